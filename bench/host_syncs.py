"""Every operation in one step of the trainer's DeepSpeed engine that makes the host wait for the GPU, with its call
site (torch's CUDA sync debug mode). A wait before the optimizer's kernels are queued drains the GPU's queue, and
the GPU then idles while the host launches what follows. CUDA only.

    python -m bench.host_syncs [--preset 360m] [--seq 256] [--accumulate 4]

With --accumulate N the step runs N micro-batches of 2 sequences, as the recipes' accumulated form does, so the
micro-steps before the optimizer's (engine.backward / engine.step without an update) are watched too.

By design one wait remains, after `engine.step()`: the trainer reading the step guard's decision
(`NonFiniteStepGuard.update_dropped`), with the optimizer's kernels already queued behind it. Exits non-zero when
anything else waits.
"""

from __future__ import annotations

import argparse
import collections
import traceback
import warnings

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="360m")
    ap.add_argument("--seq", type=int, default=256, help="tokens a sequence (the waits do not depend on it)")
    ap.add_argument("--accumulate", type=int, default=1, help="micro-batches of 2 sequences a step")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.host_syncs needs a CUDA device (the sync debug mode watches CUDA calls)")

    # the trainer harness of bench.train_throughput: the trainer's model, DeepSpeed engine and step guard
    from bench.train_throughput import build_ours, make_engine, random_batch, set_options
    from pretrain.distributed import init_distributed

    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        # the debug mode's warnings ("called a synchronizing CUDA operation"); any other warning is not a wait
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        sites[" <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}:{f.name}"
                          for f in frames[-6:][::-1])] += 1

    init_distributed()  # a world of one, as the trainer sets it up (DeepSpeed would otherwise look for MPI)
    if args.accumulate < 1:
        raise SystemExit("--accumulate must be >= 1")
    set_options({"micro_batch": 2})
    B = 2 * args.accumulate
    model, _, loss_fn, cfg = build_ours(args.preset, args.seq, B, "trainer", False, False)
    train_step = make_engine(model, "trainer", cfg)
    ids, labels = random_batch(B, args.seq, 32000, seed=0)

    def step() -> None:
        # forward, backward, engine.step() and the read of the guard's decision, as the trainer's loop does
        train_step(loss_fn, ids, labels, None)

    # past DeepSpeed's and the allocator's first-step work
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        # recording from here: setting the mode warns about itself through the same channel (a wait counted at
        # set_sync_debug_mode on the H100, 2026-12-06, that is not one of the step's)
        warnings.showwarning = record
        try:
            step()
        finally:
            warnings.showwarning = lambda *a, **k: None
            torch.cuda.set_sync_debug_mode(0)
    expected = [s for s in sites if "update_dropped" in s]
    print(f"{sum(sites.values())} waits for the GPU in one trainer step ({args.preset}, {args.accumulate} "
          f"micro-batch{'es' if args.accumulate > 1 else ''}):")
    for site, n in sites.most_common():
        print(f"  {n}x {'(by design) ' if site in expected else ''}{site}")
    return 0 if len(sites) == len(expected) else 1


if __name__ == "__main__":
    raise SystemExit(main())
