"""Helper worker processes for ``send --processes N``.

Each helper is one more worker on the same campaign, sharing it through the delivery log
exactly as workers on other machines do; the helpers report their counts (and an error,
if one stops on one) to the parent over a queue, so the progress bar and the summary
cover all of them.

A helper can be started before the parent writes the plan (``start``): it loads its
modules and opens the database meanwhile (~0.5 s of a fresh interpreter), then waits on
its pipe until ``go`` hands it what only the committed plan knows (the campaign's id, its
segments, the prepared variants), or until the pipe closes (``cancel``: it ends without
touching anything). ``go`` writes from a thread, so a helper still loading never holds
up the parent's own sending.

A helper dies with its parent: when ``send`` is killed (kill -9, OOM), a helper that
carried on would keep sending on its own and run beside the next ``send``. On Linux the
kernel kills it (``PR_SET_PDEATHSIG``, set first thing in the helper; the parent is
checked once more right after, in case it died before that); elsewhere a watchdog thread
waits for the parent to go. The helper's rows are then settled by the next sender like
those of any dead worker (its journal, ``sending.journal``).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # multiprocessing and ctypes load only when helpers start (~1 MB)
    from multiprocessing.process import BaseProcess

PR_SET_PDEATHSIG = 1


def _kill_self() -> None:
    if hasattr(signal, "SIGKILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(1)


def _set_pdeathsig() -> bool:
    """Linux: have the kernel send SIGKILL to this process when its parent (the thread
    that started it) dies. False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        # The C library this interpreter runs on (not ``ctypes.util.find_library``,
        # which runs ldconfig in a child process every time a helper starts).
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    """Elsewhere: a thread that waits for the parent to go, then kills this process."""

    import multiprocessing
    import multiprocessing.connection

    def watch() -> None:
        parent = multiprocessing.parent_process()
        sentinel = getattr(parent, "sentinel", None)
        if sentinel is not None:
            # The parent's end of a pipe: readable (EOF) once the parent is gone.
            multiprocessing.connection.wait([sentinel])
        else:
            while os.getppid() == parent_pid:
                time.sleep(0.2)
        _kill_self()

    threading.Thread(target=watch, name="clara-parent-watchdog", daemon=True).start()


def die_with_parent(parent_pid: int, *, pdeathsig: bool = True) -> None:
    """Make this (helper) process die when ``parent_pid`` does."""
    if not (pdeathsig and _set_pdeathsig()):
        _watch_parent(parent_pid)
    # The parent may have died before the line above: then nobody would signal us.
    if os.getppid() != parent_pid:
        _kill_self()


def _helper_entry(parent_pid: int, target: Callable[..., None], *args: Any) -> None:
    die_with_parent(parent_pid)
    # A terminal's Ctrl-C reaches the whole process group. Until a helper sends, it
    # leaves it to the parent, which cancels or stops it; once it sends, it stops
    # cleanly on its own (``run_send``'s signal handlers replace this).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    target(*args)


def wait_for_go(go: Any) -> Any:
    """In a helper: what the parent's ``go`` sent, or None once the parent cancelled (or
    is gone)."""
    try:
        return go.recv()
    except (EOFError, OSError):
        return None
    finally:
        go.close()


class HelperProcesses:
    """Extra worker processes running ``target(index, *args, go, queue)``: ``go`` is the
    helper's end of a pipe (``wait_for_go``), ``queue`` where it reports its counts."""

    def __init__(self, target: Callable[..., None], args: tuple[Any, ...], count: int) -> None:
        self.target = target
        self.count = count
        self.args = args
        self.errors: list[str] = []
        self.processes: list[BaseProcess] = []
        self.latest: dict[int, Counter[str]] = {}
        self.interrupted = False
        self._queue: Any = None
        self._pipes: list[Any] = []  # the parent's ends, until go or cancel
        self._writers: list[threading.Thread] = []
        self._gone = False  # ``go`` handed them the campaign

    def start(self) -> None:
        if not self.count or self.processes:
            return
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._queue = context.Queue()
        parent = os.getpid()
        for i in range(self.count):
            theirs, ours = context.Pipe(duplex=False)
            process = context.Process(
                target=_helper_entry,
                args=(parent, self.target, i, *self.args, theirs, self._queue),
                daemon=False,
            )
            process.start()
            theirs.close()
            self.processes.append(process)
            self._pipes.append(ours)

    def go(self, *message: Any) -> None:
        """Hand every waiting helper ``message``, from a thread (a helper reads it once
        its modules are loaded). Only the first call hands anything."""
        if not self._pipes:
            return
        payload = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        pipes, self._pipes = self._pipes, []
        self._gone = True

        def write(pipe: Any) -> None:
            with contextlib.suppress(OSError):  # a helper that died says so by its exit
                pipe.send_bytes(payload)
            pipe.close()

        for pipe in pipes:
            writer = threading.Thread(target=write, args=(pipe,), name="clara-helper-go")
            writer.start()
            self._writers.append(writer)

    def waiting(self) -> bool:
        """Helpers are started and wait for ``go``."""
        return bool(self._pipes)

    def cancel(self) -> None:
        """Helpers still waiting for ``go`` end without sending anything."""
        pipes, self._pipes = self._pipes, []
        for pipe in pipes:
            pipe.close()

    def _drain(self) -> None:
        if self._queue is None:
            return
        while True:
            try:
                index, counts, interrupted, error = self._queue.get_nowait()
            except queue.Empty:
                return
            if error:
                self.errors.append(error)
            self.latest[index] = Counter(counts)
            self.interrupted = self.interrupted or interrupted

    def counts(self) -> Counter[str]:
        self._drain()
        total: Counter[str] = Counter()
        for counts in self.latest.values():
            total.update(counts)
        return total

    def ready(self) -> int:
        """How many helpers have loaded and reported (the first report is an empty one,
        sent before a helper waits for ``go``)."""
        self._drain()
        return len(self.latest)

    def running(self) -> bool:
        return any(p.is_alive() for p in self.processes)

    def sentinels(self) -> list[int]:
        """File descriptors that become readable as each helper ends."""
        return [p.sentinel for p in self.processes if p.is_alive()]

    def stop(self) -> None:
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    def join(self) -> None:
        self.cancel()
        for process in self.processes:
            process.join()
        for writer in self._writers:
            writer.join()
        self._drain()

    def __enter__(self) -> HelperProcesses:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        # Helpers still waiting end on their own once cancelled (``join``); those already
        # sending are stopped when the send failed or was interrupted.
        if kind is not None and self._gone:
            self.stop()
        self.join()
