"""Preemption signals, resuming on a new world size, the non-finite-step guard, torn checkpoints, inspect."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from pretrain import checkpoint as ckpt
from pretrain.inspect import main as inspect_main
from tests.integration.launch_utils import REPO, TINY, check_ok, free_port, launch, shm_left, step_losses


def start_background(data_dir, out, *overrides, ranks=2):
    env = {**os.environ, "NUM_GPUS": str(ranks), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
           "MASTER_PORT": str(free_port()), "PYTHONWARNINGS": "ignore::FutureWarning"}
    cmd = ["bash", str(REPO / "launch/pretrain.sh"), "tiny-cpu", f"data.dir={data_dir}", f"train.out_dir={out}",
           *TINY, *overrides]
    # a session of its own, so the whole job can be signalled as a scheduler does
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    proc.master_port = env["MASTER_PORT"]
    return proc


def wait_for_step(out, step, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.communicate()}")
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and step_losses(out) and max(step_losses(out)) >= step:
            return
        time.sleep(0.3)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def trainer_pids(proc):
    return [p.pid for p in psutil.Process(proc.pid).children(recursive=True)
            if "pretrain.train" in " ".join(p.cmdline())]


@pytest.mark.parametrize("how", ["sigterm-job", "sigusr1-ranks", "sigusr1-one-of-two", "sigusr1-one-rank"])
def test_preemption_signal_saves_and_exits(how, demo_data, tmp_path):
    out = tmp_path / "run"
    # one rank: the stop flag is read on the host, with no peers to agree with
    ranks = 1 if how.endswith("one-rank") else 2
    proc = start_background(demo_data, out, "train.steps=400", "train.save_every=0", "train.eval_every=0",
                            ranks=ranks)
    wait_for_step(out, 3, proc)
    # the ranks are up and training: DeepSpeed's shared-memory segments are already unlinked (mapped, nameless),
    # so however the job ends, killed included, none is left behind in /dev/shm
    assert shm_left(proc.master_port) == []
    if how == "sigterm-job":
        # a scheduler's kill / preemption: SIGTERM to every process of the job (launchers and ranks)
        os.killpg(os.getpgid(proc.pid), signal.SIGTERM)
    elif how == "sigusr1-one-of-two":
        # one rank alone sees the signal: the ranks agree (in the step guard's all-reduce) and stop at one step
        ranks_by_id = {int(p.environ()["RANK"]): p.pid for p in map(psutil.Process, trainer_pids(proc))
                       if "RANK" in p.environ()}
        assert sorted(ranks_by_id) == [0, 1], ranks_by_id
        os.kill(ranks_by_id[1], signal.SIGUSR1)
    else:
        # SLURM's --signal=USR1@T reaches every task directly
        for pid in trainer_pids(proc):
            os.kill(pid, signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=240)
    assert "stop signal received" in stdout, stdout[-2000:] + stderr[-2000:]
    state = json.loads((out / "run_state.json").read_text())
    assert state["state"] == "stopped" and 3 <= state["step"] < 400
    if how.startswith("sigusr1"):
        # every rank exited 0, so the launcher does too
        assert proc.returncode == 0
    tag = (out / "checkpoints" / "latest").read_text()
    assert tag == ckpt.tag_for(state["step"]) and ckpt.check_checkpoint(out / "checkpoints" / tag) == ""
    r = launch(demo_data, out, f"train.steps={state['step'] + 2}", "train.save_every=0", "train.eval_every=0",
               ranks=ranks)
    check_ok(r)
    assert f"at step {state['step']}" in r.stdout


@pytest.fixture(scope="module")
def one_rank_reference(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_rank")
    check_ok(launch(demo_data, out, "train.eval_every=0", "train.save_every=0", ranks=1))
    return step_losses(out)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_a_new_world_size(before, after, one_rank_reference, demo_data, tmp_path):
    out = tmp_path / "run"
    check_ok(launch(demo_data, out, "train.stop_at_step=3", "train.eval_every=0", "train.save_every=0",
                    ranks=before))
    r = launch(demo_data, out, "train.eval_every=0", "train.save_every=0", ranks=after)
    check_ok(r)
    assert "universal checkpoint, new layout" in r.stdout and "at step 3" in r.stdout
    assert (out / "checkpoints" / "step_00000003" / "universal").is_dir()
    losses = step_losses(out)
    # the data order and the optimizer state continue: the loss curve is the one-process run's
    for step in range(4, 9):
        assert losses[step] == pytest.approx(one_rank_reference[step], rel=1e-4), (step, losses, one_rank_reference)


def test_non_finite_step_is_skipped(demo_data, tmp_path):
    out = tmp_path / "run"
    r = launch(demo_data, out, "train.eval_every=0", "train.save_every=0", env={"METALA_FAULT": "nan@step=3,rank=1"})
    check_ok(r)
    assert "step 3: non-finite loss or gradient on some rank; update skipped (1 in a row)" in r.stdout
    state = json.loads((out / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(row.get("train/loss") is None or row["train/loss"] == row["train/loss"] for row in rows)
    # resuming checks that Adam took exactly steps - skipped updates
    r = launch(demo_data, out, "train.steps=9", "train.eval_every=0", "train.save_every=0")
    check_ok(r)
    assert "at step 8" in r.stdout


def test_repeated_non_finite_steps_stop_the_run(demo_data, tmp_path):
    out = tmp_path / "run"
    r = launch(demo_data, out, "train.max_bad_steps=3", "train.eval_every=0", "train.save_every=0",
               env={"METALA_FAULT": "nan@step=3-9,rank=0"})
    assert r.returncode == 3
    assert "3 consecutive non-finite steps ending at step 5 (first bad step 3)" in r.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step_00000005"


def test_out_of_memory_names_what_to_lower(demo_data, tmp_path):
    # one rank runs out of memory in the middle of step 2 (micro-batch 1 of 2): the launcher stops the others, and
    # that rank says where it was and which settings lower the memory, starting with the micro-batch
    out = tmp_path / "run"
    r = launch(demo_data, out, "train.eval_every=0", "train.save_every=0",
               env={"METALA_FAULT": "oom@step=2,micro=1,rank=1"})
    assert r.returncode != 0
    assert "torch.OutOfMemoryError: injected by METALA_FAULT at step 2, micro-batch 1, rank 1" in r.stderr
    assert ("out of memory: at step 2, 2 sequences of 64 tokens a forward on each rank; lower the memory with "
            "train.micro_batch=1 (the same global batch in more accumulated micro-batches), or "
            "train.activation_checkpointing=true") in r.stderr
    # the run keeps what it had: no checkpoint was due, none is torn
    assert not (out / "checkpoints" / "latest").exists()


def test_out_of_memory_advice_follows_the_settings():
    from types import SimpleNamespace

    import torch

    from pretrain.config import load_config
    from pretrain.train import out_of_memory_advice

    recipe = REPO / "launch/configs/360m.yaml"
    cfg = load_config(recipe)
    # the 360m recipe on 8 GPUs: 32 sequences a rank in one forward, compiled at budget 0.9, ZeRO-1
    rank = SimpleNamespace(micro_batch=32, layout=SimpleNamespace(dp=8), device=torch.device("cpu"), step=99)
    advice = out_of_memory_advice(cfg, rank)
    assert advice.startswith("at step 100, 32 sequences of 2048 tokens a forward on each rank; lower the memory with "
                             "train.micro_batch=16 ")
    for fix in ("train.compile_memory_budget=0.7", "train.activation_checkpointing=true", "train.zero_stage=2"):
        assert fix in advice, fix
    # nothing left to split at one sequence a forward with checkpointing on, under ZeRO-3
    cfg = load_config(recipe, ["train.activation_checkpointing=true", "train.zero_stage=3"])
    advice = out_of_memory_advice(cfg, SimpleNamespace(micro_batch=1, layout=SimpleNamespace(dp=256),
                                                       device=torch.device("cpu"), step=0))
    assert advice.endswith("every memory setting is at its lowest: split the model over more GPUs (parallel.tp)")
    # before the engine existed
    assert "while building the model" in out_of_memory_advice(cfg, None)


def test_torn_checkpoint_falls_back_with_a_warning(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        folder = root / ckpt.tag_for(step)
        folder.mkdir(parents=True)
        (folder / "model.pt").write_bytes(b"x" * 100)
        (folder / ckpt.MANIFEST).write_text(json.dumps({"step": step, "files": {"model.pt": 100}}))
    (root / "latest").write_text(ckpt.tag_for(4))
    assert ckpt.find_resumable(root) == ("step_00000004", [])
    (root / ckpt.tag_for(4) / "model.pt").write_bytes(b"x" * 60)
    tag, warnings = ckpt.find_resumable(root)
    assert tag == "step_00000002" and "model.pt has 60 bytes, the manifest says 100" in warnings[0]
    (root / ckpt.tag_for(2) / ckpt.MANIFEST).unlink()
    tag, warnings = ckpt.find_resumable(root)
    assert tag is None and len(warnings) == 2
    assert inspect_main([str(root / ckpt.tag_for(4))]) == 1


def test_inspect_reports_a_checkpoint(demo_data, tmp_path, capsys):
    out = tmp_path / "run"
    check_ok(launch(demo_data, out, "train.steps=2", "train.eval_every=0", "train.save_every=0", ranks=1))
    assert inspect_main([str(out)]) == 0
    text = capsys.readouterr().out
    assert "step        2" in text and "world 1 = DP 1 x SP 1 x TP 1; ZeRO-1" in text and "status      OK" in text
