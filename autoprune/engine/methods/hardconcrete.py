"""Hard-concrete gates trained with an L0 cost budget (Louizos et al. 2018), then an exact prune.

Every channel of every prunable group gets a gate z in [0, 1] that multiplies the channel
where its consumers (the conv and linear layers reading it) take it in, so each of them sees
the gated channel. With u ~ U(0, 1) drawn once per channel and forward pass in training,

    s = sigmoid((log u - log(1 - u) + log_alpha) / beta),  z = min(1, max(0, s (zeta - gamma) + gamma))

and at evaluation z = min(1, max(0, sigmoid(log_alpha) (zeta - gamma) + gamma)); the gate
is nonzero with probability P = sigmoid(log_alpha - beta log(-gamma / zeta)) (beta = 2/3,
gamma = -0.1, zeta = 1.1, the paper's). The ``log_alpha`` live outside the model: their own
Adam optimiser (without momentum) steps them after each backward pass, they stay within
[log 0.01, log 100] as in the paper's reference code, and they are never saved with the model.

The expected kept cost E[c] under the keep probabilities P (a conv/linear layer keeps its
dense cost times the expected kept shares of its input and output channels) is steered to a
target t by the augmented Lagrangian of the equality E[c] = t (the method of multipliers,
Hestenes 1969, Powell 1969):

    loss += lambda (E[c] - t) + (rho / 2) (E[c] - t)^2,  lambda <- lambda + rho (E[c] - t) after every step

which is the two-sided form lambda1 (c - t) + lambda2 (c - t)^2 of Wang et al. 2020
("Structured pruning of large language models") with lambda2 held at rho / 2: the quadratic
term damps the loop that plain dual ascent on lambda alone would make oscillate around t,
and lambda may turn negative to reopen gates when the expected cost falls below t. The
target falls linearly from the starting E[c] to the budget over the first half of the
gates' steps, then holds at the budget (Wang et al.'s target warm-up). The gates train with
the weights over the first ``GATE_END`` of the fine-tuning steps; then the keep
probabilities are the channel scores of one exact prune to the budget, the deterministic
gates are folded into the consumers' weights, the BN statistics are re-estimated (those
gathered under the random gates do not describe the network with fixed ones), the pruned
channels are held at zero while the rest of fine-tuning recovers, and they are removed at
the end.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
from torch import nn

from ...schema import number
from ..graph import PRUNABLE_TYPES, PrunableGraph, clone
from ..hooks import ChannelMask, TrainHook
from ..measure import flops_by_module
from ..stages import Pruned, leave_kept
from .base import Method, pruned_at_once, register
from .context import MethodContext

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1  # the hard-concrete stretch and temperature of Louizos et al.
GATE_END = 0.75  # the gates train over this share of the fine-tuning steps; the rest recovers
TARGET_WARM = 0.5  # the target expected cost reaches the budget after this share of the gates' steps
BN_BATCHES = 16  # training batches the BN statistics are re-estimated on once the gates are fixed
EPS = 1e-6  # u is drawn from [EPS, 1 - EPS]
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(1e-2), math.log(1e2)  # the bounds of the paper's reference code


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0) of hard-concrete gates with parameters ``log_alpha``."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def log_alpha_for(keep: float) -> float:
    """The ``log_alpha`` whose gate is nonzero with probability ``keep``."""
    return math.log(keep / (1.0 - keep)) + BETA * math.log(-GAMMA / ZETA)


def sample_gate(log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A training gate for uniform noise ``u`` in (0, 1)."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def deterministic_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    """The gate at evaluation."""
    return (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def _width(module: nn.Module, dim: str) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features if dim == "in" else module.out_features
    return module.in_channels if dim == "in" else module.out_channels


class ExpectedCost:
    """The expected kept cost fraction under the gates' keep probabilities, differentiable:
    each conv/linear layer keeps its dense cost times the expected kept share of its output
    channels times that of its input channels (a depthwise conv: of its channels once);
    channels outside every gated group count as kept, and so does every other layer's cost.
    The cost is FLOPs for FLOPs and latency budgets, parameters for parameter budgets."""

    def __init__(self, model: nn.Module, example: torch.Tensor, groups: list, kind: str) -> None:
        device = next(model.parameters()).device
        total, by_module = flops_by_module(model, example)
        if kind == "params":
            total = float(sum(p.numel() for p in model.parameters()))
            by_module = {
                n: float(sum(p.numel() for p in m.parameters(recurse=False))) for n, m in model.named_modules()
            }
        self.total = total
        self.layers = []
        sides: dict[tuple[str, str], list] = {}
        for group in groups:
            for it in group.items:
                roots = torch.as_tensor(it.root_idxs, device=device)
                sides.setdefault((it.module, it.dim), []).append((group.name, roots))
        fixed = total
        for name, m in model.named_modules():
            if not isinstance(m, PRUNABLE_TYPES) or not by_module.get(name):
                continue
            fixed -= by_module[name]
            depthwise = getattr(m, "groups", 1) > 1 and m.groups == _width(m, "in")
            ins, outs = sides.get((name, "in"), []), sides.get((name, "out"), [])
            if depthwise and outs:
                ins = []  # its inputs are its outputs' channels: counted once
            self.layers.append((by_module[name], _width(m, "in"), ins, _width(m, "out"), outs))
        self.fixed = fixed

    def __call__(self, keep: dict[str, torch.Tensor]) -> torch.Tensor:
        def share(n: int, items: list) -> torch.Tensor | float:
            if not items:
                return 1.0
            kept = sum(keep[g][roots].sum() for g, roots in items)
            return (kept + (n - sum(len(r) for _, r in items))) / n

        cost = sum(c * share(cin, ins) * share(cout, outs) for c, cin, ins, cout, outs in self.layers)
        return (cost + self.fixed) / self.total


class HardConcreteGates(TrainHook):
    """One hard-concrete gate per channel of each of ``groups``, applied by forward hooks
    (:meth:`attach`, :meth:`detach`) to the inputs of the conv/linear layers that consume the
    group's channels; one sample per forward pass in training, the deterministic gate in eval.
    After each backward pass (until :meth:`stop`) the Lagrangian term is added, the gates'
    own optimiser steps and the multiplier takes its step (:meth:`after_backward`).
    ``warm``: the steps over which the target falls from the starting expected cost to the
    budget."""

    def __init__(self, model, groups, cost: ExpectedCost, budget: float, opts: dict, seed: int, warm: int) -> None:
        device = next(model.parameters()).device
        self.model, self.cost, self.budget, self.rho, self.warm = model, cost, budget, opts["dual_lr"], warm
        start = log_alpha_for(opts["init_keep"])
        self.log_alpha = {g.name: torch.full((g.size,), start, device=device, requires_grad=True) for g in groups}
        # no momentum: its lag would make the multiplier's loop overshoot the target
        self.opt = torch.optim.Adam(list(self.log_alpha.values()), lr=opts["lr"], betas=(0.0, 0.999))
        self.noise = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            self.start = self.expected = float(cost(self.keep()))
        self.lam, self.active = 0.0, True
        self.consumers: dict[str, list] = {}  # layer -> (group, input channel indices, the group's channels)
        modules = dict(model.named_modules())
        for g in groups:
            for it in g.items:
                if it.dim == "in" and isinstance(modules[it.module], PRUNABLE_TYPES):
                    idxs, roots = torch.as_tensor(it.idxs, device=device), torch.as_tensor(it.root_idxs, device=device)
                    self.consumers.setdefault(it.module, []).append((g.name, idxs, roots))
        self.handles: list = []
        self.gates: dict[str, torch.Tensor] = {}

    def keep(self) -> dict[str, torch.Tensor]:
        """P(z != 0) per group, differentiable."""
        return {g: keep_probability(a) for g, a in self.log_alpha.items()}

    def attach(self) -> None:
        self.handles.append(self.model.register_forward_pre_hook(self._draw))
        for name in self.consumers:
            module = self.model.get_submodule(name)
            self.handles.append(module.register_forward_pre_hook(partial(self._gate, name)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.gates = [], {}

    def _draw(self, model, args) -> None:
        if not model.training:
            self.gates = {g: deterministic_gate(a) for g, a in self.log_alpha.items()}
            return
        self.gates = {}
        for g, a in self.log_alpha.items():
            u = torch.rand(a.shape, generator=self.noise, device=a.device) * (1 - 2 * EPS) + EPS
            self.gates[g] = sample_gate(a, u)

    def _vector(self, name: str, width: int, gates: dict[str, torch.Tensor]) -> torch.Tensor:
        """The gate of each of layer ``name``'s ``width`` input channels (1 where ungated)."""
        vec = torch.ones(width, device=next(iter(gates.values())).device)
        for g, idxs, roots in self.consumers[name]:
            vec = vec.index_copy(0, idxs, gates[g][roots])
        return vec

    def _gate(self, name: str, module: nn.Module, args: tuple):
        x = args[0]
        vec = self._vector(name, _width(module, "in"), self.gates).to(x.dtype)
        if not isinstance(module, nn.Linear):
            vec = vec.view(1, -1, *([1] * (x.dim() - 2)))
        return (x * vec, *args[1:])

    def fold(self) -> None:
        """Scale each consumer's weights by its deterministic input gates, so the model
        without the hooks computes what it did in eval with them."""
        with torch.no_grad():
            gates = {g: deterministic_gate(a) for g, a in self.log_alpha.items()}
            for name in self.consumers:
                module = self.model.get_submodule(name)
                vec = self._vector(name, _width(module, "in"), gates)
                w = module.weight
                if isinstance(module, nn.Linear):
                    w.mul_(vec.view(1, -1).to(w.dtype))
                    continue
                per_in, per_out = w.shape[1], w.shape[0] // module.groups  # channels per conv group
                rows = torch.arange(w.shape[0], device=w.device) // per_out * per_in
                scale = vec[rows[:, None] + torch.arange(per_in, device=w.device)[None, :]]
                w.mul_(scale.view(*scale.shape, *([1] * (w.dim() - 2))).to(w.dtype))

    def stop(self) -> None:
        self.active = False

    def target(self, step: int) -> float:
        """The expected cost aimed at: from the starting one down to the budget over the
        ``warm`` first steps (the target warm-up of Wang et al. 2020), then the budget."""
        ahead = max(0.0, self.start - self.budget)
        return self.budget + ahead * max(0.0, 1.0 - step / self.warm)

    def after_backward(self, step: int, total: int) -> None:
        """Add the augmented Lagrangian lambda g + (rho / 2) g^2, g = E[cost] - target, to the
        gates' gradients (the task loss's are there already), step their optimiser, keep
        log_alpha within the reference code's bounds, then lambda <- lambda + rho g."""
        if not self.active:
            return
        cost = self.cost(self.keep())
        self.expected, target = float(cost.detach()), self.target(step)
        gap = cost - target
        (self.lam * gap + self.rho / 2 * gap**2).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for a in self.log_alpha.values():
                a.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)
        self.lam += self.rho * (self.expected - target)


def prune_by_gates(ctx: MethodContext, model: nn.Module, keep: dict[str, np.ndarray]) -> Pruned:
    """A copy of ``model`` pruned exactly to the budget with the keep probabilities as the
    channel scores (not normalised per group: they compare across groups as they are), checked
    against the really pruned model and solved again when it misses, as the criterion path does."""
    return ctx.prune(model, ctx.budget, channel=keep)


class GatePhase(TrainHook):
    """Ends the gates' training at step ``end``: takes the hooks off, prunes a copy to the
    budget by the keep probabilities (measured on the trained weights: folded gates at zero
    would read as masked weights), folds the deterministic gates into the weights, masks the
    pruned channels (``mask`` holds them at zero from then on) and re-estimates the BN
    statistics. ``step`` and ``expected``: when, and the expected cost the gates reached."""

    def __init__(self, ctx: MethodContext, gates: HardConcreteGates, mask: ChannelMask, end: int) -> None:
        self.ctx, self.gates, self.mask, self.end = ctx, gates, mask, end
        self.pruned: Pruned | None = None
        self.step, self.expected = end, math.nan

    def on_step_start(self, step: int, total: int) -> None:
        if step == self.end:
            self.prune(step)

    def prune(self, step: int) -> None:
        ctx, gates, model = self.ctx, self.gates, self.mask.graph.model
        gates.stop()
        gates.detach()
        keep = {g: p.detach().cpu().double().numpy() for g, p in gates.keep().items()}
        self.pruned = prune_by_gates(ctx, model, keep)
        self.step, self.expected = step, gates.expected
        gates.fold()
        self.mask.set(self.pruned.plan)
        ctx.recalibrate(model, ctx.policy.finetune.bn_recalibrate or BN_BATCHES)
        ctx.pruned(self.pruned)


@register
class HardConcrete(Method):
    """Gates (:class:`HardConcreteGates`) train with the weights over the first ``GATE_END``
    of the fine-tuning steps, their expected cost steered to the budget; then one exact prune
    by their keep probabilities (:class:`GatePhase`), the pruned channels held at zero while
    the rest of fine-tuning recovers, and removed at the end. Without fine-tuning it prunes at
    once by the policy's criterion."""

    name = "hardconcrete"
    family = "learned masks"
    summary = "Hard-concrete channel gates with an L0 cost budget, then an exact prune (Louizos et al. 2018)."
    structures = ("channel",)
    options = {
        "lr": number(0.0, low_open=True, optional=True, most=1e3),  # the gates' Adam learning rate
        "init_keep": number(0.0, 1.0, low_open=True, high_open=True, optional=True),  # P(z != 0) at the start
        "dual_lr": number(0.0, optional=True, most=1e6),  # rho: the penalty's weight and the multiplier's step
    }
    defaults = {"lr": 0.5, "init_keep": 0.9, "dual_lr": 10.0}
    space = {"lr": [0.1, 0.5]}

    def run(self, ctx: MethodContext) -> Pruned:
        opts = self.settings(ctx.policy)
        if ctx.policy.finetune.epochs == 0:
            return pruned_at_once(ctx)
        task, policy, work = ctx.task, ctx.policy, clone(ctx.dense)
        example = task.example_input().to(ctx.device)
        graph = leave_kept(PrunableGraph(work, example, embedding=policy.embedding), work, policy, example)
        cost = ExpectedCost(work, example, graph.groups, ctx.budget.kind)
        total = policy.finetune.epochs * ctx.steps_per_epoch()
        end = max(1, int(round(GATE_END * total)))
        warm = max(1, int(round(TARGET_WARM * end)))
        gates = HardConcreteGates(work, graph.groups, cost, ctx.budget.fraction, opts, ctx.cfg.seed, warm)
        mask = ChannelMask(graph)
        phase = GatePhase(ctx, gates, mask, end)
        gates.attach()
        try:
            epochs = ctx.train(work, policy.finetune, "fine-tune (hard-concrete gates)", hooks=[phase, gates, mask])
        finally:
            gates.detach()
        if phase.pruned is None:  # the gates trained to the last step
            phase.prune(total)
        mask.apply()
        model, history = mask.pruned_copy(example)
        ctx.log(phase.step, "gates trained", ctx.budget.fraction, model)
        ctx.events[-1]["expected"] = phase.expected
        out = phase.pruned
        ratios = {g: len(mask.plan[g]) / mask.sizes[g] for g in out.plan}
        sizes = {g: mask.sizes[g] for g in out.plan}
        return ctx.finish(
            Pruned(model, "channel", history, ratios, out.estimate, out.attempts, epochs, plan=out.plan, sizes=sizes)
        )
