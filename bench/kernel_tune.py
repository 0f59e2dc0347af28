"""Per-kernel times of the Triton MetaLA operator and a sweep of launch configurations (warps, pipelining stages,
tiles, segment length), at the benchmark shapes. Correctness is checked for every configuration that is timed
(against the default configuration's outputs, which bench/ops.py checks against the fp32 reference).

    python -m bench.kernel_tune [--quick] [--aug] [--shapes 16x2048x16,1x32768x16] [--segs 8,32,64] [--variants JSON]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from bench import gpu_tag
from metala.ops.metala import chunk as C

ROOT = Path(__file__).resolve().parents[1]


def setup(B, T, H, K=64, V=128, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B * T, H, K, device="cuda", generator=g).bfloat16()
    z = torch.randn(B * T, H, K, device="cuda", generator=g).bfloat16()
    v = torch.randn(B * T, H, V, device="cuda", generator=g).bfloat16()
    do = torch.randn(B * T, H, V, device="cuda", generator=g).bfloat16()
    return q, z, v, do


# --aug: the fused self-augmentation's weight [H, K] (None: the operator alone)
W_AUG: torch.Tensor | None = None


def run(q, z, v, do, B, T, seg):
    plan = C.plan_for(B, T, None, C.BT, seg, q.device)
    o, _, _, saved = C.chunk_metala_fwd(q, z, v, q.shape[-1] ** -0.5, 1 / 16, None, False, plan, True, W_AUG)
    dq, dz, dv, _, dw = C.chunk_metala_bwd(q, z, v, do, None, q.shape[-1] ** -0.5, 1 / 16, saved, plan, True, False,
                                           W_AUG)
    return plan, saved, (o, dq, dz, dv) + (() if dw is None else (dw,))


def timed(q, z, v, do, B, T, seg):
    from triton.testing import do_bench

    plan, saved, outs = run(q, z, v, do, B, T, seg)
    f = do_bench(lambda: C.chunk_metala_fwd(q, z, v, 0.125, 1 / 16, None, False, plan, True, W_AUG), warmup=25,
                 rep=100)
    b = do_bench(lambda: C.chunk_metala_bwd(q, z, v, do, None, 0.125, 1 / 16, saved, plan, True, False, W_AUG),
                 warmup=25, rep=100)
    return f, b, outs


def breakdown(q, z, v, do, B, T, seg) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    run(q, z, v, do, B, T, seg)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            run(q, z, v, do, B, T, seg)
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if "metala" in e.key:
            out[e.key] = e.device_time_total / 10 / 1e3
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def kernel_resources() -> dict[str, list[dict]]:
    """Registers, spills and shared memory of every compiled variant of the operator's kernels (from the driver,
    after the runs above): a spilling kernel is the first thing to look at."""
    from metala.ops.metala import chunk_bwd, chunk_fwd

    out = {}
    for mod in (chunk_fwd, chunk_bwd):
        for name in dir(mod):
            fn = getattr(mod, name)
            if not name.startswith("chunk_metala_") or not hasattr(fn, "device_caches"):
                continue
            rows = []
            for caches in fn.device_caches.values():
                for compiled in caches[0].values():
                    try:
                        compiled._init_handles()
                        rows.append({"regs": compiled.n_regs, "spills": compiled.n_spills,
                                     "shared": compiled.metadata.shared, "warps": compiled.metadata.num_warps,
                                     "stages": compiled.metadata.num_stages})
                    except Exception as e:  # noqa: BLE001 - the layout of Triton's cache is not an API
                        rows.append({"error": f"{type(e).__name__}: {e}"[:200]})
            if rows:
                out[name] = rows
    return out


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """ "BxTxH,..." -> [(B, T, H), ...]; T must be a multiple of the 64-token chunk (the sweep times whole chunks)."""
    shapes = []
    for item in text.split(","):
        try:
            B, T, H = (int(x) for x in item.strip().lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is not BxTxH (e.g. 16x2048x16)") from None
        if min(B, T, H) < 1 or T % 64:
            raise SystemExit(f"--shapes: {item!r} needs positive sizes and T a multiple of 64")
        shapes.append((B, T, H))
    return shapes


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# a variant's outputs must match the defaults' to bf16 accuracy (relative difference) to be picked at all
MAX_REL_DIFF = 5e-3
# a variant counts as a gain when fwd+bwd is at least this much below the defaults' at every timed shape
MIN_GAIN = 0.003


def combine_winners(shapes: list[dict], min_gain: float = MIN_GAIN) -> dict:
    """One configuration from the variants that beat the defaults at every timed shape (fwd+bwd, by > min_gain,
    outputs within bf16 accuracy of the defaults'): the largest worst-shape gain first, then each further winner
    that touches none of the kernels already set. Two changes to one kernel are never merged untimed (they interact:
    session 20, the dh kernel's 4 warps and 128-register cap, each a gain, lost most of it together); changes to
    different kernels are taken as adding up, which bench/ops.py and the training step must confirm."""
    worst: dict[str, float] = {}
    seen: dict[str, int] = {}
    for entry in shapes:
        base = entry["fwd_ms"] + entry["bwd_ms"]
        for v in entry["variants"]:
            if "change" not in v or v["max_rel_diff"] > MAX_REL_DIFF:
                continue
            key = json.dumps(v["change"], sort_keys=True)
            gain = 1 - (v["fwd_ms"] + v["bwd_ms"]) / base
            worst[key] = min(worst.get(key, gain), gain)
            seen[key] = seen.get(key, 0) + 1
    combined: dict = {}
    for key, gain in sorted(worst.items(), key=lambda kv: -kv[1]):
        change = json.loads(key)
        if seen[key] < len(shapes) or gain <= min_gain or set(change) & set(combined):
            continue
        combined.update(change)
    return combined


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results")
    ap.add_argument("--variants", default=None,
                    help='JSON list of {kernel: changes} to time instead of the built-in sweep, e.g. '
                         '\'[{"bwd_dqk": {"num_warps": 8}}]\'')
    ap.add_argument("--aug", action="store_true", help="with the fused self-augmentation (w_aug) in the kernels")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--segs", default="8,32,64",
                    help="segment lengths (chunks) of the two-level state pass to time besides the default")
    ap.add_argument("--shapes", type=parse_shapes, default=[(16, 2048, 8), (1, 32768, 16)],
                    help="BxTxH list, e.g. 16x2048x16 for the 1.3B training step (default: 16x2048x8,1x32768x16; "
                         "--quick takes the first)")
    args = ap.parse_args()
    shapes = args.shapes
    global W_AUG
    three = {"form": "split_dA"}
    default = copy.deepcopy(C.CONFIG)
    from metala.ops.metala.chunk_fwd import SPAN

    report = {"gpu": torch.cuda.get_device_name(), "default": default, "one_reference_span": SPAN.value,
              "shapes": []}
    # each variant: {kernel: changes} on top of the defaults
    variants = [
        {"bwd_dqk": {"BK": 64, "num_warps": 8}}, {"bwd_dqk": {"BK": 16}}, {"bwd_dqk": {"num_stages": 1}},
        {"bwd_dqk": {"BV": 128, "num_warps": 8}}, {"bwd_dqk": {"BK": 64, "BV": 32, "num_warps": 8}},
        # dv, then dq and dkg reading the dA that dv stored (the three-kernel backward)
        {"bwd_dqk": three}, {"bwd_dqk": three, "bwd_dkg": {"BK": 32}},
        {"bwd_dh": {"BV": 64, "num_warps": 4}}, {"bwd_dv": {"num_warps": 8}},
        {"fwd_o": {"num_warps": 8}}, {"fwd_h": {"num_warps": 8}},
        # one kernel per intra-chunk form choosing at run time, instead of a launch per form
        {"intra": {"two_launches": False}}, {"bwd_dqk": three, "bwd_dkg": {"num_warps": 4}},
        {"bwd_dqk": {"BK": 16}, "bwd_dh": {"BV": 64}},
        # which intra-chunk kernels launch once per form (the rest branch per chunk); run this script also with
        # METALA_ONE_REFERENCE_SPAN=-1 (every chunk on the sub-chunk form) before changing the default
        {"intra": {"two_launches": ["bwd_dv", "bwd_dqk"]}}, {"intra": {"two_launches": True}},
        {"intra": {"two_launches": ["fwd_o", "bwd_dqk"]}},
    ]
    if args.variants:
        variants = json.loads(args.variants)
        unknown = {name for change in variants for name in change} - set(C.CONFIG)
        if unknown:
            raise SystemExit(f"--variants: unknown kernels {sorted(unknown)}; known: {sorted(C.CONFIG)}")
    for B, T, H in shapes[:1] if args.quick else shapes:
        q, z, v, do = setup(B, T, H)
        W_AUG = torch.randn(H, q.shape[-1], device="cuda") * 0.5 if args.aug else None
        seg_default = C.default_seg_chunks(T // 64, B, H, 2)
        f, b, ref = timed(q, z, v, do, B, T, seg_default)
        entry = {"B": B, "T": T, "H": H, "seg_default": seg_default, "fwd_ms": f, "bwd_ms": b,
                 "kernels_ms": breakdown(q, z, v, do, B, T, seg_default), "variants": []}
        C.CONFIG["bwd_dqk"].update(three)
        entry["kernels_ms_three_kernel_bwd"] = breakdown(q, z, v, do, B, T, seg_default)
        C.CONFIG = copy.deepcopy(default)
        print(f"B{B} T{T} H{H} seg {seg_default}: fwd {f:.3f} bwd {b:.3f} ms", flush=True)
        for k, ms in entry["kernels_ms"].items():
            print(f"   {ms:8.3f} ms  {k[:90]}", flush=True)
        print("   three-kernel backward:", flush=True)
        for k, ms in entry["kernels_ms_three_kernel_bwd"].items():
            if "bwd" in k:
                print(f"   {ms:8.3f} ms  {k[:90]}", flush=True)
        for seg in (int(x) for x in args.segs.split(",") if x.strip()):
            if seg == seg_default:
                continue
            f2, b2, outs = timed(q, z, v, do, B, T, seg)
            err = max(rel(a, r) for a, r in zip(outs, ref))
            entry["variants"].append({"seg_chunks": seg, "fwd_ms": f2, "bwd_ms": b2, "max_rel_diff": err})
            print(f"   seg {seg:>3}: fwd {f2:.3f} bwd {b2:.3f}  diff {err:.1e}", flush=True)
        for change in variants:
            C.CONFIG = copy.deepcopy(default)
            for name, kw in change.items():
                C.CONFIG[name].update(kw)
            try:
                f2, b2, outs = timed(q, z, v, do, B, T, seg_default)
                err = max(rel(a, r) for a, r in zip(outs, ref))
                entry["variants"].append({"change": change, "fwd_ms": f2, "bwd_ms": b2, "max_rel_diff": err})
                print(f"   {change}: fwd {f2:.3f} bwd {b2:.3f}  diff {err:.1e}", flush=True)
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for one configuration
                print(f"   {change}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        C.CONFIG = copy.deepcopy(default)
        # the fastest variant whose outputs match the defaults' to bf16 accuracy (ops.py then checks it against
        # the fp32 reference); {} when none beats the defaults
        ok = [x for x in entry["variants"] if "change" in x and x["max_rel_diff"] <= MAX_REL_DIFF]
        best = min(ok, key=lambda x: x["fwd_ms"] + x["bwd_ms"], default=None)
        entry["best_change"] = best["change"] if best and best["fwd_ms"] + best["bwd_ms"] < f + b else {}
        print(f"   best: {entry['best_change'] or 'the defaults'}", flush=True)
        report["shapes"].append(entry)
    report["combined"] = combine_winners(report["shapes"])
    # ready to paste: bench/ops.py (whose gate checks it against the fp32 reference) and the training step read it
    print(f"combined winners: METALA_TRITON_CONFIG='{json.dumps(report['combined'])}'", flush=True)
    report["kernel_resources"] = kernel_resources()
    for name, rows in report["kernel_resources"].items():
        print(f"   {name}: " + ", ".join(f"{r.get('regs')} regs {r.get('spills')} spills {r.get('warps')} warps"
                                         for r in rows), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report["aug"] = args.aug
    gpu = gpu_tag(torch.cuda.get_device_name())
    tag = ("_aug" if args.aug else "") + (f"_{args.tag}" if args.tag else "")
    path = args.out / f"{time.strftime('%Y%m%d')}_{gpu}_kernel_tune{tag}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
