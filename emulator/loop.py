"""A small single-threaded event loop: readable fds, one-shot timers and clean signal exit.

Everything in the emulator runs on this loop, so a guest BAR read goes from ``recvmsg`` to the
reply's ``sendmsg`` with no thread hand-off or queue in between.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import selectors
import signal
import time
from collections.abc import Callable
from types import FrameType

logger = logging.getLogger(__name__)

Callback = Callable[[], None]


class EventLoop:
    """Call a callback when an fd becomes readable or a timer expires, until ``stop()``."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Callback]] = []
        self._sequence = itertools.count()
        self._running = False
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wakeup_r, selectors.EVENT_READ, self._drain_wakeup)
        self._old_handlers: dict[int, object] = {}
        self.stop_reason = ""

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._selector.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)

    def call_later(self, delay: float, callback: Callback) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._sequence), callback))

    def stop(self, reason: str = "") -> None:
        self.stop_reason = reason or self.stop_reason
        self._running = False
        with contextlib.suppress(BlockingIOError):
            os.write(self._wakeup_w, b"\0")

    def stop_on_signals(self, *signums: int) -> None:
        """Stop the loop on these signals (e.g. SIGTERM, SIGINT) instead of raising."""

        def handler(signum: int, _frame: FrameType | None) -> None:
            self.stop(signal.Signals(signum).name)

        for signum in signums:
            self._old_handlers[signum] = signal.signal(signum, handler)

    def run(self) -> None:
        self._running = True
        while self._running:
            timeout = None
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            for key, _ in self._selector.select(timeout):
                callback: Callback = key.data
                callback()
                if not self._running:
                    break
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, callback = heapq.heappop(self._timers)
                callback()

    def close(self) -> None:
        for signum, old in self._old_handlers.items():
            signal.signal(signum, old)  # type: ignore[arg-type]
        self._selector.close()
        os.close(self._wakeup_r)
        os.close(self._wakeup_w)

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wakeup_r, 512):
                pass
        except BlockingIOError:
            pass
