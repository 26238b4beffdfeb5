"""Scoring cost of every pruning criterion, relative to one forward+backward pass.

What is measured: for each model and each criterion, the wall time of one
``criterion.score(ctx)`` call (the scoring step of the engine, without the finite check and
the channel reduction), with the context the engine builds: the model in eval mode, its
conv/linear layers (:func:`autoprune.engine.criteria.scored_modules`), the scoring data (data
criteria only), seed 0, structure ``unstructured`` (``channel`` for fpgm and bn_scale, which
score channels only), the scoring batch as the example input and density 0.1 (synflow's
target: its exponential schedule runs its default 100 rounds down to 10% of the weights).
Every criterion runs with its default options (fisher ``chunk_mb`` 256, hutchinson 10
probes, ...).

The reference is ONE forward+backward pass on a 64-sample batch: cross-entropy of the
model's logits, ``loss.backward()`` to all parameters (gradients cleared outside the
timing). It is timed in the same run, side by side: in every repeat each criterion call is
preceded by one reference pass, and the criteria are visited in alternating order, so drift
and load hit both alike. Times are medians of ``--repeats`` timed calls after ``--warmup``
untimed ones; the reference is the median of all its passes for that model.

Models and scoring data (untrained weights, seed 0; timing does not depend on training):

* ``resnet18``, ``resnet50`` (or any torchvision classifier name): ``weights=None``,
  ``num_classes=10``; scoring data one batch of 64 random 3x32x32 images (standard normal)
  with random labels, seeded;
* ``default``: the default task's model (``digits`` task, ``digits_resnet``, 1x8x8 inputs);
  scoring data, with ``--default-data batch`` (the default), one batch of 64 samples drawn
  (seeded) from the training split; with ``--default-data scoring``, the engine's scoring
  subset ``engine.scoring_batches(task, 10, 0)``: 10 samples per class, 100 samples in two
  batches (64 + 36). The reference pass always uses one 64-sample batch (the first).

The growth table (when resnet18 and resnet50 are both measured) puts each criterion's
time50/time18 next to the parameter ratio params50/params18: a criterion whose cost is
linear in the parameters has growth / param ratio near 1 (the forward+backward pass itself
grows with FLOPs, not parameters, and is listed as the first row).

Peak extra memory is measured on the untimed warm-up call (so the timed calls carry no
sampling overhead): on CPU the peak resident set size above the level before the call,
sampled every 2 ms by a thread after glibc's ``malloc_trim`` (an estimate: memory the
allocator still caches is reused without showing); on CUDA ``torch.cuda.max_memory_allocated``
above the allocated memory before the call. ``--warmup 0`` skips the memory column.

Run: ``python bench/criteria_cost.py`` (``--models resnet18 --repeats 1`` for a quick run;
``--device cuda`` on a GPU, where every timing is bracketed by CUDA synchronisation).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import _page
import torch
from torch import nn

from autoprune import engine
from autoprune.config import TaskConfig
from autoprune.engine.criteria import CRITERIA, Criterion, ScoreContext, make_criterion, scored_modules
from autoprune.engine.models import torchvision_model
from autoprune.engine.tasks import get_task

BATCH = 64
DENSITY = 0.1  # synflow's target density
CHANNEL_ONLY = ("fpgm", "bn_scale")  # criteria that score channels only
Batches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Setup:
    """One model to measure: the network, its scoring data and the reference batch."""

    name: str
    model: nn.Module
    data: Batches  # scoring batches (data criteria)
    ref: tuple[torch.Tensor, torch.Tensor]  # the 64-sample forward+backward batch
    describe: str


@dataclass
class Result:
    name: str
    params: int
    scored: int  # conv/linear weights scored
    describe: str
    ref_times: list[float] = field(default_factory=list)
    ref_mem: float | None = None
    times: dict[str, list[float]] = field(default_factory=dict)
    mem: dict[str, float | None] = field(default_factory=dict)

    @property
    def ref(self) -> float:
        return statistics.median(self.ref_times)

    def time(self, name: str) -> float:
        return statistics.median(self.times[name])


# ------------------------------------------------------------------ models and data


def torchvision_setup(name: str, device: torch.device) -> Setup:
    torch.manual_seed(0)
    model = torchvision_model(name, 10).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    describe = f"torchvision {name}(weights=None, num_classes=10); one batch of {BATCH} random 3x32x32 images"
    return Setup(name, model, [(x, y)], (x, y), describe + ", random labels")


def default_setup(device: torch.device, which: str) -> Setup:
    task = get_task(TaskConfig())
    engine.seed_everything(0)
    model = task.model_factory().to(device).eval()
    if which == "scoring":
        data = engine.scoring_batches(task, 10, 0)
        n = sum(len(y) for _, y in data)
        describe = f"engine.scoring_batches(task, 10, 0): {n} samples in {len(data)} batches"
    else:
        idx = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(0))[:BATCH]
        xs, ys = zip(*(task.train[int(i)] for i in idx))
        data = [(torch.stack(list(xs)), torch.as_tensor(ys))]
        describe = f"one batch of {BATCH} samples of the training split (seeded draw)"
    ref = (data[0][0][:BATCH], data[0][1][:BATCH])
    describe = f"default task {task.name} ({task.model_name}, input {'x'.join(map(str, task.input_shape))}); {describe}"
    return Setup("default", model, data, ref, describe)


# ------------------------------------------------------------------ timing and memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    elapsed = time.perf_counter() - t0
    del out
    return elapsed


def _trim() -> None:
    """Hand memory cached by glibc's malloc back to the system, so RSS starts from what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_mb(fn: Callable[[], object], device: torch.device) -> tuple[object, float | None]:
    """Run ``fn`` once; its result and the peak memory above the level before the call (MB)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        sync(device)
        return out, (torch.cuda.max_memory_allocated(device) - base) / 2**20
    _trim()
    try:
        base = _rss()
    except (OSError, ValueError):
        return fn(), None
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            done.wait(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out = fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], _rss())
    return out, (peak[0] - base) / 2**20


def fwd_bwd(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()


def make_context(setup: Setup, criterion: Criterion, device: torch.device) -> ScoreContext:
    structure = "channel" if criterion.name in CHANNEL_ONLY else "unstructured"
    data = [(x.to(device), y.to(device)) for x, y in setup.data] if criterion.needs_data else None
    return ScoreContext(
        model=setup.model,
        modules=scored_modules(setup.model),
        data=data,
        seed=0,
        structure=structure,
        example=setup.ref[0].to(device),
        density=DENSITY,
    )


def check_scores(name: str, model: nn.Module, scores: dict[str, torch.Tensor], before, flags) -> list[str]:
    """Problems with a criterion's output or with the state it left the model in."""
    problems = []
    bad = [n for n, s in scores.items() if not torch.isfinite(s).all()]
    if bad:
        problems.append(f"{name}: non-finite scores for {', '.join(bad[:3])}")
    after = dict(model.named_parameters())
    if model.training:
        problems.append(f"{name}: left the model in training mode")
    if any(not torch.equal(after[k], v) for k, v in before.items()):
        problems.append(f"{name}: changed the model's parameters")
    if any(after[k].requires_grad != r for k, r in flags.items()):
        problems.append(f"{name}: changed requires_grad of parameters")
    return problems


def measure(setup: Setup, names: list[str], args: argparse.Namespace, device: torch.device) -> Result:
    model = setup.model
    x, y = (t.to(device) for t in setup.ref)
    result = Result(
        setup.name,
        sum(p.numel() for p in model.parameters()),
        sum(m.weight.numel() for m in scored_modules(model).values()),
        setup.describe,
    )
    criteria = {n: make_criterion(n) for n in names}
    contexts = {n: make_context(setup, c, device) for n, c in criteria.items()}

    def reference() -> float:
        t = timed(lambda: fwd_bwd(model, x, y), device)
        model.zero_grad(set_to_none=True)
        return t

    def call(name: str) -> Callable[[], object]:
        return lambda: criteria[name].score(contexts[name])

    # warm-up (untimed): memory, sanity checks
    _, result.ref_mem = peak_extra_mb(lambda: fwd_bwd(model, x, y), device)
    model.zero_grad(set_to_none=True)
    for _ in range(args.warmup - 1):
        reference()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    flags = {k: v.requires_grad for k, v in model.named_parameters()}
    problems = []
    for n in names:
        t0 = time.perf_counter()
        scores, result.mem[n] = peak_extra_mb(call(n), device) if args.warmup else (None, None)
        if scores is not None:
            problems += check_scores(n, model, scores, before, flags)
        for _ in range(args.warmup - 1):
            call(n)()
        print(f"  [{setup.name}] {n}: warm-up {time.perf_counter() - t0:.2f} s", file=sys.stderr, flush=True)
        result.times[n] = []
    del before
    for p in problems:
        print(f"  WARNING [{setup.name}] {p}", flush=True)

    for r in range(args.repeats):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            result.ref_times.append(reference())
            result.times[n].append(timed(call(n), device))
        print(f"  [{setup.name}] repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    return result


# ------------------------------------------------------------------ report


def load() -> str:
    try:
        return "load average (1/5/15 min) " + "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "load average n/a"


def fmt_mem(mb: float | None) -> str:
    return "n/a" if mb is None else f"{mb:.0f}"


def model_blocks(res: Result, names: list[str]) -> list[str]:
    """The heading, notes and table of one model."""
    spread = max(res.ref_times) / min(res.ref_times)
    rows = [(f"(fwd+bwd, batch {BATCH})", f"{res.ref:.4f}", "1.00", fmt_mem(res.ref_mem))]
    for n in names:
        t = res.time(n)
        rows.append(
            (f"{n} (channel)" if n in CHANNEL_ONLY else n, f"{t:.4f}", f"{t / res.ref:.2f}", fmt_mem(res.mem.get(n)))
        )
    head = ["criterion", "scoring time (s)", "× fwd+bwd", "peak extra memory (MB)"]
    return [
        f"\n### {res.name}: {res.params / 1e6:.2f} M parameters, {res.scored / 1e6:.2f} M scored conv/linear weights\n",
        f"Scoring data: {res.describe}. Reference: one forward+backward pass, batch {BATCH}, median of "
        f"{len(res.ref_times)} passes (max/min of the passes {spread:.2f}: a noise indication).\n",
        _page.table(head, rows, "lrrr"),
    ]


def growth_blocks(small: Result, big: Result, names: list[str]) -> list[str]:
    ratio = big.params / small.params
    head = ["criterion", f"time {small.name} (s)", f"time {big.name} (s)", "growth (time ratio)", "params ratio"]
    head.append("growth / params ratio")
    rows = []
    for n, a, b in [("(fwd+bwd)", small.ref, big.ref)] + [(n, small.time(n), big.time(n)) for n in names]:
        g = b / a if a > 0 else float("inf")
        rows.append((n, f"{a:.4f}", f"{b:.4f}", f"{g:.2f}x", f"{ratio:.2f}x", f"{g / ratio:.2f}"))
    return [
        f"\n### growth {small.name} → {big.name}: params ratio {ratio:.2f}x "
        f"({big.params / 1e6:.2f} M / {small.params / 1e6:.2f} M)\n",
        _page.table(head, rows, "l" + "r" * 5),
    ]


def protocol(args, names: list[str], models: list[str], device: torch.device, loads: list[str]) -> str:
    timing = "bracketed by CUDA synchronisation" if device.type == "cuda" else f"{args.threads} torch thread(s)"
    memory = "not measured (no warm-up)" if not args.warmup else "measured on the first warm-up call"
    return (
        f"One `criterion.score(ctx)` call of each criterion ({_page.listing(names)}), as the engine makes it: "
        f"structure unstructured except {_page.listing(CHANNEL_ONLY)} (channel), density {DENSITY} (synflow's "
        f"target), default options, seed 0; on {device} ({timing}). Models: {_page.listing(models)} (untrained, "
        "seed 0; each one's scoring data below). "
        f"The reference is one forward+backward pass on a {BATCH}-sample batch, run before every timed criterion "
        f"call, the criteria visited in alternating order; times are medians of {args.repeats} timed call(s) after "
        f"{args.warmup} untimed one(s). Peak extra memory: {memory}. {_page.listing(loads).capitalize()}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        default="resnet18,resnet50,default",
        help="comma-separated: torchvision names and/or 'default' (the digits task's model)",
    )
    parser.add_argument("--criteria", default="all", help="comma-separated criterion names, or 'all'")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per criterion (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per criterion (memory: the first)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--default-data",
        choices=("batch", "scoring"),
        default="batch",
        help="default model's scoring data: one 64-sample training batch, or engine.scoring_batches(task, 10, 0)",
    )
    _page.add_arguments(parser)
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    page = _page.Page(__file__, "Scoring cost of every pruning criterion, relative to one forward+backward pass", args)
    names = CRITERIA.names() if args.criteria == "all" else [c.strip() for c in args.criteria.split(",") if c.strip()]
    for n in names:
        CRITERIA.get(n)  # fails early with the list of names
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    device = engine.resolve_device(args.device)

    torch.set_num_threads(args.threads)
    print(f"machine: {_page.machine()}; torch threads: {torch.get_num_threads()}; device: {device}")
    print(f"criteria: {', '.join(names)}; warm-up {args.warmup}, repeats {args.repeats} (median)")
    loads = [f"{load()} at the start"]
    print(f"{loads[0]} (other processes on the machine make timings noisy)")

    results: dict[str, Result] = {}
    for m in models:
        print(f"measuring {m} ...", file=sys.stderr, flush=True)
        setup = default_setup(device, args.default_data) if m == "default" else torchvision_setup(m, device)
        results[m] = measure(setup, names, args, device)
        del setup
    loads.append(f"{load()} at the end")

    for res in results.values():
        page.show(*model_blocks(res, names))
    if "resnet18" in results and "resnet50" in results:
        page.show(*growth_blocks(results["resnet18"], results["resnet50"], names))
    page.write(protocol(args, names, models, device, loads))


if __name__ == "__main__":
    main()
