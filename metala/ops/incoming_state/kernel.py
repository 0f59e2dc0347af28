"""Triton kernels of the incoming-state share (math and layout: naive.py beside this file).

Every program owns one TILE-token tile of one row and head (the dS kernel: a group of tiles), so the work is
spread over the whole sequence: the prefix log-decay a tile needs comes in as `G_off`, made from the per-tile sums
of `gate_tile_sums_fwd_kernel`. Nothing [L, H, K]-sized in fp32 is ever written: g, its cumulative sums and
exp(G) live in registers and are recomputed in the backward.
"""

from __future__ import annotations

import triton
import triton.language as tl

import metala.ops.utils.triton_compat  # noqa: F401  (interpreter shim)
from metala.ops.utils.triton_math import logsigmoid, sigmoid_neg


@triton.jit
def _tile_gate(z, row, m_t, i_h, offs_k, H: tl.constexpr, K: tl.constexpr, inv_tau):
    """Gate logits x and the floored log-decay g (0 past the row's end) of one tile: fp32 [TILE, K] each."""
    x = tl.load(z + (row[:, None] * H + i_h) * K + offs_k[None, :], mask=m_t[:, None], other=0.0).to(tl.float32)
    g = tl.where(m_t[:, None], tl.maximum(logsigmoid(x) * inv_tau, -10.0), 0.0)
    return x, g


@triton.jit
def gate_tile_sums_fwd_kernel(z, first_len, last_start, out_first, out_last, inv_tau, L, NT,
                              H: tl.constexpr, K: tl.constexpr, TILE: tl.constexpr):
    j, b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = j * TILE + tl.arange(0, TILE)
    offs_k = tl.arange(0, K)
    m_t = t < L
    _, g = _tile_gate(z, (b * L + t).to(tl.int64), m_t, i_h, offs_k, H, K, inv_tau)
    fl = tl.load(first_len + b)
    ls = tl.load(last_start + b)
    p = ((b * NT + j) * H + i_h) * K + offs_k
    tl.store(out_first + p, tl.sum(tl.where((t < fl)[:, None], g, 0.0), axis=0))
    tl.store(out_last + p, tl.sum(tl.where((t >= ls)[:, None], g, 0.0), axis=0))


@triton.jit
def gate_tile_sums_bwd_kernel(z, first_len, last_start, d_first, d_last, dz, inv_tau, L, NT,
                              H: tl.constexpr, K: tl.constexpr, TILE: tl.constexpr):
    j, b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = j * TILE + tl.arange(0, TILE)
    offs_k = tl.arange(0, K)
    m_t = t < L
    row = (b * L + t).to(tl.int64)
    x, _ = _tile_gate(z, row, m_t, i_h, offs_k, H, K, inv_tau)
    fl = tl.load(first_len + b)
    ls = tl.load(last_start + b)
    p = ((b * NT + j) * H + i_h) * K + offs_k
    dg = (tl.where((t < fl)[:, None], tl.load(d_first + p)[None, :], 0.0)
          + tl.where((t >= ls)[:, None], tl.load(d_last + p)[None, :], 0.0))
    # no gradient where the log-decay was floored
    live = logsigmoid(x) * inv_tau > -10.0
    tl.store(dz + (row[:, None] * H + i_h) * K + offs_k[None, :],
             tl.where(live, dg * sigmoid_neg(x) * inv_tau, 0.0).to(dz.dtype.element_ty), mask=m_t[:, None])


@triton.jit
def _decayed_queries(q, z, G_off, row, t, m_t, fl, b, j, i_h, offs_k, inv_tau, NT,
                     H: tl.constexpr, K: tl.constexpr):
    """q_t * exp(G_t) on the tile's first-piece tokens (0 elsewhere), with x (the gate logits) and G."""
    x, g = _tile_gate(z, row, m_t, i_h, offs_k, H, K, inv_tau)
    G = tl.cumsum(g, axis=0) + tl.load(G_off + ((b * NT + j) * H + i_h) * K + offs_k)[None, :]
    qq = tl.load(q + (row[:, None] * H + i_h) * K + offs_k[None, :], mask=m_t[:, None], other=0.0).to(tl.float32)
    # G <= 0 on real tokens, so exp never overflows; past the first piece the select drops the term
    return tl.where((t < fl)[:, None], qq * tl.exp(G), 0.0), qq, x, G


@triton.jit
def incoming_state_fwd_kernel(o, q, z, S, G_off, first_len, out, scale, inv_tau, L, NT,
                              H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, TILE: tl.constexpr,
                              BV: tl.constexpr, DT: tl.constexpr, DOT_PREC: tl.constexpr):
    """out = o + scale * (q * exp(G)) S on first-piece tokens, out = o elsewhere: per (tile, row x head, V-tile)."""
    j, bh, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, i_h = bh // H, bh % H
    t = j * TILE + tl.arange(0, TILE)
    offs_k = tl.arange(0, K)
    offs_v = i_v * BV + tl.arange(0, BV)
    m_t = t < L
    m_v = offs_v < V
    row = (b * L + t).to(tl.int64)
    p_v = (row[:, None] * H + i_h) * V + offs_v[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    acc = tl.load(o + p_v, mask=m_tv, other=0.0).to(tl.float32)
    fl = tl.load(first_len + b)
    if j * TILE < fl:
        qd, _, _, _ = _decayed_queries(q, z, G_off, row, t, m_t, fl, b, j, i_h, offs_k, inv_tau, NT, H, K)
        s = tl.load(S + ((bh * K + offs_k[:, None]) * V + offs_v[None, :]), mask=m_v[None, :], other=0.0)
        acc += scale * tl.dot(qd.to(DT), s.to(DT), input_precision=DOT_PREC)
    tl.store(out + p_v, acc.to(out.dtype.element_ty), mask=m_tv)


@triton.jit
def incoming_state_bwd_dqz_kernel(q, z, S, G_off, first_len, dout, dq, dz, dG_off, scale, inv_tau, L, NT,
                                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, TILE: tl.constexpr,
                                  BV: tl.constexpr, DT: tl.constexpr, DOT_PREC: tl.constexpr):
    """dq, dz (through the tile-local cumulative sum) and d G_off of one tile; zeros past the first piece."""
    j, bh = tl.program_id(0), tl.program_id(1)
    b, i_h = bh // H, bh % H
    t = j * TILE + tl.arange(0, TILE)
    offs_k = tl.arange(0, K)
    m_t = t < L
    row = (b * L + t).to(tl.int64)
    p_k = (row[:, None] * H + i_h) * K + offs_k[None, :]
    p_off = ((b * NT + j) * H + i_h) * K + offs_k
    fl = tl.load(first_len + b)
    if j * TILE < fl:
        # dO S^T first: the gate and query tiles are loaded after it, so they are not live across the V walk
        dSq = tl.zeros([TILE, K], dtype=tl.float32)
        for i_v in range(0, (V + BV - 1) // BV):
            offs_v = i_v * BV + tl.arange(0, BV)
            m_v = offs_v < V
            dd = tl.load(dout + (row[:, None] * H + i_h) * V + offs_v[None, :], mask=m_t[:, None] & m_v[None, :],
                         other=0.0)
            s = tl.load(S + ((bh * K + offs_k[:, None]) * V + offs_v[None, :]), mask=m_v[None, :], other=0.0)
            dSq += tl.dot(dd.to(DT), tl.trans(s.to(DT)), input_precision=DOT_PREC)
        _, qq, x, G = _decayed_queries(q, z, G_off, row, t, m_t, fl, b, j, i_h, offs_k, inv_tau, NT, H, K)
        inside = (t < fl)[:, None]
        dqq = tl.where(inside, scale * tl.exp(G) * dSq, 0.0)
        dG = qq * dqq
        tile_sum = tl.sum(dG, axis=0)
        tl.store(dG_off + p_off, tile_sum)
        # d g_s = sum over the tile's t >= s of dG_t; earlier tiles get theirs through G_off
        dg = tile_sum[None, :] - tl.cumsum(dG, axis=0) + dG
        live = inside & (logsigmoid(x) * inv_tau > -10.0)
        tl.store(dq + p_k, dqq.to(dq.dtype.element_ty), mask=m_t[:, None])
        tl.store(dz + p_k, tl.where(live, dg * sigmoid_neg(x) * inv_tau, 0.0).to(dz.dtype.element_ty),
                 mask=m_t[:, None])
    else:
        zero = tl.zeros([TILE, K], dtype=tl.float32)
        tl.store(dG_off + p_off, tl.sum(zero, axis=0))
        tl.store(dq + p_k, zero.to(dq.dtype.element_ty), mask=m_t[:, None])
        tl.store(dz + p_k, zero.to(dz.dtype.element_ty), mask=m_t[:, None])


@triton.jit
def incoming_state_bwd_ds_kernel(q, z, G_off, first_len, dout, dS_part, inv_tau, L, NT, NG, TPG,
                                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, TILE: tl.constexpr,
                                 BV: tl.constexpr, DT: tl.constexpr, DOT_PREC: tl.constexpr):
    """Partial sum over a group of TPG tiles of (q * exp(G))^T dout: per (row x head, V-tile, group), fp32
    [K, BV]; the launcher adds the groups (a fixed order: the result does not depend on scheduling)."""
    bh, i_v, grp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, i_h = bh // H, bh % H
    offs_k = tl.arange(0, K)
    offs_v = i_v * BV + tl.arange(0, BV)
    m_v = offs_v < V
    fl = tl.load(first_len + b)
    acc = tl.zeros([K, BV], dtype=tl.float32)
    for jj in range(0, TPG):
        j = grp * TPG + jj
        if j * TILE < fl:
            t = j * TILE + tl.arange(0, TILE)
            m_t = t < L
            row = (b * L + t).to(tl.int64)
            qd, _, _, _ = _decayed_queries(q, z, G_off, row, t, m_t, fl, b, j, i_h, offs_k, inv_tau, NT, H, K)
            dd = tl.load(dout + (row[:, None] * H + i_h) * V + offs_v[None, :], mask=m_t[:, None] & m_v[None, :],
                         other=0.0)
            acc += tl.dot(tl.trans(qd).to(DT), dd.to(DT), input_precision=DOT_PREC)
    tl.store(dS_part + ((bh * NG + grp) * K + offs_k[:, None]) * V + offs_v[None, :], acc, mask=m_v[None, :])
