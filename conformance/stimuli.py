"""What makes a back-end do something: a request per device type, and map stimuli.

``KICK_REQUESTS`` holds, per virtio device id, one request the tool knows how to put on a
queue and what counts as its answer (rng: random bytes; blk: GET_ID; fs: FUSE INIT). A
``Stimulus`` makes a back-end send SHMEM_MAP: ``shmem-reference:CONTROL_SOCKET`` asks the
reference device over its control socket (JSON lines, ``vhost_user_backend.control``),
``virtiofs-dax`` sends FUSE CREATE, WRITE, SETUPMAPPING, REMOVEMAPPING, RELEASE and UNLINK on
the request queue (``vhost_user_backend/devices/virtiofs/fuse.py``'s definitions), ``none``
relies on what the back-end maps by itself.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from conformance.memory import GuestMemory, SplitQueue, wait_call
from vhost_user.shmem import PAGE_SIZE
from vhost_user_backend.control import ControlClient
from vhost_user_backend.devices.virtiofs.fuse import (
    KERNEL_MINOR_VERSION,
    KERNEL_VERSION,
    NO_FH,
    ROOT_ID,
    CreateIn,
    EntryOut,
    FuseOpcode,
    InHeader,
    InitIn,
    OpenOut,
    OutHeader,
    ReleaseIn,
    RemoveMappingIn,
    RemoveMappingOne,
    SetupMappingFlag,
    SetupMappingIn,
    WriteIn,
)

VIRTIO_ID_BLK = 2
VIRTIO_ID_RNG = 4
VIRTIO_ID_FS = 26
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_ID_BYTES = 20
DAX_CHUNK = 2 << 20


class StimulusError(Exception):
    """The stimulus could not be applied (not a conformance verdict by itself)."""


@dataclass(frozen=True, slots=True)
class QueueRequest:
    """One request on queue ``queue``: the chain to post and how to judge the answer."""

    queue: int
    name: str
    build: Callable[[GuestMemory], list[tuple[int, int, bool]]]
    #: (guest memory, chain, used length) -> a problem, or "" when the answer is right
    judge: Callable[[GuestMemory, list[tuple[int, int, bool]], int], str]


def _rng_chain(memory: GuestMemory) -> list[tuple[int, int, bool]]:
    return [(memory.alloc(64), 64, True)]


def _rng_judge(memory: GuestMemory, chain: list[tuple[int, int, bool]], length: int) -> str:
    return "" if 0 < length <= 64 else f"used length {length} for a 64-byte buffer"


def _blk_chain(memory: GuestMemory) -> list[tuple[int, int, bool]]:
    header = memory.alloc(16)
    memory.write(header, struct.pack("<IIQ", VIRTIO_BLK_T_GET_ID, 0, 0))
    status = memory.alloc(1)
    memory.write(status, b"\xff")
    return [(header, 16, False), (memory.alloc(VIRTIO_BLK_ID_BYTES), 20, True), (status, 1, True)]


def _blk_judge(memory: GuestMemory, chain: list[tuple[int, int, bool]], length: int) -> str:
    status = memory.read(chain[-1][0], 1)[0]
    # 0 OK, 2 UNSUPP: both are an answer; 0xff means the status byte was never written.
    return "" if status in (0, 2) else f"GET_ID status byte {status:#x}"


class FuseCaller:
    """FUSE requests on a virtio-fs request queue, one at a time."""

    def __init__(
        self, memory: GuestMemory, queue: SplitQueue, kick: int, call: int, timeout: float
    ) -> None:
        self.memory, self.queue, self.kick, self.call_fd = memory, queue, kick, call
        self.timeout = timeout
        self.unique = 0

    def __call__(
        self, opcode: FuseOpcode, nodeid: int, body: bytes = b"", reply_size: int = 4096
    ) -> tuple[int, bytes]:
        """(errno, reply body)."""
        self.unique += 1
        header = InHeader(40 + len(body), opcode, self.unique, nodeid, 0, 0, os.getpid(), 0, 0)
        chain = fuse_chain(self.memory, header.pack() + body, reply_size)
        self.queue.post(chain)
        os.eventfd_write(self.kick, 1)
        used, _ = wait_call(self.call_fd, self.queue, self.timeout)
        if used is None:
            raise StimulusError(f"FUSE {opcode.name}: no answer within {self.timeout:g} s")
        reply = self.memory.read(chain[1][0], used.length)
        if len(reply) < OutHeader.STRUCT.size:
            raise StimulusError(f"FUSE {opcode.name}: {len(reply)}-byte reply")
        out = OutHeader.unpack(reply[: OutHeader.STRUCT.size])
        return -out.error, reply[OutHeader.STRUCT.size :]

    def ok(self, opcode: FuseOpcode, nodeid: int, body: bytes = b"") -> bytes:
        err, data = self(opcode, nodeid, body)
        if err:
            raise StimulusError(f"FUSE {opcode.name} failed: {os.strerror(err)}")
        return data


def fuse_chain(memory: GuestMemory, request: bytes, reply_size: int) -> list[tuple[int, int, bool]]:
    gpa = memory.alloc(len(request))
    memory.write(gpa, request)
    return [(gpa, len(request), False), (memory.alloc(reply_size + 16), reply_size + 16, True)]


def init_body() -> bytes:
    return InitIn(KERNEL_VERSION, KERNEL_MINOR_VERSION, 128 << 10, 0, 0).pack()


def _fs_chain(memory: GuestMemory) -> list[tuple[int, int, bool]]:
    header = InHeader(40 + 64, FuseOpcode.INIT, 1, 0, 0, 0, os.getpid(), 0, 0)
    return fuse_chain(memory, header.pack() + init_body(), 256)


def _fs_judge(memory: GuestMemory, chain: list[tuple[int, int, bool]], length: int) -> str:
    if length < OutHeader.STRUCT.size:
        return f"FUSE INIT answered with {length} bytes"
    out = OutHeader.unpack(memory.read(chain[1][0], OutHeader.STRUCT.size))
    return "" if out.unique == 1 else f"FUSE INIT reply for unique {out.unique}"


KICK_REQUESTS: dict[int, QueueRequest] = {
    VIRTIO_ID_RNG: QueueRequest(0, "virtio-rng: one 64-byte buffer", _rng_chain, _rng_judge),
    VIRTIO_ID_BLK: QueueRequest(0, "virtio-blk: GET_ID", _blk_chain, _blk_judge),
    VIRTIO_ID_FS: QueueRequest(1, "virtio-fs: FUSE INIT on request queue 1", _fs_chain, _fs_judge),
}
#: Queues a device type needs (virtio-fs: hiprio + one request queue).
DEFAULT_QUEUES: dict[int, int] = {VIRTIO_ID_FS: 2}


class Rings(Protocol):
    """What a stimulus needs of the session's activated rings."""

    memory: GuestMemory | None
    queues: list[SplitQueue]
    kicks: list[int]
    calls: list[int]
    timeout: float

    @property
    def regions(self) -> dict[int, int] | None: ...


class Stimulus(Protocol):
    name: str
    virtio_id: int | None

    def fire(self, rings: Rings) -> str:
        """Make the back-end map (and unmap); what was done. ``StimulusError`` if it could
        not be applied."""
        raise NotImplementedError


class NoStimulus:
    name = "none"
    virtio_id: int | None = None

    def fire(self, rings: Rings) -> str:
        return ""


class ShmemReference:
    """The reference device's control socket: two maps, then one unmap."""

    name = "shmem-reference"
    virtio_id: int | None = VIRTIO_ID_RNG

    def __init__(self, control: str) -> None:
        self.control = control

    def fire(self, rings: Rings) -> str:
        shmid = min(rings.regions) if rings.regions else 0
        done = []
        try:
            with ControlClient(self.control, rings.timeout) as client:
                for offset in (0, 2 * PAGE_SIZE):
                    reply = client(
                        "map", shmid=shmid, shm_offset=offset, length=PAGE_SIZE, seed=offset
                    )
                    done.append(f"map {offset:#x}: {'ok' if reply.get('ok') else reply}")
                reply = client("unmap", shmid=shmid, shm_offset=2 * PAGE_SIZE, length=PAGE_SIZE)
                done.append(f"unmap {2 * PAGE_SIZE:#x}: {'ok' if reply.get('ok') else reply}")
        except (OSError, ValueError) as exc:
            raise StimulusError(f"control socket {self.control}: {exc}") from exc
        return "; ".join(done)


class VirtioFsDax:
    """A file created in the shared directory, 8 KiB written, mapped into the DAX window
    (SETUPMAPPING), unmapped (REMOVEMAPPING), mapped again elsewhere and left mapped (the
    reset that follows drops it), closed and removed."""

    name = "virtiofs-dax"
    virtio_id: int | None = VIRTIO_ID_FS

    def fire(self, rings: Rings) -> str:
        if len(rings.queues) < 2 or rings.memory is None:
            raise StimulusError("virtio-fs needs a request queue (queue 1)")
        fuse = FuseCaller(
            rings.memory, rings.queues[1], rings.kicks[1], rings.calls[1], rings.timeout
        )
        fuse.ok(FuseOpcode.INIT, 0, init_body())
        name = f".virtio-emu-check-{os.getpid()}".encode()
        created = fuse.ok(
            FuseOpcode.CREATE,
            ROOT_ID,
            CreateIn(os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600, 0o022, 0).pack() + name + b"\0",
        )
        entry = EntryOut.unpack(created[: EntryOut.SIZE])
        fh = OpenOut.unpack(created[EntryOut.SIZE :]).fh
        steps = ["INIT", "CREATE"]
        try:
            data = bytes(range(256)) * (2 * PAGE_SIZE // 256)
            fuse.ok(
                FuseOpcode.WRITE, entry.nodeid, WriteIn(fh, 0, len(data), 0, 0, 0, 0).pack() + data
            )
            flags = int(SetupMappingFlag.READ)
            err, _ = fuse(
                FuseOpcode.SETUPMAPPING,
                entry.nodeid,
                SetupMappingIn(NO_FH, 0, DAX_CHUNK, flags, 0).pack(),
            )
            steps.append(f"SETUPMAPPING: {_outcome(err)}")
            if not err:
                body = RemoveMappingIn(1).pack() + RemoveMappingOne(0, DAX_CHUNK).pack()
                err, _ = fuse(FuseOpcode.REMOVEMAPPING, entry.nodeid, body)
                steps.append(f"REMOVEMAPPING: {_outcome(err)}")
                # One chunk stays mapped: the reset that follows must drop it silently.
                err, _ = fuse(
                    FuseOpcode.SETUPMAPPING,
                    entry.nodeid,
                    SetupMappingIn(NO_FH, 0, DAX_CHUNK, flags, DAX_CHUNK).pack(),
                )
                steps.append(f"SETUPMAPPING at 2 MiB, left mapped: {_outcome(err)}")
        finally:
            fuse(FuseOpcode.RELEASE, entry.nodeid, ReleaseIn(fh, 0, 0, 0).pack())
            fuse(FuseOpcode.UNLINK, ROOT_ID, name + b"\0")
        return ", ".join(steps)


def _outcome(err: int) -> str:
    return os.strerror(err) if err else "ok"


def parse_device(text: str | None) -> Stimulus:
    """``--device NAME``: ``shmem-reference:CONTROL_SOCKET``, ``virtiofs-dax`` or ``none``."""
    if text is None or text == "none":
        return NoStimulus()
    name, _, arg = text.partition(":")
    if name == "shmem-reference":
        if not arg:
            raise ValueError("shmem-reference needs its control socket: shmem-reference:PATH")
        return ShmemReference(arg)
    if name == "virtiofs-dax" and not arg:
        return VirtioFsDax()
    raise ValueError(
        f"unknown device {text!r}: shmem-reference:CONTROL_SOCKET, virtiofs-dax or none"
    )
