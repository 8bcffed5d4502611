"""A scripted vhost-user front-end for tests of back-ends, in lockstep over a real socket.

``LockstepFrontend`` sends one request and reads exactly one reply (when one is due), so every
test is deterministic. ``ChannelPeer`` is the front-end's end of the back-end channel: a thread
that answers SHMEM_MAP/UNMAP with scripted status codes, really ``mmap``-ing what it maps as our
emulator would::

    fe = LockstepFrontend(path)
    fe.negotiate(int(PF.REPLY_ACK | PF.BACKEND_REQ | PF.SHMEM))
    peer = ChannelPeer(fe, [0, 17])   # the first request succeeds, the second is refused
"""

from __future__ import annotations

import mmap
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from vhost_user.codec import Channel, VhostUserDecoder, VhostUserMessage, encode, reply_to, request
from vhost_user.messages import (
    ANSWERED_REQUESTS,
    EMPTY,
    BackendReq,
    FrontendReq,
    Payload,
    VhostUserMMap,
    VhostUserU64,
)
from wire.errors import TransportError
from wire.unix import connect_unix, recv_with_fds, send_with_fds


class LockstepFrontend:
    """Send one request, read exactly one reply. The fds passed stay the caller's."""

    def __init__(self, path: str | Path, timeout: float = 5.0) -> None:
        self.sock = connect_unix(path, timeout)
        self.decoder = VhostUserDecoder(Channel.FRONTEND, expect_replies=True)

    def send(self, msg: VhostUserMessage) -> None:
        data, fds = encode(msg)
        send_with_fds(self.sock, data, fds)

    def send_raw(self, data: bytes, fds: list[int] | None = None) -> None:
        send_with_fds(self.sock, data, fds or [])

    def recv(self) -> VhostUserMessage:
        """The next message; ``EOFError`` when the back-end closed the connection."""
        while (msg := self.decoder.next_message()) is None:
            data, fds = recv_with_fds(self.sock, self.decoder.bytes_needed())
            if not data:
                raise EOFError("back-end closed the connection")
            self.decoder.feed(data, fds)
        return msg

    def call(
        self,
        req: FrontendReq,
        payload: Payload = EMPTY,
        fds: list[int] | None = None,
        *,
        need_reply: bool = False,
    ) -> VhostUserMessage | None:
        """Send ``req``; its reply if one is due (asked for, or a GET_*), else None."""
        self.send(request(req, payload, fds=fds or [], need_reply=need_reply))
        if need_reply or req in ANSWERED_REQUESTS:
            reply = self.recv()
            assert reply.request is req, (req, reply.request)
            return reply
        return None

    def u64(self, req: FrontendReq, payload: Payload = EMPTY, fds: list[int] | None = None) -> int:
        """``req`` with a reply asked for; the reply's u64 (a status for SET_* requests)."""
        reply = self.call(req, payload, fds, need_reply=True)
        assert reply is not None and isinstance(reply.payload, VhostUserU64), reply
        return reply.payload.value

    def negotiate(self, protocol: int) -> None:
        """Ack every offered feature and ``protocol`` (which must be offered); SET_OWNER."""
        features = self.u64(FrontendReq.GET_FEATURES)
        self.call(FrontendReq.SET_FEATURES, VhostUserU64(features))
        offered = self.u64(FrontendReq.GET_PROTOCOL_FEATURES)
        assert offered & protocol == protocol, (hex(offered), hex(protocol))
        self.call(FrontendReq.SET_PROTOCOL_FEATURES, VhostUserU64(protocol))
        self.call(FrontendReq.SET_OWNER)

    def close(self) -> None:
        self.sock.close()
        self.decoder.close()


class ChannelPeer:
    """The front-end's end of the back-end channel, answering SHMEM_MAP/UNMAP in a thread.

    Each request is answered with the next of ``codes`` (a list the test may append to); when
    none is left, with ``then``, or, if ``then`` is None, the thread stops answering. Every
    request is recorded in ``seen`` as (request, payload, the mapped bytes at that moment). With
    ``keep_maps`` a successful map stays mapped in ``maps[(shmid, shm_offset)]`` (writable if
    the request says so) until a successful unmap, as in a real front-end. ``delay`` holds
    each reply back (a slow front-end). ``policy``, when given, decides every status instead of
    ``codes``: it sees the request, its payload and the fd that came with it (or None), e.g.
    ``qemu_map_policy`` refuses what QEMU 11.1 refuses.
    """

    def __init__(
        self,
        fe: LockstepFrontend,
        codes: list[int] | None = None,
        *,
        then: int | None = None,
        keep_maps: bool = False,
        delay: float = 0.0,
        policy: Callable[[BackendReq, VhostUserMMap, int | None], int] | None = None,
    ) -> None:
        self.ours, theirs = socket.socketpair()
        try:
            assert fe.u64(FrontendReq.SET_BACKEND_REQ_FD, EMPTY, [theirs.fileno()]) == 0
        finally:
            theirs.close()
        self.codes = [] if codes is None else codes
        self.then = then
        self.keep_maps = keep_maps
        self.delay = delay
        self.policy = policy
        self.seen: list[tuple[BackendReq, VhostUserMMap, bytes]] = []
        self.maps: dict[tuple[int, int], mmap.mmap] = {}
        self.reply_failed = False
        self.thread = threading.Thread(target=self._run, name="channel-peer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        decoder = VhostUserDecoder(Channel.BACKEND, expect_replies=False)
        try:
            while self.codes or self.then is not None or self.policy is not None:
                while (msg := decoder.next_message()) is None:
                    data, fds = recv_with_fds(self.ours, decoder.bytes_needed())
                    if not data:
                        return
                    decoder.feed(data, fds)
                with msg:
                    # Chosen once the request is here: the test may append codes meanwhile.
                    code = self._decide(msg)
                    assert code is not None
                    self._answer(msg, code)
                    data, _ = encode(reply_to(msg, VhostUserU64(code)))
                time.sleep(self.delay)
                try:
                    send_with_fds(self.ours, data)
                except TransportError:
                    self.reply_failed = True
                    return
        finally:
            decoder.close()

    def _decide(self, msg: VhostUserMessage) -> int | None:
        if self.policy is not None:
            assert isinstance(msg.payload, VhostUserMMap), msg
            fd = msg.fds[0] if msg.fds else None
            return self.policy(BackendReq(msg.request), msg.payload, fd)
        return self.codes.pop(0) if self.codes else self.then

    def _answer(self, msg: VhostUserMessage, code: int) -> None:
        p = msg.payload
        assert isinstance(p, VhostUserMMap), msg
        assert msg.need_reply
        req = BackendReq(msg.request)
        content = b""
        if req is BackendReq.SHMEM_MAP:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if p.writable else 0)
            # Python's mmap will not map past EOF: a map whose last page holds EOF is kept
            # as far as EOF (the rest of that page reads as zeros, as in a real mapping).
            size = os.fstat(msg.fds[0]).st_size
            length = min(p.length, size - p.fd_offset) if size else p.length
            if length <= 0:
                self.seen.append((req, p, bytes(p.length)))
                return
            mapped = mmap.mmap(msg.fds[0], length, prot=prot, offset=p.fd_offset)
            content = bytes(mapped[:length]) + bytes(p.length - length)
            if code == 0 and self.keep_maps:
                self.maps[(p.shmid, p.shm_offset)] = mapped
            else:
                mapped.close()
        elif code == 0 and (p.shmid, p.shm_offset) in self.maps:
            self.maps.pop((p.shmid, p.shm_offset)).close()
        self.seen.append((req, p, content))

    def close(self) -> None:
        self.thread.join(5)
        self.ours.close()
        for mapped in self.maps.values():
            mapped.close()
        self.maps.clear()


def qemu_map_policy(req: BackendReq, p: VhostUserMMap, fd: int | None) -> int:
    """Status 1 where QEMU 11.1's native front-end refuses a SHMEM_MAP for the file's size:
    ``fd_offset + length`` past the end of a non-empty file (its RAM-from-fd size check)."""
    if req is BackendReq.SHMEM_MAP and fd is not None:
        size = os.fstat(fd).st_size
        if size and p.fd_offset + p.length > size:
            return 1
    return 0
