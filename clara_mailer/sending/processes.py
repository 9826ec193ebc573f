"""Helper worker processes for ``send --processes N``.

Each helper is one more worker on the same campaign, sharing it through the delivery log
exactly as workers on other machines do; the helpers report their counts (and an error,
if one stops on one) to the parent over a queue, so the progress bar and the summary
cover all of them.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
from collections import Counter
from collections.abc import Callable
from typing import Any


class HelperProcesses:
    """Extra worker processes running ``target(index, *args, queue)``."""

    def __init__(self, target: Callable[..., None], args: tuple[Any, ...], count: int) -> None:
        self.target = target
        self.count = count
        self.args = args
        self.errors: list[str] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.latest: dict[int, Counter[str]] = {}
        self.interrupted = False
        self._context = multiprocessing.get_context("spawn")
        self._queue: Any = None

    def start(self) -> None:
        if not self.count:
            return
        self._queue = self._context.Queue()
        for i in range(self.count):
            process = self._context.Process(
                target=self.target, args=(i, *self.args, self._queue), daemon=False
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
