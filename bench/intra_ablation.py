"""Where the time of the dq/dk/dg tail goes: the joint dq/dk kernel's work after its loop over V
(`chunk_bwd.dq_dk_from_products`), here as a kernel of its own that reads the products over V (dA, dO h^T, v dS^T,
rowsum(h dS)) from memory, with one part removed or replaced at a time, timed at the 360M benchmark shape (random
inputs of the right shapes). A profile, not a correctness benchmark: variants marked "ablation" compute wrong
gradients on purpose; variants marked "candidate" are alternative implementations, checked against the full one.
Mode 0 takes its running sums as scans; mode 4 (the reverse sum as a triangular matmul) is what the kernels do
by default since (chunk_fwd.py METALA_CUMSUM; 20261202_h200_intra_ablation.json).

    python -m bench.intra_ablation [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from bench import gpu_tag, result_path
from metala.ops.metala import chunk as C
from metala.ops.metala.chunk_bwd import store_dgate
from metala.ops.metala.chunk_fwd import ONE_REF, intra_grad_k, intra_grad_q, load_gate, other_path
from metala.ops.utils.triton_math import neg_expm1

# MODE: 0 full; 1 ablation: dq only; 2 candidate: dA^T loaded transposed from memory; 3 ablation: no reverse
# cumsum; 4 candidate: reverse cumsum as a masked tf32x3 matmul; 5 ablation: no intra dk product;
# 6 ablation: no intra products at all; 7 candidate: 2 + 4
MODES = {0: "full", 1: "ablation: dq only", 2: "candidate: dA^T from memory", 3: "ablation: no reverse cumsum",
         4: "candidate: reverse cumsum as matmul", 5: "ablation: no intra dk product",
         6: "ablation: no intra products", 7: "candidate: dA^T from memory + cumsum as matmul"}


@triton.jit
def intra_variant(q, gate, dA_in, dqi, dki, hds, dq, dgate, chunk_start, chunk_len, scale, inv_tau,
                  H: tl.constexpr, K: tl.constexpr, BT_: tl.constexpr, BC_: tl.constexpr, BK: tl.constexpr,
                  PREC: tl.constexpr, MODE: tl.constexpr):
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k = i_k * BK + tl.arange(0, BK)
    o_t = tl.arange(0, BT_)
    start = tl.load(chunk_start + i_c)
    length = tl.load(chunk_len + i_c)
    m_t = o_t < length
    tok = start + o_t
    g = load_gate(gate, tok, m_t, i_h, offs_k, H, K, True, inv_tau)
    gam = tl.sum(g, axis=0)
    if other_path(gam, ONE_REF):
        return
    p_dA = dA_in + (i_c * H + i_h) * BT_ * BT_
    dA = tl.load(p_dA + o_t[:, None] * BT_ + o_t[None, :])
    p_k = (tok[:, None] * H + i_h) * K + offs_k[None, :]
    m_tk = m_t[:, None]
    dq_inter = tl.load(dqi + p_k, mask=m_tk, other=0.0)
    dk_state = tl.load(dki + p_k, mask=m_tk, other=0.0)
    h_dS = tl.load(hds + (i_c * H + i_h) * K + offs_k)
    Gam = tl.cumsum(g, axis=0)
    k = neg_expm1(g)
    if MODE == 6:
        dqq = scale * tl.exp(Gam) * dq_inter + tl.sum(dA, axis=1)[:, None]
    else:
        dqq = intra_grad_q(dA, k, Gam, gam, o_t, BT_, BC_, PREC, tl.float32, ONE_REF) + scale * tl.exp(Gam) * dq_inter
    tl.store(dq + p_k, dqq.to(dq.dtype.element_ty), mask=m_tk)
    if MODE == 1:
        return
    qq = tl.load(q + p_k, mask=m_tk, other=0.0).to(tl.float32)
    d_gam = qq * dqq
    dk_state = dk_state * tl.exp(gam[None, :] - Gam)
    if MODE == 2 or MODE == 7:
        dAT = tl.load(p_dA + o_t[None, :] * BT_ + o_t[:, None])
        dkk = intra_grad_k(dAT, qq, Gam, gam, o_t, BT_, BC_, PREC, tl.float32, ONE_REF) + dk_state
    elif MODE == 5 or MODE == 6:
        dkk = dk_state + qq
    else:
        dkk = intra_grad_k(tl.trans(dA), qq, Gam, gam, o_t, BT_, BC_, PREC, tl.float32, ONE_REF) + dk_state
    d_gam -= k * dkk
    if MODE == 3:
        dg = d_gam
    elif MODE == 4 or MODE == 7:
        # revcumsum[t] = sum_{i >= t} d_gam[i]
        upper = tl.where(o_t[:, None] <= o_t[None, :], 1.0, 0.0)
        dg = tl.dot(upper, d_gam, input_precision="tf32x3")
    else:
        dg = tl.sum(d_gam, axis=0)[None, :] - tl.cumsum(d_gam, axis=0) + d_gam
    dg += (tl.sum(k * dk_state, axis=0) + tl.exp(gam) * h_dS)[None, :]
    dg -= tl.exp(g) * dkk
    store_dgate(dgate, dg, g, p_k, m_tk, inv_tau, True)


def main() -> None:
    from triton.testing import do_bench

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "bench/results")
    ap.add_argument("--warps", default="4,8")
    args = ap.parse_args()
    B, T, H, K = 16, 2048, 8, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B * T, H, K, device="cuda", generator=gen).bfloat16()
    z = torch.randn(B * T, H, K, device="cuda", generator=gen).bfloat16()
    plan = C.plan_for(B, T, None, C.BT, 16, q.device)
    dA = torch.randn(plan.n_chunks, H, 64, 64, device="cuda", generator=gen).tril() * 0.1
    dqi = torch.randn(B * T, H, K, device="cuda", generator=gen)
    dki = torch.randn(B * T, H, K, device="cuda", generator=gen)
    hds = torch.randn(plan.n_chunks, H, K, device="cuda", generator=gen)
    rows = []
    for warps in map(int, args.warps.split(",")):
        for BK in (32, 64):
            ref = None
            for mode, what in MODES.items():
                dq, dz = torch.empty_like(q), torch.empty_like(z)

                def go(BK=BK, mode=mode, warps=warps, dq=dq, dz=dz):
                    intra_variant[(plan.n_chunks, H, K // BK)](
                        q, z, dA, dqi, dki, hds, dq, dz, plan.chunk_start, plan.chunk_len, 0.125, 1 / 16,
                        H=H, K=K, BT_=64, BC_=16, BK=BK, PREC="tf32", MODE=mode, num_warps=warps)

                go()
                torch.cuda.synchronize()
                if mode == 0:
                    ref = (dq.float().clone(), dz.float().clone())
                diff = max(((a.float() - r).norm() / r.norm()).item() for a, r in zip((dq, dz), ref))
                ms = do_bench(go, warmup=25, rep=100)
                row = {"warps": warps, "BK": BK, "mode": mode, "what": what, "ms": ms,
                       "rel_diff_vs_full": diff if what.startswith(("full", "candidate")) else None}
                rows.append(row)
                print(f"warps {warps} BK {BK:>2} {what:<48} {ms:.3f} ms"
                      + (f"  diff {diff:.1e}" if row["rel_diff_vs_full"] is not None else ""), flush=True)
    path = result_path(args.out, gpu_tag(torch.cuda.get_device_name()), "intra_ablation")
    path.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "shape": [B, T, H, K], "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
