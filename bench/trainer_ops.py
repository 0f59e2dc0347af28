"""How many PyTorch ops our trainer's DeepSpeed engine issues per training step, by phase (forward, backward,
optimizer step), against a plain bf16 model with torch AdamW. On a GPU every op is a kernel launch with host work in
front of it; the optimizer step runs after the backward with nothing to overlap, so its op count is host time the
GPU waits through. Runs on CPU (gloo, world of one) or on one GPU.

    python -m bench.trainer_ops [--preset 360m] [--ds-config '{"bf16": {"check_grad_overflow": true}}']

`--ds-config` merges into `pretrain.trainer.deepspeed_config` (top-level sections replaced key by key), e.g. to
count DeepSpeed's own bf16 overflow check. Before counting, each engine trains two steps on one batch and the
loss must drop (a broken engine is not measured). Views and other metadata-only ops are counted apart.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

from bench import gpu_tag, merge_sections, result_path

ROOT = Path(__file__).resolve().parents[1]
# ops that only create views or metadata: no kernel
METADATA_OPS = {"aten::as_strided", "aten::view", "aten::resolve_conj", "aten::empty", "aten::reshape",
                "aten::empty_strided", "aten::transpose", "aten::select", "aten::slice", "aten::_unsafe_view", "aten::t",
                "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::narrow", "aten::view_as", "aten::detach",
                "aten::_has_compatible_shallow_copy_type", "aten::alias", "aten::lift_fresh", "aten::resize_",
                "aten::_reshape_alias", "aten::permute", "aten::empty_like", "aten::split", "aten::chunk"}


def count_ops(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = Counter({e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")})
    compute = Counter({k: v for k, v in counts.items() if k not in METADATA_OPS})
    return {"ops": sum(counts.values()), "compute_ops": sum(compute.values()), "top": dict(compute.most_common(8))}


def count_ours(cfg, mcfg, device, ids, labels, ds_change: dict) -> tuple[dict, list[float], dict]:
    """The trainer's engine, guard and DeepSpeed config (with `ds_change`): ops per phase, the training losses and
    the DeepSpeed config used. Its own function, so that the engine is gone before the process groups are."""
    from pretrain.optim import build_optimizer
    from pretrain.parallel.layout import ParallelLayout
    from pretrain.step_guard import initialize_with_guard
    from pretrain.trainer import build_training_model, deepspeed_config

    model, _ = build_training_model(cfg, mcfg, ParallelLayout(1, 0), device)
    opt = build_optimizer(model, 1e-3, (0.9, 0.95), 1e-8, 0.1)
    ds_cfg = merge_sections(deepspeed_config(cfg, 1, "bf16"), ds_change)
    engine, _, guard = initialize_with_guard(model, opt, ds_cfg, device)
    state = {}

    def forward():
        guard.new_step()
        state["loss"] = engine(ids, labels=labels, return_logits=False).loss
        guard.observe_loss(state["loss"])

    def ds_step():
        forward()
        engine.backward(state["loss"])
        engine.step()
        return state["loss"].detach()

    losses = trained(ds_step, lambda: engine(ids, labels=labels, return_logits=False).loss.detach())
    if not losses[-1] < losses[0]:
        raise SystemExit(f"DeepSpeed engine did not train on one batch: losses {losses}")
    ours = {"forward": count_ops(forward), "backward": count_ops(lambda: engine.backward(state["loss"])),
            "step": count_ops(engine.step)}
    return ours, losses, ds_cfg


def trained(step, loss_of) -> list[float]:
    """Three steps on one batch, then that batch's loss."""
    return [float(step()) for _ in range(3)] + [float(loss_of())]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="360m")
    ap.add_argument("--seq", type=int, default=64, help="tokens per step (the counts do not depend on it)")
    ap.add_argument("--ds-config", default="{}", type=json.loads)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    import deepspeed

    from bench.train_throughput import train_config
    from pretrain.distributed import init_distributed
    from pretrain.parallel.layout import ParallelLayout
    from pretrain.trainer import build_training_model

    device, _, _ = init_distributed()

    cfg = train_config(args.preset, args.seq, 1, False, False)
    mcfg = cfg.model.build(vocab_size=32000)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (1, args.seq), generator=g).to(device)
    labels = torch.randint(0, 32000, (1, args.seq), generator=g).to(device)

    ours, losses, ds_cfg = count_ours(cfg, mcfg, device, ids, labels, args.ds_config)

    # plain: bf16 weights, torch AdamW, the same model
    state = {}
    model, _ = build_training_model(cfg, mcfg, ParallelLayout(1, 0), device)
    model = model.to(torch.bfloat16)
    popt = torch.optim.AdamW(model.parameters(), lr=1e-3, **({"fused": True} if device.type == "cuda" else {}))

    def plain_forward():
        state["loss"] = model(ids, labels=labels, return_logits=False).loss

    def plain_step():
        plain_forward()
        state["loss"].backward()
        popt.step()
        popt.zero_grad(set_to_none=True)
        return state["loss"].detach()

    plain_losses = trained(plain_step, lambda: model(ids, labels=labels, return_logits=False).loss.detach())
    if not plain_losses[-1] < plain_losses[0]:
        raise SystemExit(f"plain model did not train on one batch: losses {plain_losses}")
    plain_forward()
    plain = {"forward": count_ops(plain_forward), "backward": count_ops(lambda: state["loss"].backward()),
             "step": count_ops(lambda: (popt.step(), popt.zero_grad(set_to_none=True)))}

    n_tensors = sum(1 for _ in model.parameters())
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {"bench": "trainer_ops", "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "device": dev_name, "deepspeed": deepspeed.__version__, "torch": torch.__version__,
              "preset": args.preset, "parameter_tensors": n_tensors, "ds_config": ds_cfg,
              "losses": {"ours": losses, "plain": plain_losses}, "ours": ours, "plain": plain,
              }
    print(f"{args.preset}: {n_tensors} parameter tensors; compute ops per phase (ours / plain):")
    for phase in ("forward", "backward", "step"):
        print(f"  {phase:8s} {ours[phase]['compute_ops']:7d} / {plain[phase]['compute_ops']:7d}   "
              f"top of ours: {ours[phase]['top']}")
    path = result_path(args.out, gpu_tag(dev_name) if device.type == "cuda" else "cpu", "trainer_ops", args.tag)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    from pretrain.distributed import shutdown_distributed

    shutdown_distributed(True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
