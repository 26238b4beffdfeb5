"""The prunable groups of a model, from torch-pruning's dependency graph, and a cost model.

A *group* is every coupled slice of one channel set: the filters of a conv, its BN entries,
the input slices of every consumer and, through residual adds and concatenations, the same
channels of every layer feeding the same sum. A group is pruned as a unit. torch-pruning is
used for the graph and the physical removal only; scores come from :mod:`autoprune.engine.criteria`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import AutopruneError
from .models import classifier_layer, first_tensor, in_mode, output_layers, train_batch

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


@dataclass
class GroupItem:
    """One coupled slice: ``module``'s ``dim`` ("out" or "in") at ``idxs``, which map to the
    group's channels ``root_idxs`` (several idxs per channel after a flatten)."""

    module: str
    dim: str
    idxs: np.ndarray
    root_idxs: np.ndarray


@dataclass
class Group:
    """A set of coupled channels, named after its root layer (the first conv/linear)."""

    name: str
    size: int  # number of channels
    items: list[GroupItem] = field(default_factory=list)

    @property
    def max_prunable(self) -> int:
        return self.size - 1


def _quiet_tp():
    import logging
    import warnings

    import torch_pruning as tp

    warnings.filterwarnings("ignore", module="torch_pruning")
    logging.getLogger("torch_pruning").setLevel(logging.ERROR)
    return tp


def build_dependency_graph(model: nn.Module, example_input: torch.Tensor):
    """torch-pruning's DependencyGraph of ``model``, with a clear error when tracing fails.
    Traced in train mode (BN statistics restored after): fine-tuning runs what was traced,
    auxiliary classifiers that only run in training included."""
    tp = _quiet_tp()
    try:
        with in_mode(model, train=True), torch.enable_grad():
            # torch-pruning sets eval mode before its pass; the forward function sets train back
            dg = tp.DependencyGraph().build_dependency(
                model, train_batch(example_input), forward_fn=_train_forward, verbose=False
            )
    except Exception as exc:  # noqa: BLE001 - any tracing failure is the model's, reported plainly
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        if _evaluates(model, example_input):
            raise AutopruneError(
                f"{type(model).__name__}'s training pass fails on input {tuple(example_input.shape[1:])} ({first}), "
                "though evaluation runs (an auxiliary head may need larger images); try a larger --image-size"
            ) from None
        raise AutopruneError(
            f"the dependency graph cannot trace this model ({type(model).__name__}): {first}"
        ) from None
    return dg


def _evaluates(model: nn.Module, example_input: torch.Tensor) -> bool:
    try:
        output_shape(model, example_input)
        return True
    except Exception:  # noqa: BLE001 - only whether it runs matters
        return False


def _train_forward(model: nn.Module, x: torch.Tensor):
    model.train()
    return model(x)


class PrunableGraph:
    """The channel groups of a model and what each group touches."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor) -> None:
        self.model = model
        self.example_input = example_input
        self.dg = build_dependency_graph(model, example_input)
        names = {m: n for n, m in model.named_modules()}
        heads = output_layers(model, example_input, train=True)  # auxiliary classifiers' too
        self.output_layer = names[classifier_layer(model, example_input)]
        self.output_shape = output_shape(model, example_input)
        self.groups: list[Group] = _groups_of(self.dg, names, [model.get_submodule(self.output_layer), *heads])
        if not self.groups:
            raise AutopruneError("the model has no prunable channel group besides its classifier")
        self.by_name = {g.name: g for g in self.groups}

    def group_names(self) -> list[str]:
        return [g.name for g in self.groups]

    def check_names(self, names) -> None:
        unknown = sorted(set(names) - set(self.by_name))
        if unknown:
            raise AutopruneError(
                f"unknown group name(s) {', '.join(unknown)}; this model's groups are: {', '.join(self.group_names())}"
            )

    def prune(self, plan: dict[str, np.ndarray]) -> None:
        """Physically remove the channels ``plan`` names (group name -> channel indices).
        Operates on ``self.model``; the history is recorded in ``self.dg``. Then runs the
        model once on the example input and fails if its output shape changed."""
        self._remove(plan)
        shape = output_shape(self.model, self.example_input)
        if shape != self.output_shape:
            pruned = [g for g in self.groups if plan.get(g.name) is not None and len(plan[g.name]) > 0]
            at_output = [g for g in pruned if any((it.module, it.dim) == (self.output_layer, "out") for it in g.items)]
            culprits = ", ".join(repr(g.name) for g in at_output or pruned)
            raise self._shape_error(f"pruning group(s) {culprits}" if culprits else "pruning", shape)

    def _remove(self, plan: dict[str, np.ndarray]) -> None:
        for group in self.groups:
            idxs = plan.get(group.name)
            if idxs is None or len(idxs) == 0:
                continue
            if len(idxs) >= group.size:
                raise AutopruneError(f"refusing to empty group {group.name!r}")
            module = self.model.get_submodule(group.name)
            pruner = self.dg.get_pruner_of_module(module)
            tp_group = self.dg.get_pruning_group(module, pruner.prune_out_channels, sorted(int(i) for i in idxs))
            tp_group.prune()

    def dry_run(self) -> None:
        """Prune one channel of every group on a copy and run it: a layer the dependency
        graph mis-handles (a custom layer, a channel shuffle, channel slicing) fails here,
        on an untrained model, instead of after training, and so does a group whose pruning
        changes the model's output shape. Names the groups that break."""

        def attempt(groups: list[Group]) -> tuple[tuple | None, str | None]:
            """(output shape, None) with channel 0 of each of ``groups`` removed, or (None, error)."""
            trial = PrunableGraph(copy.deepcopy(self.model).eval(), self.example_input)
            trial.groups = groups
            try:
                trial._remove({g.name: np.array([0]) for g in groups})
                with in_mode(trial.model, train=True), torch.no_grad():
                    trial.model(train_batch(self.example_input))  # what fine-tuning runs (auxiliary heads too)
                return output_shape(trial.model, self.example_input), None
            except Exception as exc:  # noqa: BLE001 - reported to the user below
                return None, (str(exc).splitlines() or [type(exc).__name__])[0]

        shape, error = attempt(self.groups)
        if error is None and shape == self.output_shape:
            return
        results = [(g.name, *attempt([g])) for g in self.groups]
        for name, one_shape, one_error in results:
            if one_error is None and one_shape != self.output_shape:
                raise self._shape_error(f"pruning group {name!r}", one_shape)
        culprits = [(n, e) for n, _, e in results if e is not None]
        if error is None and not culprits:
            raise self._shape_error("pruning all groups together", shape)
        detail = "; ".join(f"{n}: {e}" for n, e in culprits[:3]) or "the groups together"
        raise AutopruneError(
            "channel pruning cannot handle this model: removing a channel of group(s) "
            f"{', '.join(n for n, _ in culprits) or '(several)'} breaks its forward pass ({detail}). "
            "The dependency graph follows standard layers (conv incl. depthwise/grouped, linear, "
            "norms, residual adds, concatenations) but not custom layers with their own weights, "
            "channel shuffles or channel slicing; use --structure unstructured"
        )

    def _shape_error(self, what: str, shape: tuple | None) -> AutopruneError:
        return AutopruneError(
            f"{what} changes the model's output shape from {self.output_shape} to {shape}: channels that "
            f"reach the model's output cannot be pruned (the output layer, whose channels are kept, was "
            f"taken to be {self.output_layer!r}); use --structure unstructured"
        )

    def history(self) -> list:
        """Replayable pruning history: [root module name, is_out_channel, indices] per step."""
        return [[n, bool(o), [int(i) for i in idx]] for n, o, idx in self.dg.pruning_history()]

    def mask(self, plan: dict[str, np.ndarray]) -> None:
        """Zero the planned channels' outputs instead of removing them: filters, biases and
        norm scale/shift. The network then computes what the physically pruned one does."""
        with torch.no_grad():
            for group in self.groups:
                idxs = plan.get(group.name)
                if idxs is None or len(idxs) == 0:
                    continue
                keep = np.ones(group.size, dtype=bool)
                keep[np.asarray(idxs)] = False
                for item in group.items:
                    if item.dim != "out":
                        continue
                    module = self.model.get_submodule(item.module)
                    sel = torch.as_tensor(item.idxs[~keep[item.root_idxs]], dtype=torch.long)
                    for p in (getattr(module, "weight", None), getattr(module, "bias", None)):
                        if isinstance(p, torch.Tensor) and p.dim() >= 1:
                            p[sel] = 0.0


def output_shape(model: nn.Module, example_input: torch.Tensor) -> tuple | None:
    """The shape of the model's output (its first tensor) on ``example_input``: one forward
    pass without gradients in eval mode; the training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = first_tensor(model(example_input))
    finally:
        model.train(was_training)
    return None if out is None else tuple(out.shape)


def _groups_of(dg, names: dict, output_layers: list[nn.Module]) -> list[Group]:
    """The prunable groups of a dependency graph: every group but those that would prune
    an output layer's output channels (names: module -> qualified name)."""
    groups = []
    for tp_group in dg.get_all_groups(ignored_layers=output_layers, root_module_types=PRUNABLE_TYPES):
        root = tp_group[0].dep.target.module
        group = Group(name=names[root], size=len(tp_group[0].idxs))
        for item in tp_group:
            module = item.dep.target.module
            if not isinstance(module, nn.Module) or module not in names:
                continue  # element-wise ops, reshapes: nothing to score or count
            dim = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
            group.items.append(GroupItem(names[module], dim, np.asarray(item.idxs), np.asarray(item.root_idxs)))
        if group.size > 1:
            groups.append(group)
    return groups


def replay_history(model: nn.Module, example_input: torch.Tensor, history: list) -> nn.Module:
    """Re-apply a recorded channel-pruning history to a freshly built dense model."""
    dg = build_dependency_graph(model, example_input)
    dg.load_pruning_history([[n, bool(o), list(idx)] for n, o, idx in history])
    return model


class CostModel:
    """FLOPs and parameters of the model after removing channels, without pruning it.

    Dense per-module FLOPs come from fvcore once; a conv or linear layer's FLOPs and weights
    scale with its kept input and output channels (a depthwise conv's with its channels), a
    norm layer's with its channels. Other modules keep their cost. The engine checks the
    estimate against fvcore on the really pruned model.
    """

    def __init__(self, graph: PrunableGraph, module_flops: dict[str, float], total_flops: float):
        model = graph.model
        self.total_flops = float(total_flops)
        self.total_params = float(sum(p.numel() for p in model.parameters()))
        self.modules: dict[str, dict] = {}
        for name, m in model.named_modules():
            if isinstance(m, PRUNABLE_TYPES):
                cin = m.in_features if isinstance(m, nn.Linear) else m.in_channels
                cout = m.out_features if isinstance(m, nn.Linear) else m.out_channels
                groups = getattr(m, "groups", 1)
                depthwise = groups > 1 and groups == cin
                kernel = int(np.prod(m.weight.shape[2:])) if m.weight.dim() > 2 else 1
                bias = m.bias is not None
                self.modules[name] = dict(
                    kind="depthwise" if depthwise else ("grouped" if groups > 1 else "dense"),
                    cin=cin,
                    cout=cout,
                    groups=groups,
                    kernel=kernel,
                    bias=bias,
                    flops=float(module_flops.get(name, 0.0)),
                    params=float(sum(p.numel() for p in m.parameters(recurse=False))),
                )
            elif isinstance(m, NORM_TYPES):
                self.modules[name] = dict(
                    kind="norm",
                    cin=m.num_features,
                    cout=m.num_features,
                    flops=float(module_flops.get(name, 0.0)),
                    params=float(sum(p.numel() for p in m.parameters(recurse=False))),
                )
        self.sizes = [g.size for g in graph.groups]  # channels per group
        # per group: (module name, dim, root index of each idx) for the modules we model
        self.effects = [
            [(it.module, it.dim, it.root_idxs) for it in g.items if it.module in self.modules] for g in graph.groups
        ]

    def _cut(self, removed: list[np.ndarray]) -> dict[str, dict[str, int]]:
        """Per modelled module touched by ``removed``: channels cut from its "in" and "out"."""
        cut: dict[str, dict[str, int]] = {}
        for effects, mask in zip(self.effects, removed):
            if not mask.any():
                continue
            for module, dim, roots in effects:
                n = int(mask[roots].sum())
                if n:
                    c = cut.setdefault(module, {"in": 0, "out": 0})
                    c[dim] += n
        return cut

    def widths(self, removed: list[np.ndarray]) -> dict[str, tuple[int, int]]:
        """(input, output) channels left to each module whose channels ``removed`` cuts."""
        out = {}
        for module, c in self._cut(removed).items():
            info = self.modules[module]
            cin, cout = info["cin"] - c["in"], info["cout"] - c["out"]
            if info["kind"] in ("norm", "depthwise"):
                cin = cout = min(cin, cout)
            out[module] = (cin, cout)
        return out

    def cost(self, removed: list[np.ndarray]) -> tuple[float, float]:
        """(flops, params) after removing the channels flagged True in ``removed[g]``."""
        cut = self._cut(removed)
        flops, params = self.total_flops, self.total_params
        for module, c in cut.items():
            info = self.modules[module]
            fo = (info["cout"] - c["out"]) / info["cout"]
            fi = (info["cin"] - c["in"]) / info["cin"]
            if info["kind"] in ("norm", "depthwise"):
                scale = min(fo, fi) if info["kind"] == "depthwise" else fo
                flops -= info["flops"] * (1 - scale)
                params -= info["params"] * (1 - scale)
                continue
            flops -= info["flops"] * (1 - fo * fi)
            weight = info["cin"] * info["cout"] * info["kernel"] / info["groups"]
            kept_weight = weight * fo * fi
            kept_bias = info["cout"] * fo if info["bias"] else 0.0
            params -= (weight - kept_weight) + ((info["cout"] if info["bias"] else 0.0) - kept_bias)
        return flops, params


def clone(model: nn.Module) -> nn.Module:
    """A deep copy. Weights masked by torch's pruning reparametrisation are recomputed
    after every forward pass, so their cached value (part of an autograd graph, which
    cannot be copied) is refreshed without gradient first."""
    for m in model.modules():
        if hasattr(m, "weight_orig") and hasattr(m, "weight_mask"):
            with torch.no_grad():
                m.weight = m.weight_orig * m.weight_mask
    return copy.deepcopy(model)
