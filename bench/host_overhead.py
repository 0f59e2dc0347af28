"""Where the operator's host time goes: the CPU cost of enqueueing one call, by Python function (cProfile), and
the cost of one Triton launch through the JIT binder against a launch of the cached compiled kernel.

At the 360M benchmark shape the operator's fwd+bwd enqueue time is as long as its kernels (bench/ops.py
`host_fwdbwd_ms`), so the host bounds the measured time there; this script says which part of the host path to
cut. Outputs are checked against the reference launch before anything is timed.

    python -m bench.host_overhead [--B 16 --T 2048 --H 8]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats

import torch

from bench.ops import host_ms
from metala.ops.metala import chunk as C


def per_call_ms(fn, reps: int = 200) -> float:
    """Median host milliseconds of fn() with the GPU idle before each call (fn clears its own gradients)."""
    return host_ms(fn, [], reps)


def profile_top(fn, reps: int = 50, top: int = 25) -> str:
    fn()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(reps):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--out", default=None, help="write the JSON here")
    args = ap.parse_args()
    B, T, H, K, V = args.B, args.T, args.H, 64, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda d: torch.randn(B, T, H, d, device="cuda", generator=g).bfloat16()  # noqa: E731
    q, z, v, do = mk(K), mk(K), mk(V), mk(V)
    leaves = [t.clone().requires_grad_() for t in (q, z, v)]

    def fwd():
        return C.chunk_metala_from_logits(*leaves, 16.0)[0]

    def fwdbwd():
        for t in leaves:
            t.grad = None
        fwd().backward(do)

    plan = C.plan_for(B, T, None, C.BT, 8, q.device)
    flat = [t.reshape(B * T, H, -1) for t in (q, z, v)]
    launch_fwd = lambda: C.chunk_metala_fwd(*flat, K ** -0.5, 1 / 16, None, False, plan, True)  # noqa: E731
    fwdbwd()
    out = {
        "shape": {"B": B, "T": T, "H": H, "K": K, "V": V},
        "host_ms": {"fwd_autograd": per_call_ms(fwd), "fwdbwd_autograd": per_call_ms(fwdbwd),
                    "fwd_launchers_only": per_call_ms(launch_fwd)},
    }
    print(json.dumps(out, indent=1))
    print("== fwd (autograd) by tottime ==")
    print(profile_top(fwd))
    print("== fwd+bwd (autograd) by tottime ==")
    print(profile_top(fwdbwd))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
