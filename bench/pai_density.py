"""Why does BN warm-up change what pruning at initialisation keeps? Per-layer kept density.

For one task, protocol and sparsity, each criterion scores the untrained, seeded network
without warm-up and with each warm-up mode, the global budget solver masks it (as
``bench/pai.py`` does), and the table gives the fraction of each layer's weights that is
kept. No training: it shows which layers' scores move when the BN statistics change, and
whether a layer is emptied (0.000) before training even starts.

Run: ``python bench/pai_density.py --task seq1d --protocol autoprune --sparsity 0.95``.
"""

from __future__ import annotations

import argparse

import _page
from pai import TASKS, budget_fraction, build_task, maskable_types, policy_for

VARIANTS = [("none", False, "scoring"), ("scoring", True, "scoring"), ("train", True, "train")]


def densities(task, criterion: str, protocol: str, sparsity: float, warmup: bool, mode: str, seed: int) -> dict:
    import dataclasses

    import torch

    from autoprune import engine
    from autoprune.config import Budget, EngineConfig
    from autoprune.engine.measure import measure
    from autoprune.engine.methods import MethodContext

    cfg = EngineConfig(seed=seed, progress=False, device="cpu")
    engine.seed_everything(seed)
    model = task.model_factory().eval()
    budget = Budget("params", budget_fraction(model, sparsity, protocol), tolerance=0.002)
    policy = dataclasses.replace(policy_for(protocol, criterion, warmup), bn_warmup_mode=mode)
    dense_cost = measure(model, task.input_shape, None, latency=False)
    run = MethodContext(task, model, policy, budget, cfg, dense_cost, torch.device("cpu"))
    run.warm_up(model)
    pruned = run.prune(model, budget)
    return {name: 1.0 - ratio for name, ratio in pruned.ratios.items()}


def _protocol(args, task, criteria: list[str]) -> str:
    model = task.model_factory()
    types = ", ".join(t.__name__ for t in maskable_types(args.protocol))
    fraction = budget_fraction(model, args.sparsity, args.protocol)
    return (
        f"Task `{args.task}` ({task.model_name}), protocol `{args.protocol}` (maskable layers: {types}), "
        f"sparsity {args.sparsity:g} of the maskable weights (a params budget of {fraction:.4f}), seed {args.seed}, "
        f"one torch thread. Each criterion ({_page.listing(criteria)}) scores the untrained, seeded network three "
        "ways: without BN warm-up (`none`), after the warm-up over the scoring subset (`scoring`) and after one pass "
        "over the training split in train mode (`train`); the global budget solver then masks it (unstructured, "
        "global scope, `max_ratio` 1.0, method `init`, as `bench/pai.py` does). No training. Each cell is the "
        "fraction of the layer's weights kept: 0.000 is a layer emptied before training starts."
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=TASKS, default="seq1d")
    p.add_argument("--protocol", choices=("study", "autoprune"), default="autoprune")
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--criteria", default="snip,grasp,fisher,hutchinson")
    p.add_argument("--seed", type=int, default=0)
    _page.add_arguments(p)
    args = p.parse_args()
    page = _page.Page(__file__, "Kept fraction per layer at initialisation, with and without BN warm-up", args)
    import torch

    torch.set_num_threads(1)
    task = build_task(args.task)
    criteria = args.criteria.split(",")
    print(
        f"# kept fraction per layer at initialisation: task {args.task}, protocol {args.protocol}, "
        f"sparsity {args.sparsity:g}, seed {args.seed}; warm-up none / scoring subset / training pass; "
        f"{_page.machine()}"
    )
    for criterion in criteria:
        cols = {v: densities(task, criterion, args.protocol, args.sparsity, w, m, args.seed) for v, w, m in VARIANTS}
        rows = [[layer, *(f"{cols[v].get(layer, 1.0):.3f}" for v, _, _ in VARIANTS)] for layer in cols["none"]]
        emptied = {v: [layer for layer in cols["none"] if cols[v].get(layer, 1.0) == 0.0] for v, _, _ in VARIANTS}
        said = "; ".join(f"warm-up `{v}`: {', '.join(f'`{n}`' for n in e)}" for v, e in emptied.items() if e)
        said = f"Layers {criterion} empties — {said}." if said else f"{criterion} empties no layer, in any variant."
        page.show(
            f"\n### {criterion}\n",
            _page.table(["layer", *(v for v, _, _ in VARIANTS)], rows, "l" + "r" * len(VARIANTS)),
            f"\n{said}",
        )
    page.write(_protocol(args, task, criteria))


if __name__ == "__main__":
    main()
