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


def test_bf16_zero1_skips_the_whole_update_on_a_non_finite_gradient():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
           "PYTHONWARNINGS": "ignore::FutureWarning"}
    env.pop("RANK", None)
    r = subprocess.run([sys.executable, "-m", "tests.integration.bf16_step_guard_run"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert out["optimizer"] == "DeepSpeedZeroOptimizer" and out["check_grad_overflow"] is False
    good, nan_loss, inf_grad, good_again = out["steps"]
    # the fused gradient norm that the guard reads equals DeepSpeed's per-tensor one on the same gradients (one call
    # per parameter group), and a non-finite norm comes back as -1 from both
    for fault, pairs in [(step["fault"], step.pop("norms")) for step in out["steps"]]:
        assert len(pairs) == 2, (fault, pairs)
        for ours, theirs in pairs:
            assert ours == pytest.approx(theirs, rel=1e-6), (fault, pairs)
        assert (min(theirs for _, theirs in pairs) == -1.0) == (fault is not None), (fault, pairs)
    assert good == {"fault": None, "skipped": False, "changed": True, "finite": True, "adam_steps": [1]}
    # the decay and no-decay groups are stepped separately by DeepSpeed: neither may move
    for bad in (nan_loss, inf_grad):
        assert bad["skipped"] and not bad["changed"] and bad["finite"] and bad["adam_steps"] == [1], bad
    assert good_again == {"fault": None, "skipped": False, "changed": True, "finite": True, "adam_steps": [2]}
