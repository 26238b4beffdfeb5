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

from pai import TASKS, budget_fraction, build_task, policy_for


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=TASKS, default="seq1d")
    p.add_argument("--protocol", choices=("study", "autoprune"), default="autoprune")
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--criteria", default="snip,grasp,fisher,hutchinson")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    task = build_task(args.task)
    variants = [("none", False, "scoring"), ("scoring", True, "scoring"), ("train", True, "train")]
    print(
        f"# kept fraction per layer at initialisation: task {args.task}, protocol {args.protocol}, "
        f"sparsity {args.sparsity:g}, seed {args.seed}; warm-up none / scoring subset / training pass"
    )
    for criterion in args.criteria.split(","):
        cols = {v: densities(task, criterion, args.protocol, args.sparsity, w, m, args.seed) for v, w, m in variants}
        layers = list(cols["none"])
        print(f"\n{criterion}\n| layer | " + " | ".join(v for v, _, _ in variants) + " |")
        print("|---|" + "---:|" * len(variants))
        for layer in layers:
            print(f"| {layer} | " + " | ".join(f"{cols[v].get(layer, 1.0):.3f}" for v, _, _ in variants) + " |")


if __name__ == "__main__":
    main()
