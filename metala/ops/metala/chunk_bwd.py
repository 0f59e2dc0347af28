"""Triton backward of the chunked MetaLA operator (formulas: README.md beside this file).

The state gradients mirror the forward's two-level pass, in reverse:
1. `chunk_metala_bwd_kernel_dh`: per (tile, segment, head), walks the segment's chunks backwards from a zero
   gradient, storing dS_local (the gradient of the state after each chunk from later chunks of the segment) and
   the segment's gradient of its entering state `Dseg`.
2. `chunk_metala_bwd_kernel_seg`: per (tile, document, head), D_out(last) = d final state,
   D_out(s - 1) = exp(G_s) * D_out(s) + Dseg_s; the document's d initial state is the last D.
3. per chunk, with h = h_local + exp(cdec) * S_in and dS = dS_local + exp(G - cdec - gam) * D_out:
   `chunk_metala_bwd_kernel_dv` (per V-tile) computes dv; `chunk_metala_bwd_kernel_dqk` computes dq, dk and the
   decay gradient dg = revcumsum(q dq - k dk) + (state terms) - alpha dk (the key tied to the decay), and dz when
   the gate came as logits. Two kernels instead of one keep each under the register file (no spills).
   With the fused self-augmentation (AUG), the dv kernel also stores da, the gradient of its per-token scalar, and
   the dq/dk kernel adds its dq, dk (through -alpha only) and per-chunk dw_aug parts.
"""

from __future__ import annotations

import triton
import triton.language as tl

import metala.ops.utils.triton_compat  # noqa: F401  (interpreter shim)
from metala.ops.metala.chunk_fwd import (
    ONE_REF,
    aug_score,
    chunk_cumsum,
    dot_intra,
    gate_cumsum,
    intra_grad_k,
    intra_grad_q,
    intra_scores,
    load_chunk,
    load_gate,
    other_path,
)
from metala.ops.utils.triton_math import neg_expm1


@triton.jit
def chunk_metala_bwd_kernel_dh(
    q, gate, do, dS_local, Dseg,
    chunk_start, chunk_len, seg_first_chunk, seg_n_chunks,
    scale, inv_tau,
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
    D = tl.zeros([BK, BV], dtype=tl.float32)
    for jj in range(0, n):
        c = first + n - 1 - jj
        start = tl.load(chunk_start + c)
        length = tl.load(chunk_len + c)
        tl.store(dS_local + ((c * H + i_h) * K + offs_k[:, None]) * V + offs_v[None, :],
                 D.to(dS_local.dtype.element_ty), mask=m_kv)
        m_t = o_t < length
        tok = start + o_t
        g = load_gate(gate, tok, m_t, i_h, offs_k, H, K, GATE_LOGITS, inv_tau)
        Gam = chunk_cumsum(g, o_t, False)
        gam = tl.sum(g, axis=0)
        qq = tl.load(q + (tok[:, None] * H + i_h) * K + offs_k[None, :],
                     mask=m_t[:, None] & (offs_k[None, :] < K), other=0.0)
        dd = tl.load(do + (tok[:, None] * H + i_h) * V + offs_v[None, :],
                     mask=m_t[:, None] & (offs_v[None, :] < V), other=0.0)
        qd = (qq.to(tl.float32) * tl.exp(Gam)).to(DT)
        D = D * tl.exp(gam)[:, None] + scale * tl.dot(tl.trans(qd), dd.to(DT), input_precision=DOT_PREC)
    tl.store(Dseg + ((i_s * H + i_h) * K + offs_k[:, None]) * V + offs_v[None, :], D, mask=m_kv)


@triton.jit
def chunk_metala_bwd_kernel_seg(
    Dseg, Gseg, dht, Dout, dh0,
    doc_first_seg, doc_n_segs,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
):
    i_kv, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NV: tl.constexpr = (V + BV - 1) // BV
    i_k, i_v = i_kv // NV, i_kv % NV
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    m_kv = (offs_k[:, None] < K) & (offs_v[None, :] < V)
    kv = offs_k[:, None] * V + offs_v[None, :]
    if HAS_DHT:
        D = tl.load(dht + (i_n * H + i_h) * K * V + kv, mask=m_kv, other=0.0).to(tl.float32)
    else:
        D = tl.zeros([BK, BV], dtype=tl.float32)
    first = tl.load(doc_first_seg + i_n)
    ns = tl.load(doc_n_segs + i_n)
    for jj in range(0, ns):
        s = first + ns - 1 - jj
        tl.store(Dout + (s * H + i_h) * K * V + kv, D, mask=m_kv)
        G = tl.load(Gseg + (s * H + i_h) * K + offs_k, mask=offs_k < K, other=0.0)
        D = D * tl.exp(G)[:, None] + tl.load(Dseg + (s * H + i_h) * K * V + kv, mask=m_kv, other=0.0)
    if STORE_DH0:
        tl.store(dh0 + (i_n * H + i_h) * K * V + kv, D, mask=m_kv)


@triton.jit
def load_states(h_local, cdec, S_in, Gseg, dS_local, Dout, i_c, i_h, s, gam, offs_k, offs_v,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """fp32 [K, BV] tiles of the state entering chunk i_c and of the gradient of the state leaving it."""
    m_v = offs_v[None, :] < V
    kv = offs_k[:, None] * V + offs_v[None, :]
    dec_in = tl.load(cdec + (i_c * H + i_h) * K + offs_k)
    # log-decay from this chunk's end to its segment's end
    dec_out = tl.load(Gseg + (s * H + i_h) * K + offs_k) - dec_in - gam
    h = tl.load(h_local + (i_c * H + i_h) * K * V + kv, mask=m_v, other=0.0).to(tl.float32)
    h += tl.exp(dec_in)[:, None] * tl.load(S_in + (s * H + i_h) * K * V + kv, mask=m_v, other=0.0)
    dS = tl.load(dS_local + (i_c * H + i_h) * K * V + kv, mask=m_v, other=0.0).to(tl.float32)
    dS += tl.exp(dec_out)[:, None] * tl.load(Dout + (s * H + i_h) * K * V + kv, mask=m_v, other=0.0)
    return h, dS


@triton.jit
def chunk_metala_bwd_kernel_dv(
    q, gate, v, do, h_local, cdec, S_in, Gseg, dS_local, Dout, dv, dA_out, w_aug, da,
    chunk_start, chunk_len, chunk_seg,
    scale, inv_tau,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT_: tl.constexpr, BC_: tl.constexpr, BV: tl.constexpr,
    GATE_LOGITS: tl.constexpr, DT: tl.constexpr, DOT_PREC: tl.constexpr, STORE_DA: tl.constexpr,
    INTRA_DT: tl.constexpr, INTRA_PATH: tl.constexpr, AUG: tl.constexpr, DA_ATOMIC: tl.constexpr,
):
    """dv = scale * A^T dO + (k * exp(gam - Gam)) dS, per (chunk, head, V-tile). With STORE_DA (one V-tile
    covering V) it also stores the masked dA = scale * dO v^T (fp32), so the dq/dk kernels need no dO v pass.
    With AUG (fused self-augmentation o += sigmoid(a v)): dv += a * ds and the fp32 gradient of the scalar a,
    da = sum_V ds * v with ds = dO * s (1 - s), which the dq/dk kernels turn into dq, dg and dw_aug; V-tiles add
    their parts atomically (DA_ATOMIC) when one program does not cover V."""
    i_c, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k = tl.arange(0, K)
    offs_v = i_v * BV + tl.arange(0, BV)
    o_t, tok, m_t, s, g = load_chunk(gate, chunk_start, chunk_len, chunk_seg, i_c, i_h, offs_k, H, K, BT_,
                                     GATE_LOGITS, inv_tau)
    Gam = chunk_cumsum(g, o_t, False)
    gam = tl.sum(g, axis=0)
    if other_path(gam, INTRA_PATH):
        return
    k = neg_expm1(g)
    qq = tl.load(q + (tok[:, None] * H + i_h) * K + offs_k[None, :], mask=m_t[:, None], other=0.0).to(tl.float32)
    if AUG:
        a = aug_score(qq, k, w_aug, i_h, offs_k, K)  # now, so that q need not stay live to the end
    A = intra_scores(qq, k, Gam, gam, o_t, BT_, BC_, INTRA_DT, DOT_PREC, INTRA_PATH)
    # the state term's key factor now, in the product's type: g, Gam and k die here
    kd = (k * tl.exp(gam[None, :] - Gam)).to(DT)
    m_tv = m_t[:, None] & (offs_v[None, :] < V)
    dd = tl.load(do + (tok[:, None] * H + i_h) * V + offs_v[None, :], mask=m_tv, other=0.0).to(DT)
    dvv = scale * tl.dot(tl.trans(A.to(DT)), dd, input_precision=DOT_PREC)
    _, dS = load_states(h_local, cdec, S_in, Gseg, dS_local, Dout, i_c, i_h, s, gam, offs_k, offs_v, H, K, V)
    dvv += tl.dot(kd, dS.to(DT), input_precision=DOT_PREC)
    if AUG:
        vf = tl.load(v + (tok[:, None] * H + i_h) * V + offs_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        sg = tl.sigmoid(a[:, None] * vf)
        ds = dd.to(tl.float32) * sg * (1.0 - sg)
        dvv += ds * a[:, None]
        if DA_ATOMIC:
            tl.atomic_add(da + tok * H + i_h, tl.sum(ds * vf, axis=1), mask=m_t)
        else:
            tl.store(da + tok * H + i_h, tl.sum(ds * vf, axis=1), mask=m_t)
    tl.store(dv + (tok[:, None] * H + i_h) * V + offs_v[None, :], dvv.to(dv.dtype.element_ty), mask=m_tv)
    if STORE_DA:
        vv = tl.load(v + (tok[:, None] * H + i_h) * V + offs_v[None, :], mask=m_tv, other=0.0).to(DT)
        dA = tl.dot(dd, tl.trans(vv), input_precision=DOT_PREC)
        dA = tl.where(o_t[:, None] >= o_t[None, :], dA * scale, 0.0)
        tl.store(dA_out + ((i_c * H + i_h) * BT_ + o_t[:, None]) * BT_ + o_t[None, :], dA)


@triton.jit
def store_dgate(dgate, dg, g, p_k, m_tk, inv_tau, GATE_LOGITS: tl.constexpr):
    """The decay gradient as the gate came: dz = dg * sigmoid(-z) / tau for logits; none where g was floored.
    sigmoid(-z) = 1 - exp(logsigmoid(z)) = -expm1(tau * g) wherever g was not floored: from g, without reading the
    logits again or dividing (g = logsigmoid(z) / tau, rounded: tau * g is logsigmoid(z) to an ulp or two)."""
    if GATE_LOGITS:
        dg = dg * neg_expm1(g * (1.0 / inv_tau)) * inv_tau
    tl.store(dgate + p_k, tl.where(g > -10.0, dg, 0.0).to(dgate.dtype.element_ty), mask=m_tk)


@triton.jit
def aug_dq(w_aug, da, tok, m_t, i_h, offs_k, k, H: tl.constexpr, K: tl.constexpr):
    """The fused self-augmentation's query gradient da * w_aug * k ([BT, BK]), and da ([BT])."""
    w = tl.load(w_aug + i_h * K + offs_k).to(tl.float32)
    dav = tl.load(da + tok * H + i_h, mask=m_t, other=0.0)
    return dav[:, None] * w[None, :] * k, dav


@triton.jit
def aug_dk_and_dw(w_aug, dav, qq, k, dw_part, i_c, i_h, offs_k, H: tl.constexpr, K: tl.constexpr):
    """The self-augmentation's key gradient da * w_aug * q ([BT, BK]; it reaches g only through k = 1 - exp(g),
    never through the decays), and this chunk's part of dw_aug = sum_t da q k, stored per (chunk, head)."""
    # w is loaded again rather than kept live from `aug_dq`: the dq/dk kernels run at the register limit
    w = tl.load(w_aug + i_h * K + offs_k).to(tl.float32)
    tl.store(dw_part + (i_c * H + i_h) * K + offs_k, tl.sum(dav[:, None] * qq * k, axis=0))
    return dav[:, None] * w[None, :] * qq


@triton.jit
def dq_dk_from_products(q, dq, dgate, dA, dq_inter, dk_state, h_dS, g, gam, tok, m_t, o_t, i_h, offs_k, scale,
                        inv_tau, w_aug, da, dw_part, i_c, H: tl.constexpr, K: tl.constexpr, BT_: tl.constexpr,
                        BC_: tl.constexpr, GATE_LOGITS: tl.constexpr, INTRA_PREC: tl.constexpr,
                        INTRA_DT: tl.constexpr, INTRA_PATH: tl.constexpr, AUG: tl.constexpr,
                        GAM_MATMUL: tl.constexpr):
    """Stores dq and the gate gradient of one (chunk, head, K-tile) from the masked dA and the products over V:
    dq_inter = dO h^T, dk_state = v dS^T (both [BT, BK]) and h_dS = rowsum(h * dS) ([BK]); with AUG, adds the
    self-augmentation's terms from da and stores this chunk's dw_aug part."""
    Gam = gate_cumsum(g, o_t, GAM_MATMUL)
    k = neg_expm1(g)
    m_tk = m_t[:, None]
    p_k = (tok[:, None] * H + i_h) * K + offs_k[None, :]
    if INTRA_PATH == ONE_REF:
        # one reference R = gam / 2 for the whole chunk (chunk_fwd.one_reference): the tail's four decay factors
        # from two exponentials, E = exp(Gam - R), 1 / E, and the per-channel exp(R): exp(Gam) = E exp(R) and
        # exp(gam - Gam) = exp(R) / E (gam - R = R); all bounded by exp(SPAN / 2)
        half = gam[None, :] * 0.5
        E = tl.exp(Gam - half)
        E_inv = tl.exp(half - Gam)
        e_half = tl.exp(half)
        dqq = dot_intra(dA, k * E_inv, INTRA_PREC, INTRA_DT) * E + scale * (E * e_half) * dq_inter
    else:
        dqq = intra_grad_q(dA, k, Gam, gam, o_t, BT_, BC_, INTRA_PREC, INTRA_DT, INTRA_PATH)
        dqq += scale * tl.exp(Gam) * dq_inter
    if AUG:
        dq_aug, dav = aug_dq(w_aug, da, tok, m_t, i_h, offs_k, k, H, K)
        tl.store(dq + p_k, (dqq + dq_aug).to(dq.dtype.element_ty), mask=m_tk)
    else:
        tl.store(dq + p_k, dqq.to(dq.dtype.element_ty), mask=m_tk)
    qq = tl.load(q + p_k, mask=m_tk, other=0.0).to(tl.float32)
    d_gam = qq * dqq
    if INTRA_PATH == ONE_REF:
        dk_state = dk_state * (E_inv * e_half)
        dkk = dot_intra(tl.trans(dA), qq * E, INTRA_PREC, INTRA_DT) * E_inv + dk_state
    else:
        dk_state = dk_state * tl.exp(gam[None, :] - Gam)
        dkk = intra_grad_k(tl.trans(dA), qq, Gam, gam, o_t, BT_, BC_, INTRA_PREC, INTRA_DT, INTRA_PATH) + dk_state
    d_gam -= k * dkk
    # the key is tied to the decay: k = 1 - exp(g), dk/dg = -exp(g); taken before the running sum below, so that
    # q, dk and the self-augmentation's terms are dead while it runs (register pressure)
    if AUG:
        dkk += aug_dk_and_dw(w_aug, dav, qq, k, dw_part, i_c, i_h, offs_k, H, K)
    dg_key = tl.exp(g) * dkk
    chunk_terms = tl.sum(k * dk_state, axis=0) + tl.exp(gam) * h_dS
    # reverse cumulative sum within the chunk, plus the terms that reach every row through the chunk's total decay
    dg = chunk_cumsum(d_gam, o_t, True) + chunk_terms[None, :] - dg_key
    store_dgate(dgate, dg, g, p_k, m_tk, inv_tau, GATE_LOGITS)


@triton.jit
def dqk_item(q, gate, v, do, h_local, cdec, S_in, Gseg, dS_local, Dout, dq, dgate, dA_in, w_aug, da, dw_part,
             chunk_start, chunk_len, chunk_seg, scale, inv_tau, i_c, i_h, i_k, CHECK_PATH: tl.constexpr,
             path_flags, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
             BT_: tl.constexpr, BC_: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
             GATE_LOGITS: tl.constexpr, DT: tl.constexpr, DOT_PREC: tl.constexpr, INTRA_PREC: tl.constexpr,
             INTRA_DT: tl.constexpr, INTRA_PATH: tl.constexpr, AUG: tl.constexpr, LOAD_DA: tl.constexpr,
             WRITE_FLAG: tl.constexpr, GAM_MATMUL: tl.constexpr):
    """dq and the gate gradient of one (chunk, head, K-tile). CHECK_PATH: skip a chunk of the other intra path
    (WRITE_FLAG: and record that it was skipped, for the launch that walks the flags)."""
    offs_k = i_k * BK + tl.arange(0, BK)
    o_t, tok, m_t, s, g = load_chunk(gate, chunk_start, chunk_len, chunk_seg, i_c, i_h, offs_k, H, K, BT_,
                                     GATE_LOGITS, inv_tau)
    gam = tl.sum(g, axis=0)
    work = True
    if CHECK_PATH:
        skip = other_path(gam, INTRA_PATH)
        if WRITE_FLAG:
            tl.store(path_flags + (i_c * H + i_h) * (K // BK) + i_k, skip.to(tl.int8))
        work = not skip
    if work:
        dA = tl.zeros([BT_, BT_], dtype=tl.float32)
        dq_inter = tl.zeros([BT_, BK], dtype=tl.float32)
        dk_state = tl.zeros([BT_, BK], dtype=tl.float32)
        h_dS = tl.zeros([BK], dtype=tl.float32)
        for i_v in tl.static_range((V + BV - 1) // BV):
            offs_v = i_v * BV + tl.arange(0, BV)
            m_tv = m_t[:, None] & (offs_v[None, :] < V)
            h, dS = load_states(h_local, cdec, S_in, Gseg, dS_local, Dout, i_c, i_h, s, gam, offs_k, offs_v, H, K, V)
            vv = tl.load(v + (tok[:, None] * H + i_h) * V + offs_v[None, :], mask=m_tv, other=0.0).to(DT)
            dd = tl.load(do + (tok[:, None] * H + i_h) * V + offs_v[None, :], mask=m_tv, other=0.0).to(DT)
            if not LOAD_DA:
                dA += tl.dot(dd, tl.trans(vv), input_precision=DOT_PREC)
            dq_inter += tl.dot(dd, tl.trans(h.to(DT)), input_precision=DOT_PREC)
            dk_state += tl.dot(vv, tl.trans(dS.to(DT)), input_precision=DOT_PREC)
            h_dS += tl.sum(h * dS, axis=1)
        if LOAD_DA:
            dA = tl.load(dA_in + ((i_c * H + i_h) * BT_ + o_t[:, None]) * BT_ + o_t[None, :])
        else:
            dA = tl.where(o_t[:, None] >= o_t[None, :], dA * scale, 0.0)
        dq_dk_from_products(q, dq, dgate, dA, dq_inter, dk_state, h_dS, g, gam, tok, m_t, o_t, i_h, offs_k,
                            scale, inv_tau, w_aug, da, dw_part, i_c, H, K, BT_, BC_, GATE_LOGITS, INTRA_PREC, INTRA_DT,
                            INTRA_PATH, AUG, GAM_MATMUL)


# PATH_FLAGS of the dq/dk kernel when its two intra paths are two launches (chunk_fwd.INTRA_PATH): NO_FLAGS, every
# launch covers the full grid and returns from the other path's chunks; WRITE_FLAGS, the one-reference launch also
# records which (chunk, head, K-tile) it skipped; WALK_FLAGS, the sub-chunk launch runs one program per FLAG_BLOCK
# of those records and works only on the recorded ones. Its full grid would hold the SMs' slots (at this kernel's
# registers, two programs an SM) for tens of thousands of programs that only read the gate to return.
NO_FLAGS: tl.constexpr = tl.constexpr(0)
WRITE_FLAGS: tl.constexpr = tl.constexpr(1)
WALK_FLAGS: tl.constexpr = tl.constexpr(2)

# ITEMS of the dq/dk kernel's full-grid launches (CONFIG["bwd_dqk"]["items"]): GRID_ITEMS, a (chunk, head, K-tile)
# grid, chunks fastest; FLAT_ITEMS, a 1-D grid of the same items with the K-tiles of one (chunk, head) adjacent, so
# that the second reads that (chunk, head)'s v and dO while the first's are in L2; LOOP_ITEMS, a fixed number of
# programs, each looping over the flat items at a stride of the grid (the compiler may then prefetch an item's
# loads during the one before: LOOP_STAGES software-pipelining stages of that loop).
GRID_ITEMS: tl.constexpr = tl.constexpr(0)
FLAT_ITEMS: tl.constexpr = tl.constexpr(1)
LOOP_ITEMS: tl.constexpr = tl.constexpr(2)


@triton.jit
def item_coords(item, H: tl.constexpr, NK: tl.constexpr):
    """(chunk, head, K-tile) of a flat dq/dk item: the K-tiles of one (chunk, head) adjacent, then heads, then chunks
    (the order of the path flags and of the flat and loop launches)."""
    return item // (H * NK), (item // NK) % H, item % NK


@triton.jit
def chunk_metala_bwd_kernel_dqk(
    q, gate, v, do, h_local, cdec, S_in, Gseg, dS_local, Dout,
    dq, dgate, dA_in, w_aug, da, dw_part, path_flags, n_items,
    chunk_start, chunk_len, chunk_seg,
    scale, inv_tau,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT_: tl.constexpr, BC_: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE_LOGITS: tl.constexpr, DT: tl.constexpr, DOT_PREC: tl.constexpr, INTRA_PREC: tl.constexpr,
    INTRA_DT: tl.constexpr, INTRA_PATH: tl.constexpr, AUG: tl.constexpr, LOAD_DA: tl.constexpr,
    PATH_FLAGS: tl.constexpr, FLAG_BLOCK: tl.constexpr, GAM_MATMUL: tl.constexpr,
    ITEMS: tl.constexpr = GRID_ITEMS, LOOP_STAGES: tl.constexpr = 1,
):
    """dq and the decay gradient dg (or dz) per (chunk, head, K-tile); key channels are independent except
    through dA = dO v^T, which each K-tile recomputes (cheap) so that no program holds all K channels."""
    NK: tl.constexpr = K // BK
    if PATH_FLAGS == WALK_FLAGS:
        first = tl.program_id(0) * FLAG_BLOCK
        offs = first + tl.arange(0, FLAG_BLOCK)
        # one read of the block's records; a block without any (ordinary gates: every block) ends here
        if tl.max(tl.load(path_flags + offs, mask=offs < n_items, other=0).to(tl.int32), axis=0) != 0:
            for j in range(0, FLAG_BLOCK):
                item = first + j
                if item < n_items:
                    if tl.load(path_flags + item) != 0:
                        i_c, i_h, i_k = item_coords(item, H, NK)
                        dqk_item(q, gate, v, do, h_local, cdec, S_in, Gseg, dS_local, Dout, dq, dgate, dA_in, w_aug,
                                 da, dw_part, chunk_start, chunk_len, chunk_seg, scale, inv_tau,
                                 i_c, i_h, i_k, False, path_flags,
                                 H, K, V, BT_, BC_, BK, BV, GATE_LOGITS, DT, DOT_PREC, INTRA_PREC, INTRA_DT,
                                 INTRA_PATH, AUG, LOAD_DA, False, GAM_MATMUL)
    elif ITEMS == LOOP_ITEMS:
        for item in tl.range(tl.program_id(0), n_items, tl.num_programs(0), num_stages=LOOP_STAGES):
            i_c, i_h, i_k = item_coords(item, H, NK)
            dqk_item(q, gate, v, do, h_local, cdec, S_in, Gseg, dS_local, Dout, dq, dgate, dA_in, w_aug, da, dw_part,
                     chunk_start, chunk_len, chunk_seg, scale, inv_tau,
                     i_c, i_h, i_k, True, path_flags,
                     H, K, V, BT_, BC_, BK, BV, GATE_LOGITS, DT, DOT_PREC, INTRA_PREC, INTRA_DT, INTRA_PATH, AUG,
                     LOAD_DA, PATH_FLAGS == WRITE_FLAGS, GAM_MATMUL)
    else:
        if ITEMS == GRID_ITEMS:
            i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        else:
            i_c, i_h, i_k = item_coords(tl.program_id(0), H, NK)
        dqk_item(q, gate, v, do, h_local, cdec, S_in, Gseg, dS_local, Dout, dq, dgate, dA_in, w_aug, da, dw_part,
                 chunk_start, chunk_len, chunk_seg, scale, inv_tau, i_c, i_h, i_k, True, path_flags,
                 H, K, V, BT_, BC_, BK, BV, GATE_LOGITS, DT, DOT_PREC, INTRA_PREC, INTRA_DT, INTRA_PATH, AUG, LOAD_DA,
                 PATH_FLAGS == WRITE_FLAGS, GAM_MATMUL)


@triton.jit
def chunk_metala_bwd_kernel_dq(
    q, gate, v, do, h_local, cdec, S_in, Gseg, dS_local, Dout, dq, dA_in, w_aug, da,
    chunk_start, chunk_len, chunk_seg,
    scale, inv_tau,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT_: tl.constexpr, BC_: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE_LOGITS: tl.constexpr, DT: tl.constexpr, DOT_PREC: tl.constexpr, INTRA_PREC: tl.constexpr,
    INTRA_DT: tl.constexpr, INTRA_PATH: tl.constexpr,
    LOAD_DA: tl.constexpr, AUG: tl.constexpr, GAM_MATMUL: tl.constexpr,
):
    """dq per (chunk, head, K-tile): the split form of `chunk_metala_bwd_kernel_dqk` (fewer live registers).
    With LOAD_DA, dA comes from `dA_in` (written by the dv kernel) instead of a dO v^T pass here."""
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k = i_k * BK + tl.arange(0, BK)
    o_t, tok, m_t, s, g = load_chunk(gate, chunk_start, chunk_len, chunk_seg, i_c, i_h, offs_k, H, K, BT_,
                                     GATE_LOGITS, inv_tau)
    gam = tl.sum(g, axis=0)
    if other_path(gam, INTRA_PATH):
        return
    dA = tl.zeros([BT_, BT_], dtype=tl.float32)
    dq_inter = tl.zeros([BT_, BK], dtype=tl.float32)
    for i_v in tl.static_range((V + BV - 1) // BV):
        offs_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (offs_v[None, :] < V)
        m_v = offs_v[None, :] < V
        kv = offs_k[:, None] * V + offs_v[None, :]
        h = tl.load(h_local + (i_c * H + i_h) * K * V + kv, mask=m_v, other=0.0).to(tl.float32)
        dec_in = tl.load(cdec + (i_c * H + i_h) * K + offs_k)
        h += tl.exp(dec_in)[:, None] * tl.load(S_in + (s * H + i_h) * K * V + kv, mask=m_v, other=0.0)
        dd = tl.load(do + (tok[:, None] * H + i_h) * V + offs_v[None, :], mask=m_tv, other=0.0).to(DT)
        if not LOAD_DA:
            vv = tl.load(v + (tok[:, None] * H + i_h) * V + offs_v[None, :], mask=m_tv, other=0.0).to(DT)
            dA += tl.dot(dd, tl.trans(vv), input_precision=DOT_PREC)
        dq_inter += tl.dot(dd, tl.trans(h.to(DT)), input_precision=DOT_PREC)
    if LOAD_DA:
        dA = tl.load(dA_in + ((i_c * H + i_h) * BT_ + o_t[:, None]) * BT_ + o_t[None, :])
    else:
        dA = tl.where(o_t[:, None] >= o_t[None, :], dA * scale, 0.0)
    Gam = gate_cumsum(g, o_t, GAM_MATMUL)
    k = neg_expm1(g)
    dqq = intra_grad_q(dA, k, Gam, gam, o_t, BT_, BC_, INTRA_PREC, INTRA_DT, INTRA_PATH)
    dqq += scale * tl.exp(Gam) * dq_inter
    if AUG:
        dqq += aug_dq(w_aug, da, tok, m_t, i_h, offs_k, k, H, K)[0]
    tl.store(dq + (tok[:, None] * H + i_h) * K + offs_k[None, :], dqq.to(dq.dtype.element_ty), mask=m_t[:, None])


@triton.jit
def chunk_metala_bwd_kernel_dkg(
    q, gate, v, do, h_local, cdec, S_in, Gseg, dS_local, Dout, dq, dgate, dA_in, w_aug, da, dw_part,
    chunk_start, chunk_len, chunk_seg,
    scale, inv_tau,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT_: tl.constexpr, BC_: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    GATE_LOGITS: tl.constexpr, DT: tl.constexpr, DOT_PREC: tl.constexpr, INTRA_PREC: tl.constexpr,
    INTRA_DT: tl.constexpr, INTRA_PATH: tl.constexpr,
    LOAD_DA: tl.constexpr, AUG: tl.constexpr, GAM_MATMUL: tl.constexpr,
):
    """dk and the decay gradient per (chunk, head, K-tile), reading the dq that `chunk_metala_bwd_kernel_dq`
    wrote (q * dq enters dg), and dA from `dA_in` with LOAD_DA."""
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k = i_k * BK + tl.arange(0, BK)
    o_t, tok, m_t, s, g = load_chunk(gate, chunk_start, chunk_len, chunk_seg, i_c, i_h, offs_k, H, K, BT_,
                                     GATE_LOGITS, inv_tau)
    gam = tl.sum(g, axis=0)
    if other_path(gam, INTRA_PATH):
        return
    dA = tl.zeros([BT_, BT_], dtype=tl.float32)
    dk_state = tl.zeros([BT_, BK], dtype=tl.float32)
    h_dS = tl.zeros([BK], dtype=tl.float32)
    for i_v in tl.static_range((V + BV - 1) // BV):
        offs_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (offs_v[None, :] < V)
        h, dS = load_states(h_local, cdec, S_in, Gseg, dS_local, Dout, i_c, i_h, s, gam, offs_k, offs_v, H, K, V)
        vv = tl.load(v + (tok[:, None] * H + i_h) * V + offs_v[None, :], mask=m_tv, other=0.0).to(DT)
        if not LOAD_DA:
            dd = tl.load(do + (tok[:, None] * H + i_h) * V + offs_v[None, :], mask=m_tv, other=0.0).to(DT)
            dA += tl.dot(dd, tl.trans(vv), input_precision=DOT_PREC)
        dk_state += tl.dot(vv, tl.trans(dS.to(DT)), input_precision=DOT_PREC)
        h_dS += tl.sum(h * dS, axis=1)
    if LOAD_DA:
        # read transposed: dAT[r, t] = dA[t, r], the layout the dk products want
        dAT = tl.load(dA_in + ((i_c * H + i_h) * BT_ + o_t[None, :]) * BT_ + o_t[:, None])
    else:
        dAT = tl.trans(tl.where(o_t[:, None] >= o_t[None, :], dA * scale, 0.0))
    Gam = gate_cumsum(g, o_t, GAM_MATMUL)
    m_tk = m_t[:, None]
    p_k = (tok[:, None] * H + i_h) * K + offs_k[None, :]
    # the state terms first, so dk_state and h_dS die early (register pressure)
    k = neg_expm1(g)
    dk_state = dk_state * tl.exp(gam[None, :] - Gam)
    c = tl.sum(k * dk_state, axis=0) + tl.exp(gam) * h_dS
    qq = tl.load(q + p_k, mask=m_tk, other=0.0).to(tl.float32)
    dkk = intra_grad_k(dAT, qq, Gam, gam, o_t, BT_, BC_, INTRA_PREC, INTRA_DT, INTRA_PATH) + dk_state
    dqq = tl.load(dq + p_k, mask=m_tk, other=0.0).to(tl.float32)
    if AUG:
        # the stored dq holds the self-augmentation's part, which does not reach the decays
        dq_aug, dav = aug_dq(w_aug, da, tok, m_t, i_h, offs_k, k, H, K)
        dqq -= dq_aug
    d_gam = qq * dqq - k * dkk
    if AUG:
        dkk += aug_dk_and_dw(w_aug, dav, qq, k, dw_part, i_c, i_h, offs_k, H, K)
    # revcumsum within the chunk + the chunk-wide state terms - alpha * dk (the key tied to the decay)
    dg = chunk_cumsum(d_gam, o_t, True) + c[None, :] - tl.exp(g) * dkk
    store_dgate(dgate, dg, g, p_k, m_tk, inv_tau, GATE_LOGITS)
