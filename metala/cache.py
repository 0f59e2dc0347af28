"""Inference cache: per layer, the fp32 recurrent state and the last k-1 pre-conv inputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class LayerCache:
    # [B, H, K, V] fp32; None before the first forward
    state: torch.Tensor | None = None
    # [B, D, k-1] in the compute dtype
    conv_state: torch.Tensor | None = None


@dataclass(slots=True)
class MetaLACache:
    """One `LayerCache` per block plus the number of tokens already consumed. Cost is O(1) in context length."""

    layers: list[LayerCache] = field(default_factory=list)
    seen_tokens: int = 0

    @classmethod
    def empty(cls, n_layers: int) -> "MetaLACache":
        return cls(layers=[LayerCache() for _ in range(n_layers)])

    def select(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (e.g. after some sequences finished)."""
        for c in self.layers:
            if c.state is not None:
                c.state = c.state.index_select(0, index)
            if c.conv_state is not None:
                c.conv_state = c.conv_state.index_select(0, index)

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for c in self.layers for t in (c.state, c.conv_state) if t is not None
        )
