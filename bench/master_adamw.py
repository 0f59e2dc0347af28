"""The fused master-weight AdamW step (pretrain/master_adamw) against what DeepSpeed ZeRO-1/2 runs for the same
update, on one flat partition of a model's size (CUDA only):

    deepspeed   g32 = g16.to(float32); torch._fused_adamw_ over fp32 (master, g32, m, v); w16.copy_(master)
    fused       one kernel: reads g16, master, m, v; writes master, m, v, w16

Correctness first, on the benchmark's own tensors: one step of each from the same state, masters and moments within
a few fp32 ulp of torch's fused AdamW, bf16 weights equal to the master rounded to nearest, and a skipped step
(found_inf = 1) writing nothing. Then the median time of each (CUDA events), and the HBM bytes each moves.

    python -m bench.master_adamw [--params 372e6,1.3e9] [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench import gpu_tag, result_path
from pretrain.master_adamw import adamw_master_step_

ROOT = Path(__file__).resolve().parents[1]
HP = {"lr": 3e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}


def make_state(n: int, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    master = torch.randn(n, device="cuda", generator=g)
    return {"master": master, "exp_avg": torch.randn(n, device="cuda", generator=g) * 1e-3,
            "exp_avg_sq": torch.rand(n, device="cuda", generator=g) * 1e-6,
            "grad": (torch.randn(n, device="cuda", generator=g) * 1e-3).bfloat16(),
            "lp": master.bfloat16(), "step": torch.full((), 7.0, device="cuda")}


def deepspeed_step(s: dict, found_inf=None, grad_scale=None) -> None:
    g32 = s["grad"].to(torch.float32)
    torch._fused_adamw_([s["master"]], [g32], [s["exp_avg"]], [s["exp_avg_sq"]], [], [s["step"]], amsgrad=False,
                        lr=HP["lr"], beta1=HP["beta1"], beta2=HP["beta2"], weight_decay=HP["weight_decay"],
                        eps=HP["eps"], maximize=False, grad_scale=grad_scale, found_inf=found_inf)
    s["lp"].copy_(s["master"])


def fused_step(s: dict, found_inf=None, grad_scale=None) -> None:
    adamw_master_step_(s["master"], s["exp_avg"], s["exp_avg_sq"], s["grad"], s["lp"], s["step"], **HP,
                       found_inf=found_inf, grad_scale=grad_scale)


def check(n: int) -> dict:
    """One step of each from the same state (clip divisor on), and a skipped fused step."""
    a, b = make_state(n), make_state(n)
    scale = torch.tensor(1.7, device="cuda")
    deepspeed_step(a, grad_scale=scale)
    fused_step(b, grad_scale=scale)
    out = {key: float((a[key] - b[key]).abs().max() / a[key].abs().max()) for key in ("master", "exp_avg", "exp_avg_sq")}
    out["lp_is_master_rounded"] = bool(torch.equal(b["lp"], b["master"].bfloat16()))
    before = {k: v.clone() for k, v in b.items()}
    fused_step(b, found_inf=torch.ones((), device="cuda"))
    out["skip_writes_nothing"] = all(torch.equal(before[k], b[k]) for k in b)
    out["correct"] = (max(out[k] for k in ("master", "exp_avg", "exp_avg_sq")) < 1e-6 and out["lp_is_master_rounded"]
                      and out["skip_writes_nothing"])
    return out


def median_ms(fn, repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="372e6,1.3e9", help="flat partition sizes (elements)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.master_adamw needs a CUDA device")
    gpu = torch.cuda.get_device_name()
    result = {"bench": "master_adamw", "gpu": gpu, "torch": torch.__version__,
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": []}
    ok = True
    for n in (int(float(x)) for x in args.params.split(",")):
        gate = check(n)
        ok &= gate["correct"]
        row = {"params": n, "gate": gate}
        if gate["correct"]:
            s = make_state(n)
            # bytes through HBM a parameter: DeepSpeed's cast (read 2, write 4), AdamW over fp32 (read p, g, m, v: 16;
            # write p, m, v: 12), copy into bf16 (read 4, write 2): 40; fused: read 2 + 12, write 12 + 2: 28
            # (the JSON of 2026-12-06's H100 run computed DeepSpeed's GB/s with 38: 2,433 there is 2,561)
            for name, step, nbytes in (("deepspeed", deepspeed_step, 40 * n), ("fused", fused_step, 28 * n)):
                ms = median_ms(lambda step=step, s=s: step(s), args.repeat)
                row[name] = {"ms": ms, "GB_per_s": nbytes / ms / 1e6}
            row["speedup"] = row["deepspeed"]["ms"] / row["fused"]["ms"]
            print(f"{n / 1e6:8.0f}M params: DeepSpeed's cast + fp32 AdamW + copy {row['deepspeed']['ms']:7.2f} ms, "
                  f"fused {row['fused']['ms']:7.2f} ms ({row['fused']['GB_per_s']:.0f} GB/s), "
                  f"{row['speedup']:.2f}x", flush=True)
        else:
            print(f"{n}: gate failed {gate}", flush=True)
        result["rows"].append(row)
        torch.cuda.empty_cache()
    path = result_path(args.out, gpu_tag(gpu), "master_adamw", args.tag)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}; correct: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
