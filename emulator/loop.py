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
import select
import signal
import time
from collections.abc import Callable
from types import FrameType

logger = logging.getLogger(__name__)

Callback = Callable[[], None]


class EventLoop:
    """Call a callback when an fd becomes readable or a timer expires, until ``stop()``."""

    def __init__(self) -> None:
        # Raw epoll rather than ``selectors``: one dict lookup per ready fd and no key objects,
        # which is measurable when every guest BAR read is one wake-up.
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callback] = {}
        self._timers: list[tuple[float, int, Callback]] = []
        self._sequence = itertools.count()
        self._running = False
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.add_reader(self._wakeup_r, self._drain_wakeup)
        self._old_handlers: dict[int, object] = {}
        self.stop_reason = ""
        self._signalled = False

    def add_reader(self, fd: int, callback: Callback) -> None:
        if fd in self._callbacks:
            raise KeyError(f"fd {fd} already has a reader")
        self._epoll.register(fd, select.EPOLLIN)
        self._callbacks[fd] = callback

    def add_writer(self, fd: int, callback: Callback) -> None:
        """Call ``callback`` when ``fd`` can be written (or has failed).

        An fd has one callback, reader or writer: a socket with output waiting stops being read
        (``remove_reader``, then ``add_writer``) until the output is gone, which is the
        back-pressure the monitor wants, and the wake-up path stays one lookup per ready fd.
        """
        if fd in self._callbacks:
            raise KeyError(f"fd {fd} already has a callback")
        self._epoll.register(fd, select.EPOLLOUT)
        self._callbacks[fd] = callback

    def remove_reader(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    remove_writer = remove_reader

    def call_later(self, delay: float, callback: Callback) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._sequence), callback))

    def stop(self, reason: str = "") -> None:
        self.stop_reason = reason or self.stop_reason
        self._running = False
        with contextlib.suppress(BlockingIOError):
            os.write(self._wakeup_w, b"\0")

    def stop_on_signals(self, *signums: int) -> None:
        """Stop the loop on these signals (e.g. SIGTERM, SIGINT) instead of raising.

        Install them before announcing readiness: a signal that arrives before ``run`` makes
        ``run`` return at once rather than being forgotten.
        """

        def handler(signum: int, _frame: FrameType | None) -> None:
            self._signalled = True
            self.stop(signal.Signals(signum).name)

        for signum in signums:
            self._old_handlers[signum] = signal.signal(signum, handler)

    def run(self) -> None:
        self._running = not self._signalled
        callbacks = self._callbacks
        while self._running:
            timeout = -1.0
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            try:
                ready = self._epoll.poll(timeout)
            except InterruptedError:
                continue
            for fd, _ in ready:
                callback = callbacks.get(fd)
                if callback is not None:
                    callback()
                if not self._running:
                    break
            if self._timers:
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    _, _, timer = heapq.heappop(self._timers)
                    timer()

    def close(self) -> None:
        for signum, old in self._old_handlers.items():
            signal.signal(signum, old)  # type: ignore[arg-type]
        self._epoll.close()
        os.close(self._wakeup_r)
        os.close(self._wakeup_w)

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wakeup_r, 512):
                pass
        except BlockingIOError:
            pass
