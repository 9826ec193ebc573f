"""Helper worker processes for ``send --processes N``.

Each helper is one more worker on the same campaign, sharing it through the delivery log
exactly as workers on other machines do; the helpers report their counts (and an error,
if one stops on one) to the parent over a queue, so the progress bar and the summary
cover all of them.

A helper dies with its parent: when ``send`` is killed (kill -9, OOM), a helper that
carried on would keep sending on its own and run beside the next ``send``. On Linux the
kernel kills it (``PR_SET_PDEATHSIG``, set first thing in the helper; the parent is
checked once more right after, in case it died before that); elsewhere a watchdog thread
waits for the parent to go. The helper's rows are then settled by the next sender like
those of any dead worker (its journal, ``sending.journal``).
"""

from __future__ import annotations

import os
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
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
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
    target(*args)


class HelperProcesses:
    """Extra worker processes running ``target(index, *args, queue)``."""

    def __init__(self, target: Callable[..., None], args: tuple[Any, ...], count: int) -> None:
        self.target = target
        self.count = count
        self.args = args
        self.errors: list[str] = []
        self.processes: list[BaseProcess] = []
        self.latest: dict[int, Counter[str]] = {}
        self.interrupted = False
        self._queue: Any = None

    def start(self) -> None:
        if not self.count:
            return
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._queue = context.Queue()
        parent = os.getpid()
        for i in range(self.count):
            process = context.Process(
                target=_helper_entry,
                args=(parent, self.target, i, *self.args, self._queue),
                daemon=False,
            )
            process.start()
            self.processes.append(process)

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

    def running(self) -> bool:
        return any(p.is_alive() for p in self.processes)

    def stop(self) -> None:
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    def join(self) -> None:
        for process in self.processes:
            process.join()
        self._drain()
