"""Standalone check of the Triton miscompile that `chunk_fwd.dot_intra` works around.

The dq/dk kernels' intra-chunk products are dA [64, 64] @ f [64, BK], where dA is the causally masked fp32 result
of another tl.dot (dO v^T). With bf16 operands, the direct form `tl.dot(dA.to(bf16), f.to(bf16))` compiled
(Triton 3.6, sm_90) to wrong results at 4 warps and, inside the operator's kernels, to illegal memory accesses at
8 warps; the transposed form `tl.trans(tl.dot(tl.trans(f), tl.trans(dA)))` is right. This script computes
dq[t] = sum_r dA[t, r] k[r] exp(Gam[t] - Gam[r]) four ways against an fp64 PyTorch reference, per operand dtype
and warp count, so a Triton upgrade can be checked before the workaround is dropped:

  direct      tl.dot(dA, f)                       (the miscompiled form with bf16 operands)
  transposed  tl.trans(tl.dot(tl.trans(f), tl.trans(dA)))
  operator    chunk_fwd.intra_grad_q (what the kernels run)
  reloaded    dA stored to global memory and loaded back, then direct  (skipped unless --all: it crashed the
              context with an illegal memory access on the H200)

    python -m bench.triton_bf16_dot_repro [--all]   (CUDA GPU; writes bench/results/<date>_<gpu>_bf16_dot_repro.json)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from bench import gpu_tag, result_path
from metala.ops.metala.chunk_fwd import ONE_REF, chunk_cumsum, intra_grad_q, load_gate
from metala.ops.utils.triton_math import neg_expm1

ROOT = Path(__file__).resolve().parents[1]
FORMS = {"direct": 0, "transposed": 1, "operator": 2, "reloaded": 3}


@triton.jit
def dq_intra_kernel(do, v, gate, scratch, out, inv_tau, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                    BK: tl.constexpr, DT: tl.constexpr, FORM: tl.constexpr, PREC: tl.constexpr):
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    o_t = tl.arange(0, 64)
    tok = i_c * 64 + o_t
    offs_k = tl.arange(0, BK)
    offs_v = tl.arange(0, V)
    dd = tl.load(do + (tok[:, None] * H + i_h) * V + offs_v[None, :])
    vv = tl.load(v + (tok[:, None] * H + i_h) * V + offs_v[None, :])
    dA = tl.dot(dd, tl.trans(vv), input_precision=PREC)
    dA = tl.where(o_t[:, None] >= o_t[None, :], dA, 0.0)
    if FORM == 3:
        p = scratch + ((i_c * H + i_h) * 64 + o_t[:, None]) * 64 + o_t[None, :]
        tl.store(p, dA)
        tl.debug_barrier()
        dA = tl.load(p)
    g = load_gate(gate, tok, o_t < 64, i_h, offs_k, H, K, True, inv_tau)
    gam = tl.sum(g, axis=0)
    Gam = chunk_cumsum(g, o_t, False)
    k = neg_expm1(g)
    R = gam[None, :] * 0.5
    if FORM == 2:
        res = intra_grad_q(dA, k, Gam, gam, o_t, 64, 16, PREC, DT, ONE_REF)
    elif FORM == 1:
        f = (k * tl.exp(R - Gam)).to(DT)
        res = tl.trans(tl.dot(tl.trans(f), tl.trans(dA.to(DT)), input_precision=PREC)) * tl.exp(Gam - R)
    else:
        res = tl.dot(dA.to(DT), (k * tl.exp(R - Gam)).to(DT), input_precision=PREC) * tl.exp(Gam - R)
    tl.store(out + (tok[:, None] * H + i_h) * BK + offs_k[None, :], res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="also the reloaded form (may crash the CUDA context)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (the miscompile is in the compiled kernel; the interpreter runs fp32)")
    torch.manual_seed(0)
    N, H, K, V, BK = 64 * 256, 8, 64, 128, 32
    C = N // 64
    do = torch.randn(N, H, V, device="cuda").bfloat16()
    v = torch.randn(N, H, V, device="cuda").bfloat16()
    z = torch.randn(N, H, K, device="cuda").bfloat16()
    d = do.double().view(C, 64, H, V).permute(0, 2, 1, 3)
    vd = v.double().view(C, 64, H, V).permute(0, 2, 1, 3)
    dA = torch.tril(d @ vd.transpose(-1, -2))
    g = (torch.nn.functional.logsigmoid(z.double()) / 16).clamp(min=-10).view(C, 64, H, K).permute(0, 2, 1, 3)
    g = g[..., :BK]
    Gam = g.cumsum(-2)
    ref = (dA @ (-torch.expm1(g) * torch.exp(-Gam))) * torch.exp(Gam)
    scratch = torch.empty(C, H, 64, 64, device="cuda")
    rows = []
    for form, code in FORMS.items():
        if form == "reloaded" and not args.all:
            continue
        for dt_name, dt in (("fp32", tl.float32), ("bf16", tl.bfloat16)):
            for warps in (4, 8):
                out = torch.zeros(N, H, BK, device="cuda")
                row = {"form": form, "operands": dt_name, "num_warps": warps}
                try:
                    dq_intra_kernel[(C, H)](do, v, z, scratch, out, 1 / 16, H=H, K=K, V=V, BK=BK, DT=dt, FORM=code,
                                            PREC="tf32", num_warps=warps)
                    torch.cuda.synchronize()
                    got = out.double().view(C, 64, H, BK).permute(0, 2, 1, 3)
                    row["rel_err"] = ((got - ref).norm() / ref.norm()).item()
                except Exception as e:  # noqa: BLE001 - an illegal access is a finding here, not a crash
                    row["error"] = f"{type(e).__name__}: {e}"[:200]
                rows.append(row)
                print(f"{form:11s} {dt_name} {warps} warps: " + (f"rel err {row['rel_err']:.2e}" if "rel_err" in row
                                                               else row["error"]), flush=True)
    gpu = torch.cuda.get_device_name()
    report = {"bench": "triton_bf16_dot_repro", "gpu": gpu, "triton": triton.__version__, "torch": torch.__version__,
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    path = result_path(args.out, gpu_tag(gpu), "bf16_dot_repro")
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
