"""fp16 inputs through the Triton operator with strongly closed gates: finite, and as close to fp32 as bf16 is?

With gate logits z ~ -6 a chunk's decay spans ~24 nats, and the intra-chunk score factors reach exp(span / 2), past
fp16's 65504: before the intra-chunk scores of fwd_o and dv took fp32 operands for fp16 inputs (`chunk.py`
`_scores_dtype`), o and dv came out NaN here. Compares o, dq, dz, dv of fp16 and bf16 runs with the fp32 chunked
reference and prints one line per dtype (prefixed with the checkout's folder name, so a copy of an older commit can
be run beside it: `cd old-copy && python path/to/fp16_check.py`). GPU only.

    python -m bench.fp16_check
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())  # the operator of the checkout this runs from

from metala.ops.metala.chunk import chunk_metala_from_logits
from metala.ops.metala.naive import naive_chunk_metala

TAU = 16.0


def main() -> int:
    torch.manual_seed(0)
    B, T, H, K, V = 2, 256, 4, 64, 128
    q = torch.randn(B, T, H, K, device="cuda")
    z = -6.0 + 0.5 * torch.randn(B, T, H, K, device="cuda")
    v = torch.randn(B, T, H, V, device="cuda")
    do = torch.randn(B, T, H, V, device="cuda")
    ref = [t.clone().requires_grad_() for t in (q, z, v)]
    o_r, _ = naive_chunk_metala(ref[0], F.logsigmoid(ref[1]) / TAU, ref[2])
    g_r = torch.autograd.grad(o_r, ref, do)
    ok = True
    for dt in (torch.float16, torch.bfloat16):
        x = [t.to(dt).requires_grad_() for t in (q, z, v)]
        o, _ = chunk_metala_from_logits(*x, TAU)
        g = torch.autograd.grad(o, x, do.to(dt))
        errs = {n: ((a.double() - b.double()).norm() / b.double().norm()).item()
                for n, a, b in zip(("o", "dq", "dz", "dv"), (o, *g), (o_r, *g_r))}
        finite = all(bool(torch.isfinite(t).all()) for t in (o, *g))
        ok &= finite and max(errs.values()) < 0.01
        print(os.path.basename(os.getcwd()), dt, "finite", finite, {k: f"{e:.2e}" for k, e in errs.items()})
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
