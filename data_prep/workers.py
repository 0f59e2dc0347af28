"""Worker processes that run one function over a stream of tasks, results in task order, each fed through a pipe
of its own.

Why not `multiprocessing.Pool`: its workers share one task queue and one result queue, each guarded by a lock that
a worker holds while it waits for a task or writes a result. A worker killed meanwhile (the out-of-memory killer
picks one mid-run) leaves that lock taken, and `Pool.terminate()`, the pool's own threads and every other worker then
wait on it forever; Pool also replaces a dead worker without a word, so its task's result never comes. Working
around that took CPython's private Pool attributes, and a run once missed a dead worker that way (hung until CI's
timeout). Here nothing is shared between workers:
  - a dead worker is seen at once: its process sentinel is waited on together with the results;
  - a worker killed halfway through writing a result leaves a torn message on its own pipe only, read as EOF;
  - the run may kill its workers at any moment (stopping never waits on a lock), and nothing replaces them.
Everything the parent sends is small (the caller moves big payloads through files), so the parent never blocks on a
full pipe while a worker blocks on writing its result to it.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import pickle
import signal
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

# how long a finished run waits for its workers to exit on their end-of-work marker before it kills them
EXIT_SECONDS = 30.0


class WorkerDied(RuntimeError):
    """A worker process exited during the run; the task it held, if any, is lost."""


class WorkerTraceback(Exception):
    """Where in the worker an exception raised in the parent came from (its `__cause__`)."""


def _serve(conn: mp.connection.Connection, fn: Callable, init: Callable | None, init_args: tuple) -> None:
    """A worker: `init(*init_args)` once, then `fn(task)` for every task received until None. Each answer is
    ("ok", result) or ("error", (exception, its traceback as text))."""
    try:
        if init is not None:
            init(*init_args)
    except Exception as e:  # noqa: BLE001 - the parent raises it
        _answer(conn, "error", (e, traceback.format_exc()))
        return
    try:
        while (task := conn.recv()) is not None:
            try:
                status, out = "ok", fn(task)
            except Exception as e:  # noqa: BLE001 - the parent raises it
                status, out = "error", (e, traceback.format_exc())
            _answer(conn, status, out)
    except (EOFError, KeyboardInterrupt):  # the parent has gone, or Ctrl-C reached a worker before its init ran
        pass


def _answer(conn: mp.connection.Connection, status: str, out: Any) -> None:
    try:
        conn.send((status, out))
    except Exception as e:  # noqa: BLE001 - an exception or result that cannot be pickled
        error = RuntimeError(f"a worker's {'exception' if status == 'error' else 'result'} could not be sent to the "
                             f"parent: {e!r}")
        conn.send(("error", (error, traceback.format_exc())))


@dataclass(eq=False)
class _Worker:
    process: mp.process.BaseProcess
    conn: mp.connection.Connection
    name: str
    # the indices of the tasks sent to it and not yet answered, oldest first (a worker answers in order)
    in_flight: deque = field(default_factory=deque)

    def died(self) -> WorkerDied:
        """How the process ended, once it has (it is joined here: its pipe or its sentinel said it is ending)."""
        self.process.join()
        code = self.process.exitcode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        hint = " (SIGKILL: often the out-of-memory killer)" if code == -signal.SIGKILL else ""
        held = "the task it held is lost" if self.in_flight else "it held no task"
        return WorkerDied(f"a {self.name} (pid {self.process.pid}) {how}{hint}; {held}")


class Workers:
    """`processes` workers running `fn`, each holding at most `per_worker` tasks at a time, and at most `processes *
    per_worker` tasks between being taken and their results being given back (the back-pressure that keeps the
    caller's reader from running ahead); `name` is what a worker is called in errors. Use as a context manager, or
    call `close()`."""

    def __init__(self, processes: int, fn: Callable, init: Callable | None = None, init_args: tuple = (),
                 context: mp.context.BaseContext | None = None, per_worker: int = 2, name: str = "worker") -> None:
        if processes < 1 or per_worker < 1:
            raise ValueError(f"need processes >= 1 and per_worker >= 1, got {processes} and {per_worker}")
        ctx = context or mp.get_context()
        self.per_worker = per_worker
        self._workers: list[_Worker] = []
        try:
            for _ in range(processes):
                here, there = ctx.Pipe()
                process = ctx.Process(target=_serve, args=(there, fn, init, init_args), daemon=True)
                process.start()
                # the parent's copy of the worker's end closed, the worker's death reads as EOF on `here`
                there.close()
                self._workers.append(_Worker(process, here, name))
        except BaseException:
            self.close(kill=True)
            raise

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def has_idle_worker(self) -> bool:
        """Whether some worker is out of work: it holds no task, or only one whose answer is already waiting to be
        read. Cheap (a poll of each pipe); asked by the caller's task iterator while `imap` takes a task."""
        return any(not w.in_flight or (len(w.in_flight) == 1 and w.conn.poll()) for w in self._workers)

    def imap(self, tasks: Iterable) -> Iterator:
        """`fn(task)` for every task, in the tasks' order. A task's exception is raised here; WorkerDied as soon as
        any worker has exited. Tasks are taken from `tasks` only as workers have room for them."""
        tasks = iter(tasks)
        early: dict[int, Any] = {}  # results that came before an earlier task's
        sent = given = 0
        more = True
        # tasks sent and not yet given back, also those already answered: one slow task must not let the other
        # workers (and the reader, and the answers waiting in `early`) run ahead without bound
        limit = self.per_worker * len(self._workers)
        while True:
            while more and sent - given < limit:
                worker = min(self._workers, key=lambda w: len(w.in_flight))
                if len(worker.in_flight) >= self.per_worker:
                    break
                try:
                    task = next(tasks)
                except StopIteration:
                    more = False
                    break
                self._send(worker, task)
                worker.in_flight.append(sent)
                sent += 1
            if given in early:
                yield early.pop(given)
                given += 1
            elif not more and given == sent:
                return
            else:
                self._receive(early)

    def _send(self, worker: _Worker, task: Any) -> None:
        try:
            worker.conn.send(task)
        except OSError:  # a broken pipe: the worker is gone (its init may have failed: its answer says why)
            self._fail(worker)

    def _receive(self, early: dict) -> None:
        """Wait for any answer or any worker's exit; store the answers (in `early`, by task index)."""
        ready = set(mp.connection.wait([w.conn for w in self._workers] + [w.process.sentinel for w in self._workers]))
        for w in self._workers:
            if w.conn in ready:
                self._take_answer(w, early)
        for w in self._workers:
            if w.process.sentinel in ready:
                self._fail(w)

    def _take_answer(self, worker: _Worker, early: dict) -> None:
        try:
            answer = worker.conn.recv_bytes()
        except (EOFError, OSError):  # it died before or while writing its answer
            raise worker.died() from None
        try:
            status, out = pickle.loads(answer)
        except Exception as e:  # e.g. an exception class whose constructor takes other arguments than it keeps
            raise RuntimeError(f"an answer of a {worker.name} (pid {worker.process.pid}) could not be read: "
                               f"{e!r}") from e
        if status == "error":  # a task's exception, or its init's
            error, where = out
            raise error from WorkerTraceback(where)
        early[worker.in_flight.popleft()] = out

    def _fail(self, worker: _Worker) -> None:
        """Raise why `worker` stopped: the error it answered last, else how it died."""
        if worker.conn.poll():
            self._take_answer(worker, {})
        raise worker.died()

    def close(self, kill: bool = False) -> None:
        """End the workers: each gets its end-of-work marker and is joined, or with `kill` (or when one does not
        exit within EXIT_SECONDS) is killed at once; killing is safe at any moment, nothing is shared."""
        if not kill:
            for w in self._workers:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
            for w in self._workers:
                w.process.join(EXIT_SECONDS)
        for w in self._workers:
            if w.process.exitcode is None:
                w.process.kill()
        for w in self._workers:
            w.process.join()
            w.conn.close()
        self._workers = []

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(kill=exc_type is not None)
