"""Sequence-parallel overhead at the model level, without DeepSpeed: where the SP step time goes.

    python -m bench.sp_overhead --preset 360m --seq 98304 [--check-seq 8192] [--steps 6] [--profile] [--simulate]

On 2 GPUs (NCCL; gloo on CPU for a smoke run) every rank first checks that the SP=2 model equals the plain model
on a short sequence in fp32 (loss and every parameter gradient, after summing over the SP ranks), then times, in the
training dtype:
  plain  one GPU runs the model at L/2 (both ranks at once, each on its own GPU, no communication);
  sp2    both GPUs run the model at L with parallel.sp=2 (each holds L/2; states and conv halos are exchanged).
A step is forward + loss + backward (no optimizer: that is the same per GPU with or without SP, up to ZeRO).
overhead = sp2 step time / plain step time - 1 (issue target <= 10 %). With --profile, each rank also writes a
table of the CUDA kernels of two steps of each kind (rank 1 is the one that receives a state).

--simulate (one GPU): the check runs as 2 gloo ranks on the CPU (keep --check-seq small); the timing runs in this process as the
last SP rank (the one that receives a state and corrects its outputs), with the collectives replaced by local
stacks of its own tensors. That measures the compute SP adds, not the transfers (a few MB per step: one fp32 state
and k-1 conv rows per layer and row); use it where no 2-GPU machine is at hand.
Writes bench/results/<yyyymmdd>_<gpu>_sp_overhead.json (or --out).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench import gpu_tag

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(seq: int, vocab: int, device: torch.device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seq), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    labels[0, -1] = -100
    # one document per row (the long-context case SP is for)
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "cu_seqlens": torch.tensor([0, seq], dtype=torch.int32, device=device)}


def _sp_loss(model, spar, batch) -> torch.Tensor:
    local, total = spar.slice_batch({k: v.cpu() for k, v in batch.items()})
    spar.to(batch["input_ids"].device)
    dev = batch["input_ids"].device
    out = model(local["input_ids"].to(dev), labels=local["labels"].to(dev), cu_seqlens=local["cu_seqlens"].to(dev),
                return_logits=False)
    return out.loss * out.n_tokens / max(total, 1)


def _plain_loss(model, batch) -> torch.Tensor:
    return model(batch["input_ids"], labels=batch["labels"], cu_seqlens=batch["cu_seqlens"], return_logits=False).loss


def _steps(ref, sp_model, spar, half: dict, full: dict):
    """One step of each kind: the plain model on `half`, the SP model on (this rank's slice of) `full`."""

    def plain_step():
        ref.zero_grad(set_to_none=True)
        _plain_loss(ref, half).backward()

    def sp_step():
        sp_model.zero_grad(set_to_none=True)
        _sp_loss(sp_model, spar, full).backward()

    return plain_step, sp_step


def _check(ref, sp_model, spar, seq: int, vocab: int, device: torch.device, group) -> dict:
    """fp32: SP loss and gradients (summed over SP) against the plain model on the whole sequence."""
    batch = _batch(seq, vocab, device, seed=1)
    ref.zero_grad(set_to_none=True)
    sp_model.zero_grad(set_to_none=True)
    loss_ref = _plain_loss(ref, batch)
    loss_ref.backward()
    loss = _sp_loss(sp_model, spar, batch)
    loss.backward()
    full = loss.detach().clone()
    dist.all_reduce(full, group=group)
    worst = 0.0
    for (name, p), (_, r) in zip(sp_model.named_parameters(), ref.named_parameters()):
        g = p.grad.clone()
        dist.all_reduce(g, group=group)
        worst = max(worst, ((g - r.grad).norm() / r.grad.norm().clamp_min(1e-12)).item())
    loss_err = abs(full.item() - loss_ref.item()) / abs(loss_ref.item())
    return {"seq": seq, "loss_rel_err": loss_err, "worst_grad_rel_err": worst,
            "ok": loss_err < 1e-4 and worst < 1e-3}


def _time(step, steps: int, warmup: int, device: torch.device) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    row = {"step_ms": 1e3 * statistics.median(times), "step_ms_all": [1e3 * t for t in times]}
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def _profile(step, device: torch.device, path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=40))


def worker(rank: int, world: int, args: argparse.Namespace, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # --simulate: two ranks cannot share one GPU under NCCL, and gloo has no all_gather for CUDA tensors, so the
    # check then runs on the CPU (the chunk backend; the SP algebra is what it checks)
    cuda = torch.cuda.is_available() and not args.simulate
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    nccl = cuda
    dist.init_process_group("nccl" if nccl else "gloo", rank=rank, world_size=world,
                            **({"device_id": device} if nccl else {}))
    try:
        from metala import MetaLAConfig, MetaLAForCausalLM
        from pretrain.parallel.layout import ParallelLayout
        from pretrain.parallel.sequence import apply_sequence_parallel

        layout = ParallelLayout(world, rank, tp=1, sp=world)
        cfg = MetaLAConfig.from_preset(args.preset)
        ref = MetaLAForCausalLM(cfg, seed=0).to(device)
        ref.validate_inputs = False
        sp_model = copy.deepcopy(ref)
        spar = apply_sequence_parallel(sp_model, layout)
        result = {"rank": rank, "check": _check(ref, sp_model, spar, args.check_seq, cfg.vocab_size, device,
                                                layout.sp_group)}
        if args.simulate:
            Path(out, f"rank{rank}.json").write_text(json.dumps(result))
            return
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
        ref.to(dtype)
        sp_model.to(dtype)
        plain_step, sp_step = _steps(ref, sp_model, spar, _batch(args.seq // 2, cfg.vocab_size, device, seed=2 + rank),
                                     _batch(args.seq, cfg.vocab_size, device, seed=2))
        result["plain"] = _time(plain_step, args.steps, args.warmup, device)
        dist.barrier()
        result["sp2"] = _time(sp_step, args.steps, args.warmup, device)
        if args.profile:
            _profile(plain_step, device, Path(out) / f"profile_plain_rank{rank}.txt")
            dist.barrier()
            _profile(sp_step, device, Path(out) / f"profile_sp2_rank{rank}.txt")
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def simulate_timing(args: argparse.Namespace, out: Path) -> dict:
    """The last SP rank's step on one device, collectives replaced by stacks of its own tensors."""
    from metala import MetaLAConfig, MetaLAForCausalLM
    from pretrain.parallel import sequence
    from pretrain.parallel.layout import ParallelLayout

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    world = args.world
    sequence.all_gather_stack = lambda x, group: torch.stack([x] * world)
    layout = ParallelLayout(world, world - 1, tp=1, sp=world, create_groups=False)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cfg = MetaLAConfig.from_preset(args.preset)
    ref = MetaLAForCausalLM(cfg, seed=0).to(device, dtype)
    ref.validate_inputs = False
    sp_model = copy.deepcopy(ref)
    spar = sequence.apply_sequence_parallel(sp_model, layout)
    plain_step, sp_step = _steps(ref, sp_model, spar, _batch(args.seq // world, cfg.vocab_size, device, seed=2),
                                 _batch(args.seq, cfg.vocab_size, device, seed=2))
    rows = {"plain": _time(plain_step, args.steps, args.warmup, device)}
    rows["sp2"] = _time(sp_step, args.steps, args.warmup, device)
    # once more, interleaved, so a drift of the machine cannot favour one side
    rows["plain_again"] = _time(plain_step, args.steps, 1, device)
    if args.profile:
        _profile(plain_step, device, out / "profile_plain_sim.txt")
        _profile(sp_step, device, out / "profile_sp_sim.txt")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="360m")
    ap.add_argument("--seq", type=int, default=98304, help="the SP sequence length L (each GPU holds L/2)")
    ap.add_argument("--check-seq", type=int, default=8192, help="sequence length of the fp32 correctness check")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--world", type=int, default=2, help="SP ranks (GPUs)")
    ap.add_argument("--profile", action="store_true", help="also write per-rank kernel tables")
    ap.add_argument("--simulate", action="store_true", help="one device: see above")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results")
    args = ap.parse_args()
    if args.seq % (2 * args.world) or args.check_seq % args.world:
        ap.error("--seq must be divisible by 2 x --world and --check-seq by --world")
    if torch.cuda.is_available() and torch.cuda.device_count() < args.world and not args.simulate:
        ap.error(f"needs {args.world} GPUs, found {torch.cuda.device_count()}")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "sp_overhead_ranks"
    work.mkdir(exist_ok=True)
    mp.spawn(worker, args=(args.world, args, _free_port(), str(work)), nprocs=args.world, join=True)
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(args.world)]
    if args.simulate:
        sim = simulate_timing(args, work)
        plain = min(sim["plain"]["step_ms"], sim["plain_again"]["step_ms"])
        sp2 = sim["sp2"]["step_ms"]
        ranks[-1].update(sim)
    else:
        # the step ends when the slowest rank ends
        plain = max(r["plain"]["step_ms"] for r in ranks)
        sp2 = max(r["sp2"]["step_ms"] for r in ranks)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"bench": "sp_overhead", "gpu": gpu, "world": args.world, "simulated": args.simulate, "preset": args.preset, "seq": args.seq,
              "dtype": args.dtype, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "correct": all(r["check"]["ok"] for r in ranks), "ranks": ranks,
              "plain_step_ms": plain, "sp2_step_ms": sp2, "sp_overhead": sp2 / plain - 1,
              "plain_tokens_per_s_per_gpu": (args.seq // 2) / (plain / 1e3),
              "sp2_tokens_per_s": args.seq / (sp2 / 1e3)}
    tag = "cpu" if gpu == "cpu" else gpu_tag(gpu)
    kind = f"x1_sim{args.world}" if args.simulate else f"x{args.world}"
    path = args.out / f"{time.strftime('%Y%m%d')}_{tag}{kind}_sp_overhead.json"
    path.write_text(json.dumps(result, indent=2))
    for r in ranks:
        c = r["check"]
        print(f"rank {r['rank']}: check loss {c['loss_rel_err']:.1e} grads {c['worst_grad_rel_err']:.1e} "
              f"{'ok' if c['ok'] else 'FAILED'}")
    print(f"step: plain (L/2, 1 GPU) {plain:.1f} ms, SP=2 (L) {sp2:.1f} ms -> overhead {100 * result['sp_overhead']:.1f}%")
    print(f"wrote {path}")
    return 0 if result["correct"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
