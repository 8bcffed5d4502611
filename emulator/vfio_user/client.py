"""A blocking vfio-user client that behaves like QEMU 11.1's ``vfio-user-pci``.

It is the test peer and benchmark driver for our server, so it sends what QEMU sends (the
same capabilities text, argsz values, message sizes and start-up order) and refuses what
QEMU refuses: a reply bigger than QEMU's receive buffer for that request, capabilities QEMU
rejects, more regions or IRQs than QEMU accepts. One request is in flight at a time;
posted writes (NO_REPLY) are not waited for, as in QEMU.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from emulator.errors import EmulatorError
from emulator.vfio_user.codec import Message, Role, VfioUserDecoder, encode, error_reply_for
from emulator.vfio_user.messages import (
    CAP_MAX_BITMAP_SIZE,
    CAP_MAX_DATA_XFER_SIZE,
    CAP_MAX_DMA_MAPS,
    CAP_MAX_MSG_FDS,
    CAP_MIGRATION,
    CAP_PGSIZE,
    CAP_PGSIZES,
    CAP_WRITE_MULTIPLE,
    CAPABILITIES,
    DEFAULT_MAX_DATA_XFER_SIZE,
    HEADER_SIZE,
    MAX_MAX_DATA_XFER_SIZE,
    MAX_MAX_MSG_FDS,
    MULTI_DATA_SIZE,
    MULTI_MAX_WRITES,
    Command,
    DeviceFlags,
    DeviceInfo,
    DmaMap,
    DmaMapFlags,
    DmaUnmap,
    DmaUnmapFlags,
    HeaderFlags,
    IrqIndex,
    IrqInfo,
    IrqInfoFlags,
    IrqSetFlags,
    MsgType,
    Payload,
    RegionAccess,
    RegionCap,
    RegionFlags,
    RegionIndex,
    RegionInfo,
    RegionWriteMulti,
    SetIrqs,
    Version,
    parse_region_caps,
)
from wire.errors import DecodeError, LocalProtocolError, RemoteProtocolError, TransportError
from wire.unix import MAX_FDS_PER_MESSAGE, close_fds, recv_with_fds, send_with_fds

__all__ = [
    "QEMU_CAPABILITIES",
    "RegionDescription",
    "StartupInfo",
    "VfioUserClient",
    "VfioUserError",
    "bar_size",
]

_log = logging.getLogger(__name__)

# What QEMU 11.1 sends in its VERSION command, in its key order (see vm-toolchain notes).
QEMU_CAPABILITIES: Mapping[str, Any] = {
    CAPABILITIES: {
        CAP_PGSIZES: 4096,
        CAP_MAX_MSG_FDS: MAX_MAX_MSG_FDS,
        CAP_MAX_DMA_MAPS: 65535,
        CAP_MAX_DATA_XFER_SIZE: DEFAULT_MAX_DATA_XFER_SIZE,
        CAP_MIGRATION: {CAP_MAX_BITMAP_SIZE: 256 * 1024 * 1024, CAP_PGSIZE: 4096},
        CAP_WRITE_MULTIPLE: True,
    }
}

# Limits QEMU enforces on what a server tells it (hw/vfio-user/device.c, proxy.c).
_QEMU_MAX_REGIONS = 100
_QEMU_MAX_IRQS = 50
_QEMU_DEFAULT_MAX_SEND_FDS = 8
_QEMU_MAX_DMA_MAPS = 65535
_QEMU_MAX_BITMAP = 256 * 1024 * 1024
_PAGE = 4096

_NO_UNMAP_FLAGS = DmaUnmapFlags(0)
_REGION_INFO_ARGSZ = RegionInfo.STRUCT.size
_RECV_SIZE = 256 * 1024

PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_BASE_ADDRESS_0 = 0x10
_NUM_BARS = 6


class VfioUserError(EmulatorError):
    """The server answered a command with an error reply."""

    def __init__(self, command: Command, err: int) -> None:
        super().__init__(f"{command.name} failed: {errno.errorcode.get(err, err)}")
        self.command = command
        self.errno = err


@dataclass(frozen=True, slots=True)
class RegionDescription:
    """A region as QEMU learns it: the info, its parsed capabilities and the mmap fd.

    The caller owns ``fd`` (None when the server sent none).
    """

    info: RegionInfo
    caps: tuple[RegionCap, ...]
    fd: int | None


@dataclass(frozen=True, slots=True)
class StartupInfo:
    """What ``startup()`` learnt, in the order QEMU learns it."""

    version: Version
    device: DeviceInfo
    regions: Mapping[int, RegionDescription]
    irqs: Mapping[int, IrqInfo]
    config: bytes
    bar_sizing: tuple[int, ...]  # what each BAR register read back after writing all-ones


class VfioUserClient:
    """A QEMU-like client on a connected UNIX stream socket (which it then owns)."""

    def __init__(self, sock: socket.socket, *, timeout: float = 5.0) -> None:
        sock.settimeout(timeout)
        self._sock = sock
        self._decoder = VfioUserDecoder(Role.CLIENT)
        self._next_id = 0
        self.server_version: Version | None = None
        self.max_data_xfer_size = DEFAULT_MAX_DATA_XFER_SIZE
        self.max_send_fds = _QEMU_DEFAULT_MAX_SEND_FDS
        self.write_multiple = False

    @classmethod
    def connect(cls, path: str, *, timeout: float = 5.0) -> VfioUserClient:
        """Connect to the server listening on ``path``."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot connect to {path}: {exc}") from exc
        return cls(sock, timeout=timeout)

    def close(self) -> None:
        self._decoder.close()
        self._sock.close()

    def __enter__(self) -> VfioUserClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- generic request/reply ------------------------------------------------------------

    def request(
        self,
        command: Command,
        payload: Payload | None = None,
        fds: Sequence[int] = (),
        *,
        reply_size: int | None = None,
    ) -> Message:
        """Send a command and wait for its reply, which the caller then owns.

        ``reply_size`` is the largest reply accepted (QEMU's receive buffer); it defaults to
        the size of the request, as in QEMU. Raises ``VfioUserError`` on an error reply.
        """
        msg_id, size = self._send(Message(command, self._take_id(), payload, tuple(fds)))
        reply = self._wait(msg_id)
        if reply.is_error:
            raise VfioUserError(command, reply.error)
        limit = size if reply_size is None else reply_size
        if reply.size > limit:
            reply.close()
            raise RemoteProtocolError(
                f"{command.name} reply of {reply.size} bytes exceeds QEMU's buffer of {limit}"
            )
        return reply

    def post(self, command: Command, payload: Payload) -> None:
        """Send a command with NO_REPLY and do not wait (QEMU's posted writes)."""
        self._send(Message(command, self._take_id(), payload, flags=HeaderFlags.NO_REPLY))

    # --- the commands ---------------------------------------------------------------------

    def version(self) -> Version:
        """Negotiate like QEMU: propose 0.0 with QEMU's capabilities, check the answer."""
        reply = self.request(Command.VERSION, Version(0, 0, QEMU_CAPABILITIES)).payload
        if not isinstance(reply, Version) or reply.capabilities is None:
            raise RemoteProtocolError("VERSION reply without NUL-terminated capabilities")
        if reply.major != 0 or reply.minor > 0:
            raise RemoteProtocolError(f"incompatible server version {reply.major}.{reply.minor}")
        self._apply_caps(reply.caps)
        self.server_version = reply
        return reply

    def dma_map(
        self,
        fd: int | None,
        address: int,
        size: int,
        offset: int = 0,
        flags: DmaMapFlags = DmaMapFlags.READ | DmaMapFlags.WRITE,
    ) -> None:
        """Map guest memory; ``fd`` (not closed here) is None for memory without one."""
        fds = () if fd is None else (fd,)
        payload = DmaMap(DmaMap.STRUCT.size, flags, offset if fd is not None else 0, address, size)
        self.request(Command.DMA_MAP, payload, fds).close()

    def dma_unmap(self, address: int, size: int, flags: DmaUnmapFlags = _NO_UNMAP_FLAGS) -> None:
        payload = DmaUnmap(DmaUnmap.STRUCT.size, flags, address, size)
        self.request(Command.DMA_UNMAP, payload).close()

    def device_get_info(self) -> DeviceInfo:
        payload = DeviceInfo(DeviceInfo.STRUCT.size, DeviceFlags(0), 0, 0)
        info = self.request(Command.DEVICE_GET_INFO, payload).payload
        if not isinstance(info, DeviceInfo):
            raise RemoteProtocolError("DEVICE_GET_INFO reply without device info")
        if info.num_regions > _QEMU_MAX_REGIONS or info.num_irqs > _QEMU_MAX_IRQS:
            raise RemoteProtocolError(
                f"QEMU refuses {info.num_regions} regions/{info.num_irqs} irqs"
            )
        return info

    def get_region_info(self, index: int) -> RegionDescription:
        """Ask with argsz 32 first, then again with the argsz the server said it needs."""
        argsz = _REGION_INFO_ARGSZ
        while True:
            request = RegionInfo(argsz, RegionFlags(0), index, 0, 0, 0)
            reply = self.request(
                Command.DEVICE_GET_REGION_INFO, request, reply_size=HEADER_SIZE + argsz
            )
            info = reply.payload
            if not isinstance(info, RegionInfo):
                reply.close()
                raise RemoteProtocolError("GET_REGION_INFO reply without region info")
            if info.argsz <= argsz:
                break
            reply.close()
            argsz = info.argsz
        with reply:
            if info.flags & RegionFlags.CAPS and not (
                _REGION_INFO_ARGSZ <= info.cap_offset <= info.argsz
            ):
                raise RemoteProtocolError(f"region {index} cap_offset {info.cap_offset}")
            caps = parse_region_caps(info)
            return RegionDescription(info, caps, os.dup(reply.fds[0]) if reply.fds else None)

    def get_irq_info(self, index: int) -> IrqInfo:
        payload = IrqInfo(IrqInfo.STRUCT.size, IrqInfoFlags(0), index, 0)
        info = self.request(Command.DEVICE_GET_IRQ_INFO, payload).payload
        if not isinstance(info, IrqInfo):
            raise RemoteProtocolError("GET_IRQ_INFO reply without IRQ info")
        return info

    def set_irqs(
        self,
        index: int,
        flags: IrqSetFlags,
        start: int,
        count: int,
        *,
        fds: Sequence[int] = (),
        data: bytes = b"",
    ) -> None:
        """SET_IRQS as QEMU sends it; eventfds go in chunks of the server's max_msg_fds."""
        if not flags & IrqSetFlags.DATA_EVENTFD or not fds:
            payload = SetIrqs(SetIrqs.STRUCT.size + len(data), flags, index, start, count, data)
            self.request(Command.DEVICE_SET_IRQS, payload).close()
            return
        if len(fds) != count:
            raise LocalProtocolError(f"{len(fds)} eventfds for count {count}")
        for first in range(0, count, max(self.max_send_fds, 1)):
            chunk = fds[first : first + self.max_send_fds]
            payload = SetIrqs(SetIrqs.STRUCT.size, flags, index, start + first, len(chunk))
            self.request(Command.DEVICE_SET_IRQS, payload, chunk).close()

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if count > self.max_data_xfer_size:
            raise LocalProtocolError(f"read of {count} bytes over max_data_xfer_size")
        reply = self.request(
            Command.REGION_READ,
            RegionAccess(offset, index, count),
            reply_size=HEADER_SIZE + RegionAccess.STRUCT.size + count,
        )
        access = reply.payload
        if not isinstance(access, RegionAccess) or access.count > count:
            raise RemoteProtocolError(f"REGION_READ reply does not fit a {count}-byte read")
        return access.data

    def region_write(self, index: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        """Write ``data``; a posted write sets NO_REPLY and returns at once."""
        if len(data) > self.max_data_xfer_size:
            raise LocalProtocolError(f"write of {len(data)} bytes over max_data_xfer_size")
        payload = RegionAccess(offset, index, len(data), data)
        if posted:
            self.post(Command.REGION_WRITE, payload)
        else:
            self.request(Command.REGION_WRITE, payload).close()

    def region_write_multi(self, writes: Sequence[tuple[int, int, bytes]]) -> None:
        """Coalesced posted writes ``(region, offset, data)`` in one message, as QEMU does
        when its queue is full (always NO_REPLY; at most 200 writes of at most 8 bytes).
        """
        if not 0 < len(writes) <= MULTI_MAX_WRITES:
            raise LocalProtocolError(f"{len(writes)} writes in one REGION_WRITE_MULTI")
        entries = []
        for region, offset, data in writes:
            if len(data) > MULTI_DATA_SIZE:
                raise LocalProtocolError(f"{len(data)}-byte write in REGION_WRITE_MULTI")
            entries.append(RegionAccess(offset, region, len(data), data))
        self.post(Command.REGION_WRITE_MULTI, RegionWriteMulti(tuple(entries)))

    def device_reset(self) -> None:
        self.request(Command.DEVICE_RESET).close()

    def config_read(self, offset: int, size: int) -> int:
        """Read a little-endian config-space register of ``size`` bytes."""
        return int.from_bytes(self.region_read(RegionIndex.CONFIG, offset, size), "little")

    def config_write(self, offset: int, value: int | bytes, size: int = 4) -> None:
        """Write a config-space register (an int of ``size`` bytes, or raw bytes)."""
        data = value if isinstance(value, bytes) else value.to_bytes(size, "little")
        self.region_write(RegionIndex.CONFIG, offset, data)

    def startup(self, ram_fd: int, ram_size: int) -> StartupInfo:
        """Replay QEMU 11.1's realize sequence against the server.

        VERSION; DMA_MAP of all RAM at guest address 0; DEVICE_GET_INFO; region info for
        BARs 0-5 and config (argsz 32 probe each); IRQ info for MSI-X, ERR and REQ; the whole
        config space; BAR sizing (all-ones, read back, restore); memory + bus-master enable.
        """
        version = self.version()
        self.dma_map(ram_fd, 0, ram_size)
        device = self.device_get_info()
        regions: dict[int, RegionDescription] = {}
        for index in (*range(_NUM_BARS), RegionIndex.CONFIG):
            regions[index] = self.get_region_info(index)
        irqs: dict[int, IrqInfo] = {}
        for index in (IrqIndex.MSIX, IrqIndex.ERR, IrqIndex.REQ):
            irqs[index] = self.get_irq_info(index)
        config_size = min(regions[RegionIndex.CONFIG].info.size, self.max_data_xfer_size)
        config = self.region_read(RegionIndex.CONFIG, 0, config_size)
        sizing = []
        for bar in range(_NUM_BARS):
            register = PCI_BASE_ADDRESS_0 + 4 * bar
            original = self.config_read(register, 4)
            self.config_write(register, 0xFFFF_FFFF)
            sizing.append(self.config_read(register, 4))
            self.config_write(register, original)
        command = self.config_read(PCI_COMMAND, 2)
        self.config_write(PCI_COMMAND, command | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 2)
        return StartupInfo(version, device, regions, irqs, config, tuple(sizing))

    # --- plumbing -------------------------------------------------------------------------

    def _take_id(self) -> int:
        msg_id = self._next_id
        self._next_id = (msg_id + 1) & 0xFFFF
        return msg_id

    def _apply_caps(self, caps: Mapping[str, Any]) -> None:
        """Take the server's limits, refusing what QEMU's caps_check refuses."""
        fds = caps.get(CAP_MAX_MSG_FDS, self.max_send_fds)
        xfer = caps.get(CAP_MAX_DATA_XFER_SIZE, self.max_data_xfer_size)
        pgsizes = caps.get(CAP_PGSIZES, _PAGE)
        maps = caps.get(CAP_MAX_DMA_MAPS, _QEMU_MAX_DMA_MAPS)
        migration = caps.get(CAP_MIGRATION, {})
        bitmap = migration.get(CAP_MAX_BITMAP_SIZE, _QEMU_MAX_BITMAP)
        migr_pgsize = migration.get(CAP_PGSIZE, _PAGE)
        if fds > MAX_MAX_MSG_FDS or xfer > MAX_MAX_DATA_XFER_SIZE:
            raise RemoteProtocolError(f"server capabilities max_msg_fds={fds} xfer={xfer}")
        if pgsizes % _PAGE or migr_pgsize % _PAGE:
            raise RemoteProtocolError(f"server page sizes {pgsizes:#x}/{migr_pgsize:#x}")
        if maps > _QEMU_MAX_DMA_MAPS or bitmap > _QEMU_MAX_BITMAP:
            raise RemoteProtocolError(f"server max_dma_maps={maps} max_bitmap_size={bitmap}")
        self.max_send_fds = min(fds, MAX_FDS_PER_MESSAGE)
        self.max_data_xfer_size = xfer
        self.write_multiple = bool(caps.get(CAP_WRITE_MULTIPLE, False))

    def _send(self, message: Message) -> tuple[int, int]:
        data, fds = encode(message)
        _log.debug(
            "--> %s id=%d size=%d nfds=%d",
            message.command.name,
            message.msg_id,
            len(data),
            len(fds),
        )
        try:
            send_with_fds(self._sock, data, fds)
        except TimeoutError as exc:
            raise TransportError(f"timed out sending {message.command.name}") from exc
        return message.msg_id, len(data)

    def _wait(self, msg_id: int) -> Message:
        """Read until the reply to ``msg_id`` arrives; answer or drop anything else."""
        while True:
            try:
                message = self._decoder.next_message()
            except DecodeError as exc:
                if exc.fatal or exc.msg_id == msg_id:
                    raise
                _log.warning("dropping bad message from server: %s", exc)
                answer = error_reply_for(exc)
                if answer is not None:
                    send_with_fds(self._sock, answer)
                continue
            if message is None:
                self._receive()
                continue
            _log.debug(
                "<-- %s id=%d size=%d nfds=%d",
                message.command.name,
                message.msg_id,
                message.size,
                len(message.fds),
            )
            if message.type is MsgType.REPLY and message.msg_id == msg_id:
                return message
            message.close()
            if message.reply_expected:
                # DMA_READ/DMA_WRITE: this client shares RAM by fd and serves no socket DMA.
                send_with_fds(self._sock, encode(message.error_reply(errno.ENOSYS))[0])
            else:
                _log.warning("dropping unexpected %s id=%d", message.command.name, message.msg_id)

    def _receive(self) -> None:
        try:
            data, fds = recv_with_fds(self._sock, _RECV_SIZE)
        except TimeoutError as exc:
            raise TransportError("timed out waiting for the server's reply") from exc
        if not data:
            close_fds(fds)
            raise TransportError("server closed the connection")
        self._decoder.feed(data, fds)


def bar_size(readback: int) -> int:
    """Size of a 32-bit memory BAR from its all-ones read-back (0: not implemented)."""
    mask = readback & ~0xF
    return (~mask + 1) & 0xFFFF_FFFF if mask else 0
