"""Triton forward of the chunked MetaLA operator (math: README.md beside this file).

Packed layout: q, gate [T, H, K] and v [T, H, V] with documents back to back (dense [B, T] is B documents);
`ChunkPlan` maps programs to chunks, segments and documents. Three kernels:

1. `chunk_metala_fwd_kernel_h`: one program per (K-tile x V-tile, segment, head) walks the segment's chunks from a
   zero state, storing each chunk's entering state `h_local` and the log-decay from the segment start `cdec`;
   it ends with the segment's own final state `E` and total log-decay `G`.
2. `chunk_metala_fwd_kernel_seg`: per (tile, document, head), composes the segments in order,
   S_in(s + 1) = exp(G_s) * S_in(s) + E_s, from the document's initial state; stores S_in and the final state.
3. `chunk_metala_fwd_kernel_o`: per (chunk, head, V-tile), h = h_local + exp(cdec) * S_in, then
   o = scale * [(q * e^Gam) h + A v], with the intra-chunk scores A as tensor-core matmuls: one, against one
   reference (half the chunk's log-decay), when the chunk's decay spans at most SPAN nats; else one per 16-row
   sub-chunk, each with its own reference row (the sub-chunk's middle). Either way every exponent is bounded: no
   fp32 overflow. With AUG it also adds the self-augmentation sigmoid(a v), a = sum_K q w_aug k (README.md).

The gate is either the fp32 log-decay g, or the gate logits z with g = logsigmoid(z) / tau computed in-kernel
(GATE_LOGITS). g is floored at G_FLOOR (alpha >= 4.5e-5) so the sub-chunk factors stay within fp32 range; the
floor is reached only for z < -160 at tau = 16, where the difference to the exact operator is below 4.5e-5.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

import metala.ops.utils.triton_compat  # noqa: F401  (interpreter shim)
from metala.ops.utils.triton_math import logsigmoid, neg_expm1

G_FLOOR = -10.0
BT = 64
BC = 16
# chunks whose log-decay spans at most SPAN nats (all but strongly closed gates: the model's g = logsigmoid(z) / 16
# is -0.043 per token at z = 0, 2.8 nats a chunk) compute their intra-chunk products with one reference. 60 keeps
# even the discarded non-causal products below exp(60) (fp32 ends at exp(88)). METALA_ONE_REFERENCE_SPAN=-1 sends
# every chunk down the sub-chunk path (for benchmarks; read once, when this module is imported).
SPAN: tl.constexpr = tl.constexpr(float(os.environ.get("METALA_ONE_REFERENCE_SPAN", "60")))


# running sums over a chunk's rows: a scan across the program's warps, or a triangular matmul on the tensor cores,
# fp32-accurate (`_triangular_dot`: two TF32 products; exact fp32 under the interpreter). METALA_CUMSUM (read
# once, at import) says which sums take the matmul:
# "reverse" (the default: the decay gradient's reverse sum in the dq/dk kernels), "all" or "none". H200, 360M shape:
# the joint dq/dk kernel 0.633 -> 0.585 ms with "all", but every other kernel slower (forward 0.311 -> 0.476 ms;
# bench/results/20261202_h200_kernel_tune_cumsum_*.json).
_CUMSUM = os.environ.get("METALA_CUMSUM", "reverse")
if _CUMSUM not in ("reverse", "all", "none"):
    raise ValueError(f"METALA_CUMSUM must be reverse, all or none, got {_CUMSUM!r}")
CUMSUM_MATMUL: tl.constexpr = tl.constexpr(_CUMSUM == "all")
REVCUMSUM_MATMUL: tl.constexpr = tl.constexpr(_CUMSUM in ("all", "reverse"))
CUMSUM_IEEE: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _triangular_dot(M, x):
    """M @ x for a 0/1 matrix M, fp32-accurate on the tensor cores: M is exact in TF32, so only x is split, into its
    TF32 head (the low 13 mantissa bits cleared) and the rest: two TF32 products where Triton's 3xTF32 spends three
    (it also splits M, whose low part is zero) and holds M's split parts in registers."""
    if CUMSUM_IEEE:
        out = tl.dot(M, x, input_precision="ieee")
    else:
        hi = (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        out = tl.dot(M, hi, input_precision="tf32") + tl.dot(M, x - hi, input_precision="tf32")
    return out


@triton.jit
def running_sum(x, o_t, REVERSE: tl.constexpr, MATMUL: tl.constexpr):
    """Inclusive running sum of x [BT, BK] over rows (REVERSE: from the chunk's end); o_t = tl.arange(0, BT). MATMUL:
    as a triangular matmul on the tensor cores (`_triangular_dot`), else as a scan across the program's warps."""
    if MATMUL:
        if REVERSE:
            out = _triangular_dot(tl.where(o_t[:, None] <= o_t[None, :], 1.0, 0.0), x)
        else:
            out = _triangular_dot(tl.where(o_t[:, None] >= o_t[None, :], 1.0, 0.0), x)
    else:
        if REVERSE:
            out = tl.sum(x, axis=0)[None, :] - tl.cumsum(x, axis=0) + x
        else:
            out = tl.cumsum(x, axis=0)
    return out


@triton.jit
def chunk_cumsum(x, o_t, REVERSE: tl.constexpr):
    """`running_sum` in the form METALA_CUMSUM gives every kernel's forward or reverse sums."""
    if REVERSE:
        out = running_sum(x, o_t, True, REVCUMSUM_MATMUL)
    else:
        out = running_sum(x, o_t, False, CUMSUM_MATMUL)
    return out


@triton.jit
def gate_cumsum(g, o_t, MATMUL: tl.constexpr):
    """The chunk's running log-decay Gam = cumsum(g) over rows for the dq/dk kernels, which choose its form on their
    own (CONFIG["bwd_dqk"]["gam_cumsum"]): a triangular matmul (MATMUL) or as `chunk_cumsum` decides for every
    kernel (METALA_CUMSUM)."""
    if MATMUL:
        out = running_sum(g, o_t, False, True)
    else:
        out = chunk_cumsum(g, o_t, False)
    return out


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
def load_chunk(gate, chunk_start, chunk_len, chunk_seg, i_c, i_h, offs_k, H: tl.constexpr, K: tl.constexpr,
               BT_: tl.constexpr, GATE_LOGITS: tl.constexpr, inv_tau):
    """Chunk i_c's rows and gate: (o_t, tok, m_t, s, g) = the row offsets, their token indices, which rows lie
    inside the chunk, the chunk's segment, and its fp32 log-decay tile [BT, BK] (`load_gate`)."""
    o_t = tl.arange(0, BT_)
    start = tl.load(chunk_start + i_c)
    length = tl.load(chunk_len + i_c)
    s = tl.load(chunk_seg + i_c)
    m_t = o_t < length
    tok = start + o_t
    return o_t, tok, m_t, s, load_gate(gate, tok, m_t, i_h, offs_k, H, K, GATE_LOGITS, inv_tau)


# INTRA_PATH, a constexpr of the kernels with intra-chunk products: which of the two forms a compiled kernel holds.
# ANY_PATH picks per chunk at run time (one kernel holds both, and pays registers for both); ONE_REF / SUB_CHUNKS
# hold one form and return at once from chunks that take the other, so a launch of each covers every chunk.
ANY_PATH: tl.constexpr = tl.constexpr(0)
ONE_REF: tl.constexpr = tl.constexpr(1)
SUB_CHUNKS: tl.constexpr = tl.constexpr(2)


@triton.jit
def one_reference(gam):
    """True when the chunk's log-decay spans at most SPAN nats in every channel of the tile: then one reference,
    half the chunk's total log-decay, keeps every factor exp(+-(Gam - gam / 2)) within exp(SPAN / 2), and the
    intra-chunk products are one matmul each instead of one per 16-row sub-chunk. `gam` [BK] is the chunk's total
    log-decay (<= 0), and Gam, its running sum, lies in [gam, 0]."""
    return tl.min(gam, axis=0) > -SPAN


@triton.jit
def other_path(gam, PATH: tl.constexpr):
    """True when this program's chunk belongs to the other launch (a kernel compiled for one path only)."""
    if PATH == ONE_REF:
        return tl.min(gam, axis=0) <= -SPAN
    elif PATH == SUB_CHUNKS:
        return tl.min(gam, axis=0) > -SPAN
    else:
        return tl.min(gam, axis=0) != tl.min(gam, axis=0)  # never: NaN-free gam


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
def _sub_chunk_ref(Gam, o_t, i: tl.constexpr, BC_: tl.constexpr):
    """Gam at the middle row of sub-chunk i: [BK]."""
    return tl.sum(tl.where((o_t == i * BC_ + BC_ // 2)[:, None], Gam, 0.0), axis=0)


@triton.jit
def _scores_one(qq, k, Gam, gam, DOT_DTYPE: tl.constexpr, DOT_PREC: tl.constexpr):
    R = gam[None, :] * 0.5
    return tl.dot((qq * tl.exp(Gam - R)).to(DOT_DTYPE), tl.trans((k * tl.exp(R - Gam)).to(DOT_DTYPE)),
                  input_precision=DOT_PREC)


@triton.jit
def _scores_sub(qq, k, Gam, o_t, BT_: tl.constexpr, BC_: tl.constexpr, DOT_DTYPE: tl.constexpr,
                DOT_PREC: tl.constexpr):
    sub = o_t // BC_
    qr = qq * tl.exp(Gam - sub_reference(Gam, o_t, BT_, BC_))
    A = tl.zeros([BT_, BT_], dtype=tl.float32)
    for i in tl.static_range(BT_ // BC_):
        R_i = _sub_chunk_ref(Gam, o_t, i, BC_)
        # keys after sub-chunk i are non-causal for its rows; clamp their exponent so nothing overflows
        kf = tl.where((sub <= i)[:, None], k * tl.exp(tl.minimum(R_i[None, :] - Gam, 80.0)), 0.0)
        qi = tl.where((sub == i)[:, None], qr, 0.0)
        A += tl.dot(qi.to(DOT_DTYPE), tl.trans(kf.to(DOT_DTYPE)), input_precision=DOT_PREC)
    return A


@triton.jit
def intra_scores(qq, k, Gam, gam, o_t, BT_: tl.constexpr, BC_: tl.constexpr, DOT_DTYPE: tl.constexpr,
                 DOT_PREC: tl.constexpr, PATH: tl.constexpr):
    """A[t, r] = sum_c q_tc k_rc exp(Gam_tc - Gam_rc) for r <= t (0 elsewhere), as tensor-core products.

    Chunks whose decay spans more than SPAN nats (strongly closed gates) take four 16-row sub-chunks, each with
    its own reference R_i (the sub-chunk's middle): queries scaled by exp(Gam - R_i), keys by exp(R_i - Gam), which
    is <= 1 for earlier keys and bounded for the keys inside sub-chunk i; later keys are zeroed before they could
    overflow.
    """
    if PATH == ONE_REF:
        A = _scores_one(qq, k, Gam, gam, DOT_DTYPE, DOT_PREC)
    elif PATH == SUB_CHUNKS:
        A = _scores_sub(qq, k, Gam, o_t, BT_, BC_, DOT_DTYPE, DOT_PREC)
    else:
        if one_reference(gam):
            A = _scores_one(qq, k, Gam, gam, DOT_DTYPE, DOT_PREC)
        else:
            A = _scores_sub(qq, k, Gam, o_t, BT_, BC_, DOT_DTYPE, DOT_PREC)
    return tl.where(o_t[:, None] >= o_t[None, :], A, 0.0)


@triton.jit
def dot_intra(a, b, PREC: tl.constexpr, DT: tl.constexpr):
    """a [BT, BT] @ b [BT, BK] with the operands in DT. Half-precision operands go in transposed, (b^T a^T)^T: on
    sm_90 with Triton 3.6 the direct form, a register tile made from an fp32 product as the left operand, compiles
    to wrong results at 4 warps and to illegal memory accesses at 8 (bench/triton_bf16_dot_repro.py)."""
    if DT == tl.float32:
        out = tl.dot(a, b, input_precision=PREC)
    else:
        out = tl.trans(tl.dot(tl.trans(b.to(DT)), tl.trans(a.to(DT))))
    return out


@triton.jit
def _grad_q_one(dA, k, Gam, gam, PREC: tl.constexpr, DT: tl.constexpr):
    R = gam[None, :] * 0.5
    return dot_intra(dA, k * tl.exp(R - Gam), PREC, DT) * tl.exp(Gam - R)


@triton.jit
def _grad_q_sub(dA, k, Gam, o_t, BT_: tl.constexpr, BC_: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr):
    # per sub-chunk i of query rows: keys up to it, scaled by exp(R_i - Gam)
    sub = o_t // BC_
    acc = tl.zeros_like(Gam)
    for i in tl.static_range(BT_ // BC_):
        R_i = _sub_chunk_ref(Gam, o_t, i, BC_)
        kf = tl.where((sub <= i)[:, None], k * tl.exp(tl.minimum(R_i[None, :] - Gam, 80.0)), 0.0)
        acc += tl.where((sub == i)[:, None], dot_intra(dA, kf, PREC, DT), 0.0)
    return acc * tl.exp(Gam - sub_reference(Gam, o_t, BT_, BC_))


@triton.jit
def _grad_by_path(ONE: tl.constexpr, SUB: tl.constexpr, x, y, Gam, gam, o_t, BT_: tl.constexpr, BC_: tl.constexpr,
                  PREC: tl.constexpr, DT: tl.constexpr, PATH: tl.constexpr):
    """ONE(x, y, ...) or SUB(x, y, ...) as PATH says (ANY_PATH: the chunk's span decides at run time)."""
    if PATH == ONE_REF:
        out = ONE(x, y, Gam, gam, PREC, DT)
    elif PATH == SUB_CHUNKS:
        out = SUB(x, y, Gam, o_t, BT_, BC_, PREC, DT)
    else:
        if one_reference(gam):
            out = ONE(x, y, Gam, gam, PREC, DT)
        else:
            out = SUB(x, y, Gam, o_t, BT_, BC_, PREC, DT)
    return out


@triton.jit
def intra_grad_q(dA, k, Gam, gam, o_t, BT_: tl.constexpr, BC_: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr,
                 PATH: tl.constexpr):
    """dq_intra[t] = sum_{r <= t} dA[t, r] k[r] exp(Gam[t] - Gam[r]) for a causally masked fp32 dA [BT, BT]; the
    product's operands are cast to DT (fp32: PREC decides; bf16 / fp16: one tensor-core pass, fp32 accumulation)."""
    return _grad_by_path(_grad_q_one, _grad_q_sub, dA, k, Gam, gam, o_t, BT_, BC_, PREC, DT, PATH)


@triton.jit
def _grad_k_one(dAT, qq, Gam, gam, PREC: tl.constexpr, DT: tl.constexpr):
    R = gam[None, :] * 0.5
    return dot_intra(dAT, qq * tl.exp(Gam - R), PREC, DT) * tl.exp(R - Gam)


@triton.jit
def _grad_k_sub(dAT, qq, Gam, o_t, BT_: tl.constexpr, BC_: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr):
    # per sub-chunk i of key rows: queries from it on, scaled by exp(Gam - R_i)
    sub = o_t // BC_
    acc = tl.zeros_like(Gam)
    for i in tl.static_range(BT_ // BC_):
        R_i = _sub_chunk_ref(Gam, o_t, i, BC_)
        qf = tl.where((sub >= i)[:, None], qq * tl.exp(tl.minimum(Gam - R_i[None, :], 80.0)), 0.0)
        acc += tl.where((sub == i)[:, None], dot_intra(dAT, qf, PREC, DT), 0.0)
    return acc * tl.exp(sub_reference(Gam, o_t, BT_, BC_) - Gam)


@triton.jit
def intra_grad_k(dAT, qq, Gam, gam, o_t, BT_: tl.constexpr, BC_: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr,
                 PATH: tl.constexpr):
    """dk_intra[r] = sum_{t >= r} dA[t, r] q[t] exp(Gam[t] - Gam[r]), from the transposed dAT[r, t] = dA[t, r]
    (operands cast to DT, as in `intra_grad_q`)."""
    return _grad_by_path(_grad_k_one, _grad_k_sub, dAT, qq, Gam, gam, o_t, BT_, BC_, PREC, DT, PATH)


@triton.jit
def aug_score(qq, k, w_aug, i_h, offs_k, K: tl.constexpr):
    """The self-augmentation's per-token scalar a = sum_K q * w_aug * k ([BT], fp32) from full-K tiles q, k."""
    w = tl.load(w_aug + i_h * K + offs_k).to(tl.float32)
    return tl.sum(qq * k * w[None, :], axis=1)


@triton.jit
def segment_tokens(chunk_start, chunk_len, first, n):
    """First token and end (exclusive) of the segment of chunks first .. first + n - 1. A segment's chunks are
    consecutive in one document, so chunk j starts at seg_start + j * BT and holds min(BT, seg_end - start) tokens.
    The forward state pass computes its chunks' tokens this way rather than loading them from the tables at every
    step (two dependent global loads at the head of each step of the serial chain): fwd_h 0.124 -> 0.115 ms at the
    360M shape, 0.243 -> 0.226 ms at 1.3B (H200, 20261205_h200_kernel_tune_aug_{baseline,new}.json). The backward
    pass (bwd_dh) measured 4-6 % slower with it (0.139 -> 0.145, 0.267 -> 0.283 ms) and keeps the table loads."""
    seg_start = tl.load(chunk_start + first)
    seg_end = tl.load(chunk_start + first + n - 1) + tl.load(chunk_len + first + n - 1)
    return seg_start, seg_end


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
    seg_start, seg_end = segment_tokens(chunk_start, chunk_len, first, n)
    S = tl.zeros([BK, BV], dtype=tl.float32)
    logdec = tl.zeros([BK], dtype=tl.float32)
    for j in range(0, n):
        c = first + j
        start = seg_start + j * BT_
        length = tl.minimum(seg_end - start, BT_)
        p_h = h_local + ((c * H + i_h) * K + offs_k[:, None]) * V + offs_v[None, :]
        tl.store(p_h, S.to(h_local.dtype.element_ty), mask=m_kv)
        if i_v == 0:
            tl.store(cdec + (c * H + i_h) * K + offs_k, logdec, mask=offs_k < K)
        m_t = o_t < length
        tok = start + o_t
        g = load_gate(gate, tok, m_t, i_h, offs_k, H, K, GATE_LOGITS, inv_tau)
        Gam = chunk_cumsum(g, o_t, False)
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
    q, gate, v, h_local, cdec, S_in, o, o_lo, w_aug,
    chunk_start, chunk_len, chunk_seg,
    scale, inv_tau,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT_: tl.constexpr, BC_: tl.constexpr, BV: tl.constexpr,
    GATE_LOGITS: tl.constexpr, DT: tl.constexpr, DOT_PREC: tl.constexpr, INTRA_DT: tl.constexpr,
    INTRA_PATH: tl.constexpr, AUG: tl.constexpr, SPLIT: tl.constexpr,
):
    """o per (chunk, head, V-tile); with AUG also the self-augmentation sigmoid(a v), a = sum_K q w_aug k.
    INTRA_DT: operand type of the intra-chunk scores, whose factors reach exp(SPAN / 2) (fp32 for fp16 inputs).
    SPLIT: the fp32 result as two bf16 tensors, o (rounded) and o_lo (the rounding's remainder, rounded)."""
    i_c, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k = tl.arange(0, K)
    offs_v = i_v * BV + tl.arange(0, BV)
    o_t, tok, m_t, s, g = load_chunk(gate, chunk_start, chunk_len, chunk_seg, i_c, i_h, offs_k, H, K, BT_,
                                     GATE_LOGITS, inv_tau)
    gam = tl.sum(g, axis=0)
    if other_path(gam, INTRA_PATH):
        return
    Gam = chunk_cumsum(g, o_t, False)
    k = neg_expm1(g)
    qq = tl.load(q + (tok[:, None] * H + i_h) * K + offs_k[None, :], mask=m_t[:, None], other=0.0).to(tl.float32)
    if AUG:
        a = aug_score(qq, k, w_aug, i_h, offs_k, K)  # now, so that q and k need not stay live to the end
    # the intra-chunk scores and the decayed queries first, in the products' types: g, Gam, k and q die before
    # the [K, BV] fp32 state tile is loaded
    qe = (qq * tl.exp(Gam)).to(DT)
    A = intra_scores(qq, k, Gam, gam, o_t, BT_, BC_, INTRA_DT, DOT_PREC, INTRA_PATH).to(DT)
    m_kv = offs_v[None, :] < V
    kv = offs_k[:, None] * V + offs_v[None, :]
    h = tl.load(h_local + (i_c * H + i_h) * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
    dec = tl.load(cdec + (i_c * H + i_h) * K + offs_k)
    h += tl.exp(dec)[:, None] * tl.load(S_in + (s * H + i_h) * K * V + kv, mask=m_kv, other=0.0)
    acc = tl.dot(qe, h.to(DT), input_precision=DOT_PREC)
    vv = tl.load(v + (tok[:, None] * H + i_h) * V + offs_v[None, :], mask=m_t[:, None] & m_kv, other=0.0)
    acc += tl.dot(A, vv.to(DT), input_precision=DOT_PREC)
    acc *= scale
    if AUG:
        acc += tl.sigmoid(a[:, None] * vv.to(tl.float32))
    p_o = (tok[:, None] * H + i_h) * V + offs_v[None, :]
    hi = acc.to(o.dtype.element_ty, fp_downcast_rounding="rtne" if SPLIT else None)
    tl.store(o + p_o, hi, mask=m_t[:, None] & m_kv)
    if SPLIT:
        tl.store(o_lo + p_o, (acc - hi.to(tl.float32)).to(o_lo.dtype.element_ty), mask=m_t[:, None] & m_kv)
