"""Where the operator's host time goes. At the 360M shape one fwd+bwd call's kernels take ~1 ms on an H100, and
its enqueue time (`bench.ops`'s `host` column: the CPU time of one call after a sync) is 0.8-1.6 ms depending on the
machine's host (sessions 25-28): on a slow host the eager call's figure is the host's.
Per shape, after the correctness gate of `bench.ops` (ours against the fp32 chunked reference):
  - host_ms: that enqueue time, and split into the forward's and the backward's;
  - launch_us: the median host time of each kernel's launch (`metala.ops.utils.launch_cache.launch`, wrapped);
  - fwdbwd_ms: `triton.testing.do_bench` quantiles (20/50/80 %), as `bench.ops` times it;
  - graph_fwdbwd_ms: the same call captured once in a CUDA graph and replayed, i.e. the kernels with the host out of
    the way; the replay's gradients must equal the eager call's first (else no time is given);
  - host_events: torch.profiler's CPU-side events of a few calls (aten ops, autograd nodes, CUDA runtime/driver calls
    such as launches, allocations and synchronisations), the heaviest by self time, in microseconds a call: a call
    that waits on the GPU inside shows it here as a synchronising runtime call;
  - python_profile: cProfile's Python functions with the most own time, per call;
  - launch_anatomy: per kernel, the microseconds of one launch through the launch cache, split into its key, the
    compiled kernel's runner and Triton's C launcher called directly; and torch_empty_us, one GPU allocation.
Writes bench/results/<yyyymmdd>_<gpu>_op_host[_<tag>].json and prints a table.

    python -m bench.op_host [--shapes metala-360m,metala-1.3b] [--seqlens 2048,8192,32768] [--tag NAME]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench import gpu_tag, result_path
from bench.ops import (SHAPES, TOKENS, add_shape_args, check_shape, clear_grads, git_info, host_ms, make_inputs,
                       ours, reference_chunked)

HOST_REPS = 40  # timed calls behind host_ms and the per-launch medians


def sync() -> None:
    # the profiling helpers also run under the CPU interpreter (tests), where there is nothing to wait for
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


class LaunchTimer:
    """Wraps the operator's `launch` and keeps each kernel's host time per call, in microseconds, and each kernel's
    first launch (kernel, grid, args, kw), which `launch_anatomy` replays."""

    def __init__(self) -> None:
        import metala.ops.metala.chunk as chunk

        self.chunk, self.inner, self.us, self.first = chunk, chunk.launch, {}, {}

    def __enter__(self) -> LaunchTimer:
        def timed(kernel, grid, args, kw):
            t0 = time.perf_counter()
            self.inner(kernel, grid, args, kw)
            self.us.setdefault(kernel.fn.__name__, []).append((time.perf_counter() - t0) * 1e6)
            self.first.setdefault(kernel.fn.__name__, (kernel, grid, args, kw))

        self.chunk.launch = timed
        return self

    def __exit__(self, *exc) -> None:
        self.chunk.launch = self.inner


def split_host_ms(leaves, do, reps: int = 20) -> tuple[float, float]:
    """Median enqueue time of the forward and of the backward, each after a sync."""
    fwd, bwd = [], []
    for _ in range(reps):
        clear_grads(leaves)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        o = ours(*leaves)[0]
        fwd.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        o.backward(do)
        bwd.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return median(fwd), median(bwd)


def graph_time(leaves, do) -> dict:
    """The fwd+bwd call replayed from a CUDA graph: its gradients against the eager call's, then do_bench times."""
    from triton.testing import do_bench

    clear_grads(leaves)
    ours(*leaves)[0].backward(do)
    eager = [t.grad.clone() for t in leaves]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture asks
        for _ in range(3):
            clear_grads(leaves)
            ours(*leaves)[0].backward(do)
    torch.cuda.current_stream().wait_stream(side)
    clear_grads(leaves)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ours(*leaves)[0].backward(do)
    for t in leaves:
        t.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    diff = max(((t.grad.float() - e.float()).abs().max() / e.float().abs().max().clamp_min(1e-30)).item()
               for t, e in zip(leaves, eager))
    out = {"grads_max_rel_diff": diff, "correct": diff <= 1e-3}
    if out["correct"]:
        out["fwdbwd_ms"] = do_bench(graph.replay, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8])
    return out


def host_events(fn, leaves, calls: int = 10, top: int = 15) -> list[dict]:
    """The heaviest host-side events of `calls` enqueues, each after a sync, by self CPU time a call."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(calls):
            clear_grads(leaves)
            sync()
            fn()
        sync()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"name": e.key[:80], "self_us": e.self_cpu_time_total / calls, "count": e.count / calls}
            for e in events]


def python_profile(fn, leaves, calls: int = 100, top: int = 25) -> list[dict]:
    """cProfile over `calls` back-to-back fwd+bwd calls: the Python functions with the most own time, in
    microseconds a call (cProfile's own overhead included: compare rows, not totals)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    sync()
    prof.enable()
    for _ in range(calls):
        clear_grads(leaves)
        fn()
    prof.disable()
    sync()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (prim calls, calls, tottime, cumtime, callers)}
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return [{"fn": f"{Path(f).name}:{line}:{name}"[:90], "own_us": tt / calls * 1e6, "cum_us": ct / calls * 1e6,
             "calls": n / calls} for (f, line, name), (_, n, tt, ct, _) in rows]


def launch_anatomy(first: tuple, reps: int = 200) -> dict:
    """For one recorded launch (kernel, grid, args, kw): microseconds a launch of the launch cache's key alone, the
    cache's whole `launch`, the compiled kernel's runner (`compiled[grid](*args)`), and its C launcher called with
    everything prepared (Triton's floor from Python), each over `reps` back-to-back launches."""
    from metala.ops.utils import launch_cache as lc

    kernel, grid, args, kw = first
    compiled, consts = lc._COMPILED[lc.cache_key(kernel, args, kw)]
    grid3 = tuple(grid) + (1,) * (3 - len(grid))
    stream = torch.cuda.current_stream().cuda_stream
    full = (*args, *consts)
    ways = {"key_us": lambda: lc._COMPILED.get(lc.cache_key(kernel, args, kw)),
            "launch_us": lambda: lc.launch(kernel, grid, args, kw),
            "runner_us": lambda: compiled[grid3](*full),
            "c_launcher_us": lambda: compiled.run(*grid3, stream, compiled.function, compiled.packed_metadata, None,
                                                  None, None, *full)}
    out = {"kernel": kernel.fn.__name__, "n_args": len(args)}
    for name, f in ways.items():
        out[name] = host_us(f, reps)
    return out


def host_us(f, reps: int) -> float:
    """Host microseconds a call of `f` over `reps` back-to-back calls, from an idle GPU."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    us = (time.perf_counter() - t0) / reps * 1e6
    torch.cuda.synchronize()
    return us


def measure(H: int, K: int, V: int, T: int) -> dict:
    from triton.testing import do_bench

    B = TOKENS // T
    q, z, v, do = make_inputs(B, T, H, K, V, seed=T + H)
    gate = check_shape(q, z, v, do, reference_chunked(q, z, v, do))["metala"]
    row = {"B": B, "T": T, "H": H, "dk": K, "dv": V, "gate": gate}
    if not gate["correct"]:
        return row
    leaves = [t.clone().requires_grad_() for t in (q, z, v)]
    fb = lambda: ours(*leaves)[0].backward(do)  # noqa: E731
    for _ in range(5):
        fb()
    torch.cuda.synchronize()
    with LaunchTimer() as timer:
        row["host_ms"] = host_ms(fb, leaves, reps=HOST_REPS)
    row["launch_us"] = {name: median(us) for name, us in timer.us.items()}
    row["launches_per_call"] = {name: len(us) // HOST_REPS for name, us in timer.us.items()}
    row["host_fwd_ms"], row["host_bwd_ms"] = split_host_ms(leaves, do)
    row["host_events"] = host_events(fb, leaves)
    row["python_profile"] = python_profile(fb, leaves)
    row["launch_anatomy"] = [launch_anatomy(first) for first in timer.first.values()]
    row["torch_empty_us"] = host_us(lambda: torch.empty(1 << 20, device="cuda"), 200)
    row["fwdbwd_ms"] = do_bench(fb, warmup=25, rep=100, grad_to_none=leaves, quantiles=[0.2, 0.5, 0.8])
    try:
        row["graph"] = graph_time(leaves, do)
    except Exception as e:  # noqa: BLE001 - a capture failure is a result too; the other figures stand
        row["graph"] = {"error": repr(e)[:500], "correct": False}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap, "2048,8192,32768")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name()
    sha, dirty = git_info()
    result = {"bench": "op_host", "git_sha": sha, "git_dirty": dirty, "gpu": gpu, "torch": torch.__version__,
              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": []}
    path = result_path(args.out, gpu_tag(gpu), "op_host", args.tag)
    print(f"{'shape':<12} {'T':>6} {'host':>7} {'fwd':>6} {'bwd':>6} {'gpu q50':>8} {'graph':>7}  launches (us)")
    ok = True
    for shape in args.shapes.split(","):
        H, K, V = SHAPES[shape]
        for T in map(int, args.seqlens.split(",")):
            row = {"shape": shape, **measure(H, K, V, T)}
            result["rows"].append(row)
            path.write_text(json.dumps(result, indent=2))  # kept after every shape: a time limit keeps what ran
            if "host_ms" not in row:
                ok = False
                print(f"{shape:<12} {T:>6} gate failed: {json.dumps(row['gate'])}")
                continue
            graph = row["graph"].get("fwdbwd_ms", [float("nan")] * 3)[1]
            launches = " ".join(f"{n.removeprefix('chunk_metala_')}={us:.0f}" for n, us in row["launch_us"].items())
            print(f"{shape:<12} {T:>6} {row['host_ms']:>7.3f} {row['host_fwd_ms']:>6.3f} {row['host_bwd_ms']:>6.3f} "
                  f"{row['fwdbwd_ms'][1]:>8.3f} {graph:>7.3f}  {launches}", flush=True)
    for row in result["rows"][:1]:
        for a in row.get("launch_anatomy", []):
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in a.items()}))
        for f in row.get("python_profile", [])[:20]:
            print(f"  {f['own_us']:8.1f} {f['cum_us']:8.1f} {f['calls']:6.1f} {f['fn']}")
    for row in result["rows"]:
        events = ", ".join(f"{e['name']} {e['self_us']:.0f}" for e in row.get("host_events", [])[:8])
        print(f"{row['shape']} T={row['T']} host us a call: {events}")
    print(f"wrote {path}")
    if not ok:
        raise SystemExit("correctness gate failed")


if __name__ == "__main__":
    main()
