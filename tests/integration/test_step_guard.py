"""The trainer's non-finite step guard under DeepSpeed ZeRO-1 in bf16, with DeepSpeed's own overflow check off
(pretrain.trainer.deepspeed_config): a NaN loss or one infinite gradient tensor leaves every parameter and the Adam
state of every parameter group untouched, and the next good step trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.launch_utils import REPO, free_port


@pytest.fixture(scope="module")
def helper_output() -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
           "PYTHONWARNINGS": "ignore::FutureWarning"}
    env.pop("RANK", None)
    r = subprocess.run([sys.executable, "-m", "tests.integration.bf16_step_guard_run"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r.stdout.splitlines()


def result(lines: list[str], tag: str) -> dict:
    return json.loads(next(ln for ln in lines if ln.startswith(tag + " "))[len(tag) + 1:])


def wrong_update_distance(clipping: dict) -> float:
    """How far the fp32 masters of a wrong update land from DeepSpeed's after the helper's three clipped steps: the
    guard's run with clipping off (~2.7e-3; each step's clip factor differs, so Adam's scale invariance does not
    hide it). Runs that compute the same update agree far closer than that, but not to a few ulp: where two correct
    implementations round one fp32 master an ulp apart on a bf16 rounding boundary, the bf16 weight differs and so
    do the next gradients (2e-5 on one CPU, below 1e-6 on the one before it)."""
    far = clipping["unclipped"]["max_master_diff"]
    assert far > 1e-3, clipping["unclipped"]
    return far


@pytest.mark.parametrize("adamw", ["plain", "fused"])
def test_bf16_zero1_skips_the_whole_update_on_a_non_finite_gradient(helper_output, adamw):
    # plain AdamW: the guard reads its decision on the host and does not call the step; fused AdamW (the trainer's
    # on a GPU): the skip happens on the device through the optimizer's found_inf, read by the host only afterwards
    out = result(helper_output, "RESULT")[adamw]
    assert out["optimizer"] == "DeepSpeedZeroOptimizer" and out["check_grad_overflow"] is False
    good, nan_loss, inf_grad, good_again = out["steps"]
    # the fused gradient norm that the guard reads equals DeepSpeed's per-tensor one on the same gradients (one call
    # per parameter group), and a non-finite norm comes back as -1 from both
    for fault, pairs in [(step["fault"], step.pop("norms")) for step in out["steps"]]:
        assert len(pairs) == 2, (fault, pairs)
        for ours, theirs in pairs:
            assert ours == pytest.approx(theirs, rel=1e-6), (fault, pairs)
        assert (min(theirs for _, theirs in pairs) == -1.0) == (fault is not None), (fault, pairs)
    waits = [step.pop("device_waits") for step in out["steps"]]
    if adamw == "fused":
        # nothing in engine.step() waits for the device (no host read, no host tensor copied there, no DeepSpeed
        # synchronize): the flags are read after it, by `update_dropped`
        assert waits == [0, 0, 0, 0]
    assert good == {"fault": None, "skipped": False, "changed": True, "finite": True, "adam_steps": [1]}
    # the decay and no-decay groups are stepped separately by DeepSpeed: neither may move (weights, fp32 masters,
    # Adam moments), and the Adam step counter stays
    for bad in (nan_loss, inf_grad):
        assert bad["skipped"] and not bad["changed"] and bad["finite"] and bad["adam_steps"] == [1], bad
    assert good_again == {"fault": None, "skipped": False, "changed": True, "finite": True, "adam_steps": [2]}


def test_clipping_taken_over_from_deepspeed_gives_its_update_without_its_host_reads(helper_output):
    # DeepSpeed ZeRO-1 clips by reading the norm on the host once per parameter group and multiplying the gradients;
    # the guard divides them by the same factor on the device (inside the fused AdamW, or in one foreach pass)
    out = result(helper_output, "CLIPPING")
    ds, plain, fused = out["deepspeed"], out["guard"], out["guard_fused"]
    assert ds["deepspeed_clip"] == 0.5 and ds["clip_in_guard"] == 0.0
    far = wrong_update_distance(out)
    for ours in (plain, fused):
        assert ours["deepspeed_clip"] == 0.0 and ours["clip_in_guard"] == 0.5
        # the clip was active (norms ~4.5 against 0.5) and the weights moved
        assert min(ours["norms"]) > 1.0 and ours["change"] > 1e-3
        assert ours["norms"][0] == pytest.approx(ds["norms"][0], rel=1e-6)
        assert ours["norms"] == pytest.approx(ds["norms"], rel=1e-5)
        assert ours["max_master_diff"] < 0.05 * far, (ours, far)
    # waits for the device in one engine.step(): none with the fused AdamW (the plain AdamW reads its step counters
    # on the CPU, and the guard reads its decision there); DeepSpeed's clipping adds a host read per parameter group
    assert fused["device_waits"] == [0, 0, 0]
    assert [d - p for d, p in zip(ds["device_waits"], plain["device_waits"])] == [2, 2, 2]


def test_fused_master_step_gives_deepspeeds_update_in_one_pass(helper_output):
    # pretrain/zero_step.py: DeepSpeed ZeRO-1's step with the gradient cast, the fp32 AdamW and the copy into the bf16
    # weights fused (MasterWeightAdamW's lp_io), against DeepSpeed's own step from the same weights and batches
    out = result(helper_output, "MASTER")
    ds, fused = out["deepspeed"], out["fused"]
    assert ds["step_method"] == "step" and fused["step_method"] == "_fused_master_step"
    for run in out.values():
        # clipping active (the guard's divisor), the weights trained, three counted Adam steps in both groups, and
        # nothing in engine.step() waits for the device
        assert run["change"] > 1e-3 and run["steps"] == [3.0, 3.0] and run["device_waits"] == [0, 0, 0], run
    # naive twin (the CPU's default): the same update; after the first step the masters a few fp32 ulp apart and the
    # moments equal to ~1e-9, the bf16 weights rounded from them (an ulp apart where a master sits on a rounding
    # boundary); after three steps within the drift such a flip starts (wrong_update_distance)
    assert fused["step1"]["masters"] < 1e-6 and fused["step1"]["moments"] < 1e-8, fused
    assert fused["step1"]["weights"] <= 2 ** -8 and fused["step3"]["weights"] <= 2 ** -8, fused
    assert fused["step3"]["masters"] < 0.05 * wrong_update_distance(result(helper_output, "CLIPPING")), fused
    assert ds["lp_rel_diff"] <= 2 ** -8 and fused["lp_rel_diff"] <= 2 ** -8
    # triton is a requirement and, without CUDA, tests/conftest.py turns its CPU interpreter on (the helper
    # inherits it): the kernel always runs here
    kernel = out.get("fused_kernel")
    assert kernel is not None, "the helper found no usable Triton (neither CUDA nor TRITON_INTERPRET=1)"
    # the kernel: the same first update (after it, the interpreter's truncating bf16 cast makes the next forwards
    # differ); and where DeepSpeed's step copies each group's gradient partition out of its reduction buffer and
    # casts that to fp32 (2 groups: 4 partition-sized tensors a step), the kernel reads the bf16 buffer in place:
    # none after the first step (which makes the Adam moments)
    assert kernel["step1"]["masters"] < 1e-6 and kernel["step1"]["moments"] < 1e-8, kernel
    assert kernel["lp_rel_diff"] < 2 ** -7
    copies = ds["partition_copies"], kernel["partition_copies"]
    assert copies[0][1:] == [4, 4] and copies[1][1:] == [0, 0], copies


def test_deepspeeds_division_by_one_is_skipped_bit_for_bit(helper_output):
    # over a reduction world of one DeepSpeed divides every gradient bucket by 1.0; pretrain.zero_step turns that
    # averaging off there: no division in backward + step, and the same fp32 masters bit for bit after two steps
    out = result(helper_output, "DIVISION")
    assert out["skipped"]["skip_applied"] and out["skipped"]["divisions"] == [0, 0]
    assert out["deepspeed"]["divisions"] == [1, 1]
    assert out["skipped"]["masters_equal"]


def test_zero1_copies_each_gradient_once_over_a_world_of_one(helper_output):
    # pretrain.zero_step.copy_gradients_once: DeepSpeed ZeRO-1 over one data-parallel rank copied every gradient
    # into its reduction bucket and again into the partition buffer; now once, straight into that buffer: half the
    # gradient-sized copies (23 parameters of the tiny model: 46 -> 23 a step, with one or two micro-batches) and the
    # same fp32 masters bit for bit after two steps. ZeRO-2 reduces from hooks during the backward: untouched.
    out = result(helper_output, "COPIES")
    for key in ("gas1_zero1", "gas2_zero1"):
        once, ds = out[key]["once"], out[key]["deepspeed"]
        assert once["applied"] and ds["applied"], out[key]
        assert ds["copies"] == [46, 46] and once["copies"] == [23, 23], out[key]
        assert once["masters_equal"] and once["change"] > 1e-4, out[key]
        # the reduction bucket (DeepSpeed's default 5e8 elements, 1 GB in bf16) is no longer needed: one element
        assert ds["bucket"] == 500_000_000 and once["bucket"] == 1, out[key]
    assert not out["gas1_zero2"]["once"]["applied"] and out["gas1_zero2"]["once"]["copies"] == [46, 46]
