"""Drive the Triton MetaLA operator for a hardware profiler: a few warm forward+backward passes at one bench shape.

    ncu --clock-control none --kernel-name regex:chunk_metala --launch-skip 8 --launch-count 8 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        python -m bench.kernel_profile --heads 8 --seq 2048

The first passes compile and warm the kernels (skip them with --launch-skip: 8 kernels per pass); nothing is
timed here, `bench/ops.py` does the timing. The passes are checked against the naive reference first at a short
length, so a profile is never taken of a wrong kernel.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--V", type=int, default=128)
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args()
    from bench.ops import check_shape, make_inputs, ours, reference_chunked

    H, K, V, T = args.heads, args.K, args.V, args.seq
    small = make_inputs(2, 256, H, K, V, seed=1)
    gate = check_shape(*small, reference_chunked(*small))["metala"]
    if not gate["correct"]:
        raise SystemExit(f"correctness gate failed, nothing profiled: {gate}")
    B = args.tokens // T
    q, z, v, do = (t.requires_grad_(i < 3) for i, t in enumerate(make_inputs(B, T, H, K, V)))
    for _ in range(args.passes):
        o, _ = ours(q, z, v)
        o.backward(do)
    torch.cuda.synchronize()
    print(f"profiled {args.passes} passes of B={B} T={T} H={H} K={K} V={V}")


if __name__ == "__main__":
    main()
