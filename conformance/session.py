"""One connection to the back-end with everything the tool set up on it.

``Session`` owns the peer, the back-end channel recorder, guest memory, rings, kick and call
eventfds, and closes them all in ``close``. Its methods are the front-end's sequences (QEMU's
negotiation order, crosvm's activation order); the runner judges their outcome.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field

from conformance.channel import ChannelRecorder
from conformance.memory import MAX_QUEUES, GuestMemory, SplitQueue
from conformance.peer import BackendFailed, Exchange, FrontendPeer
from conformance.rules import parse_shmem_config
from vhost_user.messages import (
    SHMEM_FEATURE_BIT_DRAFT,
    SHMEM_FEATURE_BIT_RUST_VMM,
    SHMEM_FEATURE_BIT_UPSTREAM,
    VHOST_USER_F_PROTOCOL_FEATURES,
    FrontendReq,
    VhostUserMemory,
    VhostUserProtocolFeature,
    VhostUserU64,
    VhostUserVringAddr,
    VhostUserVringState,
)
from wire.unix import close_fds

PF = VhostUserProtocolFeature
VIRTIO_F_VERSION_1 = 1 << 32
PROTOCOL_FEATURES = 1 << VHOST_USER_F_PROTOCOL_FEATURES
#: What a shared-memory front-end uses when offered (SHMEM is added at the bit offered).
WANTED = PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ | PF.BACKEND_SEND_FD | PF.CONFIG | PF.RESET_DEVICE


def shmem_bit_offered(offered: int) -> int | None:
    """The bit the back-end means shared memory by: 22, else 20 or 21 (the old numberings)."""
    for bit in (SHMEM_FEATURE_BIT_UPSTREAM, SHMEM_FEATURE_BIT_DRAFT, SHMEM_FEATURE_BIT_RUST_VMM):
        if offered & (1 << bit):
            return bit
    return None


@dataclass
class Negotiated:
    features: int = 0
    protocol_offered: int = 0
    protocol_acked: int = 0
    shmem_bit: int | None = None
    queue_num: int | None = None
    regions: dict[int, int] | None = None
    exchanges: dict[str, Exchange] = field(default_factory=dict)

    def has(self, feature: VhostUserProtocolFeature) -> bool:
        return bool(self.protocol_acked & feature)


class Session:
    """One connection; ``close`` releases everything it holds."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.timeout = timeout
        self.peer = FrontendPeer(sock, timeout)
        self.n = Negotiated()
        self.recorder: ChannelRecorder | None = None
        self.memory: GuestMemory | None = None
        self.queues: list[SplitQueue] = []
        self.kicks: list[int] = []
        self.calls: list[int] = []
        self.active = False

    @property
    def regions(self) -> dict[int, int] | None:
        return self.n.regions

    # -- negotiation --------------------------------------------------------------------------
    def get_features(self) -> Exchange:
        exchange = self.peer.call(FrontendReq.GET_FEATURES)
        self.n.features = exchange.u64() or 0
        return exchange

    def get_protocol_features(self) -> Exchange:
        exchange = self.peer.call(FrontendReq.GET_PROTOCOL_FEATURES)
        self.n.protocol_offered = exchange.u64() or 0
        return exchange

    def set_protocol_features(self) -> Exchange:
        offered = self.n.protocol_offered
        self.n.shmem_bit = shmem_bit_offered(offered)
        shmem = 0 if self.n.shmem_bit is None else 1 << self.n.shmem_bit
        self.n.protocol_acked = offered & (int(WANTED) | shmem)
        return self.peer.call(
            FrontendReq.SET_PROTOCOL_FEATURES, VhostUserU64(self.n.protocol_acked)
        )

    def driver_features(self) -> int:
        return self.n.features & (VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES)

    def open_channel(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            self.peer.ack(FrontendReq.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.recorder = ChannelRecorder(ours, self.n.regions)

    def get_shmem_config(self) -> Exchange:
        exchange = self.peer.call(FrontendReq.GET_SHMEM_CONFIG)
        assert exchange.reply is not None
        config, _ = parse_shmem_config(exchange.reply.body)
        if config is not None:
            self.n.regions = config.regions()
            if self.recorder is not None:
                self.recorder.regions = self.n.regions
        return exchange

    def negotiate(self, *, shmem_config: bool = True) -> None:
        """The whole negotiation without judging it (a fresh connection for a later check)."""
        self.get_features()
        if self.n.features & PROTOCOL_FEATURES:
            self.get_protocol_features()
            self.set_protocol_features()
            self.peer.ack_all = self.n.has(PF.REPLY_ACK)
        self.peer.ack(FrontendReq.SET_OWNER)
        if self.n.has(PF.MQ):
            self.n.queue_num = self.peer.call(FrontendReq.GET_QUEUE_NUM).u64()
        if self.n.has(PF.BACKEND_REQ):
            self.open_channel()
        if shmem_config and self.n.shmem_bit is not None:
            self.get_shmem_config()

    # -- rings --------------------------------------------------------------------------------
    def activate(self, num_queues: int) -> list[Exchange]:
        """SET_FEATURES, SET_MEM_TABLE, then per queue NUM, ADDR, BASE, CALL, KICK, ENABLE.
        ``BackendFailed`` at the first refusal."""
        if self.memory is None:
            self.memory = GuestMemory()
        self.memory.reset_buffers()
        self._close_eventfds()
        self.queues = [SplitQueue(self.memory, q) for q in range(min(num_queues, MAX_QUEUES))]
        done = [self.peer.ack(FrontendReq.SET_FEATURES, VhostUserU64(self.driver_features()))]
        table = VhostUserMemory((self.memory.region,))
        done.append(self.peer.ack(FrontendReq.SET_MEM_TABLE, table, [self.memory.fd]))
        for queue in self.queues:
            q = queue.index
            kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.kicks.append(kick)
            self.calls.append(call)
            desc, used, avail = queue.addresses()
            done += [
                self.peer.ack(FrontendReq.SET_VRING_NUM, VhostUserVringState(q, queue.size)),
                self.peer.ack(
                    FrontendReq.SET_VRING_ADDR, VhostUserVringAddr(q, 0, desc, used, avail, 0)
                ),
                self.peer.ack(FrontendReq.SET_VRING_BASE, VhostUserVringState(q, 0)),
                self.peer.ack(FrontendReq.SET_VRING_CALL, VhostUserU64(q), [call]),
                self.peer.ack(FrontendReq.SET_VRING_KICK, VhostUserU64(q), [kick]),
            ]
            if self.n.features & PROTOCOL_FEATURES:
                done.append(self.peer.ack(FrontendReq.SET_VRING_ENABLE, VhostUserVringState(q, 1)))
        self.active = True
        return done

    def stop_rings(self) -> list[tuple[int, Exchange]]:
        """GET_VRING_BASE on every queue (it stops the ring)."""
        answers = []
        for queue in self.queues:
            state = VhostUserVringState(queue.index, 0)
            answers.append((queue.index, self.peer.call(FrontendReq.GET_VRING_BASE, state)))
        self.active = False
        return answers

    def alive(self) -> bool:
        """Does the back-end still answer (GET_FEATURES within the timeout)?"""
        try:
            return self.peer.call(FrontendReq.GET_FEATURES).reply is not None
        except (BackendFailed, OSError):
            return False

    # -- teardown -----------------------------------------------------------------------------
    def _close_eventfds(self) -> None:
        close_fds(self.kicks + self.calls)
        self.kicks, self.calls = [], []

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
        with contextlib.suppress(OSError):
            self.peer.close()
        self._close_eventfds()
        if self.memory is not None:
            self.memory.close()
            self.memory = None
