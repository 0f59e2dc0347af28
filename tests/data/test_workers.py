"""`data_prep.workers.Workers`: results in order, errors and deaths reported at once, back-pressure, kill at will."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

from data_prep.workers import WorkerDied, Workers, WorkerTraceback

FORK = mp.get_context("fork")


def _slower_first(i: int) -> int:
    time.sleep(0.02 * (8 - i % 8))  # early tasks finish last
    return i * i


def _fails_on_3(i: int) -> int:
    if i == 3:
        raise ValueError("task 3 is bad")
    return i


def _dies_on_2(i: int) -> int:
    if i == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.05)
    return i


def _sleeps(i: int) -> int:
    time.sleep(60)
    return i


def _unpicklable(i: int):
    return lambda: i


class _NeedsTwoArguments(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")  # pickles its message only: it cannot be rebuilt from it


def _raises_unreadable(i: int) -> int:
    raise _NeedsTwoArguments(i, i)


def _bad_init() -> None:
    raise RuntimeError("the model changed")


def _identity(i: int) -> int:
    return i


@pytest.mark.parametrize("processes", [1, 3])
def test_results_come_in_task_order(processes):
    with Workers(processes, _slower_first, context=FORK) as w:
        assert list(w.imap(range(20))) == [i * i for i in range(20)]
    assert mp.active_children() == []


def _slow_on_0(i: int) -> int:
    if i == 0:
        time.sleep(0.5)
    return i


def test_the_reader_never_runs_ahead_of_the_results():
    """Task 0 is slow; the other worker must not race ahead of it (nor the reader, nor the answers kept)."""
    pulled = []

    def tasks():
        for i in range(50):
            pulled.append(i)
            yield i

    with Workers(2, _slow_on_0, context=FORK, per_worker=2) as w:
        for given, result in enumerate(w.imap(tasks())):
            assert result == given
            # two tasks a worker, counted from the last result given back
            assert len(pulled) <= given + 2 * 2
    assert len(pulled) == 50


def _naps(i: int) -> int:
    time.sleep(0.3)
    return i


@pytest.mark.parametrize("slow_tasks", [True, False])
def test_has_idle_worker_says_when_a_worker_is_out_of_work(slow_tasks):
    """Asked as each task is taken (what `prepare`'s reader does before parsing a task itself). Slow tasks: only the
    first finds the worker idle. Instant tasks and a slow consumer: each later one finds the worker done with the
    task it held, its answer waiting in the pipe, so out of work."""
    seen = []

    def tasks():
        for i in range(5):
            seen.append(w.has_idle_worker())
            yield i

    with Workers(1, _naps if slow_tasks else _identity, context=FORK, per_worker=2) as w:
        for result in w.imap(tasks()):
            if not slow_tasks:
                time.sleep(0.2)
    if slow_tasks:
        assert seen == [True, False, False, False, False]
    else:
        # the second is taken right after the first was sent: the worker may or may not have answered it yet
        assert seen[0] and seen[2:] == [True, True, True]


def test_a_tasks_exception_is_raised_in_the_caller_with_the_workers_traceback():
    with pytest.raises(ValueError, match="task 3 is bad") as raised:
        with Workers(2, _fails_on_3, context=FORK) as w:
            list(w.imap(range(10)))
    assert isinstance(raised.value.__cause__, WorkerTraceback) and "_fails_on_3" in str(raised.value.__cause__)
    assert mp.active_children() == []


def test_an_init_error_is_raised_in_the_caller():
    with pytest.raises(RuntimeError, match="the model changed"):
        with Workers(2, _identity, _bad_init, context=FORK) as w:
            list(w.imap(range(10)))
    assert mp.active_children() == []


def test_an_unpicklable_result_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match="a worker's result could not be sent to the parent"):
        with Workers(1, _unpicklable, context=FORK) as w:
            list(w.imap(range(2)))


def test_an_answer_the_parent_cannot_unpickle_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match=r"an answer of a worker \(pid \d+\) could not be read"):
        with Workers(1, _raises_unreadable, context=FORK) as w:
            list(w.imap(range(2)))
    assert mp.active_children() == []


def test_a_dead_worker_stops_the_run_at_once_with_how_it_died():
    t0 = time.monotonic()
    with pytest.raises(WorkerDied, match=r"was killed by signal 9 \(SIGKILL: often the out-of-memory killer\); "
                                         r"the task it held is lost"):
        with Workers(2, _dies_on_2, context=FORK) as w:
            list(w.imap(range(100)))
    assert time.monotonic() - t0 < 10 and mp.active_children() == []


def _time_is_up(*_):
    raise TimeoutError


def test_busy_workers_are_killed_at_once_on_close():
    w = Workers(2, _sleeps, context=FORK)
    results = w.imap(range(4))
    # the answers would take a minute: the wait is broken from outside after 0.5 s, as Ctrl-C would break it
    signal.signal(signal.SIGALRM, _time_is_up)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(TimeoutError):
            next(results)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    t0 = time.monotonic()
    w.close(kill=True)
    assert time.monotonic() - t0 < 5 and mp.active_children() == []


def test_spawned_workers_work_too():
    with Workers(2, _slower_first, context=mp.get_context("spawn")) as w:
        assert list(w.imap(range(8))) == [i * i for i in range(8)]
