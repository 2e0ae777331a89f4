"""A small pool of forked worker processes, each on a pair of pipes: no threads, no queues.

multiprocessing.Pool moves every task and result through helper threads of
the calling process, which then compete with it for the interpreter: for
thousands of small tasks (directory listings, batches of small files) that
costs more than the tasks.  Here the caller writes a task (a pickled function
and arguments) to a worker's pipe and reads the result from the worker's
other pipe when it needs it; a worker does its tasks in order.  A worker
never has more than ``DEPTH`` tasks queued, so neither side blocks on a full
pipe while the other waits for it.

Workers are forked: they share what the caller held at that moment (the
root, the exclusions) without pickling it.  They ignore SIGINT (Ctrl-C is the
caller's to handle), hold none of the caller's stdin or stdout, and die with
the caller, also when it is killed (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import collections
import os
import pickle
import signal
from collections.abc import Callable
from typing import Any

from .errors import AppPotError

DEPTH = 2  # tasks queued per worker


class Pending:
    """A task's result, to come."""

    __slots__ = ("done", "error", "value", "worker")

    def __init__(self, worker: _Worker) -> None:
        self.worker, self.done = worker, False
        self.value: Any = None
        self.error: BaseException | None = None

    def get(self) -> Any:
        while not self.done:
            self.worker.receive()
        if self.error is not None:
            raise self.error
        return self.value


class _Worker:
    def __init__(self, pid: int, tasks: int, results: int) -> None:
        self.pid, self.tasks, self.results = pid, tasks, results
        self.queued: collections.deque[Pending] = collections.deque()

    def send(self, data: bytes) -> Pending:
        _write_all(self.tasks, len(data).to_bytes(8, "little") + data)
        pending = Pending(self)
        self.queued.append(pending)
        return pending

    def receive(self) -> None:
        """Read the next result of this worker into its Pending."""
        size = int.from_bytes(_read_exactly(self.results, 8), "little")
        ok, value = pickle.loads(_read_exactly(self.results, size))
        pending = self.queued.popleft()
        pending.done = True
        if ok:
            pending.value = value
        else:
            pending.error = value


class ForkPool:
    """``workers`` forked processes; ``submit`` runs a function in the least busy one."""

    def __init__(self, workers: int) -> None:
        self.workers: list[_Worker] = []
        parent = os.getpid()
        for _ in range(workers):
            task_r, task_w = os.pipe2(os.O_CLOEXEC)
            result_r, result_w = os.pipe2(os.O_CLOEXEC)
            try:
                pid = os.fork()
            except OSError:
                for fd in (task_r, task_w, result_r, result_w):
                    os.close(fd)
                self.close()
                raise
            if pid == 0:  # the worker
                try:
                    for other in self.workers:
                        os.close(other.tasks)
                        os.close(other.results)
                    os.close(task_w)
                    os.close(result_r)
                    _serve(parent, task_r, result_w)
                finally:
                    os._exit(0)
            os.close(task_r)
            os.close(result_w)
            self.workers.append(_Worker(pid, task_w, result_r))

    def has_room(self) -> bool:
        """True if a task can be submitted without waiting for a result."""
        return any(len(w.queued) < DEPTH for w in self.workers)

    def submit(self, function: Callable[..., Any], *args: Any) -> Pending:
        worker = min(self.workers, key=lambda w: len(w.queued))
        self.workers.remove(worker)  # the next tie goes to another worker
        self.workers.append(worker)
        while len(worker.queued) >= DEPTH:  # every worker is busy: take in a result first
            worker.receive()
        return worker.send(pickle.dumps((function, args), protocol=pickle.HIGHEST_PROTOCOL))

    def close(self) -> None:
        """End the workers (tasks under way are abandoned) and reap them."""
        for worker in self.workers:
            os.close(worker.tasks)
            os.close(worker.results)
            try:
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for worker in self.workers:
            try:
                os.waitpid(worker.pid, 0)
            except ChildProcessError:
                pass
        self.workers = []


def _serve(parent: int, tasks: int, results: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes  # PR_SET_PDEATHSIG has no wrapper in os

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the caller died before the line above
        return
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):  # never hold the caller's pipes open
        os.dup2(null, fd)
    os.close(null)
    while True:
        head = _read_exactly(tasks, 8, eof_ok=True)
        if not head:
            return
        function, args = pickle.loads(_read_exactly(tasks, int.from_bytes(head, "little")))
        try:
            reply = (True, function(*args))
        except Exception as exc:  # the caller raises it where it wants the result
            reply = (False, exc)
        try:
            data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # an exception that cannot be pickled: send its text
            data = pickle.dumps((False, RuntimeError(f"{type(reply[1]).__name__}: {exc}")))
        _write_all(results, len(data).to_bytes(8, "little") + data)


def _read_exactly(fd: int, size: int, eof_ok: bool = False) -> bytes:
    data = os.read(fd, size)
    if len(data) == size or (eof_ok and not data):
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.read(fd, min(size - got, 1 << 20))
        if not more:
            raise AppPotError("a worker process of apppot-snap ended unexpectedly (killed, or out of memory?)")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
