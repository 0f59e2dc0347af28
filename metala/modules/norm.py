"""Normalisations. Block norms are configurable (metala.md section 7 row 5); the head norm is not (row 6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Parameter-free RMSNorm in fp32: x * rsqrt(mean(x^2) + eps), cast back to the input dtype."""

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class LayerNorm(nn.LayerNorm):
    """Affine LayerNorm computed in fp32 (the GPT-NeoX default, for paper-text parity)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


def build_norm(norm_type: str, dim: int, eps: float) -> nn.Module:
    if norm_type == "rmsnorm":
        return RMSNorm(eps)
    if norm_type == "layernorm":
        return LayerNorm(dim, eps=eps)
    raise ValueError(f"norm_type must be 'rmsnorm' or 'layernorm', got {norm_type!r}")


def head_layer_norm(o: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head LayerNorm without affine parameters over the last dim, in fp32.

    Mean-centring is what cancels the constant sigmoid(0) = 0.5 the self-augmentation adds at init (w_aug = 0),
    which is why this norm is not configurable.
    """
    return F.layer_norm(o.float(), (o.shape[-1],), eps=eps)
