"""Refusals of channel pruning: short, naming the layer and the cause, suggesting what works;
and the memory and time bound on tracing a model's groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from autoprune import engine
from autoprune.config import Policy
from autoprune.engine.graph import PrunableGraph
from autoprune.engine.probe import channel_shuffles
from autoprune.errors import AutopruneError

EXAMPLE = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))


class SliceNet(nn.Module):
    """``a``'s channels are sliced in halves and added: removing one of them breaks the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(4, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        x = torch.relu(self.c(torch.relu(self.b(x[:, :4] + x[:, 4:]))))
        return self.fc(x.mean((2, 3)))


def test_a_group_that_breaks_the_forward_pass_is_named_and_keep_prunes_the_rest():
    model = SliceNet().eval()
    with pytest.raises(AutopruneError) as err:
        PrunableGraph(model, EXAMPLE).dry_run()
    message = str(err.value)
    assert "group 'a' breaks the forward pass" in message and "--keep 'a'" in message
    assert len(message) < 300 and "\n" not in message
    policy = Policy(keep=["a"])
    graph = engine.leave_kept(PrunableGraph(model, EXAMPLE), model, policy, EXAMPLE)
    graph.dry_run()  # the other groups are fine
    assert sorted(graph.group_names()) == ["b", "c"]
    graph.prune({"b": np.array([0, 1]), "c": np.array([3])})
    assert model.b.out_channels == 6 and model.c.out_channels == 7 and model.a.out_channels == 8
    assert model(EXAMPLE).shape == (1, 3)


def test_a_channel_shuffle_is_found_in_the_block_that_does_it():
    import torchvision

    model = torchvision.models.shufflenet_v2_x0_5(num_classes=3)
    found = channel_shuffles(model, torch.zeros(1, 3, 32, 32))
    assert found[:2] == ["stage2.0", "stage2.1"] and len(found) == 16  # one per block of the 3 stages
    assert channel_shuffles(torchvision.models.resnet18(num_classes=3), torch.zeros(1, 3, 32, 32)) == []


TRACE = """
import torch, torchvision
from autoprune.engine.graph import PrunableGraph
from autoprune.errors import AutopruneError
try:
    print(len(PrunableGraph(torchvision.models.resnet50(num_classes=3).eval(), torch.zeros(1, 3, 32, 32)).groups))
except AutopruneError as exc:
    print(exc)
"""


@pytest.mark.parametrize("variable, value, said", [("SECONDS", "0", "(0 s;"), ("MEMORY_GB", "0.00001", " GB;")])
def test_tracing_the_groups_past_its_bound_stops_with_a_clear_error(variable, value, said):
    """In a fresh process (its memory grows while it traces; a long-lived one may reuse freed
    memory), once past the bound and once within the defaults."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOPRUNE_GRAPH_")}
    run = [sys.executable, "-c", TRACE]
    bounded = subprocess.run(run, env={**env, f"AUTOPRUNE_GRAPH_{variable}": value}, capture_output=True, text=True)
    message = bounded.stdout.strip()
    assert message.startswith("tracing ResNet's channel groups went past its bound") and said in message, bounded
    assert int(subprocess.run(run, env=env, capture_output=True, text=True).stdout) > 10  # within the defaults
