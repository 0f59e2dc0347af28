"""Two CPU ranks under the deepspeed launcher: ZeRO-1/2/3 train, checkpoint, reload and reproduce."""

from __future__ import annotations

import json

import pytest
import torch

from metala import MetaLAForCausalLM
from metala.export import main as export_main
from pretrain.checkpoint import MANIFEST, check_checkpoint
from tests.integration.launch_utils import check_ok, launch, step_losses


@pytest.fixture(scope="module")
def straight_run(demo_data, tmp_path_factory):
    """8 steps under ZeRO-1 in one go: the reference loss curve."""
    out = tmp_path_factory.mktemp("straight")
    r = launch(demo_data, out, "train.zero_stage=1")
    check_ok(r)
    return out, r


def test_training_logs_evaluates_and_checkpoints(straight_run):
    out, r = straight_run
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, 9))
    assert losses[8] < losses[1] - 0.3, losses
    assert "val loss" in r.stdout and (out / "loss_curve.png").stat().st_size > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = next(row for row in rows if row.get("train/loss") is not None)
    for key in ("train/lr", "train/grad_norm", "perf/tokens_per_s", "mem/peak_rss_gib"):
        assert logged[key] > 0, key
    assert any(row.get("val/loss") for row in rows)
    for step in (4, 8):
        folder = out / "checkpoints" / f"step_{step:08d}"
        assert check_checkpoint(folder) == ""
        manifest = json.loads((folder / MANIFEST).read_text())
        assert manifest["step"] == step and manifest["zero_stage"] == 1
        assert manifest["consumed_samples"] == 8 * step
        files = set(manifest["files"])
        assert {"model_config.json", "tokenizer.model", "rng_rank00000.pt", "rng_rank00001.pt"} <= files
    assert (out / "checkpoints" / "latest").read_text() == "step_00000008"


# ZeRO-1: SIGKILL in the middle of a gradient-accumulation cycle (micro-batch 1 of 2) of step 6;
# ZeRO-2: SIGKILL at the start of step 5; ZeRO-3: SIGKILL while checkpoint 8 is being written.
KILLS = {1: "kill@step=6,micro=1,rank=0", 2: "kill@step=5,micro=0,rank=1", 3: "kill_in_save@step=8,rank=0"}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_killed_run_resumes_exactly(stage, straight_run, demo_data, tmp_path):
    # the same seed again, killed (SIGKILL) and resumed from the last complete checkpoint: the loss curve of the
    # straight run, bit for bit under ZeRO-1 (the reference's stage), to fp32 reduction-order noise under 2 and 3
    # (ZeRO-3 runs DeepSpeed's own step against the reference's fused master step)
    reference = step_losses(straight_run[0])
    out = tmp_path / "killed"
    r = launch(demo_data, out, f"train.zero_stage={stage}", env={"METALA_FAULT": KILLS[stage]})
    assert r.returncode != 0
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    assert not (out / "checkpoints" / "step_00000008").exists()
    # ZeRO-2 resumes under DeepSpeed's own step: the fused master step's checkpoint (pretrain/zero_step.py: torch
    # AdamW's state entries) continues there, and the two steps give the same curve
    extra = ["train.fused_master_step=false"] if stage == 2 else []
    r = launch(demo_data, out, f"train.zero_stage={stage}", *extra)
    check_ok(r)
    assert "resumed from" in r.stdout and "at step 4" in r.stdout
    again = step_losses(out)
    tol = 0.0 if stage == 1 else 1e-4
    for step in range(1, 9):
        assert again[step] == pytest.approx(reference[step], abs=tol), (step, again[step], reference[step])


def test_a_micro_batch_above_the_ranks_share_runs_the_share_whole(straight_run, demo_data, tmp_path):
    # train.micro_batch 8 on 2 ranks of a global batch of 8: each rank runs its 4 sequences in one forward where the
    # straight run accumulated 2 micro-batches of 2. The same samples and schedule: the same loss curve up to the fp32
    # rounding of a different summation order
    out = tmp_path / "whole_share"
    r = launch(demo_data, out, "train.zero_stage=1", "train.micro_batch=8")
    check_ok(r)
    assert "micro 4/rank (train.micro_batch 8 capped at the rank's share), grad accumulation 1" in r.stdout
    ref, got = step_losses(straight_run[0]), step_losses(out)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(ref[step], rel=1e-4), (step, got[step], ref[step])


def test_export_matches_the_trained_weights(demo_data, tmp_path):
    run = tmp_path / "run"
    check_ok(launch(demo_data, run, "train.zero_stage=1", "train.steps=2", "train.save_every=0", "train.eval_every=0"))
    out = tmp_path / "exported"
    export_main(["--checkpoint", str(run), "--out", str(out)])
    model = MetaLAForCausalLM.from_pretrained(out)
    module = torch.load(run / "checkpoints/step_00000002/mp_rank_00_model_states.pt", weights_only=False)["module"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, module[name].float()), name
    assert (out / "tokenizer.model").is_file()


def test_resume_none_refuses_to_overwrite(demo_data, tmp_path):
    run = tmp_path / "run"
    check_ok(launch(demo_data, run, "train.steps=1", "train.save_every=0", "train.eval_every=0"))
    r = launch(demo_data, run, "train.steps=2", "train.resume=none", ranks=1, env={"NUM_GPUS": "1"})
    assert r.returncode == 2 and "already holds checkpoints" in r.stderr
