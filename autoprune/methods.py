"""Pruning methods: when pruning happens and how the network recovers (PRUNING.md section 5).

A method takes the dense model and returns a :class:`~autoprune.engine.Pruned` model that
meets the budget and has been trained; :func:`autoprune.engine.run` measures it.
"""

from __future__ import annotations

from collections.abc import Callable

from . import engine as E
from .graph import clone
from .registry import Registry

METHODS: Registry[Callable[..., E.Pruned]] = Registry("method")


@METHODS.register("oneshot")
def oneshot(task, dense, policy, budget, cfg, dense_cost, device, on_epoch) -> E.Pruned:
    """Train -> prune once -> fine-tune (Han et al. 2015)."""
    work = clone(dense)
    data = E.scoring_batches(task, cfg.scoring_per_class, cfg.seed)
    if policy.bn_warmup:
        E.bn_warmup(work, data, device)
    scores = E.score(work, policy, data, cfg.seed)
    pruned = E.prune_to_budget(work, task, policy, budget, scores, dense_cost)
    pruned.epochs = E.train(pruned.model, task, policy.finetune, cfg.seed, device,
                            desc="fine-tune", progress=cfg.progress, on_epoch=on_epoch)  # fmt: skip
    return pruned
