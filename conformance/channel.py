"""The front-end's end of the back-end channel: answer, record and judge every request.

A thread serves the channel for the whole session, because back-ends send SHMEM_MAP while
the tool waits for something else (a control-socket command, a kick's call, the reply to
SET_VRING_KICK). Every request is kept as a ``ChannelEvent`` with its bytes, its fds' facts
(the fds themselves are closed at once) and the rules it broke (``rules.py``). The answer is
what our emulator would answer: 0, or the errno of the broken rule; and once, on purpose, a
refusal (``refuse_next_map``) for ``shmem.refusal``.

Each answer to a request with NEED_REPLY is held back ``AWAIT_WINDOW`` seconds: a request
that arrives meanwhile shows the back-end did not wait for the status it asked for.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import threading
import time
from dataclasses import dataclass, field

from conformance.rules import Problem, map_problems, unmap_problems
from conformance.verdict import Verdict
from conformance.wire import NoReply, PeerLost, RawMessage, read_raw
from vhost_user.codec import VhostUserHeader
from vhost_user.messages import (
    VHOST_USER_VERSION,
    BackendReq,
    VhostUserHeaderFlag,
    VhostUserMMap,
    VhostUserU64,
)
from wire.errors import RemoteProtocolError

AWAIT_WINDOW = 0.02
#: How long the rest of a message may take once its first byte is here.
MESSAGE_DEADLINE = 5.0
#: The status used for the deliberate refusal: "no resources", which the spec names.
REFUSAL = errno.ENOSPC


@dataclass
class ChannelEvent:
    """One back-end request: when (``phase``), what, what we answered, what it broke."""

    phase: str
    msg: RawMessage
    problems: list[Problem] = field(default_factory=list)
    status: int | None = None
    refused_on_purpose: bool = False
    #: An UNMAP of a mapping the last reset dropped (``lifecycle.mappings_after_reset``).
    unmaps_dropped: bool = False
    #: The bytes of our answer, when one was sent.
    reply: bytes | None = None

    @property
    def request(self) -> BackendReq | None:
        try:
            return BackendReq(self.msg.request)
        except ValueError:
            return None

    def describe(self) -> str:
        name = self.request.name if self.request is not None else f"request {self.msg.request}"
        try:
            p = VhostUserMMap.unpack(self.msg.body)
            where = f" shmid {p.shmid} [{p.shm_offset:#x}, +{p.length:#x})"
        except RemoteProtocolError:
            where = ""
        return f"{name}{where} ({self.phase})"


class ChannelRecorder:
    """Serves ``sock`` (our end of the channel) in a thread until ``close``."""

    def __init__(self, sock: socket.socket, regions: dict[int, int] | None) -> None:
        self.sock = sock
        self.regions = regions
        self.phase = "negotiation"
        self.events: list[ChannelEvent] = []
        self.live: dict[tuple[int, int], int] = {}
        self.dropped: dict[tuple[int, int], int] = {}
        self.refuse_next_map = False
        self.error: str | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="check-channel", daemon=True)
        self._thread.start()

    # -- the session's view -----------------------------------------------------------------
    def snapshot(self) -> list[ChannelEvent]:
        with self._lock:
            return list(self.events)

    def front_end_reset(self) -> None:
        """A device reset: the front-end drops every mapping (the spec says so)."""
        with self._lock:
            self.dropped = dict(self.live)
            self.live.clear()

    def wait_for(self, count: int, timeout: float) -> bool:
        """Wait until at least ``count`` events were recorded (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self.events) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    def settle(self, quiet: float, limit: float) -> None:
        """Wait until no request arrived for ``quiet`` seconds (at most ``limit``)."""
        deadline = time.monotonic() + limit
        seen = -1
        while time.monotonic() < deadline:
            with self._lock:
                count = len(self.events)
            if count == seen:
                return
            seen = count
            time.sleep(quiet)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(2)
        self.sock.close()

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.2)
            if not ready:
                continue
            try:
                # A message that started arriving is read whole (or the channel is given up:
                # the stream would be out of step).
                msg = read_raw(self.sock, time.monotonic() + MESSAGE_DEADLINE)
            except (NoReply, PeerLost) as exc:
                if not self._stop.is_set():
                    self.error = str(exc)
                return
            event = self._judge(msg)
            if msg.need_reply and event.status is not None:
                event.problems.extend(self._awaited(msg))
                event.reply = self._reply(msg, event.status)
            with self._changed:
                self.events.append(event)
                self._changed.notify_all()

    def _judge(self, msg: RawMessage) -> ChannelEvent:
        with self._lock:
            event = ChannelEvent(self.phase, msg)
            if msg.request == BackendReq.SHMEM_MAP:
                event.problems = map_problems(msg, self.regions, self.live)
                event.status = self._map_status(event)
            elif msg.request == BackendReq.SHMEM_UNMAP:
                event.problems = unmap_problems(msg, self.live)
                event.status = self._unmap_status(event)
            elif msg.is_reply or msg.version != VHOST_USER_VERSION:
                event.problems = [(Verdict.FAIL, f"not a request: flags {msg.flags:#x}")]
            else:
                event.status = 0 if msg.need_reply else None
            return event

    def _map_status(self, event: ChannelEvent) -> int:
        if any(v is Verdict.FAIL for v, _ in event.problems):
            overlap = any("overlaps" in text for _, text in event.problems)
            return errno.EEXIST if overlap else errno.EINVAL
        if self.refuse_next_map:
            self.refuse_next_map = False
            event.refused_on_purpose = True
            return REFUSAL
        p = VhostUserMMap.unpack(event.msg.body)
        self.live[(p.shmid, p.shm_offset)] = p.length
        return 0

    def _unmap_status(self, event: ChannelEvent) -> int:
        try:
            p = VhostUserMMap.unpack(event.msg.body)
        except RemoteProtocolError:
            return errno.EINVAL
        key = (p.shmid, p.shm_offset)
        if self.live.get(key) == p.length:
            del self.live[key]
            return 0
        if key in self.dropped:
            event.unmaps_dropped = True
        return errno.ENOENT

    def _awaited(self, msg: RawMessage) -> list[Problem]:
        """Hold the answer back a moment: a new request meanwhile means nobody waits for it."""
        ready, _, _ = select.select([self.sock], [], [], AWAIT_WINDOW)
        if not ready:
            return []
        try:
            peek = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:
            return []
        if not peek:
            return []
        return [(Verdict.FAIL, "the back-end sent its next request without awaiting the reply")]

    def _reply(self, msg: RawMessage, status: int) -> bytes:
        flags = VHOST_USER_VERSION | VhostUserHeaderFlag.REPLY
        body = VhostUserU64(status).pack()
        data = VhostUserHeader(msg.request, flags, len(body)).pack() + body
        try:
            self.sock.sendall(data)
        except OSError as exc:
            self.error = f"reply to {msg.request} failed: {exc}"
        return data
