"""The prunable groups of a model, from torch-pruning's dependency graph, and a cost model.

A *group* is every coupled slice of one channel set: the filters of a conv, its BN entries,
the input slices of every consumer and, through residual adds and concatenations, the same
channels of every layer feeding the same sum. A group is pruned as a unit. torch-pruning is
used for the graph and the physical removal only; scores come from :mod:`autoprune.engine.criteria`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import AutopruneError, first_line
from .attention import ATTENTION_TYPES, EMBEDDING, HEADS, attention_pruners, head_rows, opaque, prune_heads
from .models import classifier_layer, first_tensor, in_mode, output_layers, train_batch
from .probe import bounded, channel_shuffles
from .zoo import check_attention

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
    size: int  # number of prunable units: channels, or in-group positions (see ``period``)
    items: list[GroupItem] = field(default_factory=list)
    period: int | None = None  # set where grouped convs tie channel p to p + period, p + 2 period...
    channels_total: int = 0  # the root layer's channels (``size`` unless folded by ``period``)
    kind: str = "channels"  # or "heads": an attention module's heads, named after its qkv layer

    def channels(self, units) -> list[int]:
        """The root layer's channel indices of ``units`` (each unit with its copies in every
        conv group where the group is folded)."""
        units = [int(u) for u in units]
        if self.period is None:
            return sorted(units)
        copies = range(0, self.channels_total, self.period)
        return sorted(u + c for u in units for c in copies)


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
        with in_mode(model, train=True), torch.enable_grad(), opaque(model):
            # torch-pruning sets eval mode before its pass; the forward function sets train back
            dg = tp.DependencyGraph().build_dependency(
                model,
                train_batch(example_input),
                forward_fn=_train_forward,
                customized_pruners=attention_pruners(),
                verbose=False,
            )
    except Exception as exc:  # noqa: BLE001 - any tracing failure is the model's, reported plainly
        first = first_line(exc, 120)
        shuffles = channel_shuffles(model, example_input)
        if shuffles:
            raise AutopruneError(
                f"channel pruning cannot follow {type(model).__name__}'s {shuffles[0] or 'forward'!r}: it shuffles "
                "channels between groups (a view splitting them, then a transpose); use --structure unstructured"
            ) from None
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

    def __init__(self, model: nn.Module, example_input: torch.Tensor, embedding: bool = False) -> None:
        """``embedding``: a vision transformer's embedding width (the residual stream) is a
        group too; off, as a policy has it by default, it is left alone."""
        self.model = model
        self.example_input = example_input
        check_attention(model)
        names = {m: n for n, m in model.named_modules()}
        self.model_names = names
        with bounded(f"tracing {type(model).__name__}'s channel groups"):
            self.dg = build_dependency_graph(model, example_input)
            heads = output_layers(model, example_input, train=True)  # auxiliary classifiers' too
            self.output_layer = names[classifier_layer(model, example_input)]
            self.output_shape = output_shape(model, example_input)
            outputs = [model.get_submodule(self.output_layer), *heads]
            self.groups: list[Group] = _groups_of(self.dg, names, outputs, embedding)
        self.groups += head_groups(model)
        self.head_steps: list[list] = []  # [attention module, "heads", [heads]] per head removal
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
        try:
            self._remove(plan)
            shape = output_shape(self.model, self.example_input)
        except (RuntimeError, IndexError) as exc:  # a layer the graph mis-handles, met only at this plan's widths
            pruned = [g.name for g in self.groups if plan.get(g.name) is not None and len(plan[g.name]) > 0]
            raise AutopruneError(
                f"pruning {len(pruned)} group(s) breaks the forward pass ({first_line(exc, 120)}); leave the "
                f"layer's group alone with --keep (one of {', '.join(map(repr, pruned[:3]))}...), "
                "or use --structure unstructured"
            ) from None
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
            if group.kind == HEADS:
                attention = group.name.rsplit(".", 1)[0]
                prune_heads(self.model.get_submodule(attention), idxs)
                self.head_steps.append([attention, HEADS, sorted(int(i) for i in idxs)])
                continue
            module = self.model.get_submodule(group.name)
            pruner = self.dg.get_pruner_of_module(module)
            tp_group = self.dg.get_pruning_group(module, pruner.prune_out_channels, group.channels(idxs))
            emptied = _emptied(self.dg, tp_group)
            if emptied is not None:
                raise AutopruneError(
                    f"removing {len(idxs)} of the {group.size} units of group {group.name!r} would remove every "
                    f"channel of {self.model_names.get(emptied, type(emptied).__name__)!r} (its channels are tied "
                    f"to others); leave the group alone with --keep {group.name!r}"
                )
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
                return None, first_line(exc)

        with bounded(
            "the dry run of channel pruning", "leave a group alone with --keep, or use --structure unstructured"
        ):
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
        if not culprits:
            raise AutopruneError(
                f"removing a channel of every group together breaks the forward pass ({error[:100]}); "
                "use --structure unstructured"
            )
        name, cause = culprits[0]
        more = f" (and {len(culprits) - 1} more group(s))" if len(culprits) > 1 else ""
        raise AutopruneError(
            f"removing a channel of group {name!r}{more} breaks the forward pass ({cause[:120]}); leave it "
            f"alone with --keep {name!r}, or use --structure unstructured"
        )

    def _shape_error(self, what: str, shape: tuple | None) -> AutopruneError:
        return AutopruneError(
            f"{what} changes the model's output shape from {self.output_shape} to {shape} (the output layer "
            f"was taken to be {self.output_layer!r}); use --keep on that group, or --structure unstructured"
        )

    def history(self) -> list:
        """Replayable pruning history: [root module name, is_out_channel, indices] per step."""
        steps = [[n, bool(o), [int(i) for i in idx]] for n, o, idx in self.dg.pruning_history()]
        return steps + self.head_steps

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
    with in_mode(model, train=False), torch.no_grad():
        out = first_tensor(model(example_input))
    return None if out is None else tuple(out.shape)


def _groups_of(dg, names: dict, output_layers: list[nn.Module], embedding: bool = False) -> list[Group]:
    """The prunable groups of a dependency graph: every group but those that would prune
    an output layer's output channels (names: module -> qualified name)."""
    groups = []
    attention = any(isinstance(m, ATTENTION_TYPES) for m in names)
    for tp_group in dg.get_all_groups(ignored_layers=output_layers, root_module_types=PRUNABLE_TYPES):
        kind = "channels"
        if attention and any(isinstance(it.dep.target.module, (*ATTENTION_TYPES, nn.LayerNorm)) for it in tp_group):
            # a transformer's embedding width: a group only where asked and where the attention
            # is torchvision's ViT's (Swin's patch merging slices tokens in a way the graph maps to
            # channels; the zoo's position embeddings and class tokens are not pruned)
            fixed = any(
                isinstance(m, ATTENTION_TYPES) and not m.embedding_group
                for m in (it.dep.target.module for it in tp_group)
            )
            if not embedding or fixed:
                continue
            kind = EMBEDDING
        root = tp_group[0].dep.target.module
        size = len(tp_group[0].idxs)
        group = Group(name=names[root], size=size, channels_total=size, kind=kind)
        widths = []  # the per-conv-group widths of the grouped convs the group touches
        for item in tp_group:
            module = item.dep.target.module
            if not isinstance(module, nn.Module) or module not in names:
                continue  # element-wise ops, reshapes: nothing to score or count
            dim = "out" if dg.is_out_channel_pruning_fn(item.dep.handler) else "in"
            group.items.append(GroupItem(names[module], dim, np.asarray(item.idxs), np.asarray(item.root_idxs)))
            width = _group_width(module, dim)
            if width is not None:
                if not np.array_equal(item.idxs, item.root_idxs):
                    widths.append(1)  # offsets into a grouped conv (a concatenation before it): left alone
                widths.append(width)
        tied = _tie_period(dg, tp_group, size)
        if widths or tied != size:
            _fold(group, math.gcd(tied, *widths))
        if group.size > 1:
            groups.append(group)
    return groups


def _tie_period(dg, tp_group, size: int) -> int:
    """The period of the channels a group's removals tie together: removing the root's
    channel ``size - 1`` also removes channel ``size - 1 - period`` where a layer reads the
    same channels twice (GhostNet's cheap depthwise op feeds on the primary conv's output and
    both are concatenated into one residual stream); ``size`` where nothing is tied."""
    root = tp_group[0].dep
    probe = dg.get_pruning_group(root.target.module, root.handler, [size - 1])
    hit = {int(i) for i in probe[0].idxs}
    return math.gcd(size, *(size - 1 - i for i in hit))


def _emptied(dg, tp_group) -> nn.Module | None:
    """A layer that removing ``tp_group`` would leave with no output channel, if any."""
    for item in tp_group:
        module = item.dep.target.module
        if not isinstance(module, PRUNABLE_TYPES) or not dg.is_out_channel_pruning_fn(item.dep.handler):
            continue
        if len(set(int(i) for i in item.idxs)) >= dg.get_pruner_of_module(module).get_out_channels(module):
            return module
    return None


def head_groups(model: nn.Module) -> list[Group]:
    """One group per attention module of :mod:`.attention`: its heads, each the ``qkv`` rows
    of its queries, keys and values and the ``proj`` columns it feeds, named after ``qkv``."""
    groups = []
    for name, m in model.named_modules():
        if isinstance(m, ATTENTION_TYPES) and m.num_heads > 1:
            rows, row_heads, cols, col_heads = head_rows(m)
            heads = np.arange(m.num_heads)
            qkv, proj = f"{name}.{m.qkv_name}", f"{name}.{m.proj_name}"
            group = Group(name=qkv, size=m.num_heads, channels_total=m.num_heads, kind=HEADS)
            group.items = [
                GroupItem(qkv, "out", np.asarray(rows), np.asarray(row_heads)),
                GroupItem(proj, "in", np.asarray(cols), np.asarray(col_heads)),
                GroupItem(name, "out", heads, heads),  # the attention itself: its cost scales with its heads
            ]
            groups.append(group)
    return groups


def _group_width(module: nn.Module, dim: str) -> int | None:
    """Channels per conv group on ``dim`` of a grouped (not depthwise) conv, else None.
    torch-pruning keeps the group count of such a conv, so a removal must take the same
    positions in every conv group (its input pruning keeps the first group's positions)."""
    groups = getattr(module, "groups", 1)
    if not isinstance(module, nn.modules.conv._ConvNd) or groups == 1 or groups == module.out_channels:
        return None  # depthwise convs (one channel per group) are pruned with their channels
    return (module.in_channels if dim == "in" else module.out_channels) // groups


def _fold(group: Group, period: int) -> None:
    """Make ``group``'s units the ``period`` positions shared by every conv group: unit p is
    channels p, p + period, ... of the root, and scores and costs add over those copies."""
    group.period, group.size = period, period
    for item in group.items:
        item.root_idxs = item.root_idxs % period


def replay_history(model: nn.Module, example_input: torch.Tensor, history: list) -> nn.Module:
    """Re-apply a recorded channel-pruning history to a freshly built dense model."""
    dg = build_dependency_graph(model, example_input)
    dg.load_pruning_history([[n, bool(o), list(idx)] for n, o, idx in history if o != HEADS])
    for name, _, heads in (step for step in history if step[1] == HEADS):
        prune_heads(model.get_submodule(name), heads)
    return model


def clone(model: nn.Module) -> nn.Module:
    """A deep copy. Weights masked by torch's pruning reparametrisation are recomputed
    after every forward pass, so their cached value (part of an autograd graph, which
    cannot be copied) is refreshed without gradient first."""
    for m in model.modules():
        if hasattr(m, "weight_orig") and hasattr(m, "weight_mask"):
            with torch.no_grad():
                m.weight = m.weight_orig * m.weight_mask
    return copy.deepcopy(model)
