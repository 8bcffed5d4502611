"""One fuzzer per socket, shared by the hypothesis tests and the long campaign.

Each engine takes its choices from a ``Draw``: ``HypothesisDraw`` (shrinkable, for the default
run) or ``RandomDraw`` (cheap, for a million messages). A step sends one hostile message (or
does one hostile thing), waits for the emulator to have processed it (a barrier request the
emulator must answer, so no sleeps), and checks the invariants.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import strategies as st

from emulator.app import Emulator
from emulator.errors import ANY_ERROR
from emulator.shmem import SharedMemoryBar
from emulator.vfio_user import messages as vm
from emulator.vhost_frontend.frontend import VhostUserFrontend
from emulator.virtio.device import QueueConfig
from testkit.procfs import fd_count, fd_table
from tests.fuzz.invariants import (
    InvariantBroken,
    ModelMapping,
    ShmemModel,
    Stats,
    check_alive,
    check_bar_view,
    check_table,
    out_of_region,
)
from tests.fuzz.rig import (
    ACTIONS,
    BACKEND_FEATURES,
    CONFIG_REGION,
    FD_KINDS,
    HEADER,
    MAPPABLE_KINDS,
    PAGE,
    PF,
    SHMEM_BAR,
    WAIT,
    Backing,
    PeerGone,
    RawVfioClient,
    RunningEmulator,
    ScriptedBackend,
    connect_client,
    emulator_config,
    make_backing,
    mmap_request,
    read_channel_reply,
)
from wire.errors import DecodeError
from wire.unix import send_with_fds

T = TypeVar("T")
U64 = (1 << 64) - 1


class Draw:
    """Where a fuzzer's choices come from."""

    def int(self, low: int, high: int) -> int:
        raise NotImplementedError

    def choice(self, options: Sequence[T]) -> T:
        return options[self.int(0, len(options) - 1)]

    def chance(self, percent: int) -> bool:
        return self.int(0, 99) < percent

    def raw(self, size: int) -> bytes:
        return bytes(self.int(0, 255) for _ in range(size))

    def boundary(self, limit: int) -> int:
        """A value near the edges that matter for ``limit`` (a size), or a random aligned one."""
        edges = (0, 1, PAGE - 1, PAGE, limit - PAGE, limit - 1, limit, limit + PAGE, 1 << 63, U64)
        if self.chance(50):
            return max(0, min(U64, self.choice(edges)))
        return self.int(0, max(limit // PAGE, 1)) * PAGE


class RandomDraw(Draw):
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def int(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def raw(self, size: int) -> bytes:
        return self.rng.randbytes(size)


class HypothesisDraw(Draw):
    def __init__(self, data: Any) -> None:
        self.data = data

    def int(self, low: int, high: int) -> int:
        return int(self.data.draw(st.integers(low, high)))

    def raw(self, size: int) -> bytes:
        return bytes(self.data.draw(st.binary(min_size=size, max_size=size)))


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Wait for ``predicate`` using the thread's own clock ticks: polling a condition that
    another thread sets (the emulator's loop) has no event to wait on."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise InvariantBroken(f"timed out waiting for {what}")
        os.sched_yield()


# -- (c) the back-end channel --------------------------------------------------------------------

SHMEM_MAP, SHMEM_UNMAP = 9, 10


class ChannelEngine:
    """Hostile SHMEM_MAP/UNMAP (and anything else) on the back-end channel."""

    def __init__(
        self,
        running: RunningEmulator,
        backend: ScriptedBackend,
        client: RawVfioClient,
        stats: Stats,
        workdir: Path,
    ) -> None:
        self.running = running
        self.backend = backend
        self.client = client
        self.stats = stats
        self.workdir = workdir
        shmem = running.emulator.shmem
        assert shmem is not None
        self.shmem: SharedMemoryBar = shmem
        self.model = ShmemModel.of(shmem)
        self.nonce = 0
        self.steps = 0
        #: Compare the whole BAR every this many steps (1 in tests, more in a campaign).
        self.view_every = 1

    @property
    def channel(self) -> socket.socket:
        channel = self.backend.channel
        assert channel is not None
        return channel

    def reset(self) -> None:
        """Start from an empty table: unmap what the model holds."""
        for shmid, per in self.model.maps.items():
            for mapping in list(per.values()):
                self._send(
                    mmap_request(SHMEM_UNMAP, shmid, 0, mapping.shm_offset, mapping.length, 0)
                )
                status = self._replies(1)
                assert status == [0], f"unmap of a live mapping refused: {status}"
                self.model.remove(shmid, mapping.shm_offset)
        self.check()

    def close(self) -> None:
        self.model.clear()

    def _send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        send_with_fds(self.channel, data, fds)
        self.stats.messages += 1

    def _replies(self, count: int) -> list[int]:
        """Statuses of the next ``count`` replies, then a barrier (answered last, in order)."""
        self._send(mmap_request(SHMEM_UNMAP, 0, 0, 0, 0, 0))
        statuses = []
        for _ in range(count + 1):
            try:
                _, flags, status = read_channel_reply(self.channel)
            except TimeoutError:
                self.stats.hangs += 1
                raise InvariantBroken(
                    "the front-end stopped answering the back-end channel"
                ) from None
            assert flags & 0x4, "reply without the REPLY flag"
            statuses.append(status)
        if statuses[-1] != errno.ENOENT:
            raise InvariantBroken(f"barrier answered {statuses[-1]}, replies out of step")
        return statuses[:-1]

    def check(self) -> None:
        problems = out_of_region(self.shmem)
        self.stats.out_of_region += len(problems)
        check_table(self.shmem, self.model)
        self.steps += 1
        if self.steps % self.view_every == 0:
            check_bar_view(self.client, self.model)
            check_alive(self.running, self.client)

    def step(self, draw: Draw) -> None:
        op = draw.choice(
            ("map",) * 6
            + ("unmap-live",) * 3
            + ("unmap-any", "malformed", "unknown", "truncate")
            + ("guest-write",) * 2
            + ("fatal",)
        )
        try:
            getattr(self, "_op_" + op.replace("-", "_"))(draw)
            self.check()
        except (AssertionError, OSError, PeerGone) as exc:
            if not self.running.alive:
                self.stats.crashes += 1
            raise InvariantBroken(f"{op}: {exc!r}; emulator error: {self.running.error!r}") from exc

    # -- operations ------------------------------------------------------------------------

    def _op_map(self, draw: Draw) -> None:
        shmid = draw.choice((0, 0, 1, 1, 2, 255))
        region = self.model.sizes.get(shmid, 16 * PAGE)
        kind = draw.choice(MAPPABLE_KINDS * 3 + FD_KINDS)
        file_size = draw.choice((0, 5, PAGE, 2 * PAGE, 4 * PAGE, 17 * PAGE, 3 * PAGE + 5))
        if draw.chance(70):
            length = draw.int(1, 4) * PAGE
            shm_offset = draw.int(0, region // PAGE) * PAGE
            fd_offset = draw.int(0, 2) * PAGE
        else:
            length, shm_offset, fd_offset = (draw.boundary(region) for _ in range(3))
        flags = draw.choice((0, 1, 1, 0, 2, 0xFF, 1 << 63))
        nfds = draw.choice((1,) * 8 + (0, 2))
        need_reply = draw.chance(85)
        self.nonce += 1
        before = len(self.shmem)
        backing = make_backing(kind, file_size, self.nonce, self.workdir)
        second = make_backing("memfd-sealable", PAGE, 0) if nfds == 2 else None
        try:
            if kind == "memfd-sealable" and draw.chance(10):
                backing.truncate(PAGE)  # shrunk before the map: the view must show it
            if kind == "dev-zero":
                # A shared mapping of /dev/zero is a new shmem object as long as the mapping,
                # read at the file offset: what lies at offsets past its length faults.
                backing.content = bytearray(min(max(length, 0), region))  # more is refused
            verdict = self._predict_map(shmid, kind, fd_offset, shm_offset, length, flags, nfds)
            fds = [backing.fd] + ([second.fd] if second else []) if nfds else []
            self._send(
                mmap_request(
                    SHMEM_MAP, shmid, fd_offset, shm_offset, length, flags, need_reply=need_reply
                ),
                fds,
            )
            statuses = self._replies(1 if need_reply else 0)
        finally:
            os.close(backing.fd)
            backing.fd = -1
            if second is not None:
                second.close()
        accepted = len(self.shmem) > before
        if need_reply:
            assert (statuses[0] == 0) == accepted, f"status {statuses[0]} but accepted={accepted}"
        if verdict != "either" and (verdict == "accept") != accepted:
            raise InvariantBroken(
                f"SHMEM_MAP shmid={shmid} kind={kind} file={file_size:#x} fd_off={fd_offset:#x} "
                f"shm_off={shm_offset:#x} len={length:#x} flags={flags:#x} nfds={nfds}: "
                f"predicted {verdict}, emulator {'accepted' if accepted else 'refused'}"
            )
        if accepted:
            backing.fd = -1
            self.model.add(
                shmid, ModelMapping(shm_offset, length, fd_offset, bool(flags & 1), backing)
            )
        else:
            backing.close()

    def _predict_map(  # noqa: PLR0917 - one argument per field of the request
        self,
        shmid: int,
        kind: str,
        fd_offset: int,
        shm_offset: int,
        length: int,
        flags: int,
        nfds: int,
    ) -> str:
        size = self.model.sizes.get(shmid)
        if nfds != 1 or flags & ~1 or size is None or length <= 0:
            return "refuse"
        if (shm_offset | fd_offset | length) % PAGE or shm_offset + length > size:
            return "refuse"
        if fd_offset + length > 1 << 63 or self.model.overlaps(shmid, shm_offset, length):
            return "refuse"
        if kind not in MAPPABLE_KINDS:
            return "refuse"  # mmap refuses pipes, sockets, eventfds, directories
        if flags & 1 and kind in ("regular-readonly", "memfd-write-sealed"):
            return "refuse"  # mmap: EACCES, EPERM
        if kind == "dev-zero" and fd_offset >= length:
            return "refuse"  # its first page faults: nothing a guest access could reach
        return "accept"  # past EOF too: a hole there reads zero

    def _op_unmap_live(self, draw: Draw) -> None:
        live = [(shmid, m) for shmid, per in self.model.maps.items() for m in per.values()]
        if not live:
            self._op_unmap_any(draw)
            return
        shmid, mapping = draw.choice(live)
        exact = draw.chance(80)
        length = mapping.length if exact else mapping.length + draw.choice((-PAGE, PAGE, 1))
        need_reply = draw.chance(85)
        self._send(
            mmap_request(
                SHMEM_UNMAP, shmid, 0, mapping.shm_offset, length, 0, need_reply=need_reply
            )
        )
        statuses = self._replies(1 if need_reply else 0)
        if exact:
            self.model.remove(shmid, mapping.shm_offset)
        if need_reply:
            assert (statuses[0] == 0) == exact, f"unmap status {statuses[0]}, exact={exact}"

    def _op_unmap_any(self, draw: Draw) -> None:
        shmid = draw.choice((0, 1, 7))
        offset, length = draw.boundary(16 * PAGE), draw.boundary(16 * PAGE)
        mapping = self.model.maps.get(shmid, {}).get(offset)
        self._send(mmap_request(SHMEM_UNMAP, shmid, 0, offset, length, 0))
        statuses = self._replies(1)
        if mapping is not None and mapping.length == length:
            assert statuses == [0]
            self.model.remove(shmid, offset)
        else:
            assert statuses[0] != 0, "unmap of nothing succeeded"

    def _op_malformed(self, draw: Draw) -> None:
        """Right request, wrong body size, stray fds or the REPLY flag: refused, in sync."""
        request = draw.choice((SHMEM_MAP, SHMEM_UNMAP, 2))
        size = draw.choice((0, 1, 39, 41, 48, 4096))
        flags = draw.choice((0x1 | 0x8, 0x1 | 0x8 | 0x4, 0x1 | 0x8))
        kinds = [draw.choice(FD_KINDS) for _ in range(draw.choice((0, 0, 1, 3)))]
        backings = [make_backing(k, PAGE, 3, self.workdir) for k in kinds]
        try:
            body = draw.raw(size)
            self._send(HEADER.pack(request, flags, size) + body, [b.fd for b in backings])
            statuses = self._replies(1)
        finally:
            for backing in backings:
                backing.close()
        ok_body = size == (40 if request in (SHMEM_MAP, SHMEM_UNMAP) else 0)
        if not ok_body or flags & 0x4:
            assert statuses[0] != 0, "a malformed request was accepted"

    def _op_unknown(self, draw: Draw) -> None:
        """Request codes the channel does not serve (0, other back-end requests, unknown)."""
        request = draw.choice((0, 1, 3, 4, 5, 6, 7, 8, 11, 12, 99, 0xFFFF_FFFF))
        size = draw.choice((0, 8, 40, 64))
        need_reply = draw.chance(80)
        self._send(HEADER.pack(request, 0x1 | (0x8 if need_reply else 0), size) + draw.raw(size))
        statuses = self._replies(1 if need_reply else 0)
        if need_reply:
            assert statuses[0] != 0, f"request {request} answered with success"

    def _op_truncate(self, draw: Draw) -> None:
        """The back-end shrinks a file under a live mapping (unless it sealed the file itself)."""
        live = self.model.mappings()
        if live:
            mapping = draw.choice(live)
            mapping.backing.truncate(draw.choice((0, PAGE // 2, PAGE)))

    def _op_guest_write(self, draw: Draw) -> None:
        offset = draw.int(0, self.model.bar_size - 1)
        writable = [
            (shmid, m) for shmid, per in self.model.maps.items() for m in per.values() if m.writable
        ]
        if writable and draw.chance(50):
            # Around the file's end, where a hole starts (or EOF's page goes on past it).
            shmid, mapping = draw.choice(writable)
            assert mapping.backing.content is not None
            eof = len(mapping.backing.content) - mapping.fd_offset + draw.int(-8, 8)
            start = self.model.bar_offsets[shmid] + mapping.shm_offset
            offset = start + min(max(eof, 0), mapping.length - 1)
        size = draw.choice((1, 2, 4, 8, 100, PAGE, 2 * PAGE))
        size = min(size, self.model.bar_size - offset)
        data = draw.raw(size)
        reply = self.client.region_write(SHMEM_BAR, offset, data)
        assert not reply.is_error, f"BAR 4 write refused: {reply.error}"
        self.model.guest_write(offset, data)

    def _op_fatal(self, draw: Draw) -> None:
        """Framing the front-end cannot recover from: it drops the back-end and reconnects."""
        how = draw.choice(("bad-version", "huge-size", "partial-close"))
        old_connections = self.backend.connections
        if how == "bad-version":
            self._send(HEADER.pack(SHMEM_UNMAP, 0x2 | 0x8, 40) + bytes(40))
        elif how == "huge-size":
            self._send(HEADER.pack(SHMEM_UNMAP, 0x1 | 0x8, 0xFFFF_FFFF))
        else:
            self._send(HEADER.pack(SHMEM_MAP, 0x1 | 0x8, 40) + bytes(10))
            self.backend.drop_channel()
        if self.backend.channel is not None:
            try:
                read_channel_reply(self.channel)
                raise InvariantBroken(f"{how}: the front-end answered instead of disconnecting")
            except PeerGone:
                pass
        self.backend.drop_channel()
        self.model.clear()
        _wait_for(
            lambda: (
                self.backend.connections > old_connections and self.backend.channel_ready.is_set()
            ),
            "the front-end to reconnect",
        )
        self.stats.sessions += 1


# -- (a) the vfio-user socket -------------------------------------------------------------------

BARRIER_ID = 0xFFFF
_COMMANDS = [int(c) for c in vm.Command]


def _payload_for(command: int, draw: Draw) -> bytes:
    """A structurally valid payload for ``command`` with boundary field values."""
    region = draw.choice((0, 1, 2, 4, 7, 8, 9, 0xFFFF_FFFF))
    if command == vm.Command.VERSION:
        caps = draw.choice(
            (
                b'{"capabilities":{}}',
                b'{"capabilities":{"max_msg_fds":99999}}',
                b"{",
                b"",
                b'{"capabilities":[]}',
                b'{"capabilities":{"max_data_xfer_size":-1}}',
            )
        )
        return (
            struct.pack("<HH", draw.choice((0, 0, 1, 0xFFFF)), draw.choice((0, 1)))
            + caps
            + b"\0" * draw.int(0, 1)
        )
    if command == vm.Command.DMA_MAP:
        return struct.pack(
            "<IIQQQ",
            32,
            draw.int(0, 7),
            draw.boundary(1 << 20),
            draw.boundary(1 << 30),
            draw.boundary(1 << 20),
        )
    if command == vm.Command.DMA_UNMAP:
        return struct.pack(
            "<IIQQ", 24, draw.int(0, 3), draw.boundary(1 << 30), draw.boundary(1 << 20)
        )
    if command in (vm.Command.DEVICE_GET_INFO,):
        return struct.pack("<IIII", draw.choice((0, 16, 32, U64 & 0xFFFFFFFF)), 0, 0, 0)
    if command == vm.Command.DEVICE_GET_REGION_INFO:
        return struct.pack("<IIIIQQ", draw.choice((0, 32, 4096)), 0, region, 0, 0, 0)
    if command == vm.Command.DEVICE_GET_REGION_IO_FDS:
        return struct.pack("<IIII", draw.choice((16, 4096)), 0, region, 0)
    if command == vm.Command.DEVICE_GET_IRQ_INFO:
        return struct.pack("<IIII", 16, 0, draw.choice((0, 1, 2, 3, 4, 5, 99)), 0)
    if command == vm.Command.DEVICE_SET_IRQS:
        count = draw.choice((0, 1, 2, 3, 0xFFFF_FFFF))
        flags = draw.choice((0x21, 0x24, 0x22, 0x09, 0x11, 0x0C, 0x3F, 0))
        data = draw.raw(count if flags & 0x2 and count < 16 else 0)
        return (
            struct.pack(
                "<IIIII",
                20 + len(data),
                flags,
                draw.choice((0, 2, 3, 4, 5, 9)),
                draw.choice((0, 1, 0xFFFF_FFFF)),
                count,
            )
            + data
        )
    if command in (vm.Command.REGION_READ, vm.Command.REGION_WRITE):
        count = draw.choice((0, 1, 2, 4, 8, 64, 4096, 1 << 20, (1 << 20) + 1))
        offset = draw.boundary(1 << 16)
        data = (
            draw.raw(min(count, 64)) * (count // 64 or 1)
            if command == vm.Command.REGION_WRITE
            else b""
        )
        return struct.pack("<QII", offset, region, count) + data[:count]
    if command == vm.Command.REGION_WRITE_MULTI:
        n = draw.choice((0, 1, 2, 65))
        entry = struct.pack("<QII", draw.boundary(4096), region, 4) + draw.raw(4) + bytes(12)
        return entry * n
    if command in (vm.Command.DMA_READ, vm.Command.DMA_WRITE):
        return struct.pack("<QQ", draw.boundary(1 << 20), draw.int(0, 16)) + draw.raw(
            draw.int(0, 16)
        )
    return draw.raw(draw.choice((0, 4, 16)))


class VfioEngine:
    """Hostile vfio-user clients, one session after another, on the server at ``path``."""

    def __init__(
        self,
        path: Path,
        stats: Stats,
        workdir: Path,
        alive: Callable[[], bool],
        fds: Callable[[], int],
    ) -> None:
        self.path = path
        self.stats = stats
        self.workdir = workdir
        self.alive = alive
        self.fds = fds
        self.baseline: int | None = None

    def session(self, draw: Draw, steps: int) -> None:
        """Connect, send ``steps`` hostile messages (each followed by a barrier), end badly."""
        client = connect_client(self.path)
        try:
            count = self.fds()
            if self.baseline is None:
                self.baseline = count
            elif count != self.baseline:
                self.stats.leaked_fds += count - self.baseline
                raise InvariantBroken(f"emulator holds {count} fds, {self.baseline} at the start")
            self.stats.sessions += 1
            for _ in range(steps):
                if not self._step(client, draw):
                    return
            self._end(client, draw)
        finally:
            client.close()

    def _step(self, client: RawVfioClient, draw: Draw) -> bool:
        """One message; False when the server (rightly) dropped the connection."""
        if draw.chance(25):
            return self._guest_access(client, draw)
        command = draw.choice(_COMMANDS * 3 + [0, 13, 99, 0xFFFF])
        body = _payload_for(command, draw)
        mutation = draw.int(0, 9)
        if mutation == 0 and body:
            body = body[: draw.int(0, len(body) - 1)]
        elif mutation == 1:
            body += draw.raw(draw.choice((1, 8, 64)))
        elif mutation == 2 and body:
            index = draw.int(0, len(body) - 1)
            body = body[:index] + bytes([body[index] ^ (1 << draw.int(0, 7))]) + body[index + 1 :]
        flags = draw.choice((0,) * 8 + (0x10, 0x1, 0x20, 0x30, 0x40, 0x2))
        msg_id = draw.int(0, BARRIER_ID - 1)
        size = 16 + len(body)
        fatal = False
        if draw.chance(3):
            size = draw.choice((0, 15, (1 << 20) + 64, 0xFFFF_FFFF))
            fatal = True
        fatal = fatal or not 16 <= size <= vm.DEFAULT_MAX_MSG_SIZE
        fatal = fatal or not 16 <= size <= vm.DEFAULT_MAX_MSG_SIZE
        kinds = [draw.choice(FD_KINDS) for _ in range(draw.choice((0,) * 12 + (1, 1, 2, 17)))]
        fatal = fatal or len(kinds) > 16
        backings = [make_backing(k, PAGE, 5, self.workdir) for k in kinds]
        reply_expected = not fatal and flags & 0xF == 0 and not flags & 0x10
        try:
            client.send_raw(
                struct.pack("<HHIII", msg_id, command, size, flags, 0) + body,
                [b.fd for b in backings],
            )
            self.stats.messages += 1
        except PeerGone:
            return self._dropped(
                fatal,
                f"while sending command {command} flags {flags:#x} "
                f"size {size} body {len(body)} fds {kinds}",
            )
        finally:
            for backing in backings:
                backing.close()
        if fatal:
            # The server must drop us: read until end of stream.
            try:
                while True:
                    client.receive().close()
            except PeerGone:
                return False
            except DecodeError as exc:
                raise InvariantBroken(f"server sent an undecodable message: {exc}") from exc
        barrier = vm.RegionAccess(0, CONFIG_REGION, 2).pack()
        seen: list[int] = []
        try:
            client.send_raw(
                struct.pack("<HHIII", BARRIER_ID, vm.Command.REGION_READ, 16 + len(barrier), 0, 0)
                + barrier
            )
            self.stats.messages += 1
            reply = client.wait_reply(BARRIER_ID, seen)
        except PeerGone:
            return self._dropped(False, f"after command {command} flags {flags:#x}")
        except TimeoutError:
            self.stats.hangs += 1
            raise InvariantBroken(f"no answer after command {command} flags {flags:#x}") from None
        assert not reply.is_error, "config read refused"
        answered = [i for i in seen if i == msg_id]
        if reply_expected and len(answered) != 1:
            raise InvariantBroken(f"command {command} id {msg_id} got {len(answered)} replies")
        if not reply_expected and answered:
            raise InvariantBroken(f"command {command} flags {flags:#x} was answered")
        return True

    def _guest_access(self, client: RawVfioClient, draw: Draw) -> bool:
        """A well-formed BAR 4 access between the hostile messages, as a guest makes them: the
        server's C hot path serves these, and the same barrier checks its replies."""
        size = 1 << 16  # the campaign's BAR: one 64 KiB region
        count = draw.choice((1, 2, 4, 8, 16, PAGE, size))
        offset = draw.int(0, size - count)
        command = draw.choice((vm.Command.REGION_READ, vm.Command.REGION_WRITE))
        posted = command == vm.Command.REGION_WRITE and draw.chance(50)
        data = (
            draw.raw(min(count, 16)).ljust(count, b"\0")
            if command == vm.Command.REGION_WRITE
            else b""
        )
        body = struct.pack("<QII", offset, SHMEM_BAR, count) + data
        msg_id = draw.int(0, BARRIER_ID - 1)
        header = struct.pack("<HHIII", msg_id, command, 16 + len(body), 0x10 if posted else 0, 0)
        try:
            client.send_raw(header + body)
            self.stats.messages += 1
            if posted:
                return True
            reply = client.wait_reply(msg_id, [])
        except PeerGone:
            return self._dropped(False, f"after a guest {command.name} {count}@{offset:#x}")
        except TimeoutError:
            self.stats.hangs += 1
            raise InvariantBroken(f"no answer to a guest {command.name}") from None
        expected = count if command == vm.Command.REGION_READ else 0
        payload = reply.payload
        if (
            reply.is_error
            or not isinstance(payload, vm.RegionAccess)
            or len(payload.data) != expected
        ):
            raise InvariantBroken(f"guest {command.name} {count}@{offset:#x} answered {reply}")
        return True

    def _dropped(self, expected: bool, when: str) -> bool:
        if not self.alive():
            self.stats.crashes += 1
            raise InvariantBroken(f"the emulator died {when}")
        if not expected:
            raise InvariantBroken(f"the server dropped the client {when}")
        return False

    def _end(self, client: RawVfioClient, draw: Draw) -> None:
        """Abrupt close, half a message then close, or a clean one."""
        how = draw.int(0, 2)
        if how == 1:
            with_fd = make_backing("eventfd", 0, 0)
            try:
                client.send_raw(
                    struct.pack("<HHIII", 1, vm.Command.REGION_WRITE, 64, 0, 0)[: draw.int(1, 16)],
                    [with_fd.fd],
                )
            except PeerGone:
                pass
            finally:
                with_fd.close()
        elif how == 2:
            client.sock.shutdown(socket.SHUT_WR)


def region_exercise(client: RawVfioClient) -> None:
    """A well-behaved client's reads: the config space and all of BAR 4."""
    check_config = client.region_read(CONFIG_REGION, 0, 64)
    assert check_config[:2] == b"\xf4\x1a"


# -- (b) the vhost-user front-end connection ------------------------------------------------------


class FrontendEngine:
    """Hostile back-ends at each step of negotiation and of the front-end's later requests."""

    def __init__(self, workdir: Path, stats: Stats) -> None:
        self.workdir = workdir
        self.stats = stats

    def session(self, draw: Draw) -> None:
        bad_at = draw.int(0, 24)
        bad_action = draw.choice(ACTIONS[1:])
        actions = {bad_at: bad_action}
        if draw.chance(30):
            actions[draw.int(0, 24)] = draw.choice(ACTIONS[1:])

        def policy(_req: Any, index: int) -> str:
            return actions.get(index, "normal")

        protocol = 0
        for feature in (PF.MQ, PF.REPLY_ACK, PF.BACKEND_REQ, PF.CONFIG, PF.RESET_DEVICE, PF.SHMEM):
            if draw.chance(85):
                protocol |= feature
        regions = draw.choice(
            ({0: 4 * PAGE}, {0: 4 * PAGE, 3: 2 * PAGE}, {}, {0: 100}, {255: PAGE})
        )
        features = BACKEND_FEATURES if draw.chance(90) else 0
        queues = draw.choice((1, 1, 0, 4))
        baseline = fd_count()
        before = fd_table()
        sock = self.workdir / "hostile.sock"
        config = emulator_config(
            self.workdir,
            vhost_user_socket=sock,
            backend_timeout=0.2,
            vfio_user_socket=self.workdir / "unused.sock",
        )
        backend = ScriptedBackend(
            sock,
            regions=regions,
            protocol=protocol,
            features=features,
            queues=queues,
            policy=policy,
        )
        started = time.monotonic()
        try:
            try:
                emulator = Emulator(config)
            except ANY_ERROR:
                emulator = None
            if emulator is not None:
                try:
                    self._exercise(emulator.frontend, draw)
                finally:
                    emulator.close()
        finally:
            elapsed = time.monotonic() - started
            backend.close()
            self.stats.messages += backend.messages_in + backend.messages_out
            self.stats.sessions += 1
        if backend.errors:
            raise InvariantBroken(f"scripted back-end failed: {backend.errors[0]!r}")
        if elapsed > 25 * config.backend_timeout + 5:
            self.stats.hangs += 1
            raise InvariantBroken(f"session took {elapsed:.1f} s")
        now = fd_count()
        if now != baseline:
            self.stats.leaked_fds += now - baseline
            new = sorted(set(fd_table().items()) - set(before.items()))
            raise InvariantBroken(f"{now - baseline} fds leaked by a session with {actions}: {new}")

    def _exercise(self, frontend: VhostUserFrontend | None, draw: Draw) -> None:
        """What a guest makes the front-end ask: config, activation, reset."""
        if frontend is None:
            return
        memfd = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC)
        os.ftruncate(memfd, 16 * PAGE)
        try:
            frontend.memory.map(0, 16 * PAGE, fd=memfd)  # lent: the memory keeps a dup
        finally:
            os.close(memfd)
        queue = QueueConfig(0, 8, 0xFFFF, 0, PAGE, 2 * PAGE)
        active = False
        for _ in range(draw.int(1, 4)):
            op = draw.int(0, 3)
            if op == 2 and active:
                op = 3  # the transport activates once per reset; so do we
            active = op == 2 or (active and op != 3)
            try:
                if op == 0:
                    frontend.read_config(0, 4)
                elif op == 1:
                    frontend.write_config(0, b"\1\2\3\4")
                elif op == 2:
                    frontend.activate(1 << 32, [queue])
                else:
                    frontend.deactivate()
            except ANY_ERROR:
                if frontend.connected:
                    raise InvariantBroken(
                        "front-end refused a reply but kept the connection"
                    ) from None
        frontend.memory.unmap_all()


__all__ = [
    "Backing",
    "ChannelEngine",
    "FrontendEngine",
    "HypothesisDraw",
    "RandomDraw",
    "VfioEngine",
]
