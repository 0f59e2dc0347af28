"""Sequence and tensor parallelism on a 2-GPU node, through `launch/pretrain.sh` and the real trainer
(shared/spec/distributed.md; issue "TP/SP", GPU run).

    python -m bench.parallel_scaling --data DIR --tokenizer FILE [--preset 360m] [--long 131072] [--steps 8]

Runs (each a fresh `launch/pretrain.sh` job; tokens/s is the median of the trainer's logged `perf/tokens_per_s`
after the first `--skip` steps, read from the run's metrics.jsonl):
  sp1_half   1 GPU, sequence L/2                         (the SP baseline: the same tokens per GPU)
  sp1_full   1 GPU, sequence L                           (expected not to fit: shows why SP is needed)
  sp2_full   2 GPUs, parallel.sp=2, sequence L           (each GPU holds L/2; the state is passed between them)
  tp2        2 GPUs, parallel.tp=2, 16 x 2048 per step
  dp2        2 GPUs, data parallel, 32 x 2048 per step   (16 x 2048 per GPU)
SP overhead = step time of sp2_full / step time of sp1_half - 1 (target <= 10 %). Every run must also have a finite
loss that falls from its first to its last logged step (a correctness floor, not a benchmark of learning).
Writes bench/results/<yyyymmdd>_<gpu>_parallel_scaling.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_job(name: str, gpus: int, overrides: list[str], work: Path, timeout: int, skip: int) -> dict:
    out_dir = work / name
    env = {**os.environ, "NUM_GPUS": str(gpus), "PYTHON": os.environ.get("PYTHON", "python3")}
    cmd = ["bash", str(ROOT / "launch/pretrain.sh"), str(ROOT / "launch/configs/360m.yaml"),
           f"train.out_dir={out_dir}", *overrides]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, log = 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else str(e.stdout or "")
    row = {"name": name, "gpus": gpus, "overrides": overrides, "rc": rc, "wall_s": time.time() - t0}
    metrics = out_dir / "metrics.jsonl"
    recs = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    perf = [r for r in recs if "perf/tokens_per_s" in r]
    if rc != 0 or len(perf) <= skip:
        row["oom"] = "OutOfMemoryError" in log or "out of memory" in log
        row["log_tail"] = log[-2500:]
        print(f"{name}: {'out of memory' if row['oom'] else f'failed (rc {rc})'}", flush=True)
        if not row["oom"]:
            print(log[-2500:], flush=True)
        return row
    timed = perf[skip:]
    row.update({
        "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in timed),
        "mfu": statistics.median(r["perf/mfu"] for r in timed) if "perf/mfu" in timed[0] else None,
        "peak_memory_gib": max(r.get("mem/peak_alloc_gib", 0.0) for r in timed),
        "loss_first": perf[0]["train/loss"], "loss_last": perf[-1]["train/loss"], "steps_timed": len(timed),
    })
    row["loss_ok"] = all(math.isfinite(r["train/loss"]) for r in perf) and row["loss_last"] < row["loss_first"]
    print(f"{name:9s} {row['tokens_per_s'] / 1e3:8.1f}k tok/s  mem {row['peak_memory_gib']:.1f} GiB  "
          f"loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--preset", default="360m")
    ap.add_argument("--long", type=int, default=131072, help="the SP sequence length L")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--skip", type=int, default=3, help="logged steps left out of the median (warm-up)")
    ap.add_argument("--runs", default="sp1_half,sp2_full,sp1_full,tp2,dp2")
    ap.add_argument("--set", nargs="*", default=[], help="extra recipe overrides for every job, e.g. "
                    "train.precision=auto (CPU)")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per job")
    ap.add_argument("--work", type=Path, default=Path("/tmp/metala_parallel_scaling"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results")
    args = ap.parse_args()
    common = [f"model.preset={args.preset}", f"data.dir={args.data}", f"data.tokenizer={args.tokenizer}",
              f"train.steps={args.steps}", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
              "train.compile=false", "logging.tensorboard=false", "logging.plot=false", "train.resume=none", *args.set]
    L = args.long
    plans = {
        "sp1_half": (1, [f"data.seq_len={L // 2}", "train.global_batch=1", "train.micro_batch=1"]),
        "sp1_full": (1, [f"data.seq_len={L}", "train.global_batch=1", "train.micro_batch=1"]),
        "sp2_full": (2, [f"data.seq_len={L}", "train.global_batch=1", "train.micro_batch=1", "parallel.sp=2"]),
        "tp2": (2, ["data.seq_len=2048", "train.global_batch=16", "train.micro_batch=16", "parallel.tp=2"]),
        "dp2": (2, ["data.seq_len=2048", "train.global_batch=32", "train.micro_batch=16"]),
    }
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"bench": "parallel_scaling", "gpu": gpu, "gpus": torch.cuda.device_count(), "preset": args.preset,
              "long_seq": L, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "h200" if "H200" in gpu else "h100" if "H100" in gpu else "gpu"
    path = args.out / f"{time.strftime('%Y%m%d')}_{tag}x{result['gpus']}_parallel_scaling.json"
    for name in args.runs.split(","):
        gpus, extra = plans[name]
        result["rows"][name] = run_job(name, gpus, common + extra, args.work, args.timeout, args.skip)
        rows = result["rows"]
        if "tokens_per_s" in rows.get("sp1_half", {}) and "tokens_per_s" in rows.get("sp2_full", {}):
            # same tokens per GPU: time per step ratio = (L/2 / tps_half) vs (L / tps_sp2)
            t_half = (L // 2) / rows["sp1_half"]["tokens_per_s"]
            t_sp2 = L / rows["sp2_full"]["tokens_per_s"]
            result["sp_overhead"] = t_sp2 / t_half - 1
        if "tokens_per_s" in rows.get("tp2", {}) and "tokens_per_s" in rows.get("dp2", {}):
            result["tp2_over_dp2"] = rows["tp2"]["tokens_per_s"] / rows["dp2"]["tokens_per_s"]
        path.write_text(json.dumps(result, indent=2))
    if "sp_overhead" in result:
        print(f"SP=2 overhead vs one GPU at half the length: {100 * result['sp_overhead']:.1f}%")
    if "tp2_over_dp2" in result:
        print(f"TP=2 tokens/s / DP=2 tokens/s: {result['tp2_over_dp2']:.2f}")
    print(f"wrote {path}")
    ok = all(r.get("loss_ok", r.get("oom", False) and r["name"] == "sp1_full") for r in result["rows"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
