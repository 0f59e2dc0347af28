"""Triton forward of the chunked MetaLA operator (math: README.md beside this file).

Packed layout: q, gate [T, H, K] and v [T, H, V] with documents back to back (dense [B, T] is B documents);
`ChunkPlan` maps programs to chunks, segments and documents. Three kernels:

1. `chunk_metala_fwd_kernel_h`: one program per (K-tile x V-tile, segment, head) walks the segment's chunks from a
   zero state, storing each chunk's entering state `h_local` and the log-decay from the segment start `cdec`;
   it ends with the segment's own final state `E` and total log-decay `G`.
2. `chunk_metala_fwd_kernel_seg`: per (tile, document, head), composes the segments in order,
   S_in(s + 1) = exp(G_s) * S_in(s) + E_s, from the document's initial state; stores S_in and the final state.
3. `chunk_metala_fwd_kernel_o`: per (chunk, head, V-tile), h = h_local + exp(cdec) * S_in, then
   o = scale * [(q * e^Gam) h + A v], with the intra-chunk scores A from four 16-row sub-chunks, each with its own
   reference row (the sub-chunk's middle) so that every exponent is bounded: no fp32 overflow, and the whole
   block is tensor-core matmuls.

The gate is either the fp32 log-decay g, or the gate logits z with g = logsigmoid(z) / tau computed in-kernel
(GATE_LOGITS). g is floored at G_FLOOR (alpha >= 4.5e-5) so the sub-chunk factors stay within fp32 range; the
floor is reached only for z < -160 at tau = 16, where the difference to the exact operator is below 4.5e-5.
"""

from __future__ import annotations

import triton
import triton.language as tl

import metala.ops.utils.triton_compat  # noqa: F401  (interpreter shim)
from metala.ops.utils.triton_math import logsigmoid, neg_expm1

G_FLOOR = -10.0
BT = 64
BC = 16


@triton.jit
def load_gate(gate, tok, m_t, i_h, offs_k, H: tl.constexpr, K: tl.constexpr, GATE_LOGITS: tl.constexpr, inv_tau):
    """fp32 log-decay [BT, BK] of a chunk: 0 on rows past the chunk's end (alpha = 1, k = 0 there)."""
    m = m_t[:, None] & (offs_k[None, :] < K)
    x = tl.load(gate + (tok[:, None] * H + i_h) * K + offs_k[None, :], mask=m, other=0.0).to(tl.float32)
    if GATE_LOGITS:
        x = logsigmoid(x) * inv_tau
    x = tl.maximum(x, -10.0)
    return tl.where(m, x, 0.0)


@triton.jit
def intra_scores(qr, k, Gam, o_t, BT_: tl.constexpr, BC_: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    """A[t, r] = sum_c q_tc k_rc exp(Gam_tc - Gam_rc) for r <= t (0 elsewhere), as tensor-core products.

    `qr` is q * exp(Gam - R) with R the reference (middle row) of each query row's sub-chunk; for sub-chunk i the
    keys are scaled by exp(R_i - Gam), which is <= 1 for earlier keys and bounded for the keys inside sub-chunk i;
    later keys are zeroed before they could overflow.
    """
    sub = o_t // BC_
    A = tl.zeros([BT_, BT_], dtype=tl.float32)
    for i in tl.static_range(BT_ // BC_):
        R_i = tl.sum(tl.where((o_t == i * BC_ + BC_ // 2)[:, None], Gam, 0.0), axis=0)
        # keys after sub-chunk i are non-causal for its rows; clamp their exponent so nothing overflows
        kf = tl.where((sub <= i)[:, None], k * tl.exp(tl.minimum(R_i[None, :] - Gam, 80.0)), 0.0)
        qi = tl.where((sub == i)[:, None], qr, 0.0)
        A += tl.dot(qi.to(DOT_DTYPE), tl.trans(kf.to(DOT_DTYPE)), input_precision=DOT_PREC)
    return tl.where(o_t[:, None] >= o_t[None, :], A, 0.0)


@triton.jit
def sub_reference(Gam, o_t, BT_: tl.constexpr, BC_: tl.constexpr):
    """Per row, Gam at the middle row of the row's 16-row sub-chunk: [BT, BK]."""
    sub = o_t // BC_
    R = tl.zeros_like(Gam)
    for i in tl.static_range(BT_ // BC_):
        R_i = tl.sum(tl.where((o_t == i * BC_ + BC_ // 2)[:, None], Gam, 0.0), axis=0)
        R = tl.where((sub == i)[:, None], R_i[None, :], R)
    return R


@triton.jit
def chunk_metala_fwd_kernel_h(
    gate, v, h_local, cdec, E, Gseg,
    chunk_start, chunk_len, seg_first_chunk, seg_n_chunks,
    inv_tau,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT_: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE_LOGITS: tl.constexpr, DT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    i_kv, i_s, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NV: tl.constexpr = (V + BV - 1) // BV
    i_k, i_v = i_kv // NV, i_kv % NV
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    m_kv = (offs_k[:, None] < K) & (offs_v[None, :] < V)
    o_t = tl.arange(0, BT_)
    first = tl.load(seg_first_chunk + i_s)
    n = tl.load(seg_n_chunks + i_s)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    logdec = tl.zeros([BK], dtype=tl.float32)
    for j in range(0, n):
        c = first + j
        start = tl.load(chunk_start + c)
        length = tl.load(chunk_len + c)
        p_h = h_local + ((c * H + i_h) * K + offs_k[:, None]) * V + offs_v[None, :]
        tl.store(p_h, S.to(h_local.dtype.element_ty), mask=m_kv)
        if i_v == 0:
            tl.store(cdec + (c * H + i_h) * K + offs_k, logdec, mask=offs_k < K)
        m_t = o_t < length
        tok = start + o_t
        g = load_gate(gate, tok, m_t, i_h, offs_k, H, K, GATE_LOGITS, inv_tau)
        Gam = tl.cumsum(g, axis=0)
        gam = tl.sum(g, axis=0)
        kd = neg_expm1(g) * tl.exp(gam[None, :] - Gam)
        vv = tl.load(v + (tok[:, None] * H + i_h) * V + offs_v[None, :],
                     mask=m_t[:, None] & (offs_v[None, :] < V), other=0.0)
        S = S * tl.exp(gam)[:, None] + tl.dot(tl.trans(kd).to(DT), vv.to(DT), input_precision=DOT_PREC)
        logdec += gam
    tl.store(E + ((i_s * H + i_h) * K + offs_k[:, None]) * V + offs_v[None, :], S, mask=m_kv)
    if i_v == 0:
        tl.store(Gseg + (i_s * H + i_h) * K + offs_k, logdec, mask=offs_k < K)


@triton.jit
def chunk_metala_fwd_kernel_seg(
    E, Gseg, h0, S_in, ht,
    doc_first_seg, doc_n_segs,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr,
):
    i_kv, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NV: tl.constexpr = (V + BV - 1) // BV
    i_k, i_v = i_kv // NV, i_kv % NV
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    m_kv = (offs_k[:, None] < K) & (offs_v[None, :] < V)
    kv = offs_k[:, None] * V + offs_v[None, :]
    if HAS_H0:
        S = tl.load(h0 + (i_n * H + i_h) * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    first = tl.load(doc_first_seg + i_n)
    ns = tl.load(doc_n_segs + i_n)
    for j in range(0, ns):
        s = first + j
        tl.store(S_in + (s * H + i_h) * K * V + kv, S, mask=m_kv)
        G = tl.load(Gseg + (s * H + i_h) * K + offs_k, mask=offs_k < K, other=0.0)
        S = S * tl.exp(G)[:, None] + tl.load(E + (s * H + i_h) * K * V + kv, mask=m_kv, other=0.0)
    if STORE_HT:
        tl.store(ht + (i_n * H + i_h) * K * V + kv, S, mask=m_kv)


@triton.jit
def chunk_metala_fwd_kernel_o(
    q, gate, v, h_local, cdec, S_in, o,
    chunk_start, chunk_len, chunk_seg,
    scale, inv_tau,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT_: tl.constexpr, BC_: tl.constexpr, BV: tl.constexpr,
    GATE_LOGITS: tl.constexpr, DT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    i_c, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k = tl.arange(0, K)
    offs_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, BT_)
    start = tl.load(chunk_start + i_c)
    length = tl.load(chunk_len + i_c)
    s = tl.load(chunk_seg + i_c)
    m_t = o_t < length
    tok = start + o_t
    g = load_gate(gate, tok, m_t, i_h, offs_k, H, K, GATE_LOGITS, inv_tau)
    Gam = tl.cumsum(g, axis=0)
    k = neg_expm1(g)
    qq = tl.load(q + (tok[:, None] * H + i_h) * K + offs_k[None, :], mask=m_t[:, None], other=0.0).to(tl.float32)
    m_kv = offs_v[None, :] < V
    kv = offs_k[:, None] * V + offs_v[None, :]
    h = tl.load(h_local + (i_c * H + i_h) * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
    dec = tl.load(cdec + (i_c * H + i_h) * K + offs_k)
    h += tl.exp(dec)[:, None] * tl.load(S_in + (s * H + i_h) * K * V + kv, mask=m_kv, other=0.0)
    acc = tl.dot((qq * tl.exp(Gam)).to(DT), h.to(DT), input_precision=DOT_PREC)
    R = sub_reference(Gam, o_t, BT_, BC_)
    A = intra_scores(qq * tl.exp(Gam - R), k, Gam, o_t, BT_, BC_, DT, DOT_PREC)
    vv = tl.load(v + (tok[:, None] * H + i_h) * V + offs_v[None, :], mask=m_t[:, None] & m_kv, other=0.0)
    acc += tl.dot(A.to(DT), vv.to(DT), input_precision=DOT_PREC)
    tl.store(o + (tok[:, None] * H + i_h) * V + offs_v[None, :], (acc * scale).to(o.dtype.element_ty),
             mask=m_t[:, None] & m_kv)
