"""Group lasso on channels: an L2-norm-per-channel penalty while training, then prune and
recover (Yuan & Lin 2006; structured sparsity learning, Wen et al. 2016). The schedule is the
penalty family's, shared with network slimming (:mod:`.slimming`)."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import AutopruneError
from ..graph import Group
from .base import register
from .slimming import Penalty, PenaltyMethod

Part = tuple[nn.Parameter, torch.Tensor, torch.Tensor]  # a parameter, its rows, the group unit of each row


class ChannelNorms(Penalty):
    """lam * sum over the channels c of every group of ||w_c||_2, w_c being every weight that
    belongs to channel c alone: the rows of c in the weight and bias of each layer whose output
    slice the group holds (the producing convs' and linears' filters and biases, the norm layers'
    scale and shift, a depthwise conv's filter, an attention head's query, key and value rows).
    The consumers' input slices are not included (they belong to other channels' filters too).
    Where a group is folded (grouped convs) a unit's copies make one vector. Its gradient,
    lam * w_c / ||w_c|| (nothing at ||w_c|| = 0), is added to the parameters' gradients."""

    def __init__(self, model, groups: list[Group]) -> None:
        super().__init__(model, groups)
        self.parts: list[tuple[int, list[Part]]] = []  # per group: its size and parts
        for group in groups:
            parts, seen = [], set()
            for item in group.items:
                if item.dim != "out" or not len(item.idxs):
                    continue
                module = model.get_submodule(item.module)
                for p in (getattr(module, "weight", None), getattr(module, "bias", None)):
                    if not isinstance(p, nn.Parameter) or p.dim() < 1 or id(p) in seen:
                        continue
                    if not p.requires_grad or p.shape[0] <= int(item.idxs.max()):
                        continue
                    seen.add(id(p))
                    idx = torch.as_tensor(item.idxs, dtype=torch.long, device=p.device)
                    roots = torch.as_tensor(item.root_idxs, dtype=torch.long, device=p.device)
                    parts.append((p, idx, roots))
            if parts:
                self.parts.append((group.size, parts))
        if not self.parts:
            raise AutopruneError("method 'group_lasso' found no trainable weights in the prunable channel groups")

    @staticmethod
    def _norms(size: int, parts: list[Part]) -> torch.Tensor:
        total = torch.zeros(size, dtype=torch.float32, device=parts[0][0].device)
        for p, idx, roots in parts:
            total.index_add_(0, roots, p[idx].reshape(len(idx), -1).float().pow(2).sum(1))
        return total.sqrt()

    def add_gradient(self, lam: float) -> None:
        with torch.no_grad():
            for size, parts in self.parts:
                norms = self._norms(size, parts)
                scale = torch.where(norms > 0, lam / norms.clamp(min=torch.finfo(norms.dtype).tiny), 0.0)
                for p, idx, roots in parts:
                    if p.grad is not None:
                        step = p[idx] * scale[roots].to(p.dtype).view(-1, *([1] * (p.dim() - 1)))
                        p.grad.index_add_(0, idx, step)

    def magnitudes(self) -> list[torch.Tensor]:
        with torch.no_grad():
            return [self._norms(size, parts) for size, parts in self.parts]


@register
class GroupLasso(PenaltyMethod):
    """Group lasso: lam * sum of the channels' L2 norms over the prunable groups while
    sparsifying (:class:`ChannelNorms`), then prune by the policy's criterion and recover.
    Wen et al. drop the channels whose norm reached zero; here the criterion picks the channels
    to meet the budget, and ``magnitude`` (the weights' magnitudes, the penalty's own measure)
    pairs with it."""

    name = "group_lasso"
    summary = (
        "Group lasso on channels (L2 norm of each channel's weights) while training, then prune and recover "
        "(Yuan & Lin 2006; Wen et al. 2016)."
    )
    defaults = {"penalty": 1e-2, "sparsify": 0.5}
    penalty_type = ChannelNorms
