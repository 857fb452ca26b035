"""What a rank waits for: its batches, pulled ahead on a thread, with a stall watchdog and a wait clock.

A Ray Data pipeline that cannot run (after a node loss its tasks may find no CPU left beside the
training workers) would leave a rank blocked in ``next()`` for ever. :class:`Feed` pulls the
batches on a thread and waits for each one with a deadline:

- after ``check_after_s`` without a batch it asks ``diagnose()`` whether the pipeline can run at
  all, and raises :class:`DataStallError` with the answer when it cannot;
- after ``stall_s`` without a batch it raises in any case, naming how long it waited.

The worker group then fails, and the driver starts it again from the last checkpoint with a size
that leaves the data pipeline room (:func:`raykd.train.trainer.fit_restarting`).

``Feed.wait_s`` adds up the time the consumer spent waiting for batches: an epoch's data wait.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["DataStallError", "Feed"]

POLL_S = 1.0  # how often a waiting consumer looks at the clock
CHECK_EVERY_S = 5.0  # how often a long wait asks diagnose() again


class DataStallError(RuntimeError):
    """No batch came within the watchdog's deadline."""


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()


class Feed:
    """Iterate ``batches`` through a queue of ``depth`` batches filled by a daemon thread."""

    def __init__(self, batches: Iterable[Any], *, stall_s: float, diagnose: Callable[[], str | None] | None = None,
                 check_after_s: float = 10.0, what: str = "batch", depth: int = 2) -> None:
        self.batches, self.stall_s, self.diagnose = batches, stall_s, diagnose
        self.check_after_s, self.what = check_after_s, what
        self.wait_s = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()

    def __iter__(self) -> Iterator[Any]:
        threading.Thread(target=self._pull, name="raykd-feed", daemon=True).start()
        try:
            while True:
                t0 = time.perf_counter()
                item = self._next(t0)
                self.wait_s += time.perf_counter() - t0
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.exc
                yield item
        finally:
            self._stop.set()  # a consumer that stops early frees the thread

    def _pull(self) -> None:
        try:
            for batch in self.batches:
                if not self._put(batch):
                    return
            self._put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(_Failed(exc))

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _next(self, t0: float) -> Any:
        next_check = self.check_after_s
        while True:
            try:
                return self._queue.get(timeout=POLL_S)
            except queue.Empty:
                waited = time.perf_counter() - t0
            if self.diagnose is not None and waited >= next_check:
                next_check = waited + CHECK_EVERY_S
                reason = self.diagnose()
                if reason:
                    raise DataStallError(f"no {self.what} for {waited:.0f} s: {reason}")
            if waited >= self.stall_s:
                raise DataStallError(
                    f"no {self.what} for {waited:.0f} s (train.stall_timeout_s): the data pipeline made no "
                    "progress; the Ray dashboard's Data tab shows which operator waits and on what")
