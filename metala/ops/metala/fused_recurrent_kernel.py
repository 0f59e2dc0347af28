"""Triton kernel of the recurrent (decoding) form: S = diag(alpha) S + k^T v; o = scale * q S, token by token."""

import triton
import triton.language as tl

import metala.ops.utils.triton_compat  # noqa: F401  (interpreter shim)
from metala.ops.utils.triton_math import logsigmoid, neg_expm1


@triton.jit
def fused_recurrent_metala_kernel(
    q, gate, v, h0, o, ht, T, scale, inv_tau,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
    GATE_LOGITS: tl.constexpr, HAS_H0: tl.constexpr,
):
    i_bh, i_v = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    offs_k = tl.arange(0, K)
    offs_v = i_v * BV + tl.arange(0, BV)
    m_v = offs_v < V
    kv = offs_k[:, None] * V + offs_v[None, :]
    if HAS_H0:
        S = tl.load(h0 + i_bh * K * V + kv, mask=m_v[None, :], other=0.0).to(tl.float32)
    else:
        S = tl.zeros([K, BV], dtype=tl.float32)
    for t in range(0, T):
        row = (i_b * T + t) * H + i_h
        g = tl.load(gate + row * K + offs_k).to(tl.float32)
        if GATE_LOGITS:
            g = logsigmoid(g) * inv_tau
        g = tl.maximum(g, -10.0)
        qq = tl.load(q + row * K + offs_k).to(tl.float32)
        vv = tl.load(v + row * V + offs_v, mask=m_v, other=0.0).to(tl.float32)
        S = tl.exp(g)[:, None] * S + neg_expm1(g)[:, None] * vv[None, :]
        out = tl.sum(qq[:, None] * S, axis=0) * scale
        tl.store(o + row * V + offs_v, out.to(o.dtype.element_ty), mask=m_v)
    tl.store(ht + i_bh * K * V + kv, S, mask=m_v[None, :])
