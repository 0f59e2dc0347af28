"""Every operation in one step of the trainer's DeepSpeed engine that makes the host wait for the GPU, with its call
site (torch's CUDA sync debug mode). A wait before the optimizer's kernels are queued drains the GPU's queue, and
the GPU then idles while the host launches what follows. CUDA only.

    python -m bench.host_syncs [--preset 360m] [--seq 256]

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
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.host_syncs needs a CUDA device (the sync debug mode watches CUDA calls)")

    from bench.train_throughput import train_config
    from pretrain.distributed import init_distributed
    from pretrain.optim import build_optimizer
    from pretrain.parallel.layout import ParallelLayout
    from pretrain.step_guard import initialize_with_guard
    from pretrain.trainer import build_training_model, deepspeed_config

    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        # the debug mode's warnings ("called a synchronizing CUDA operation"); any other warning is not a wait
        if "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        sites[" <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}:{f.name}"
                          for f in frames[-6:][::-1])] += 1

    device, _, _ = init_distributed()
    cfg = train_config(args.preset, args.seq, 2, False, False)
    model_config = cfg.model.build(vocab_size=32000)
    model, _ = build_training_model(cfg, model_config, ParallelLayout(1, 0), device)
    opt = build_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.1)
    engine, _, guard = initialize_with_guard(model, opt, deepspeed_config(cfg, 1, "bf16"), device)
    ids = torch.randint(0, 32000, (2, args.seq), device=device)
    labels = torch.randint(0, 32000, (2, args.seq), device=device)

    def step() -> bool:
        guard.new_step()
        loss = engine(ids, labels=labels, return_logits=False).loss
        guard.observe_loss(loss)
        engine.backward(loss)
        engine.step()
        return guard.update_dropped

    # past DeepSpeed's and the allocator's first-step work
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    expected = [s for s in sites if "update_dropped" in s]
    print(f"{sum(sites.values())} waits for the GPU in one trainer step ({args.preset}):")
    for site, n in sites.most_common():
        print(f"  {n}x {'(by design) ' if site in expected else ''}{site}")
    return 0 if len(sites) == len(expected) else 1


if __name__ == "__main__":
    raise SystemExit(main())
