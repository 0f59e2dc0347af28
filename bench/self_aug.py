"""Does fusing the self-augmentation into the operator pay? (issue: "fuse it into the output if it pays; measure").

The layer computes o = op(q, z, v) + sigmoid(a v), a = sum_K q w_aug k (paper Eq. 22). Three ways, per bench shape
(bf16, B*T = 32768, K = 64, V = 128; H = 8 for 360M, 16 for 1.3B), fwd and fwd+bwd with the gradient of w_aug:
  - `fused`: `chunk_metala_from_logits(..., w_aug=w)`: the output kernel adds the term, the dv kernel forms its
    gradient da, the dq/dk kernel turns da into dq, dz and dw_aug;
  - `separate`: the operator, then `naive_self_augmentation` in PyTorch (the model's module, eager);
  - `separate_compiled`: the same term under torch.compile (what `train.compile=true` runs);
  - `no_aug`: the operator alone (the floor).
Correctness first: the fused bf16 path against the fp32 PyTorch chunked reference plus the fp32 term, relative
error <= 0.005 for o, o centred per head, dq, dz, dv, dw_aug; a failing shape gets no time and the script exits non-zero.

    python -m bench.self_aug [--shapes metala-360m,metala-1.3b] [--seqlens 2048,8192]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from bench import gpu_tag, result_path
from bench.ops import SHAPES, TAU, TOKENS, add_shape_args, err, finite, make_inputs


def fused(q, z, v, w):
    from metala.ops.metala.chunk import chunk_metala_from_logits

    return chunk_metala_from_logits(q, z, v, TAU, w_aug=w)[0]


def aug_term(q, z, v, w):
    from metala.ops.metala.naive import naive_self_augmentation

    return naive_self_augmentation(q, -torch.expm1(F.logsigmoid(z.float()) / TAU), v, w)


def separate(term):
    from metala.ops.metala.chunk import chunk_metala_from_logits

    def fn(q, z, v, w):
        # the model's unfused path: fp32 sum handed to the head norm
        return chunk_metala_from_logits(q, z, v, TAU)[0].float() + term(q, z, v, w)

    return fn


def check(q, z, v, w, do) -> dict:
    from metala.ops.metala.naive import naive_chunk_metala

    ref = [t.float().clone().requires_grad_() for t in (q, z, v, w)]
    o_r = naive_chunk_metala(ref[0], F.logsigmoid(ref[1]) / TAU, ref[2])[0] + aug_term(*ref)
    grads_r = torch.autograd.grad((o_r * do.float()).sum(), ref)
    leaves = [t.clone().requires_grad_() for t in (q, z, v, w)]
    o = fused(*leaves)
    grads = torch.autograd.grad((o.float() * do.float()).sum(), leaves)
    # o centred per head too: what the head norm keeps, and what a bf16-rounded o + ~0.5 would lose
    centred = lambda x: x - x.mean(-1, keepdim=True)  # noqa: E731
    e = {"o": err(o_r, o), "o_centred": err(centred(o_r.detach()), centred(o.detach().float())),
         **{n: err(a, b) for n, a, b in zip(("dq", "dz", "dv", "dw_aug"), grads_r, grads)}}
    return {"err": e, "correct": finite(o, *grads) and max(e.values()) <= 0.005}


def time_variants(q, z, v, w, do) -> dict:
    from triton.testing import do_bench

    from metala.ops.metala.chunk import chunk_metala_from_logits

    variants = {
        "fused": fused,
        "separate": separate(aug_term),
        "separate_compiled": separate(torch.compile(aug_term, dynamic=False)),
        "no_aug": lambda q, z, v, w: chunk_metala_from_logits(q, z, v, TAU)[0],
    }
    out = {}
    for name, fn in variants.items():
        leaves = [t.clone().requires_grad_() for t in (q, z, v, w)]

        def fb():
            fn(*leaves).backward(do)

        fb()  # compile / autotune outside the timing
        torch.cuda.synchronize()
        f = do_bench(lambda: fn(*leaves), warmup=25, rep=100)
        b = do_bench(fb, warmup=25, rep=100, grad_to_none=leaves)
        out[name] = {"fwd_ms": f, "fwdbwd_ms": b}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap, "2048,8192")
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name()
    result = {"bench": "self_aug", "gpu": gpu, "torch": torch.__version__,
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": []}
    ok = True
    print(f"{'shape':>12} {'T':>6} | fwd+bwd ms: {'fused':>7} {'separate':>9} {'compiled':>9} {'no_aug':>7} | "
          "max err")
    for shape in args.shapes.split(","):
        H, K, V = SHAPES[shape]
        for T in map(int, args.seqlens.split(",")):
            B = TOKENS // T
            q, z, v, do = make_inputs(B, T, H, K, V, seed=T)
            w = (torch.randn(H * K, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)) * 0.5)
            row = {"shape": shape, "B": B, "T": T, "H": H, "K": K, "V": V, "gate": check(q, z, v, w, do)}
            ok &= row["gate"]["correct"]
            if row["gate"]["correct"]:
                row["times"] = time_variants(q, z, v, w, do)
                t = row["times"]
                print(f"{shape:>12} {T:>6} | {'':>11} {t['fused']['fwdbwd_ms']:7.3f} {t['separate']['fwdbwd_ms']:9.3f} "
                      f"{t['separate_compiled']['fwdbwd_ms']:9.3f} {t['no_aug']['fwdbwd_ms']:7.3f} | "
                      f"{max(row['gate']['err'].values()):.2e}", flush=True)
            else:
                print(f"{shape:>12} {T:>6} | gate failed: {row['gate']['err']}", flush=True)
            result["rows"].append(row)
    path = result_path(args.out, gpu_tag(gpu), "self_aug")
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}; all correct: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
