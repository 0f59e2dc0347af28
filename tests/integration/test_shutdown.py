"""A finished run leaves no process group behind: the groups' threads are joined before the process exits.

A group whose C++ object outlives the run keeps its worker threads running into interpreter teardown, where a rank
that finished and wrote everything can abort (exit -6, "terminate called without an active exception"), failing
the job; CI saw it under load. The race itself is rare, so the tests check its precondition, deterministically:
with METALA_CHECK_SHUTDOWN=1 (set by `launch_utils.launch`) the trainer reports any communication thread still
running after shutdown, and `launch_utils.check_ok` fails on the report, for every multi-rank run of the suite.
Here: one rank under each ZeRO stage, and the thread census itself.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.integration.launch_utils import REPO, check_ok, free_port, launch


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_no_process_group_outlives_the_run(stage, demo_data, tmp_path):
    # before the fix: the default group's gloo threads, kept alive by torch.distributed.nn's default arguments and
    # the trainer's signal handler (and, under ZeRO-3, by DeepSpeed's module stack and memoised coordinator)
    r = launch(demo_data, tmp_path / "run", "train.steps=2", "train.eval_every=0", "train.save_every=0",
               f"train.zero_stage={stage}", ranks=1)
    check_ok(r)
    assert (tmp_path / "run" / "run_state.json").is_file()


def test_the_check_sees_live_group_threads():
    # the report is only as good as the thread census (Linux /proc): a live gloo group must show up in it. A new
    # thread names itself once it runs (CI saw the census taken before gloo's workers had), so the script polls
    script = (
        "import time\n"
        "import torch.distributed as dist\n"
        "from pretrain.distributed import comm_threads\n"
        "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:%d', rank=0, world_size=1)\n"
        "deadline = time.monotonic() + 30\n"
        "while not any(n.startswith('pt_gloo') for n in comm_threads()) and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
        "print(','.join(comm_threads()))\n"
        "dist.destroy_process_group()\n" % free_port()
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    names = r.stdout.split()[-1].split(",")
    assert any(n.startswith("pt_gloo") for n in names), names  # gloo's worker threads
    assert any(n.startswith("pt_tcpstore") for n in names), names  # the rendezvous store's server
