"""Model-zoo layers in a prunable form: timm's and HuggingFace transformers' models.

:func:`zoo_form` rewrites, in place, the modules of these libraries whose forward pass
hard-codes a width that channel or head pruning changes, into modules computing the same
outputs from their current weights (it is one of :func:`.attention.prunable_form`'s
``CONVERSIONS``, registered here):

- timm's ``Attention`` (ViT, DeiT, MobileViT) and HuggingFace's ``ViTAttention`` become
  :class:`TimmAttention` / :class:`HFAttention`: packed ``qkv`` and ``proj`` linears whose
  heads are pruned whole, as torchvision's ViT attention is (HuggingFace's separate query, key
  and value projections are packed into one ``qkv``);
- edgenext's cross-covariance attention becomes :class:`CrossCovarianceAttention` (heads and
  their temperatures pruned whole);
- timm's cross-stage (CSP) stages split by the widths of the layers each half feeds, and
  MetaFormer's (PoolFormer's) ``Scale`` reshapes by its parameter's length;
- MLP-Mixer's token-mixing MLP is one node to the dependency graph (it mixes tokens, not
  channels, so its width is left alone), as attention modules are.

Attention whose heads interleave their queries, keys and values (LeViT, CoAtNet / MaxxViT)
is not converted: :func:`check_attention` refuses channel pruning of such a model before
its graph is traced. Neither timm nor transformers is imported: modules are recognised by
their class name and module, so a model built without them needs neither.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AutopruneError
from .attention import CONVERSIONS, Attention, _Leaf


def _is(m: nn.Module, package: str, *names: str) -> bool:
    cls = type(m)
    return cls.__module__.startswith(package) and cls.__name__ in names


class _Packed(Attention):
    """:class:`.attention.Attention` around an existing pair of projections (no copy)."""

    embedding_group = False  # the zoo models' position embeddings and class tokens are not pruned

    @classmethod
    def around(cls, qkv: nn.Linear, proj: nn.Linear, head_dim: int, dropout: float):
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.head_dim, new.qkv, new.proj, new.dropout = head_dim, qkv, proj, float(dropout)
        return new


class TimmAttention(_Packed):
    """timm's ``Attention`` (``forward(x, attn_mask=None)`` returns the output tensor)."""

    @classmethod
    def of(cls, m: nn.Module) -> TimmAttention | None:
        plain = all(isinstance(getattr(m, n, None), nn.Identity) for n in ("q_norm", "k_norm", "norm"))
        if not plain or getattr(m, "gate", None) is not None or m.scale != m.head_dim**-0.5:
            return None
        return cls.around(m.qkv, m.proj, m.head_dim, m.attn_drop.p).train(m.training)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        if is_causal:
            raise ValueError("autoprune's TimmAttention does not mask causally")
        return self._run(lambda t: self._attend(t, attn_mask), x)


class HFAttention(_Packed):
    """HuggingFace's ``ViTAttention`` (``q_proj``, ``k_proj``, ``v_proj`` packed into
    ``qkv``; ``o_proj`` is ``proj``); returns ``(output, None)`` as the original does."""

    @classmethod
    def of(cls, m: nn.Module) -> HFAttention | None:
        q, k, v = m.q_proj, m.k_proj, m.v_proj
        if m.scaling != m.head_dim**-0.5 or getattr(m, "is_causal", False):
            return None
        qkv = nn.Linear(q.in_features, 3 * q.out_features, bias=q.bias is not None)
        qkv = qkv.to(q.weight.device, q.weight.dtype)
        with torch.no_grad():
            qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            if q.bias is not None:
                qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
        return cls.around(qkv, m.o_proj, m.head_dim, m.attention_dropout).train(m.training)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **_):
        return self._run(lambda t: self._attend(t, attention_mask), hidden_states), None


class CrossCovarianceAttention(_Packed):
    """edgenext's cross-covariance attention (XCA, El-Nouby et al. 2021): per head, a
    channel-by-channel attention map; its heads follow ``qkv``, each with its temperature."""

    @classmethod
    def of(cls, m: nn.Module) -> CrossCovarianceAttention:
        new = cls.around(m.qkv, m.proj, m.qkv.out_features // (3 * m.num_heads), m.attn_drop.p)
        new.temperature, new.proj_drop = m.temperature, m.proj_drop
        return new.train(m.training)

    def drop_head_params(self, keep: torch.Tensor) -> None:
        self.temperature = nn.Parameter(self.temperature.data[keep].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(lambda t: self._attend(t, None), x)

    def _attend(self, x: torch.Tensor, mask: None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 4, 1).unbind(0)
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.temperature
        attn = F.dropout(attn.softmax(dim=-1), self.dropout, self.training)
        return self.proj_drop(self.proj((attn @ v).permute(0, 3, 1, 2).reshape(b, n, -1)))


def _in_width(module: nn.Module) -> int:
    """The input channels of the first conv ``module`` registers (the first one it runs)."""
    return next(m.in_channels for m in module.modules() if isinstance(m, nn.Conv2d))


class CrossStage(nn.Module):
    """timm's ``CrossStage``: the expanded channels split into the cross path and the
    blocks' path, as wide as the blocks' (or the transition's) input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_exp(self.conv_down(x))
        width = _in_width(self.blocks) if len(self.blocks) else _in_width(self.conv_transition_b)
        xs, xb = x.split([x.shape[1] - width, width], dim=1)
        xb = self.conv_transition_b(self.blocks(xb)).contiguous()
        return self.conv_transition(torch.cat([xs, xb], dim=1))


class CrossStage3(nn.Module):
    """timm's ``CrossStage3``: the first part of the split, as wide as the blocks' input,
    feeds the blocks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_exp(self.conv_down(x))
        width = _in_width(self.blocks)
        x1, x2 = x.split([width, x.shape[1] - width], dim=1)
        return self.conv_transition(torch.cat([self.blocks(x1), x2], dim=1))


class Scale(nn.Module):
    """MetaFormer's ``Scale``: one factor per channel, as many as its parameter holds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(-1, *([1] * (len(self.shape) - 1)))


class MixerBlock(_Leaf, nn.Module):
    """MLP-Mixer's block, its token-mixing MLP one node to a tracer (see :func:`.attention.opaque`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mix = self._run(lambda t: self.mlp_tokens(t.transpose(1, 2)).transpose(1, 2), self.norm1(x))
        x = x + self.drop_path(mix)
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))


_TIMM_RECLASSED = {  # (timm module, class name) -> the prunable form's class
    ("timm.models.cspnet", "CrossStage"): CrossStage,
    ("timm.models.cspnet", "CrossStage3"): CrossStage3,
    ("timm.models.metaformer", "Scale"): Scale,
    ("timm.models.mlp_mixer", "MixerBlock"): MixerBlock,
}
# attention whose heads interleave their queries, keys and values in one projection, or
# whose relative-position bias is indexed by head: not converted, so not prunable by heads
INTERLEAVED = {
    ("timm.models.levit", "Attention"),
    ("timm.models.levit", "AttentionDownsample"),
    ("timm.models.maxxvit", "Attention2d"),
    ("timm.models.maxxvit", "AttentionCl"),
}


def check_attention(model: nn.Module) -> None:
    """Refuse, before tracing, a model with attention modules channel pruning cannot follow."""
    for name, m in model.named_modules():
        if (type(m).__module__, type(m).__name__) in INTERLEAVED:
            raise AutopruneError(
                f"channel pruning cannot follow {type(model).__name__}'s attention {name!r} ({type(m).__name__}): "
                "its heads interleave their queries, keys and values, which autoprune does not prune by heads, "
                "and --keep cannot leave an attention module out of the channel groups; use --structure unstructured"
            )


def zoo_form(model: nn.Module) -> nn.Module:
    """In place: the timm and HuggingFace modules above in their prunable form."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = None
            if _is(child, "timm.layers", "Attention"):
                new = TimmAttention.of(child)
            elif _is(child, "timm.", "CrossCovarianceAttn"):
                new = CrossCovarianceAttention.of(child)
            elif _is(child, "transformers.", "ViTAttention") and hasattr(child, "q_proj"):
                new = HFAttention.of(child)
            if new is not None:
                setattr(parent, name, new)
    for m in model.modules():
        cls = _TIMM_RECLASSED.get((type(m).__module__, type(m).__name__))
        if cls is not None:
            m.__class__ = cls
    return model


CONVERSIONS.append(zoo_form)
