"""Pure-PyTorch references for the MetaLA operator (the definition; kernels are optimisations of these).

Layout is seq-first: q, g, k are [B, T, H, K], v is [B, T, H, V], states are fp32 [N, H, K, V]. The math is in
README.md beside this file. Everything here computes in fp32 and supports autograd.

- `naive_recurrent_metala`: token-by-token recurrence, the reference of every test.
- `naive_parallel_metala`: the parallel log-space attention-map form (small T).
- `naive_chunk_metala`: the chunked form (intra-chunk masked log-space products, inter-chunk state pass); fast
  enough for CPU training and the GPU benchmark's correctness gate, and the "chunk" backend of `metala_attn`.
- `naive_self_augmentation`: the self-augmentation term the Triton output kernel can fuse (`w_aug`).
"""

from __future__ import annotations

import torch

from metala.ops.utils.varlen import pad_index, pad_packed, unpad_to_packed


def _segments(batch: int, total: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    # (batch row, start, end) of every independent sequence
    if cu_seqlens is None:
        return [(b, 0, total) for b in range(batch)]
    bounds = cu_seqlens.tolist()
    return [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def naive_recurrent_metala(
    q: torch.Tensor,
    g: torch.Tensor,
    v: torch.Tensor,
    k: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """S_t = diag(exp g_t) S_{t-1} + k_t^T v_t,  o_t = scale * q_t S_t,  with k = 1 - exp(g) unless given."""
    dtype = q.dtype
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    q, g, v = q.float(), g.float(), v.float()
    k = -torch.expm1(g) if k is None else k.float()
    o = torch.zeros(B, T, H, V, dtype=torch.float32, device=q.device)
    segments = _segments(B, T, cu_seqlens)
    finals = []
    for n, (b, start, end) in enumerate(segments):
        if initial_state is not None:
            S = initial_state[n].float()
        else:
            S = q.new_zeros(H, K, V)
        rows = []
        for t in range(start, end):
            S = g[b, t].exp()[:, :, None] * S + k[b, t][:, :, None] * v[b, t][:, None, :]
            rows.append(scale * torch.einsum("hk,hkv->hv", q[b, t], S))
        o_seg = torch.stack(rows, 0)
        o = o.index_put((torch.tensor([b]), torch.arange(start, end)), o_seg)
        finals.append(S)
    final = torch.stack(finals, 0) if output_final_state else None
    return o.to(dtype), final


def naive_parallel_metala(
    q: torch.Tensor,
    g: torch.Tensor,
    v: torch.Tensor,
    k: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Parallel log-space form (paper Eq. A28-A30) from a zero state: O(T^2 K) memory, for small T only.

    o_t = scale * sum_{r<=t} [sum_i q_ti k_ri exp(G_ti - G_ri)] v_r with inclusive G; the exponent is masked before
    exp, so A and 1/A are never formed (1/A overflows fp32 after ~2k tokens at init).
    """
    dtype = q.dtype
    T, K = q.shape[1], q.shape[-1]
    scale = K**-0.5 if scale is None else scale
    q, g, v = q.float(), g.float(), v.float()
    k = -torch.expm1(g) if k is None else k.float()
    G = g.cumsum(1)  # [B, T, H, K]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    diff = (G[:, :, None] - G[:, None, :]).masked_fill(~causal[None, :, :, None, None], float("-inf"))
    attn = (q[:, :, None] * k[:, None, :] * diff.exp()).sum(-1)  # [B, T, T, H]
    return (scale * torch.einsum("btrh,brhv->bthv", attn, v)).to(dtype)


def _chunk_dense(
    q: torch.Tensor,
    g: torch.Tensor,
    v: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    # fp32 inputs, no varlen; returns (o [B, T, H, V] fp32, final state [B, H, K, V] fp32)
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    if pad:
        # g = 0 and k = 0 on padding: alpha = 1 and no write, so the state passes through the pad unchanged
        q, g, v, k = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, g, v, k))
    NT = (T + pad) // C

    def chunked(t: torch.Tensor) -> torch.Tensor:
        return t.view(B, NT, C, H, t.shape[-1]).permute(0, 3, 1, 2, 4)  # [B, H, NT, C, D]

    q, g, v, k = chunked(q), chunked(g), chunked(v), chunked(k)
    # inclusive chunk-local cumulative log-decay, fp32
    G = g.cumsum(-2)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # the exponent is masked before exp: non-causal pairs have G_i - G_j > 0 and may overflow
    diff = (G.unsqueeze(-2) - G.unsqueeze(-3)).masked_fill(~causal[..., None], float("-inf"))
    A = (q.unsqueeze(-2) * k.unsqueeze(-3) * diff.exp()).sum(-1)  # [B, H, NT, C, C]
    o = A @ v
    # inter-chunk: every exponent below is a difference G_a - G_b with a later than b, hence <= 0
    q_decayed = q * G.exp()
    k_to_end = k * (G[..., -1:, :] - G).exp()
    chunk_decay = G[..., -1, :].exp()  # [B, H, NT, K]
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    inter = []
    for n in range(NT):
        inter.append(q_decayed[:, :, n] @ S)
        S = chunk_decay[:, :, n, :, None] * S + k_to_end[:, :, n].transpose(-1, -2) @ v[:, :, n]
    o = scale * (o + torch.stack(inter, 2))
    o = o.permute(0, 2, 3, 1, 4).reshape(B, NT * C, H, V)[:, :T]
    return o, S


def naive_chunk_metala(
    q: torch.Tensor,
    g: torch.Tensor,
    v: torch.Tensor,
    k: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked fp32 form of `naive_recurrent_metala` (same arguments), differentiable through autograd.

    Packed documents are scattered into a right-padded [N, Tmax] batch: padding with g = 0 and k = 0 leaves each
    document's final state untouched, so no document sees another and no reset is emulated through alpha = 0.
    """
    dtype = q.dtype
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    q32, g32, v32 = q.float(), g.float(), v.float()
    k32 = -torch.expm1(g32) if k is None else k.float()
    if cu_seqlens is None:
        o, final = _chunk_dense(q32, g32, v32, k32, scale, initial_state, chunk_size)
    else:
        n_seqs = cu_seqlens.numel() - 1
        index, t_max = pad_index(cu_seqlens, T)
        padded = [pad_packed(t, index, n_seqs, t_max) for t in (q32, g32, v32, k32)]
        o, final = _chunk_dense(*padded, scale, initial_state, chunk_size)
        o = unpad_to_packed(o, index)
    return o.to(dtype), (final if output_final_state else None)


def naive_self_augmentation(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w_aug: torch.Tensor) -> torch.Tensor:
    """The self-augmentation term sigmoid(a * v), a = sum_K q * w_aug * k per token and head (paper Eq. 22), fp32.

    q, k [B, T, H, K], v [B, T, H, V], w_aug H * K values; the heads are q's (a tensor-parallel shard's own).
    """
    H, K = q.shape[2], q.shape[3]
    a = (q.float() * w_aug.float().reshape(H, K) * k.float()).sum(-1, keepdim=True)  # [B, T, H, 1]
    return torch.sigmoid(a * v.float())
