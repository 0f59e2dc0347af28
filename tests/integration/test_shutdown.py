"""A finished run leaves no process group behind: the groups' threads are joined before the process exits.

A group whose C++ object outlives the run keeps its worker threads running into interpreter teardown, where a rank
that finished and wrote everything can abort (exit -6, "terminate called without an active exception"), failing
the job; CI saw it under load. The race itself is rare, so the tests check its precondition, deterministically:
with METALA_CHECK_SHUTDOWN=1 the trainer reports any communication thread still running after shutdown. Every
multi-rank run of the suite goes through `launch_utils.check_ok`, which fails on that report; here one rank, each
ZeRO stage, and the check itself.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.integration.launch_utils import REPO, TINY, free_port

LEAK = "process groups outlived the run"


def train_one_rank(demo_data, out, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), "METALA_CHECK_SHUTDOWN": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "pretrain.train", "--config", str(REPO / "launch/configs/tiny-cpu.yaml"),
           f"data.dir={demo_data}", f"train.out_dir={out}", *TINY, "train.steps=2", "train.eval_every=0",
           "train.save_every=0", *overrides]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names come from Linux /proc")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_no_process_group_outlives_the_run(stage, demo_data, tmp_path):
    r = train_one_rank(demo_data, tmp_path / "run", f"train.zero_stage={stage}")
    assert r.returncode == 0, r.stderr[-4000:]
    # before the fix: the default group's gloo threads, kept alive by torch.distributed.nn's default arguments and
    # the trainer's signal handler (and, under ZeRO-3, by DeepSpeed's module stack and memoised coordinator)
    assert LEAK not in r.stderr, r.stderr[-4000:]
    assert (tmp_path / "run" / "run_state.json").is_file()


def test_the_check_sees_live_group_threads(tmp_path):
    # the report is only as good as the thread census: a live gloo group must show up in it
    script = (
        "import os, torch.distributed as dist\n"
        "from pretrain.distributed import comm_threads\n"
        "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:%d', rank=0, world_size=1)\n"
        "print(len(comm_threads()))\n"
        "dist.destroy_process_group()\n" % free_port()
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) >= 2
