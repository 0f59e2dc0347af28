"""Helpers the GPU benchmarks report with, and the ahead-of-time kernel compile, checked on CPU (the benchmarks
themselves need a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.train_throughput import busy_and_span


def test_busy_and_span_merges_overlapping_kernels():
    # two overlapping kernels (0-4, 2-5), one nested (3-4), a gap, then one more (7-8): busy 6 of a 8-long span
    assert busy_and_span([(7.0, 8.0), (0.0, 4.0), (3.0, 4.0), (2.0, 5.0)]) == (6.0, 8.0)
    assert busy_and_span([(1.0, 2.0)]) == (1.0, 1.0)
    assert busy_and_span([]) == (0.0, 0.0)


def test_merge_sections_updates_a_section_key_by_key_and_replaces_the_rest():
    from bench import merge_sections

    base = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}, "gradient_clipping": 1.0}
    out = merge_sections(base, {"bf16": {"check_grad_overflow": True}, "gradient_clipping": 0.0})
    assert out == {"bf16": {"enabled": True, "check_grad_overflow": True}, "zero_optimization": {"stage": 1},
                   "gradient_clipping": 0.0}
    assert base["bf16"] == {"enabled": True}  # the base is not changed


def test_doc_boundaries_pack_documents_into_rows_like_the_loader():
    from bench.train_throughput import doc_boundaries, step_boundaries

    B, T = 4, 2048
    cu = doc_boundaries(B, T, 500, seed=0)
    assert cu.dtype.is_floating_point is False and cu[0] == 0 and cu[-1] == B * T
    assert bool((cu[1:] > cu[:-1]).all())
    # every row starts a document (no document crosses a row), and the lengths average about the mean asked for
    assert set(range(0, B * T, T)) <= set(cu.tolist())
    assert 300 < (B * T) / (len(cu) - 1) < 700
    assert step_boundaries(None) is None


def test_result_path_names_files_by_date_device_bench_and_tag(tmp_path):
    import time

    from bench import result_path

    day = time.strftime("%Y%m%d")
    out = tmp_path / "new" / "results"
    assert result_path(out, "h100", "ops") == out / f"{day}_h100_ops.json"
    assert out.is_dir()  # made when missing
    assert result_path(out, "cpu", "trainer_ops", "s16") == out / f"{day}_cpu_trainer_ops_s16.json"


def test_kernel_sweep_combines_winners_of_different_kernels_only():
    from bench.kernel_tune import combine_winners

    def shape(base, variants):
        return {"fwd_ms": base / 2, "bwd_ms": base / 2,
                "variants": [{"change": c, "fwd_ms": ms / 2, "bwd_ms": ms / 2, "max_rel_diff": d}
                             for c, ms, d in variants]}

    dh_warps, dh_cap = {"bwd_dh": {"num_warps": 4}}, {"bwd_dh": {"maxnreg": 128}}
    gam, fwd_o = {"bwd_dqk": {"gam_cumsum": "matmul"}}, {"fwd_o": {"maxnreg": 128}}
    wrong, small = {"bwd_dv": {"BV": 32}}, {"fwd_h": {"num_warps": 8}}
    shapes = [
        # worst-shape gains: dh_warps 4 %, dh_cap 3 % (the same kernel: only the larger kept), gam 2 %; fwd_o wins at
        # one shape only; bwd_dv fast but its outputs differ; fwd_h within the noise margin
        shape(2.0, [(dh_warps, 1.90, 0), (dh_cap, 1.92, 0), (gam, 1.94, 1e-4), (fwd_o, 1.80, 0), (wrong, 1.0, 0.1),
                    (small, 1.998, 0)]),
        shape(1.0, [(dh_warps, 0.96, 0), (dh_cap, 0.97, 0), (gam, 0.98, 1e-4), (fwd_o, 1.02, 0), (wrong, 0.5, 0.1),
                    (small, 0.999, 0)]),
    ]
    assert combine_winners(shapes) == {**dh_warps, **gam}
    assert combine_winners(shapes[:1]) == {**fwd_o, **dh_warps, **gam}
    for entry, ms in zip(shapes, (1.86, 0.94)):  # dh_cap now 7 % / 6 %: ahead of dh_warps
        entry["variants"][1].update(fwd_ms=ms / 2, bwd_ms=ms / 2)
    assert combine_winners(shapes) == {**dh_cap, **gam}
    assert combine_winners([shape(1.0, [(dh_warps, 1.1, 0)])]) == {}


def test_every_kernel_compiles_for_hopper_without_a_gpu():
    """`bench.aot_check --quick` compiles every Triton kernel for sm_90 with the launchers' warps and stages (ptxas
    from the Triton wheel): a kernel signature the checker no longer matches, or a kernel that no longer compiles for
    Hopper, fails here instead of on a lent GPU. (It once reported fwd_o as failing for a missing SPLIT argument and
    exited 0.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "bench.aot_check", "--quick"], check=False, capture_output=True,
                       text=True, env=env, cwd=Path(__file__).resolve().parents[2], timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("bf16 ")]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert len(lines) >= 20 and all(" ok " in ln for ln in lines), "\n".join(lines)
    assert any(ln.split()[3].startswith("fwd_o") for ln in lines)



_ALIGNED_PTX_CHECK = """
from triton.backends.compiler import GPUTarget
from bench.aot_check import compile_kernel, sass_mix
from metala.ops.metala.chunk_fwd import chunk_metala_fwd_kernel_seg as kern
types = {"E": "*fp32", "Gseg": "*fp32", "h0": "*fp32", "S_in": "*fp32", "ht": "*fp32",
         "doc_first_seg": "*i32", "doc_n_segs": "*i32"}
consts = {"H": 8, "K": 64, "V": 128, "BK": 64, "BV": 64, "HAS_H0": True, "STORE_HT": True}
k = compile_kernel(kern, types, consts, 4, GPUTarget("cuda", 90, 32))
ptx = k.asm["ptx"]
print("vector loads", ptx.count("ld.global.v4"), "vector stores", ptx.count("st.global.v4"))
print(sass_mix(k.asm["cubin"]))
"""


def test_aot_compile_specialises_pointers_as_a_gpu_launch_does():
    """The AOT compile sees 16-byte aligned pointers, as Triton's launcher specialises every torch allocation: the
    segment scan's state tiles load and store as 128-bit vectors, as on a GPU. Without that specialisation they
    were scalar, and ptxas reported the registers and spills of a kernel no GPU runs (it put the dq/dk kernel's
    spills at ~1.6 KB a thread where the GPU's compile had ~0.2 KB)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _ALIGNED_PTX_CHECK], check=False, capture_output=True, text=True,
                       env=env, cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    words = r.stdout.split()
    loads, stores = int(words[words.index("loads") + 1]), int(words[words.index("stores") + 1])
    assert loads > 0 and stores > 0, r.stdout
    # `--sass`: the scan's instruction count by class (its serial loop is a run-time loop: the static count is the
    # loop body once); a scan of fp32 tiles has fp32 arithmetic and exponentials, no tensor-core instructions
    mix = dict(zip(words[words.index("sass") + 2::2], map(int, words[words.index("sass") + 3::2])))
    total = int(words[words.index("sass") + 1].rstrip(":"))
    assert total > 50 and mix["fp32"] > 0 and mix["mufu"] > 0 and mix["mma"] == 0 and mix["spill"] == 0, r.stdout


def test_op_host_launch_timer_sees_every_kernel_launch_of_the_operator_and_restores_the_launcher():
    """`bench.op_host` charges host time to kernels through this wrapper: it must sit on the path the operator really
    launches through (compiled on a GPU, under the interpreter that tests/conftest.py turns on elsewhere), once per
    kernel launch, forward and backward."""
    import torch

    import metala.ops.metala.chunk as chunk
    from bench.op_host import LaunchTimer

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, z, v = (torch.randn(1, 20, 2, 16, device=dev, requires_grad=True) for _ in range(3))
    launcher = chunk.launch
    with LaunchTimer() as timer:
        o, _ = chunk.chunk_metala_from_logits(q, z, v)
        forward = {name: len(us) for name, us in timer.us.items()}
        o.sum().backward()
    assert chunk.launch is launcher
    assert set(forward) == {"chunk_metala_fwd_kernel_h", "chunk_metala_fwd_kernel_seg", "chunk_metala_fwd_kernel_o"}
    backward = {name: len(us) - forward.get(name, 0) for name, us in timer.us.items()}
    assert {"chunk_metala_bwd_kernel_dh", "chunk_metala_bwd_kernel_seg", "chunk_metala_bwd_kernel_dv",
            "chunk_metala_bwd_kernel_dqk"} <= {n for n, c in backward.items() if c > 0}
    assert all(us > 0 for times in timer.us.values() for us in times)
    assert set(timer.first) == set(timer.us)  # each kernel's first launch, as launch_anatomy replays it
    assert all(first[0].fn.__name__ == name and isinstance(first[2], tuple) for name, first in timer.first.items())
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_op_host_profiles_charge_the_operators_host_work_to_its_functions_per_call():
    """`bench.op_host`'s profiles report per call: the Python profile must name the operator's own host functions
    with one forward and one backward a call, and the profiler's events must include the operator's autograd nodes."""
    import torch

    from bench.op_host import host_events, python_profile
    from metala.ops.metala.chunk import chunk_metala_from_logits

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    leaves = [torch.randn(1, 20, 2, 16, device=dev, requires_grad=True) for _ in range(3)]
    do = torch.randn(1, 20, 2, 16, device=dev)

    def fwd_bwd():
        chunk_metala_from_logits(*leaves)[0].backward(do)

    rows = {r["fn"].rsplit(":", 1)[-1]: r for r in python_profile(fwd_bwd, leaves, calls=3, top=10**6)}
    for name in ("chunk_metala_fwd", "chunk_metala_bwd"):
        assert rows[name]["calls"] == 1.0, rows[name]
        assert rows[name]["cum_us"] >= rows[name]["own_us"] > 0
    names = {e["name"]: e for e in host_events(fwd_bwd, leaves, calls=2, top=10**6)}
    assert names["ChunkMetaLAFunction"]["count"] == 1.0
    assert names["ChunkMetaLAFunctionBackward"]["count"] == 1.0
    assert all(leaf.grad is not None for leaf in leaves)


def test_train_rows_gives_each_row_its_own_overrides_arguments_and_environment(tmp_path):
    # bench/gpu/train_rows.sh in a copy of its folder, with its GPU set-up (env.sh) and `python` replaced by stubs
    # that print what a row ran with
    root = Path(__file__).resolve().parents[2]
    (tmp_path / "bench/gpu").mkdir(parents=True)
    (tmp_path / "bench/gpu/train_rows.sh").write_text((root / "bench/gpu/train_rows.sh").read_text())
    (tmp_path / "bench/gpu/env.sh").write_text(
        "T0=$(date +%s); DEADLINE=${DEADLINE:-585}\nleft() { echo $(( DEADLINE - ($(date +%s) - T0) )); }\n")
    stub = tmp_path / "bin/python"
    stub.parent.mkdir()
    stub.write_text('#!/usr/bin/env bash\necho "CD=${TORCHINDUCTOR_COORDINATE_DESCENT_TUNING:-unset} $*"\n'
                    'echo "100 tok/s"\n')
    stub.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    rows = ('cd={"compile_memory_budget": 1.0}|TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 --micro-batch 32;'
            'base={"compile_memory_budget": 0.9}|--micro-batch 16;plain={}')
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "ROWS": rows, "OUT": str(out),
           "PRESET": "360m", "TAG": "t"}
    env.pop("TORCHINDUCTOR_COORDINATE_DESCENT_TUNING", None)
    proc = subprocess.run(["bash", "bench/gpu/train_rows.sh"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [line.split(":")[0] for line in proc.stdout.splitlines()[:3]] == ["1 cd", "2 base", "3 plain"]
    logs = {p.name: p.read_text() for p in out.glob("row_*.log")}
    cd, base, plain = logs["row_1_cd.log"], logs["row_2_base.log"], logs["row_3_plain.log"]
    assert cd.startswith("CD=1 ") and '--train-overrides {"compile_memory_budget": 1.0} --micro-batch 32' in cd
    assert "TORCHINDUCTOR" not in cd.split(" ", 1)[1]  # the setting is the row's environment, not an argument
    assert base.startswith("CD=unset ") and '{"compile_memory_budget": 0.9} --micro-batch 16 --out' in base
    assert plain.startswith("CD=unset ") and "--train-overrides {} --out" in plain
    assert "--presets 360m" in plain and "--tag t_3_plain" in plain
