"""Short causal depthwise convolution (kernel k, no bias) with document resets and a decode cache.

y_t = sum_{j<k} w[:, j] * x_{t-(k-1)+j}: w[:, k-1] multiplies the current token (the causal-conv1d convention).
History before a document start is zero, exactly as at the start of a sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from metala.ops.utils.varlen import positions_in_seq


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    conv_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, T, D], weight [D, 1, k], conv_state [B, D, k-1] (the previous k-1 inputs) -> (y [B, T, D], new state).

    The new state holds the last k-1 inputs (zero-padded on the left when fewer were seen), ready for decoding.
    """
    B, T, D = x.shape
    k = weight.shape[-1]
    w = weight.view(D, k).to(x.dtype)
    if conv_state is None:
        history = x.new_zeros(B, k - 1, D)
    else:
        if cu_seqlens is not None:
            raise ValueError("conv_state and cu_seqlens cannot be combined")
        history = conv_state.transpose(1, 2).to(x.dtype)
    xp = torch.cat([history, x], dim=1)  # [B, k-1+T, D]
    pos = positions_in_seq(cu_seqlens, T) if cu_seqlens is not None else None
    y = None
    for j in range(k):
        tap = xp[:, j : j + T] * w[:, j]
        lag = k - 1 - j
        if pos is not None and lag > 0:
            # the tap reaches `lag` tokens back: zero it where that crosses the document start
            tap = tap * (pos >= lag).to(x.dtype)[None, :, None]
        y = tap if y is None else y + tap
    new_state = xp[:, xp.shape[1] - (k - 1) :].transpose(1, 2) if k > 1 else x.new_zeros(B, D, 0)
    return y, new_state


class ShortConv(nn.Module):
    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size))
        bound = kernel_size**-0.5
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, conv_state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return short_conv(x, self.weight, cu_seqlens, conv_state)


class NoConv(nn.Module):
    """The `use_conv=False` ablation (paper Table 8): the mixer reads SiLU(x) directly."""

    def forward(
        self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, conv_state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return x, conv_state
