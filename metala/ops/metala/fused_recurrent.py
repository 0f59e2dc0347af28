"""Recurrent form of the MetaLA operator for decoding (a few tokens with a carried state).

One step costs O(H * K * V) whatever the context length. Heads and batch are handled by batched tensor ops
(no Python per-head loop); on CUDA the Triton kernel in `chunk.py` family replaces the per-step ops.
"""

from __future__ import annotations

import torch


def fused_recurrent_metala(
    q: torch.Tensor,
    g: torch.Tensor,
    v: torch.Tensor,
    k: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense [B, T, H, *] recurrence with an fp32 state [B, H, K, V]; meant for small T (decode, T = 1)."""
    if cu_seqlens is not None:
        raise ValueError("fused_recurrent_metala does not take cu_seqlens; use the chunk backend for packed input")
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    g32 = g.float()
    k32 = -torch.expm1(g32) if k is None else k.float()
    q32, v32 = q.float(), v.float()
    S = q32.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    outs = []
    for t in range(T):
        S = g32[:, t].exp().unsqueeze(-1) * S + k32[:, t].unsqueeze(-1) * v32[:, t].unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", q32[:, t], S))
    o = (scale * torch.stack(outs, 1)).to(q.dtype)
    return o, (S if output_final_state else None)


def fused_recurrent_metala_triton(
    q: torch.Tensor,
    gate: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    gate_logits: bool = False,
    decay_normalizer: float = 16.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton recurrence for decoding (no autograd): one program per (sequence, head, V-tile) keeps its state
    tile in registers across the T tokens. `gate` is g (fp32 log-decay) or, with gate_logits, the logits z."""
    from metala.ops.metala.fused_recurrent_kernel import fused_recurrent_metala_kernel
    from metala.ops.utils.launch_cache import launch

    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    BV = min(64, V)
    o = torch.empty_like(v)
    ht = torch.empty(B, H, K, V, device=q.device, dtype=torch.float32)
    h0 = initial_state.contiguous() if initial_state is not None else ht
    # through the launch cache: decoding launches this once per layer per token, so the binder's cost adds up
    launch(fused_recurrent_metala_kernel, (B * H, -(-V // BV)),
           (q.contiguous(), gate.contiguous(), v.contiguous(), h0, o, ht, T, float(scale), 1.0 / decay_normalizer),
           dict(H=H, K=K, V=V, BV=BV, GATE_LOGITS=gate_logits, HAS_H0=initial_state is not None, num_warps=4))
    return o, (ht if output_final_state else None)
