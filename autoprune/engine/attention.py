"""Attention heads as a prunable structure (torchvision's ViT and Swin transformers).

:func:`prunable_form` gives a model attention modules whose number of heads follows their
weights: ViT's ``nn.MultiheadAttention`` becomes :class:`Attention` (packed ``qkv`` and
``proj`` linears holding the same weights) and Swin's ``ShiftedWindowAttention`` (V1 and V2)
is re-classed in place to :class:`WindowAttention` / :class:`WindowAttentionV2`, whose
forward takes the head count and inner width from ``qkv`` (torchvision's takes both from
the input width, which breaks once heads go). The outputs are those of the original model.

For torch-pruning's dependency graph an attention module is one layer (a leaf with its own
pruner: in channels are ``qkv``'s inputs, out channels ``proj``'s outputs), and while the
graph is traced its inside is hidden from the tracer (:func:`opaque`), which would otherwise
walk the views and window slices with channels-first index mappings (and, on swin_t, run
out of memory enumerating the groups). Heads are internal to the module: :func:`prune_heads`
removes whole heads (``qkv`` rows of q, k and v, ``proj`` columns, the position-bias columns)
with torch-pruning's layer functions, and a history records them as ``[name, "heads", [h]]``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

HEADS = "heads"  # the kind of a head-removal step in a pruning history
EMBEDDING = "embedding"  # the kind of a transformer's embedding-width group


class _Opaque(torch.autograd.Function):
    """``out``, computed without autograd, as a function of ``x`` alone: the tracer sees one
    node fed by the attention's input."""

    @staticmethod
    def forward(ctx, x, out):
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, None


class _Leaf:
    _opaque = False
    qkv_name, proj_name = "qkv", "proj"  # the packed input projection and the output projection
    embedding_group = False  # whether the embedding width around it may be a group (ViT's)

    def _run(self, fn, x: torch.Tensor) -> torch.Tensor:
        if not self._opaque:
            return fn(x)
        with torch.no_grad():
            out = fn(x)
        return _Opaque.apply(x, out)


@contextlib.contextmanager
def opaque(model: nn.Module):
    """Within: every attention module of ``model`` is one node to a tracer."""
    leaves = [m for m in model.modules() if isinstance(m, _Leaf)]
    for m in leaves:
        m._opaque = True
    try:
        yield model
    finally:
        for m in leaves:
            m.__dict__.pop("_opaque", None)


class Attention(_Leaf, nn.Module):
    """Self-attention with packed ``qkv`` and ``proj`` in place of ViT's
    ``nn.MultiheadAttention`` (called ``(x, x, x, need_weights=False)``, returns
    ``(out, None)``). The number of heads is ``qkv.out_features // (3 * head_dim)``."""

    embedding_group = True

    def __init__(self, dim: int, num_heads: int, bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.dropout = float(dropout)

    @property
    def num_heads(self) -> int:
        return self.qkv.out_features // (3 * self.head_dim)

    @classmethod
    def of(cls, mha: nn.MultiheadAttention) -> Attention | None:
        """The same attention as ``mha``, or None where ``mha`` is not packed batch-first
        self-attention without extra key/value biases."""
        plain = mha._qkv_same_embed_dim and mha.batch_first and mha.bias_k is None and not mha.add_zero_attn
        if not plain or mha.in_proj_weight is None:
            return None
        new = cls(mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None, dropout=mha.dropout)
        new = new.to(mha.in_proj_weight.device, mha.in_proj_weight.dtype)
        with torch.no_grad():
            new.qkv.weight.copy_(mha.in_proj_weight)
            new.proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                new.qkv.bias.copy_(mha.in_proj_bias)
                new.proj.bias.copy_(mha.out_proj.bias)
        return new.train(mha.training)

    def forward(self, query, key=None, value=None, need_weights: bool = False, attn_mask=None, **_):
        if (key is not None and key is not query) or (value is not None and value is not query) or need_weights:
            raise ValueError("autoprune's Attention is self-attention without attention weights")
        return self._run(lambda x: self._attend(x, attn_mask), query), None

    def _attend(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = x.shape
        h, d = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(o.transpose(1, 2).reshape(b, n, h * d))


def _shift_mask(height: int, width: int, window: list[int], shift: list[int], like: torch.Tensor) -> torch.Tensor:
    """Swin's mask for shifted windows: (windows, N, N), -100 between tokens of different regions."""
    region = like.new_zeros((height, width))
    rows = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
    cols = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
    for i, (r, c) in enumerate((r, c) for r in rows for c in cols):
        region[r[0] : r[1], c[0] : c[1]] = i
    gh, gw = height // window[0], width // window[1]
    region = region.view(gh, window[0], gw, window[1]).permute(0, 2, 1, 3).reshape(gh * gw, -1)
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def _window_attention_class():
    from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

    class WindowAttention(_Leaf, ShiftedWindowAttention):
        """torchvision's ShiftedWindowAttention with heads that follow ``qkv``."""

        @property
        def num_heads(self) -> int:
            return self.qkv.out_features // (3 * self.head_dim)

        @num_heads.setter
        def num_heads(self, value: int) -> None:  # torchvision's __init__ sets it before head_dim exists
            self.__dict__["_heads_at_init"] = value

        @classmethod
        def convert(cls, m: nn.Module) -> None:
            heads = m.__dict__.pop("num_heads", None) or m.__dict__.pop("_heads_at_init")
            m.head_dim = m.qkv.in_features // heads
            m.__class__ = cls

        def _scaled(self, q, k):
            return q, k, self.head_dim**-0.5

        def _qkv(self, x):
            return self.qkv(x)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._run(self._attend, x)

        def _attend(self, x: torch.Tensor) -> torch.Tensor:
            b, height, width, c = x.shape
            ws = list(self.window_size)
            x = F.pad(x, (0, 0, 0, (ws[1] - width % ws[1]) % ws[1], 0, (ws[0] - height % ws[0]) % ws[0]))
            _, ph, pw, _ = x.shape
            shift = [0 if ws[i] >= (ph, pw)[i] else s for i, s in enumerate(self.shift_size)]
            if sum(shift):
                x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
            gh, gw, n = ph // ws[0], pw // ws[1], ws[0] * ws[1]
            x = x.view(b, gh, ws[0], gw, ws[1], c).permute(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, n, c)
            h, d = self.num_heads, self.head_dim
            q, k, v = self._qkv(x).reshape(b, gh * gw, n, 3, h, d).permute(3, 0, 1, 4, 2, 5).unbind(0)
            q, k, scale = self._scaled(q, k)
            bias = self.get_relative_position_bias()
            if sum(shift):
                bias = bias + _shift_mask(ph, pw, ws, shift, x).unsqueeze(1)
            drop = self.attention_dropout if self.training else 0.0
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, dropout_p=drop)
            o = self.proj(o.transpose(2, 3).reshape(b, gh * gw, n, h * d))
            o = F.dropout(o, p=self.dropout, training=self.training)
            o = o.view(b, gh, gw, ws[0], ws[1], -1).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, -1)
            if sum(shift):
                o = torch.roll(o, shifts=(shift[0], shift[1]), dims=(1, 2))
            return o[:, :height, :width, :].contiguous()

    class WindowAttentionV2(WindowAttention, ShiftedWindowAttentionV2):
        """The same for ShiftedWindowAttentionV2 (cosine attention, no key bias)."""

        get_relative_position_bias = ShiftedWindowAttentionV2.get_relative_position_bias

        def _scaled(self, q, k):
            scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
            return F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1), 1.0

        def _qkv(self, x):
            out = self.qkv(x)
            if self.qkv.bias is None:
                return out
            n = self.qkv.out_features // 3
            key_bias = torch.zeros_like(self.qkv.bias)
            key_bias[n : 2 * n] = self.qkv.bias[n : 2 * n]
            return out - key_bias  # torchvision's V2 has no key bias

    return ShiftedWindowAttention, ShiftedWindowAttentionV2, WindowAttention, WindowAttentionV2


_SWIN, _SWIN_V2, WindowAttention, WindowAttentionV2 = _window_attention_class()


def _vision_transformer_class():
    from torchvision.models.vision_transformer import VisionTransformer

    class PrunableVisionTransformer(VisionTransformer):
        """torchvision's VisionTransformer whose ``hidden_dim`` (its input reshape's width)
        follows the patch embedding, so the embedding width can be pruned."""

        @property
        def hidden_dim(self) -> int:
            return self.conv_proj.out_channels

        @hidden_dim.setter
        def hidden_dim(self, value: int) -> None:  # set by torchvision's __init__ only
            pass

    return VisionTransformer, PrunableVisionTransformer


_VIT, PrunableVisionTransformer = _vision_transformer_class()


def _maxvit_attention_class():
    from torchvision.models.maxvit import RelativePositionalMultiHeadAttention

    class MaxVitAttention(_Leaf, RelativePositionalMultiHeadAttention):
        """torchvision's MaxViT attention with heads that follow ``to_qkv``. Its scale stays
        the dense model's (torchvision scales by the embedding width, not the head size)."""

        qkv_name, proj_name = "to_qkv", "merge"
        qkv = property(lambda self: self.to_qkv)
        proj = property(lambda self: self.merge)

        @property
        def n_heads(self) -> int:
            return self.to_qkv.out_features // (3 * self.head_dim)

        @n_heads.setter
        def n_heads(self, value: int) -> None:  # set by torchvision's __init__ only
            pass

        num_heads = n_heads

        @classmethod
        def convert(cls, m: nn.Module) -> None:
            m.__dict__.pop("n_heads", None)
            m.__class__ = cls

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._run(self._attend, x)

        def _attend(self, x: torch.Tensor) -> torch.Tensor:
            b, g, p, _ = x.shape
            h, d = self.n_heads, self.head_dim
            q, k, v = self.to_qkv(x).reshape(b, g, p, 3, h, d).permute(3, 0, 1, 4, 2, 5).unbind(0)
            bias = self.get_relative_positional_bias()
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale_factor)
            return self.merge(o.transpose(2, 3).reshape(b, g, p, h * d))

    return RelativePositionalMultiHeadAttention, MaxVitAttention


_MAXVIT, MaxVitAttention = _maxvit_attention_class()
ATTENTION_TYPES = (Attention, WindowAttention, WindowAttentionV2, MaxVitAttention)


CONVERSIONS: list = []  # in-place conversions of other libraries' layers; :mod:`.zoo` registers its own


def prunable_form(model: nn.Module) -> nn.Module:
    """In place: torchvision's attention modules become head-prunable ones computing the
    same outputs, and the conversions in ``CONVERSIONS`` run (timm's and HuggingFace's
    layers: :mod:`.zoo`). Models without such modules are returned unchanged."""
    for convert in CONVERSIONS:
        convert(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention) and (new := Attention.of(child)) is not None:
                setattr(parent, name, new)
    for m in model.modules():
        if type(m) is _VIT:
            m.__dict__.pop("hidden_dim", None)
            m.__class__ = PrunableVisionTransformer
        elif type(m) is _MAXVIT:
            MaxVitAttention.convert(m)
        elif type(m) is _SWIN_V2:
            WindowAttentionV2.convert(m)
        elif type(m) is _SWIN:
            WindowAttention.convert(m)
    return model


def attention_pruners() -> dict:
    """torch-pruning's custom pruner for each attention class: the module is one layer."""
    import torch_pruning as tp

    class AttentionPruner(tp.pruner.function.BasePruningFunc):
        def prune_out_channels(self, layer, idxs):
            tp.prune_linear_out_channels(layer.proj, list(idxs))
            return layer

        def prune_in_channels(self, layer, idxs):
            tp.prune_linear_in_channels(layer.qkv, list(idxs))
            return layer

        def get_out_channels(self, layer):
            return layer.proj.out_features

        def get_in_channels(self, layer):
            return layer.qkv.in_features

    pruner = AttentionPruner()
    types, queue = set(), list(ATTENTION_TYPES)
    while queue:  # subclasses too (:mod:`.zoo`'s): torch-pruning looks pruners up by exact class
        t = queue.pop()
        types.add(t)
        queue += t.__subclasses__()
    return {t: pruner for t in types}


def head_rows(module: nn.Module) -> tuple[list[int], list[int], list[int], list[int]]:
    """For every head h of ``module``: ``qkv`` output rows and their heads, ``proj`` input
    columns and their heads (q, k and v rows of head h all belong to h)."""
    h, d = module.num_heads, module.head_dim
    cols = list(range(h * d))
    rows = [part * h * d + c for part in range(3) for c in cols]
    return rows, [(r % (h * d)) // d for r in rows], cols, [c // d for c in cols]


def prune_heads(module: nn.Module, heads: Sequence[int]) -> None:
    """Remove whole ``heads`` from an attention module of :func:`prunable_form`."""
    import torch_pruning as tp

    heads = sorted({int(h) for h in heads})
    n = module.num_heads
    if not heads:
        return
    if heads[0] < 0 or heads[-1] >= n or len(heads) >= n:
        raise ValueError(f"cannot remove heads {heads} of {n}")
    gone = set(heads)
    rows, row_heads, cols, col_heads = head_rows(module)
    tp.prune_linear_out_channels(module.qkv, [r for r, h in zip(rows, row_heads) if h in gone])
    tp.prune_linear_in_channels(module.proj, [c for c, h in zip(cols, col_heads) if h in gone])
    keep = torch.tensor([h for h in range(n) if h not in heads], dtype=torch.long)
    if isinstance(module, WindowAttentionV2):
        module.logit_scale = nn.Parameter(module.logit_scale.data[keep].clone())
        tp.prune_linear_out_channels(module.cpb_mlp[2], heads)
    elif isinstance(module, (WindowAttention, MaxVitAttention)):
        table = module.relative_position_bias_table
        module.relative_position_bias_table = nn.Parameter(table.data[:, keep].clone())
    elif hasattr(module, "drop_head_params"):  # per-head parameters of :mod:`.zoo`'s attention
        module.drop_head_params(keep)


def attention_flops(inputs, outputs) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: the multiply-adds of
    ``q @ k^T`` and ``weights @ v`` (the scale, mask and softmax are not counted, as fvcore
    counts no element-wise op)."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(inputs[i]) for i in range(3))
    return int(math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1]))
