"""The collapse report of a pruned model: what share of each group or layer is kept, and
which were emptied."""

from __future__ import annotations

from typing import Any

from ...config import Policy
from ..solver import max_masked, max_pruned
from .budget import Pruned


def collapse_report(pruned: Pruned, policy: Policy) -> dict[str, Any]:
    """Per group (channel) or layer (unstructured): the kept fraction; and which were pruned
    to their floor (one channel, or ``max_ratio``) or emptied, so collapse is visible."""
    kept, at_floor, empty = {}, [], []
    for name, ratio in pruned.ratios.items():
        size = pruned.sizes.get(name)
        kept[name] = 1.0 - ratio
        if not size:
            continue
        removed = int(round(ratio * size))
        if removed >= size:
            empty.append(name)
        elif removed >= (max_pruned if pruned.structure == "channel" else max_masked)(size, policy.max_ratio):
            at_floor.append(name)
    return {"kept_fraction": kept, "at_floor": at_floor, "empty": empty}
