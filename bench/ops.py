"""Operator benchmark (shared/spec/performance.md section 6.1): our Triton MetaLA kernel against fla `chunk_gla` and
PyTorch SDPA at the MetaLA shapes, correctness gate first.

Shapes: bf16, B*T = 32768, T in {2048, 8192, 32768}; `metala-360m` (H=8) and `metala-1.3b` (H=16), K=64, V=128.
Gate (a failing row gets no time; the script exits non-zero):
  1. small shapes (T = 63, 500, with h0 and dht) vs the fp32 token-by-token reference: ratio <= 0.005 for
     o, ht, dq, dz, dv, dh0;
  2. every bench shape: ours and fla vs the fp32 chunked reference on the same bf16 inputs (o, dq, dv, dz);
  3. no NaN/inf anywhere.
Timing: triton.testing.do_bench(warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8]) medians, fwd and fwd+bwd, after one
untimed call. Writes bench/results/<yyyymmdd>_<gpu>_ops.json and prints a table.

    python -m bench.ops [--shapes metala-360m,metala-1.3b] [--seqlens 2048,8192,32768]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import gpu_tag, result_path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"metala-360m": (8, 64, 128), "metala-1.3b": (16, 64, 128)}
TOKENS = 32768
TAU = 16.0


def ceilings() -> tuple[float, float]:
    """Measured bf16 matmul TFLOP/s (8192^3) and copy TB/s (1 GiB, read + write counted)."""
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=25, rep=100)
    tflops = 2 * 8192**3 / ms / 1e9
    x = torch.empty(2**29, device="cuda", dtype=torch.bfloat16).normal_()
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=100)
    tbps = 2 * x.numel() * 2 / ms / 1e9
    del a, b, x, y
    return tflops, tbps


def roofline_ms(B, T, H, K, V, tflops, tbps, C=64):
    th = B * T * H
    f_fwd = th * (2 * C * (K + V) + 4 * K * V)
    f_bwd = th * (4 * C * (K + V) + 10 * K * V)
    b_fwd = th * 4 * (K + V)
    b_bwd = th * (8 * K + 6 * V)
    fwd = max(f_fwd / (tflops * 1e12), b_fwd / (tbps * 1e12)) * 1e3
    bwd = max(f_bwd / (tflops * 1e12), b_bwd / (tbps * 1e12)) * 1e3
    return fwd, fwd + bwd


def err(ref, x):
    ref, x = ref.detach().double(), x.detach().double()
    return ((ref - x).norm() / ref.norm().clamp_min(1e-12)).item()


def finite(*ts):
    return all(bool(torch.isfinite(t).all()) for t in ts if t is not None)


def make_inputs(B, T, H, K, V, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, H, K, device="cuda", generator=g).bfloat16()
    z = torch.randn(B, T, H, K, device="cuda", generator=g).bfloat16()
    v = torch.randn(B, T, H, V, device="cuda", generator=g).bfloat16()
    do = torch.randn(B, T, H, V, device="cuda", generator=g).bfloat16()
    return q, z, v, do


def ours(q, z, v, h0=None, final=False):
    from metala.ops.metala.chunk import chunk_metala_from_logits

    return chunk_metala_from_logits(q, z, v, TAU, initial_state=h0, output_final_state=final)


def gate_small() -> dict:
    """Gate 1: bf16 kernel vs the fp32 token-by-token recurrence, with h0 and dht."""
    from metala.ops.metala.naive import naive_recurrent_metala

    out = {}
    for T in (63, 500):
        B, H, K, V = 2, 4, 64, 128
        q, z, v, do = make_inputs(B, T, H, K, V, seed=T)
        h0 = torch.randn(B, H, K, V, device="cuda")
        dht = torch.randn(B, H, K, V, device="cuda")
        leaves = [t.clone().requires_grad_() for t in (q, z, v, h0)]
        o, ht = ours(*leaves[:3], h0=leaves[3], final=True)
        grads = torch.autograd.grad((o.float() * do.float()).sum() + (ht * dht).sum(), leaves)
        ref_leaves = [t.float().clone().requires_grad_() for t in (q, z, v, h0)]
        o_r, ht_r = naive_recurrent_metala(ref_leaves[0], F.logsigmoid(ref_leaves[1]) / TAU, ref_leaves[2],
                                           initial_state=ref_leaves[3], output_final_state=True)
        grads_r = torch.autograd.grad((o_r * do.float()).sum() + (ht_r * dht).sum(), ref_leaves)
        errs = {"o": err(o_r, o), "ht": err(ht_r, ht)}
        errs.update({n: err(a, b) for n, a, b in zip(("dq", "dz", "dv", "dh0"), grads_r, grads)})
        out[f"T{T}"] = {"err": errs, "finite": finite(o, ht, *grads), "correct": finite(o, ht, *grads)
                        and max(errs.values()) <= 0.005}
    return out


def reference_chunked(q, z, v, do):
    from metala.ops.metala.naive import naive_chunk_metala

    leaves = [t.float().clone().requires_grad_() for t in (q, z, v)]
    o, _ = naive_chunk_metala(leaves[0], F.logsigmoid(leaves[1]) / TAU, leaves[2])
    grads = torch.autograd.grad((o * do.float()).sum(), leaves)
    return o.detach(), grads


def fla_available() -> bool:
    try:
        import fla  # noqa: F401
        from fla.ops.gla import chunk_gla  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means the peer is absent
        return False
    return True


def fla_inputs(z, K):
    g = (F.logsigmoid(z.float()) / TAU).contiguous()
    k = (-torch.expm1(g)).bfloat16().contiguous()
    return g, k


def check_shape(q, z, v, do, ref) -> dict:
    o_r, (dq_r, dz_r, dv_r) = ref
    rows = {}
    leaves = [t.clone().requires_grad_() for t in (q, z, v)]
    o, _ = ours(*leaves)
    dq, dz, dv = torch.autograd.grad(o, leaves, do)
    e = {"o": err(o_r, o), "dq": err(dq_r, dq), "dz": err(dz_r, dz), "dv": err(dv_r, dv)}
    rows["metala"] = {"err": e, "correct": finite(o, dq, dz, dv) and max(e.values()) <= 0.005}
    if fla_available():
        from fla.ops.gla import chunk_gla

        zq = [t.clone().requires_grad_() for t in (q, z, v)]
        g, k = fla_inputs(zq[1], q.shape[-1])
        o, _ = chunk_gla(zq[0], k, zq[2], g)
        dq, dz, dv = torch.autograd.grad(o, zq, do)
        e = {"o": err(o_r, o), "dq": err(dq_r, dq), "dz": err(dz_r, dz), "dv": err(dv_r, dv)}
        rows["fla_chunk_gla"] = {"err": e, "correct": finite(o, dq, dz, dv) and max(e.values()) <= 0.005}
    return rows


def bench(fn_fwd, fn_fb, grads):
    from triton.testing import do_bench

    fn_fb()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    f = do_bench(fn_fwd, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
    fb = do_bench(fn_fb, warmup=25, rep=100, grad_to_none=grads, quantiles=[0.2, 0.5, 0.8])
    return {"fwd_ms": f[1], "fwd_ms_q20": f[0], "fwd_ms_q80": f[2], "fwdbwd_ms": fb[1], "fwdbwd_ms_q20": fb[0],
            "fwdbwd_ms_q80": fb[2], "host_fwdbwd_ms": host_ms(fn_fb, grads),
            "peak_mem_GB": torch.cuda.max_memory_allocated() / 1e9}


def clear_grads(leaves) -> None:
    for t in leaves:
        t.grad = None


def add_shape_args(ap, seqlens: str) -> None:
    """The operator benchmarks' common arguments: bench.ops SHAPES names, sequence lengths and the output folder."""
    ap.add_argument("--shapes", default="metala-360m,metala-1.3b")
    ap.add_argument("--seqlens", default=seqlens)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results")


def host_ms(fn, grads, reps: int = 20) -> float:
    """Median CPU time to enqueue one call (the GPU idle before it): when it nears the GPU time, the launches
    (Python, Triton's argument binding, allocations) bound the operator rather than its kernels."""
    times = []
    for _ in range(reps):
        clear_grads(grads)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[reps // 2]


def time_impls(q, z, v, do, B, T, H, K, V, fla_ok: bool) -> dict:
    out = {}
    leaves = [t.clone().requires_grad_() for t in (q, z, v)]
    out["metala"] = bench(lambda: ours(*leaves)[0], lambda: ours(*leaves)[0].backward(do), leaves)
    if fla_ok:
        from fla.ops.gla import chunk_gla

        g, k = fla_inputs(z, K)
        fl = [q.clone().requires_grad_(), k.clone().requires_grad_(), v.clone().requires_grad_(),
              g.clone().requires_grad_()]
        out["fla_chunk_gla"] = bench(lambda: chunk_gla(*fl[:3], fl[3])[0],
                                     lambda: chunk_gla(*fl[:3], fl[3])[0].backward(do), fl)
    qs, ks, vs = (torch.randn(B, H, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                  for _ in range(3))
    dos = torch.randn(B, H, T, 128, device="cuda", dtype=torch.bfloat16)
    sd = lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    out["sdpa"] = bench(sd, lambda: sd().backward(dos), [qs, ks, vs])
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

    out["sdpa_flash"] = bench(flash, lambda: flash().backward(dos), [qs, ks, vs])
    return out


def git_info() -> tuple[str, bool]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip())
        return sha or "unknown", dirty
    except OSError:
        return "unknown", True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap, "2048,8192,32768")
    args = ap.parse_args()
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False
    tflops, tbps = ceilings()
    gpu = torch.cuda.get_device_name()
    print(f"{gpu}: matmul {tflops:.0f} TFLOP/s, copy {tbps:.2f} TB/s", flush=True)
    small = gate_small()
    print("gate 1 (small shapes vs fp32 recurrence):", json.dumps(small), flush=True)
    fla_ok = fla_available()
    rows, all_ok = [], all(v["correct"] for v in small.values())
    from metala.ops.metala.chunk import CONFIG
    from metala.ops.metala.chunk_fwd import SPAN

    sha, dirty = git_info()
    try:
        import fla

        fla_version = fla.__version__
    except Exception:  # noqa: BLE001
        fla_version = None
    result = {"bench": "ops", "git_sha": sha, "git_dirty": dirty,
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "gpu": gpu, "torch": torch.__version__,
              "triton": triton.__version__, "fla": fla_version, "cuda": torch.version.cuda, "deepspeed": None,
              "matmul_tflops": tflops, "copy_TBps": tbps, "kernel_config": CONFIG,
              "one_reference_span": SPAN.value, "gate_small": small, "rows": rows}
    path = result_path(args.out, gpu_tag(gpu), "ops")
    for shape in args.shapes.split(","):
        H, K, V = SHAPES[shape]
        for T in map(int, args.seqlens.split(",")):
            B = TOKENS // T
            q, z, v, do = make_inputs(B, T, H, K, V, seed=T + H)
            ref = reference_chunked(q, z, v, do)
            checks = check_shape(q, z, v, do, ref)
            del ref
            torch.cuda.empty_cache()
            times = time_impls(q, z, v, do, B, T, H, K, V, fla_ok) if all(c["correct"] for c in checks.values()) else {}
            rf, rfb = roofline_ms(B, T, H, K, V, tflops, tbps)
            fla_fb = times.get("fla_chunk_gla", {}).get("fwdbwd_ms")
            for impl, t in times.items():
                row = {"shape": shape, "B": B, "T": T, "H": H, "dk": K, "dv": V, "dtype": "bf16", "impl": impl,
                       "sdpa_backend": {"sdpa": "default", "sdpa_flash": "flash"}.get(impl),
                       "correct": checks.get(impl, {"correct": True})["correct"],
                       "err": checks.get(impl, {}).get("err"), **t,
                       "roofline_fwd_ms": rf, "roofline_fwdbwd_ms": rfb, "x_roofline": t["fwdbwd_ms"] / rfb,
                       "speedup_vs_fla": (fla_fb / t["fwdbwd_ms"]) if fla_fb else None,
                       "autotune_config": {"BT": 64, "BC": 16, "BK": 64, "BV": 64, "two_level": True}
                       if impl == "metala" else None}
                rows.append(row)
            for impl, c in checks.items():
                if not c["correct"]:
                    all_ok = False
                    rows.append({"shape": shape, "B": B, "T": T, "H": H, "impl": impl, "correct": False,
                                 "err": c["err"]})
            print(f"{shape} T={T}: " + ", ".join(
                f"{i} {t['fwd_ms']:.3f}/{t['fwdbwd_ms']:.3f} ms" for i, t in times.items()) +
                f" | roofline {rfb:.3f} ms | errors {json.dumps({k: v['err'] for k, v in checks.items()})}",
                flush=True)
            del q, z, v, do
            torch.cuda.empty_cache()
            # saved after every shape: a time limit keeps what was measured
            path.write_text(json.dumps(result, indent=2))
    path.write_text(json.dumps(result, indent=2))
    print(f"\n{'shape':<12} {'T':>6} {'impl':<14} {'fwd ms':>8} {'fwd+bwd':>8} {'host':>7} {'x roof':>7} {'vs fla':>7}")
    for r in rows:
        if "fwdbwd_ms" in r:
            sp = f"{r['speedup_vs_fla']:.2f}x" if r["speedup_vs_fla"] else "-"
            print(f"{r['shape']:<12} {r['T']:>6} {r['impl']:<14} {r['fwd_ms']:>8.3f} {r['fwdbwd_ms']:>8.3f} "
                  f"{r['host_fwdbwd_ms']:>7.3f} {r['x_roofline']:>7.2f} {sp:>7}")
    print(f"wrote {path}")
    if not all_ok:
        raise SystemExit("correctness gate failed: see the rows with correct = false")


if __name__ == "__main__":
    main()
