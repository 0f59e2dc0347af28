"""A finished run leaves no process group behind: the groups' gloo threads are joined before the interpreter exits.

A group whose C++ object outlives the run keeps its worker threads running into interpreter teardown, where a rank
that finished and wrote everything can abort (exit -6, "terminate called without an active exception"), failing
the job; CI saw it under load. The race itself is rare, so this checks its precondition, deterministically: after
`pretrain.train.main` returns, no gloo thread of this process is still running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.launch_utils import REPO, TINY, free_port

PROBE = """
import json, sys
from pathlib import Path
from pretrain.train import main

def gloo_threads():
    names = []
    for comm in Path("/proc/self/task").glob("*/comm"):
        try:
            names.append(comm.read_text().strip())
        except OSError:
            pass
    return sorted(n for n in names if n.startswith(("pt_gloo", "gloo_")))

rc = main(sys.argv[1:])
print("PROBE " + json.dumps({"rc": rc, "threads": gloo_threads()}), flush=True)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names come from Linux /proc")
@pytest.mark.parametrize("stage", [1, 2])
def test_no_process_group_outlives_the_run(stage, demo_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO)}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(key, None)
    args = ["--config", str(REPO / "launch/configs/tiny-cpu.yaml"), f"data.dir={demo_data}",
            f"train.out_dir={tmp_path / 'run'}", *TINY, "train.steps=2", "train.eval_every=0", "train.save_every=0",
            f"train.zero_stage={stage}"]
    r = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    probe = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("PROBE "))[6:])
    assert probe["rc"] == 0
    # before the fix: the default group's 3 threads (torch.distributed.nn's defaults and the signal handler's
    # closure kept it alive), and 18 under the deepspeed launcher
    assert probe["threads"] == [], probe["threads"]
    assert (tmp_path / "run" / "run_state.json").is_file()
