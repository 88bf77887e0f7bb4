"""Bounded waits for reads that may never return, and an image's budget for segmenting.

A read blocked in a system call (a socket that never answers) cannot be interrupted from
Python. So reads run on a daemon thread of their own (`ReadThread`) and the caller waits for
each at most `run.read_timeout_s`; past that it goes on with `ReadTimedOut` (the image's error
row) and leaves the thread behind. The thread finishes the call if it ever returns (the
result is dropped), then runs what was queued after it (closing the scene), and ends. A daemon
thread never holds the process at exit, so a stuck read cannot keep a job from ending.

`Budget` is the cooperative side of `run.image_timeout_s`: the pipeline calls its `check`
between tiles, crops and point batches, which raises `OverBudget` once the image's time is up.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import numpy as np

from sam_batch.pipeline.errors import ImageError
from sam_batch.pipeline.rasters import Scene, Window

Result = TypeVar("Result")


class ReadTimedOut(ImageError):
    """A read not done within `run.read_timeout_s` (`timeout_s`, in s)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__("read", f"not done after {timeout_s:g} s (run.read_timeout_s)")


class OverBudget(Exception):
    """An image's segmenting ran past `run.image_timeout_s` (`budget_s`, in s)."""

    def __init__(self, budget_s: float) -> None:
        super().__init__(f"segment: over run.image_timeout_s ({budget_s:g} s)")


class ReadThread:
    """One daemon thread that runs reads one after another, each waited for at most `timeout_s` s.

    Use as a context manager: leaving it queues the thread's end without waiting for it. After
    a timeout the thread may still be blocked; calls queued behind it run once it is free.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._calls: queue.SimpleQueue = queue.SimpleQueue()  # (future, function, args); None ends
        threading.Thread(target=self._serve, name="sam-batch-read", daemon=True).start()

    def __enter__(self) -> ReadThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._calls.put(None)

    def call(self, function: Callable[..., Result], *args: Any) -> Result:
        """`function(*args)` on the thread; `ReadTimedOut` if it is not back within `timeout_s`."""
        future = self.post(function, *args)
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise ReadTimedOut(self.timeout_s) from None

    def post(self, function: Callable[..., Result], *args: Any) -> Future:
        """Queue `function(*args)` on the thread without waiting for it."""
        future: Future = Future()
        self._calls.put((future, function, args))
        return future

    def _serve(self) -> None:
        while (item := self._calls.get()) is not None:
            future, function, args = item
            try:
                future.set_result(function(*args))
            except BaseException as error:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(error)


class BoundedScene:
    """A `pipeline.rasters.Scene` whose window reads run on `reads`, each waited for at most
    its timeout; the scene's own thread, so that one thread alone touches its file."""

    def __init__(self, scene: Scene, reads: ReadThread) -> None:
        self.scene, self.reads = scene, reads
        self.width, self.height, self.crs, self.transform = scene.width, scene.height, scene.crs, scene.transform

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray | None]:
        """The scene's `read` of `window` on the thread; `ReadTimedOut` past the timeout."""
        return self.reads.call(self.scene.read, window)

    def read_decimated(self, window: Window, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
        """The scene's `read_decimated` on the thread, bounded alike."""
        return self.reads.call(self.scene.read_decimated, window, shape)


def read_bounded(timeout_s: float, function: Callable[..., Result], *args: Any) -> Result:
    """`function(*args)` on a `ReadThread` of its own, waited for at most `timeout_s` s."""
    with ReadThread(timeout_s) as thread:
        return thread.call(function, *args)


class Budget:
    """`budget_s` seconds from now (None: no limit); `check` raises `OverBudget` once they are spent."""

    def __init__(self, budget_s: float | None) -> None:
        self.budget_s = budget_s
        self.deadline = None if budget_s is None else time.monotonic() + budget_s

    @classmethod
    def until(cls, deadline: float | None, budget_s: float | None) -> Budget:
        """The rest of a budget of `budget_s` s that another process started: spent at
        `deadline` (`time.time()`; None: no limit)."""
        budget = cls(None)
        budget.budget_s = budget_s
        if deadline is not None:
            budget.deadline = time.monotonic() + deadline - time.time()
        return budget

    def check(self) -> None:
        """Raise `OverBudget` if the budget is spent."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise OverBudget(self.budget_s)
