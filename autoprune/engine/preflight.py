"""Checks on an untrained model before any training or data-heavy work: what ``autoprune
prune`` and ``search`` run first, so a model, a policy or a budget that cannot work fails in
seconds, with the reason."""

from __future__ import annotations

import torch

from ..config import Budget, Policy
from ..errors import AutopruneError, first_line
from .checkpoint import room_to_save
from .graph import PrunableGraph
from .measure import check_latency_batch, measure
from .solver import solve_channels
from .stages import channel_problem, check_budget, leave_kept, score, solve_unstructured


def preflight(task, policy: Policy, budget: Budget, latency_batch: int = 1, device=None) -> int:
    """Checks on an untrained model, before training or data-heavy work: the model runs on
    the task's input, the dependency graph handles every layer, per-layer names exist, and
    the budget is reachable (it depends on the structure and ``max_ratio`` alone), and a
    ``latency_batch`` fits in ``device``'s memory (:func:`check_latency_batch`). Returns
    the disk space that saving the model needs (``checkpoint.room_to_save``)."""
    example = task.example_input()
    try:  # building it too: a model whose windows or embeddings need another size says so there
        model = task.model_factory().eval()
        with torch.no_grad():
            model(example)
    except Exception as exc:  # noqa: BLE001 - the model's own error, reported plainly
        raise AutopruneError(
            f"model {task.model_name!r} cannot run on the task's input of shape {tuple(example.shape)} "
            f"({first_line(exc, 120)}); it may need another --image-size"
        ) from None
    check_budget(policy, budget)
    check_latency_batch(model, example, latency_batch, device or torch.device("cpu"))
    size = room_to_save(model)
    scores = score(model, Policy(criterion="magnitude", structure=policy.structure), None, 0)
    if policy.structure != "channel":  # the solver also checks per_layer names against the maskable layers
        solve_unstructured(model, task, policy, budget, scores, measure(model, task.input_shape, None, False))
        return size
    graph = PrunableGraph(model, example, embedding=policy.embedding)
    graph = leave_kept(graph, model, policy, example)
    graph.dry_run()
    names, sizes, channel, costs = channel_problem(model, example, policy, scores, graph)
    if budget.kind == "latency":
        return size  # reachable or not is known once the latency table is built (on the trained model's device)
    dense = (costs.total_flops, costs.total_params)
    step = policy.round_to if isinstance(policy.round_to, int) else 1  # auto: known once the table is
    solve_channels(names, sizes, channel, policy, budget, costs.cost, dense, step=step)
    return size
