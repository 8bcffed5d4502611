"""Interrupts as eventfds handed over by the vfio-user client (DEVICE_SET_IRQS).

Every VFIO IRQ index works the same way: MSI-X (one interrupt per vector), INTx, ERR and
REQ (one each). QEMU emulates the MSI-X table itself; we only get one eventfd per
interrupt. Writing to it injects the interrupt, so a vhost-user back-end given the same
eventfd as its call fd interrupts the guest without passing through Python.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)


class IrqEventfds:
    """Eventfds, mask and pending bits for the ``count`` interrupts of one VFIO IRQ index.

    Interrupt ``n`` is MSI-X vector ``n`` for the MSI-X index; INTx, ERR and REQ have only
    interrupt 0. Owns the eventfds.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self._eventfds: list[int | None] = [None] * count
        self._masked = [False] * count
        self._pending = [False] * count
        self._broken: set[int] = set()
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever the eventfd of any vector changes."""
        self._listeners.append(listener)

    def eventfd(self, vector: int) -> int | None:
        """The eventfd that injects ``vector``, if the client gave one."""
        if 0 <= vector < self.count:
            return self._eventfds[vector]
        return None

    def set_eventfds(self, start: int, fds: Sequence[int | None]) -> None:
        """Install ``fds`` from vector ``start`` on. They are lent: each vector keeps a ``dup``
        and closes the one it replaces."""
        if start < 0 or start + len(fds) > self.count:
            raise ValueError(f"vectors {start}..{start + len(fds)} outside 0..{self.count}")
        kept = [None if fd is None else os.dup(fd) for fd in fds]
        for vector, fd in enumerate(kept, start):
            old = self._eventfds[vector]
            if old is not None:
                os.close(old)
            if fd is not None:
                # Never block the loop on a client's fd (a pipe whose reader stopped).
                with contextlib.suppress(OSError):
                    os.set_blocking(fd, False)
            self._eventfds[vector] = fd
            self._broken.discard(vector)
        self._notify()

    def disable(self) -> None:
        """Drop every eventfd (SET_IRQS with DATA_NONE and count 0)."""
        changed = any(fd is not None for fd in self._eventfds)
        for vector in range(self.count):
            self._close(vector)
        self._masked = [False] * self.count
        self._pending = [False] * self.count
        if changed:
            self._notify()

    def set_masked(self, start: int, count: int, masked: bool) -> None:
        """Mask or unmask vectors; unmasking delivers what became pending meanwhile."""
        for vector in range(max(start, 0), min(start + count, self.count)):
            self._masked[vector] = masked
            if not masked and self._pending[vector]:
                self._pending[vector] = False
                self.trigger(vector)

    def trigger(self, vector: int) -> bool:
        """Inject ``vector``; returns False if it has no eventfd or is masked (then pending)."""
        if not 0 <= vector < self.count:
            return False
        if self._masked[vector]:
            self._pending[vector] = True
            return False
        fd = self._eventfds[vector]
        if fd is None:
            return False
        try:
            os.eventfd_write(fd, 1)
        except OSError as exc:
            # The client handed us something that is not a writable, non-full eventfd (a
            # pipe's read end, a full pipe): the interrupt is lost, the emulator must not be.
            if vector not in self._broken:
                self._broken.add(vector)
                logger.warning("vector %d: cannot signal fd %d: %s", vector, fd, exc)
            return False
        return True

    def pending_bits(self) -> int:
        """The Pending Bit Array as an integer (bit n = vector n)."""
        return sum(1 << vector for vector, pending in enumerate(self._pending) if pending)

    def close(self) -> None:
        for vector in range(self.count):
            self._close(vector)

    def _close(self, vector: int) -> None:
        fd = self._eventfds[vector]
        if fd is not None:
            self._eventfds[vector] = None
            os.close(fd)

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()
