"""`piece_log_decays` and `incoming_state_output`: the functional API (Triton kernels on GPU or under the
interpreter, the naive twins elsewhere), with their autograd Functions and launchers.

Sequence parallelism uses them per layer: each rank runs the MetaLA operator on its slice from a zero state, takes
the log-decay of its last document piece from `piece_log_decays`, the ranks exchange final states and decays, and
`incoming_state_output` adds what the true entering state contributes to each row's first piece:
    o_t += scale * (q_t * exp(G_t)) S_in,    G_t = log-decay from the row's start through t.
The operator is linear in its state, so this is exact, and it costs one pass over the first piece instead of a
second run of the operator.
"""

from __future__ import annotations

import torch

from metala.ops.incoming_state.naive import TILE, naive_gate_tile_sums, naive_incoming_state_output
from metala.ops.metala.api import triton_usable

BACKENDS = ("auto", "triton", "naive")


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and not triton_usable(x.device):
        raise ValueError(f"backend='triton' needs a CUDA device or TRITON_INTERPRET=1 (device={x.device})")
    return backend == "triton" or (backend == "auto" and x.is_cuda and triton_usable(x.device))


def _check_rows(name: str, x: torch.Tensor, first_len: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be [B, L, H, D], got shape {tuple(x.shape)}")
    if first_len.shape != (x.shape[0],):
        raise ValueError(f"first_len must be [B] = [{x.shape[0]}], got {tuple(first_len.shape)}")


def _kernel_dtypes(dtype: torch.dtype):
    from metala.ops.metala.chunk import _dot_dtype, _dot_prec

    return _dot_dtype(dtype), _dot_prec(dtype)


# launch widths: 8 warps keep every kernel below at 0 spills on sm_90 at K = 64, V = 128 (bench/aot_check.py)
class _GateTileSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, first_len, last_start, inv_tau):
        from metala.ops.incoming_state.kernel import gate_tile_sums_fwd_kernel

        B, L, H, K = z.shape
        NT = -(-L // TILE)
        z = z.contiguous()
        s_first = torch.empty(B, NT, H, K, device=z.device, dtype=torch.float32)
        s_last = torch.empty_like(s_first)
        gate_tile_sums_fwd_kernel[(NT, B, H)](z, first_len, last_start, s_first, s_last, inv_tau, L, NT, H=H, K=K,
                                             TILE=TILE, num_warps=4)
        ctx.save_for_backward(z, first_len, last_start)
        ctx.inv_tau = inv_tau
        return s_first, s_last

    @staticmethod
    def backward(ctx, d_first, d_last):
        from metala.ops.incoming_state.kernel import gate_tile_sums_bwd_kernel

        z, first_len, last_start = ctx.saved_tensors
        B, L, H, K = z.shape
        NT = -(-L // TILE)
        zeros = torch.zeros(B, NT, H, K, device=z.device, dtype=torch.float32)
        d_first = zeros if d_first is None else d_first.contiguous()
        d_last = zeros if d_last is None else d_last.contiguous()
        dz = torch.empty_like(z)
        gate_tile_sums_bwd_kernel[(NT, B, H)](z, first_len, last_start, d_first, d_last, dz, ctx.inv_tau, L, NT,
                                             H=H, K=K, TILE=TILE, num_warps=8)
        return dz, None, None, None


class _IncomingStateOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, q, z, S, G_off, first_len, scale, inv_tau):
        from metala.ops.incoming_state.kernel import incoming_state_fwd_kernel

        B, L, H, K = q.shape
        V = o.shape[-1]
        o, q, z, S, G_off = (t.contiguous() for t in (o, q, z, S.float(), G_off))
        NT = -(-L // TILE)
        BV = min(128, V)
        DT, prec = _kernel_dtypes(q.dtype)
        out = torch.empty_like(o)
        incoming_state_fwd_kernel[(NT, B * H, -(-V // BV))](
            o, q, z, S, G_off, first_len, out, scale, inv_tau, L, NT, H=H, K=K, V=V, TILE=TILE, BV=BV, DT=DT,
            DOT_PREC=prec, num_warps=8,
        )
        ctx.save_for_backward(q, z, S, G_off, first_len)
        ctx.meta = (scale, inv_tau, V)
        return out

    @staticmethod
    def backward(ctx, dout):
        from metala.ops.incoming_state.kernel import incoming_state_bwd_dqz_kernel, incoming_state_bwd_ds_kernel

        q, z, S, G_off, first_len = ctx.saved_tensors
        scale, inv_tau, V = ctx.meta
        B, L, H, K = q.shape
        NT = -(-L // TILE)
        dout = dout.contiguous()
        DT, prec = _kernel_dtypes(q.dtype)
        BV = min(64, V)
        dq, dz, dG_off = torch.empty_like(q), torch.empty_like(z), torch.empty_like(G_off)
        incoming_state_bwd_dqz_kernel[(NT, B * H)](
            q, z, S, G_off, first_len, dout, dq, dz, dG_off, scale, inv_tau, L, NT, H=H, K=K, V=V, TILE=TILE, BV=BV,
            DT=DT, DOT_PREC=prec, num_warps=8,
        )
        # dS: groups of tiles in parallel (enough programs to fill a GPU), summed in a fixed order
        NV = -(-V // BV)
        NG = max(1, min(NT, 1024 // (B * H * NV)))
        TPG = -(-NT // NG)
        NG = -(-NT // TPG)
        part = torch.empty(B * H, NG, K, V, device=q.device, dtype=torch.float32)
        incoming_state_bwd_ds_kernel[(B * H, NV, NG)](
            q, z, G_off, first_len, dout, part, inv_tau, L, NT, NG, TPG, H=H, K=K, V=V, TILE=TILE, BV=BV, DT=DT,
            DOT_PREC=prec, num_warps=8,
        )
        dS = part.sum(1).view(B, H, K, V) * scale
        return dout, dq, dz, dS, dG_off, None, None, None


def piece_log_decays(z: torch.Tensor, first_len: torch.Tensor, last_start: torch.Tensor, decay_normalizer: float,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Log-decays of each row's first and last document piece, from the gate logits (differentiable in z).

    Args:
        z: [B, L, H, K] gate logits (g = max(logsigmoid(z) / decay_normalizer, -10), as in the MetaLA kernels).
        first_len: int32 [B], tokens of each row's first piece; last_start: int32 [B], where its last piece starts.

    Returns:
        G_off: fp32 [B, ceil(L / 64), H, K], the log-decay from the row's start to each 64-token tile's start
            within the first piece (the input `incoming_state_output` takes);
        G_last: fp32 [B, H, K], the total log-decay of each row's last piece.
    """
    _check_rows("z", z, first_len)
    if _use_triton(z, backend):
        s_first, s_last = _GateTileSums.apply(z, first_len.to(torch.int32), last_start.to(torch.int32),
                                              1.0 / decay_normalizer)
    else:
        s_first, s_last = naive_gate_tile_sums(z, first_len, last_start, decay_normalizer)
    return s_first.cumsum(1) - s_first, s_last.sum(1)


def incoming_state_output(o: torch.Tensor, q: torch.Tensor, z: torch.Tensor, S: torch.Tensor, G_off: torch.Tensor,
                          first_len: torch.Tensor, decay_normalizer: float, scale: float | None = None,
                          backend: str = "auto") -> torch.Tensor:
    """o plus the share of the entering states S in each row's first piece (a new tensor in o's dtype).

    Args:
        o: [B, L, H, V] the operator's output from a zero state; q, z: [B, L, H, K] its queries and gate logits.
        S: fp32 [B, H, K, V] the state entering each row; G_off, first_len: from `piece_log_decays`.
        scale: default K ** -0.5, as in the operator.

    Examples::

        >>> G_off, G_last = piece_log_decays(z, first_len, last_start, 16.0)
        >>> o = incoming_state_output(o, q, z, S_in, G_off, first_len, 16.0)
    """
    _check_rows("q", q, first_len)
    if z.shape != q.shape or o.shape[:3] != q.shape[:3] or S.shape != (q.shape[0], q.shape[2], q.shape[3], o.shape[3]):
        raise ValueError(f"shapes do not match: o {tuple(o.shape)}, q {tuple(q.shape)}, z {tuple(z.shape)}, "
                         f"S {tuple(S.shape)} (want [B, L, H, V], [B, L, H, K] twice, [B, H, K, V])")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if _use_triton(q, backend):
        return _IncomingStateOutput.apply(o, q, z, S, G_off, first_len.to(torch.int32), scale,
                                          1.0 / decay_normalizer)
    return naive_incoming_state_output(o, q, z, S, G_off, first_len, decay_normalizer, scale)
