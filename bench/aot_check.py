"""Compile every Triton kernel ahead of time for Hopper (sm_90) on a machine without a GPU: catches compile errors,
and reports shared memory and (from the PTX) register pressure, before any GPU time is spent.

    python -m bench.aot_check [--sm 90]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from metala.ops.incoming_state import kernel as incoming
from metala.ops.metala import chunk_bwd, chunk_fwd, fused_recurrent_kernel
from metala.ops.metala.chunk import (
    CONFIG,
    DQK_ITEMS,
    FLAG_BLOCK,
    _bv,
    _gam_matmul,
    _intra_dtype,
    _intra_paths,
    _scores_dtype,
    _stores_dA,
)

# the dq/dk kernel's records mode per compiled intra path, as chunk.py launches it (two launches: the first writes
# the records, the second walks them; one kernel for both paths: none)
PATH_FLAGS_OF = {chunk_fwd.ONE_REF.value: chunk_bwd.WRITE_FLAGS.value,
                 chunk_fwd.SUB_CHUNKS.value: chunk_bwd.WALK_FLAGS.value,
                 chunk_fwd.ANY_PATH.value: chunk_bwd.NO_FLAGS.value}
PATH_TAGS = {chunk_fwd.ANY_PATH.value: "any", chunk_fwd.ONE_REF.value: "one", chunk_fwd.SUB_CHUNKS.value: "sub"}
# the split dq / dk kernels are launched on the dq/dk kernel's paths
PATHS_OF = {"bwd_dq": "bwd_dqk", "bwd_dkg": "bwd_dqk"}


def launch_config(job: str) -> dict:
    """chunk.py's CONFIG entry (launch warps and stages) of a job: its name up to the path / aug suffix, where the
    two segment scans share "seg"; {} for kernels CONFIG does not name."""
    base = job.split("/")[0].split("+")[0]
    return CONFIG.get("seg" if base.endswith("_seg") else base, {})


def sig(kernel, types: dict[str, str], consts: dict) -> dict:
    out = {}
    for name in kernel.arg_names:
        out[name] = "constexpr" if name in consts else types.get(name, "*fp32")
    return out


def ptxas_report(ptx: str, sm: int) -> str:
    """Registers and spills as ptxas reports them for the PTX Triton produced (under the register cap, as the
    driver's compile applies it: Triton writes it into the PTX as .maxnreg)."""
    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([str(ptxas), f"-arch=sm_{sm}a" if sm == 90 else f"-arch=sm_{sm}", "-v", str(src), "-o",
                            str(Path(tmp) / "k.cubin")], check=False, capture_output=True, text=True)
    text = r.stderr + r.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return f"regs {regs.group(1) if regs else '?':>3} spills {spill.group(1) + '/' + spill.group(2) if spill else '?'}"


# SASS opcode classes `--sass` counts: barriers, shared-memory traffic (layout conversions and tensor-core operand
# staging), tensor-core instructions, special-function (exp / log) instructions, and the fp32 arithmetic
SASS_CLASSES = {"bar": ("BAR",), "smem": ("LDS", "STS", "LDSM", "STSM"), "mma": ("HGMMA", "HMMA"), "mufu": ("MUFU",),
                "fp32": ("FFMA", "FMUL", "FADD"), "shfl": ("SHFL",), "spill": ("LDL", "STL")}


def sass_mix(cubin: bytes) -> str:
    """Instructions a thread issues by class, from the cubin's SASS (static count: Triton unrolls the kernels'
    compile-time loops, so for these kernels it is close to the dynamic count per program)."""
    nvdisasm = Path(triton.__file__).parent / "backends/nvidia/bin/nvdisasm"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([str(nvdisasm), "-c", str(path)], check=True, capture_output=True, text=True).stdout
    ops = re.findall(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, flags=re.MULTILINE)
    counts = {name: sum(op in group for op in ops) for name, group in SASS_CLASSES.items()}
    return f"sass {len(ops)}: " + " ".join(f"{name} {n}" for name, n in counts.items())


def compile_kernel(kernel, types, consts, warps, target, stages: int = 3, maxnreg: int | None = None):
    """The Triton compile of `kernel` for `target` (no GPU needed), specialised as a launch on a GPU would be."""
    signature = sig(kernel, types, consts)
    # pointers 16-byte aligned, as the runtime specialises every torch allocation: without this ptxas sees scalar
    # loads and stores and reports far more registers and spills than the kernels launched on a GPU have
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if signature[name].startswith("*")}
    src = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    options = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(src, target=target, options=options)


def compile_one(kernel, types, consts, warps, target, stages: int = 3, maxnreg: int | None = None,
                sass: bool = False) -> str:
    k = compile_kernel(kernel, types, consts, warps, target, stages, maxnreg)
    cap = f" maxnreg {maxnreg}" if maxnreg else ""
    return (f"warps {warps} stages {stages}{cap} shared {k.metadata.shared:>6} B  "
            f"{ptxas_report(k.asm['ptx'], target.arch)}" + (f"  {sass_mix(k.asm['cubin'])}" if sass else ""))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sm", type=int, default=90)
    ap.add_argument("--quick", action="store_true", help="bf16 K64/V128 only")
    ap.add_argument("--heads", type=int, default=8, help="H, a compile-time constant of the kernels (8: 360M, 16: 1.3B)")
    ap.add_argument("--sass", action="store_true", help="also count each kernel's SASS instructions by class")
    ap.add_argument("--only", default="", help="compile only the jobs whose name contains this (e.g. bwd_dqk/one+aug)")
    args = ap.parse_args()
    target = GPUTarget("cuda", args.sm, 32)
    dtypes = (("bf16", tl.bfloat16, "tf32"),) if args.quick else (("bf16", tl.bfloat16, "tf32"), ("fp32", tl.float32, "ieee"))
    failed = 0
    for dt_name, dt, prec in dtypes:
        for K, V in ((64, 128),) if args.quick else ((64, 128), (128, 128), (32, 64), (128, 256)):
            ints = {n: "*i32" for n in ("chunk_start", "chunk_len", "chunk_seg", "seg_first_chunk", "seg_n_chunks",
                                        "doc_first_seg", "doc_n_segs")}
            io = {n: f"*{dt_name}" for n in ("q", "gate", "v", "o", "o_lo", "do", "dq", "dgate", "dv")}
            io["dA_out"] = io["dA_in"] = "*fp32"
            io["path_flags"], io["n_items"] = "*i8", "i32"
            # the fused self-augmentation's weight and gradients (compiled here with AUG off and on)
            io["w_aug"] = io["da"] = io["dw_part"] = "*fp32"
            state = {"h_local": f"*{dt_name}", "dS_local": f"*{dt_name}"}
            scal = {"inv_tau": "fp32", "scale": "fp32", "T": "i32"}
            types = {**ints, **io, **state, **scal}
            BK, BV = min(64, K), min(64, V)
            # the dq/dk kernels' tiles as chunk.py launches them
            bk_dqk, bv_dqk = min(CONFIG["bwd_dqk"]["BK"], K), min(CONFIG["bwd_dqk"].get("BV", 64), V)
            gam_matmul = _gam_matmul()
            # the intra-chunk operand types, as chunk.py chooses them for a GPU
            torch_dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dt_name]
            intra_dt, scores_dt = _intra_dtype(torch_dt), _scores_dtype(torch_dt)
            common = {"H": args.heads, "K": K, "V": V}
            jobs = [
                ("fwd_h", chunk_fwd.chunk_metala_fwd_kernel_h, {**common, "BT_": 64, "BK": BK, "BV": _bv("fwd_h", V),
                 "GATE_LOGITS": True, "DT": dt, "DOT_PREC": prec}, 4),
                ("fwd_seg", chunk_fwd.chunk_metala_fwd_kernel_seg, {**common, "BK": BK, "BV": BV, "HAS_H0": True,
                 "STORE_HT": True}, 4),
                ("fwd_o", chunk_fwd.chunk_metala_fwd_kernel_o, {**common, "BT_": 64, "BC_": 16, "BV": _bv("fwd_o", V),
                 "GATE_LOGITS": True, "DT": dt, "DOT_PREC": prec, "INTRA_DT": scores_dt, "AUG": False,
                 "SPLIT": dt_name == "bf16"}, 4),
                ("bwd_dh", chunk_bwd.chunk_metala_bwd_kernel_dh, {**common, "BT_": 64, "BK": BK, "BV": _bv("bwd_dh", V),
                 "GATE_LOGITS": True, "DT": dt, "DOT_PREC": prec}, 4),
                ("bwd_seg", chunk_bwd.chunk_metala_bwd_kernel_seg, {**common, "BK": BK, "BV": BV, "HAS_DHT": True,
                 "STORE_DH0": True}, 4),
                ("bwd_dv", chunk_bwd.chunk_metala_bwd_kernel_dv, {**common, "BT_": 64, "BC_": 16, "BV": _bv("bwd_dv", V),
                 "GATE_LOGITS": True, "DT": dt, "DOT_PREC": prec, "STORE_DA": _stores_dA(V), "INTRA_DT": scores_dt, "AUG": False,
                 "DA_ATOMIC": _bv("bwd_dv", V) < V}, 4),
                ("bwd_dqk", chunk_bwd.chunk_metala_bwd_kernel_dqk, {**common, "BT_": 64, "BC_": 16, "BK": bk_dqk, "BV": bv_dqk,
                 "GATE_LOGITS": True, "DT": dt, "DOT_PREC": prec, "INTRA_PREC": prec, "INTRA_DT": intra_dt,
                 "AUG": False, "LOAD_DA": False, "PATH_FLAGS": chunk_bwd.WRITE_FLAGS.value, "FLAG_BLOCK": FLAG_BLOCK,
                 "GAM_MATMUL": gam_matmul, "ITEMS": DQK_ITEMS[CONFIG["bwd_dqk"]["items"]],
                 "LOOP_STAGES": CONFIG["bwd_dqk"]["loop_stages"]}, 4),
                ("bwd_dq", chunk_bwd.chunk_metala_bwd_kernel_dq, {**common, "BT_": 64, "BC_": 16, "BK": min(CONFIG["bwd_dq"]["BK"], K), "BV": bv_dqk,
                 "GATE_LOGITS": True, "DT": dt, "DOT_PREC": prec, "INTRA_PREC": prec, "INTRA_DT": intra_dt,
                 "LOAD_DA": True, "AUG": False, "GAM_MATMUL": gam_matmul}, 4),
                ("bwd_dkg", chunk_bwd.chunk_metala_bwd_kernel_dkg, {**common, "BT_": 64, "BC_": 16, "BK": min(CONFIG["bwd_dkg"]["BK"], K), "BV": bv_dqk,
                 "GATE_LOGITS": True, "DT": dt, "DOT_PREC": prec, "INTRA_PREC": prec, "INTRA_DT": intra_dt,
                 "LOAD_DA": True, "AUG": False, "GAM_MATMUL": gam_matmul}, 4),
                ("decode", fused_recurrent_kernel.fused_recurrent_metala_kernel, {**common, "BV": BV,
                 "GATE_LOGITS": True, "HAS_H0": True}, 4),
            ]
            # the sequence-parallel correction (metala/ops/incoming_state), with the launchers' widths
            inc = {"H": args.heads, "K": K, "TILE": 64}
            types.update({n: "*fp32" for n in ("S", "G_off", "out_first", "out_last", "d_first", "d_last", "dG_off",
                                                "dS_part")})
            types.update({"out": f"*{dt_name}", "dout": f"*{dt_name}", "dz": f"*{dt_name}", "dq": f"*{dt_name}",
                          "first_len": "*i32", "last_start": "*i32", "L": "i32", "NT": "i32",
                          "NG": "i32", "TPG": "i32", "z": f"*{dt_name}"})
            mm = {**inc, "V": V, "DT": dt, "DOT_PREC": prec}
            jobs += [
                ("inc_tile_fwd", incoming.gate_tile_sums_fwd_kernel, inc, 4),
                ("inc_tile_bwd", incoming.gate_tile_sums_bwd_kernel, inc, 8),
                ("inc_fwd", incoming.incoming_state_fwd_kernel, {**mm, "BV": min(128, V)}, 8),
                ("inc_bwd_dqz", incoming.incoming_state_bwd_dqz_kernel, {**mm, "BV": min(64, V)}, 8),
                ("inc_bwd_ds", incoming.incoming_state_bwd_ds_kernel, {**mm, "BV": min(64, V)}, 8),
            ]
            # the intra-chunk kernels exist in one compiled form per path (chunk_fwd.py INTRA_PATH)
            # (the joint dq/dk kernel's sub-chunk launch walks the records its one-reference launch writes); the
            # paths each launcher compiles (CONFIG["intra"]): "any" where one kernel picks per chunk at run time
            jobs = [(f"{name}/{PATH_TAGS[path]}" if "INTRA_PATH" in kern.arg_names else name, kern,
                     {**consts, "INTRA_PATH": path,
                      **({"PATH_FLAGS": PATH_FLAGS_OF[path]} if "PATH_FLAGS" in consts else {})}
                     if "INTRA_PATH" in kern.arg_names else consts, warps)
                    for name, kern, consts, warps in jobs
                    for path in (_intra_paths(PATHS_OF.get(name, name)) if "INTRA_PATH" in kern.arg_names else (0,))]
            # and the kernels that can fuse the self-augmentation, once more with it
            jobs += [(f"{name}+aug", kern, {**consts, "AUG": True}, warps) for name, kern, consts, warps in jobs
                     if "AUG" in consts]
            for name, kern, consts, warps in jobs:
                if args.only not in name:
                    continue
                cfg = launch_config(name)
                try:
                    info = compile_one(kern, types, consts, cfg.get("num_warps", warps), target,
                                       cfg.get("num_stages", 3), cfg.get("maxnreg"), args.sass)
                    print(f"{dt_name} K{K:<3} V{V:<3} {name:<9} ok   {info}")
                except Exception as e:  # noqa: BLE001 - report every failure, keep going
                    failed += 1
                    print(f"{dt_name} K{K:<3} V{V:<3} {name:<9} FAILED {type(e).__name__}: {str(e)[:400]}")
    if failed:
        raise SystemExit(f"{failed} kernel compile(s) failed")


if __name__ == "__main__":
    main()
