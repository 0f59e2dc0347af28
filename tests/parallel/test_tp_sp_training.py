"""TP = 2 x SP = 2 (4 CPU ranks under the deepspeed launcher) trains like one process, under ZeRO-1 and ZeRO-2,
and its checkpoints resume (same layout) and consolidate back to the single-process weights."""

from __future__ import annotations

import pytest

from pretrain.consolidate import load_consolidated
from tests.integration.launch_utils import check_ok, launch, step_losses

LAYOUT = ["parallel.tp=2", "parallel.sp=2"]
COMMON = ["train.steps=6", "train.eval_every=0", "train.save_every=0", "model.attn_backend=chunk"]


@pytest.fixture(scope="module")
def single(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    # DeepSpeed's own ZeRO step here: the parallel runs take the fused master step (pretrain/zero_step.py, the
    # default), so their match also checks it against DeepSpeed's, with TP shards, ZeRO-2 and a resume
    check_ok(launch(demo_data, out, *COMMON, "train.fused_master_step=false", ranks=1))
    return out


def test_zero1_tp_sp_stop_resume_matches_one_process(single, demo_data, tmp_path):
    out = tmp_path / "tpsp"
    check_ok(launch(demo_data, out, *COMMON, *LAYOUT, "train.zero_stage=1", "train.stop_at_step=3", ranks=4))
    r = launch(demo_data, out, *COMMON, *LAYOUT, "train.zero_stage=1", ranks=4)
    check_ok(r)
    assert "DP 1 x SP 2 x TP 2" in r.stdout and "resumed from" in r.stdout and "at step 3" in r.stdout
    ref, got = step_losses(single), step_losses(out)
    for step in range(1, 7):
        assert got[step] == pytest.approx(ref[step], rel=1e-5), (step, got[step], ref[step])
    # the TP shards consolidate back to the one-process weights
    state, _, _ = load_consolidated(out)
    ref_state, _, _ = load_consolidated(single)
    for name, tensor in ref_state.items():
        err = ((state[name] - tensor).norm() / tensor.norm().clamp_min(1e-12)).item()
        # a wrong merge (dim, order, slice) gives errors of order 1; Adam turns 1e-7 reduction-order differences
        # of near-zero gradients (w_aug starts at 0) into ~1e-3 after 6 steps
        assert err < 1e-2, (name, err)


def test_zero2_tp_sp_matches_one_process(single, demo_data, tmp_path):
    out = tmp_path / "tpsp"
    check_ok(launch(demo_data, out, *COMMON, *LAYOUT, "train.zero_stage=2", ranks=4))
    ref, got = step_losses(single), step_losses(out)
    for step in range(1, 7):
        assert got[step] == pytest.approx(ref[step], rel=1e-5), (step, got[step], ref[step])
    # the global gradient norm (pretrain/grad_norm.py: TP shards counted on every rank, replicated weights once)
    ref, got = step_losses(single, "train/grad_norm"), step_losses(out, "train/grad_norm")
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(ref[step], rel=1e-3), (step, got[step], ref[step])


def test_bad_layouts_are_refused_before_launch():
    import os
    import subprocess
    import sys

    from tests.integration.launch_utils import REPO

    def dry(gpus, *overrides):
        env = {**os.environ, "DRY_RUN": "1", "NUM_GPUS": str(gpus), "PYTHON": sys.executable}
        return subprocess.run(["bash", str(REPO / "launch/pretrain.sh"), "tiny-cpu", *overrides], env=env,
                              capture_output=True, text=True, timeout=120)

    r = dry(2, "parallel.tp=2", "parallel.sp=2")
    assert r.returncode == 2 and "not divisible by parallel.tp * parallel.sp" in r.stderr
    r = dry(4, "parallel.tp=4", "model.n_heads=2", "train.global_batch=16", "train.micro_batch=16")
    assert r.returncode == 2 and "must divide the head count" in r.stderr
    r = dry(4, "parallel.tp=2", "parallel.sp=2")
    assert r.returncode == 0 and "4 ranks = DP 1 x SP 2 x TP 2" in r.stdout
