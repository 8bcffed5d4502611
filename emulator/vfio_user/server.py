"""The vfio-user server: one UNIX socket, one client at a time, one handler per command.

Two kinds of message, each with one path. The hot ones, a guest's accesses to the
shared-memory BAR and its kicks of running queues (nearly all the traffic), are served in C
(``hotpath.HotPath``, emulator/hotpath/hotpath.c): when the socket is readable ``_on_readable``
calls ``drain()``, which receives every waiting message, answers the hot ones with
``process_vm_readv/writev`` or an eventfd write, sends their replies, and stops at the first
other message. That one comes back here byte for byte with its fds and takes the straight
line through this file: the codec decodes it, ``_handle`` picks the handler, the handler asks
the ``PciDevice`` and returns the reply, and ``_send`` encodes and writes it; then ``drain()``
goes on. So replies keep the order of requests, and every refusal, error reply and log line is
Python's: C serves only what the Python path would have served silently (the access checks,
the sizes, negotiation, no fds). Handlers do no I/O; a ``RemoteProtocolError`` they raise
becomes an error reply with its errno. A framing error or a dead socket drops the client,
resets the device and waits for the next client; nothing a client sends stops the server.

Logging never changes the path: the DEBUG line per message and the ``--trace`` record are
observers at the I/O boundary (``_observe``), switched by one boolean read per wake-up; for
hot messages C keeps compact records while observed and they become the same lines and records
after each drain. The monitor's counters are always on: C counts what it served and
``_fold`` adds that to ``counters`` after each drain; the Python path counts a dict increment
per message in ``_process_buffered`` and a list increment per access in the region handlers.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from emulator.counters import Counters
from emulator.loop import EventLoop
from emulator.memory import GuestMemory
from emulator.pci.device import (
    NUM_IRQS,
    NUM_REGIONS,
    DeviceRegion,
    IrqIndex,
    PciDevice,
    RegionPermission,
)
from emulator.pci.interrupts import IrqEventfds
from emulator.trace import Tracer
from emulator.vfio_user import messages as m
from emulator.vfio_user.codec import (
    Message,
    Role,
    VfioUserDecoder,
    encode,
    error_reply_for,
    region_reply,
)
from emulator.vfio_user.hotpath import (
    PENDING_SHIFT,
    STATUS_MASK,
    Count,
    Direction,
    Drain,
    HotPath,
    Pending,
    Record,
)
from wire.errors import DecodeError, RemoteProtocolError, TransportError
from wire.unix import send_with_fds, set_send_timeout

logger = logging.getLogger(__name__)

#: This socket's name in the trace and in the monitor's counters.
TRACE_CHANNEL = "vfio-user"
#: Logged (followed by the socket path) once the socket accepts a client; launchers wait for it.
READY_LINE = "ready: listening for a vfio-user client on "

PAGE_SIZE = 4096
MAX_DMA_MAPS = 65535
#: What we tell the client in the VERSION reply; max_msg_fds stays within the spec's 16.
SERVER_CAPABILITIES = {
    m.CAP_MAX_MSG_FDS: 16,
    m.CAP_MAX_DATA_XFER_SIZE: m.DEFAULT_MAX_DATA_XFER_SIZE,
    m.CAP_PGSIZES: PAGE_SIZE,
    m.CAP_MAX_DMA_MAPS: MAX_DMA_MAPS,
    m.CAP_WRITE_MULTIPLE: True,
}
_REGION_INFO_SIZE = m.RegionInfo.STRUCT.size
SEND_TIMEOUT = 5.0
#: An enum class lookup costs per access.
_READ, _WRITE = RegionPermission.READ, RegionPermission.WRITE
_IDLE = int(Drain.IDLE)
_COUNTS, _LOGS = int(Pending.COUNTS), int(Pending.RECORDS | Pending.DROPS)
_IRQ_FLAGS = {
    IrqIndex.INTX: m.IrqInfoFlags.EVENTFD | m.IrqInfoFlags.MASKABLE | m.IrqInfoFlags.AUTOMASKED,
    IrqIndex.MSI: m.IrqInfoFlags.EVENTFD,
    IrqIndex.MSIX: m.IrqInfoFlags.EVENTFD | m.IrqInfoFlags.MASKABLE,
    IrqIndex.ERR: m.IrqInfoFlags.EVENTFD,
    IrqIndex.REQ: m.IrqInfoFlags.EVENTFD,
}

#: A handler returns the reply as a Message, or already encoded (the region accesses), or None.
Reply = Message | bytes | None
Handler = Callable[[Message], Reply]
_P = TypeVar("_P")


class VfioUserServer:
    """Serves ``device`` to vfio-user clients connecting to ``path``."""

    def __init__(
        self,
        path: Path,
        device: PciDevice,
        memory: GuestMemory,
        loop: EventLoop,
        tracer: Tracer | None = None,
        *,
        counters: Counters | None = None,
    ) -> None:
        self.path = path
        self.device = device
        self.memory = memory
        self.loop = loop
        self.tracer = tracer or Tracer(None)
        self.counters = counters or Counters()
        counts = self.counters.messages(TRACE_CHANNEL)
        self._received, self._sent = counts.received, counts.sent
        bar = self.counters.bar
        self._reads, self._read_bytes = bar.reads, bar.read_bytes
        self._writes, self._write_bytes = bar.writes, bar.write_bytes
        self.clients_served = 0
        self._listener: socket.socket | None = None
        self._client: socket.socket | None = None
        self._decoder: VfioUserDecoder | None = None
        self._negotiated = False
        self._max_data_xfer = m.DEFAULT_MAX_DATA_XFER_SIZE
        self._irqs: dict[int, IrqEventfds] = {
            IrqIndex.MSIX: device.msix,
            IrqIndex.INTX: device.intx,
            IrqIndex.ERR: IrqEventfds(1),
            IrqIndex.REQ: IrqEventfds(1),
        }
        # Region sizes and permissions never change after the device is built.
        self._region_infos = tuple(device.region_info(index) for index in range(NUM_REGIONS))
        self._readable = tuple(bool(i.access & RegionPermission.READ) for i in self._region_infos)
        self._writable = tuple(bool(i.access & RegionPermission.WRITE) for i in self._region_infos)
        self._observed = False  # DEBUG logging or tracing on; read again at every wake-up
        self._hot = HotPath(max_msg_size=m.DEFAULT_MAX_MSG_SIZE, max_fds=m.MAX_MAX_MSG_FDS)
        self._dropped_write: Callable[[int, int], None] | None = None
        #: Messages C served (the Python path never saw them), kicks it wrote to an
        #: eventfd, and the writes that failed (logged).
        self.hot_messages = 0
        self.hot_kicks = [0, 0]
        self._fold_into = self._configure_hot_path()
        device.set_kick_sink(self._hot)
        self._handlers: dict[m.Command, Handler] = {
            m.Command.VERSION: self._version,
            m.Command.DMA_MAP: self._dma_map,
            m.Command.DMA_UNMAP: self._dma_unmap,
            m.Command.DEVICE_GET_INFO: self._device_get_info,
            m.Command.DEVICE_GET_REGION_INFO: self._get_region_info,
            m.Command.DEVICE_GET_REGION_IO_FDS: self._get_region_io_fds,
            m.Command.DEVICE_GET_IRQ_INFO: self._get_irq_info,
            m.Command.DEVICE_SET_IRQS: self._set_irqs,
            m.Command.REGION_READ: self._region_read,
            m.Command.REGION_WRITE: self._region_write,
            m.Command.DEVICE_RESET: self._device_reset,
            m.Command.REGION_WRITE_MULTI: self._region_write_multi,
        }

    # -- socket life cycle ---------------------------------------------------------------

    def listen(self) -> None:
        """Bind the socket (replacing a stale one) and start accepting clients."""
        with contextlib.suppress(FileNotFoundError):
            if self.path.is_socket():
                self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(str(self.path))
        listener.listen(1)
        listener.setblocking(False)
        self._listener = listener
        self.loop.add_reader(listener.fileno(), self._accept)
        logger.info("%s%s", READY_LINE, self.path)

    def close(self) -> None:
        """Drop the client, stop listening and remove the socket file."""
        self._drop_client("server shutting down")
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for index in (IrqIndex.ERR, IrqIndex.REQ):
            self._irqs[index].close()

    @property
    def connected(self) -> bool:
        return self._client is not None

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self._client is not None:
            logger.warning("refusing a second vfio-user client while one is connected")
            client.close()
            return
        # Blocking sends bounded by SO_SNDTIMEO, so a client that stops reading is dropped
        # instead of stalling the loop; receives use MSG_DONTWAIT. No fcntl per message.
        client.setblocking(True)
        set_send_timeout(client, SEND_TIMEOUT)
        self._client = client
        self._hot.attach(client.fileno())
        self._decoder = VfioUserDecoder(Role.SERVER)
        self._negotiated = False
        self._max_data_xfer = m.DEFAULT_MAX_DATA_XFER_SIZE
        self.clients_served += 1
        self.loop.add_reader(client.fileno(), self._on_readable)
        logger.info("vfio-user client connected")

    def _drop_client(self, reason: str) -> None:
        client, decoder = self._client, self._decoder
        if client is None or decoder is None:
            return
        logger.info("vfio-user client gone: %s", reason)
        self.loop.remove_reader(client.fileno())
        self._hot.detach()
        client.close()
        decoder.close()
        self._client = self._decoder = None
        # The next client starts from power-on: no DMA, no interrupts, a reset device.
        self.device.reset()
        for vectors in self._irqs.values():
            vectors.disable()
        self.memory.unmap_all()

    # -- receive, dispatch, reply ----------------------------------------------------------

    def _configure_hot_path(self) -> list[tuple[Any, Any]]:
        """Tell C where the shared-memory BAR and the notify area are; returns where each of
        its counts (``Count`` order) is added: the same counters the Python path uses."""
        access = self.device.direct_access()
        bar = self.counters.bar
        shm = notify = 0
        if access.shmem is not None:
            window = access.shmem
            shm = window.index
            self._hot.set_shmem(shm, window.host_address, window.size, window.max_access)
            self._dropped_write = window.dropped_write
            window.on_unusable(self._hot.clear_shmem)
        if access.notify is not None:
            area = access.notify
            notify = area.index
            self._hot.set_notify(notify, area.offset, area.multiplier, area.num_queues)
        received, sent = self._received, self._sent
        read, write, multi = (
            m.Command.REGION_READ,
            m.Command.REGION_WRITE,
            m.Command.REGION_WRITE_MULTI,
        )
        targets: dict[Count, tuple[Any, Any]] = {
            Count.IN_READ: (received, read),
            Count.IN_WRITE: (received, write),
            Count.IN_WRITE_MULTI: (received, multi),
            Count.OUT_READ: (sent, read),
            Count.OUT_WRITE: (sent, write),
            Count.OUT_WRITE_MULTI: (sent, multi),
            Count.SHMEM_READS: (bar.reads, shm),
            Count.SHMEM_READ_BYTES: (bar.read_bytes, shm),
            Count.SHMEM_WRITES: (bar.writes, shm),
            Count.SHMEM_WRITE_BYTES: (bar.write_bytes, shm),
            Count.NOTIFY_WRITES: (bar.writes, notify),
            Count.NOTIFY_WRITE_BYTES: (bar.write_bytes, notify),
            Count.KICKS: (self.hot_kicks, 0),
            Count.KICK_ERRORS: (self.hot_kicks, 1),
        }
        return [targets[count] for count in Count]

    def _on_readable(self) -> None:
        """Let C serve everything waiting; take each message it hands back on our path.

        C stops at such a message only after sending the replies before it, and goes on from
        the next one when called again; it returns IDLE once the socket is empty.
        """
        self._observed = self.tracer.enabled or logger.isEnabledFor(logging.DEBUG)
        hot = self._hot
        hot.set_observed(self._observed)
        while self._client is not None and self._decoder is not None:
            result = hot.drain()
            if result >> PENDING_SHIFT:
                self._fold(result >> PENDING_SHIFT)
            status = result & STATUS_MASK
            if status == _IDLE:
                return
            if status == Drain.COLD:
                data, fds = hot.take_cold()
                try:
                    self._decoder.feed(data, fds)
                    self._process_buffered()
                except TransportError as exc:
                    self._drop_client(str(exc))
                    return
                except RemoteProtocolError as exc:
                    self._drop_client(f"protocol error: {exc}")
                    return
            elif status == Drain.EOF:
                self._drop_client("end of stream")
            elif status == Drain.TOO_MANY_FDS:
                self._drop_client(f"peer sent more than {m.MAX_MAX_MSG_FDS} fds in one message")
            elif status == Drain.ERROR:
                self._drop_client(f"connection lost: {os.strerror(hot.errno)}")
            # Drain.YIELD: C emptied its logs into ours; it goes on where it stopped.

    def _fold(self, pending: int) -> None:
        """What C did since the last drain (``pending``: which ``Pending`` logs): counts into
        ``counters``, records into the DEBUG lines and trace, dropped writes to the
        shared-memory BAR's warnings."""
        hot = self._hot
        if pending & _COUNTS:
            counts = hot.take_counts()
            self.hot_messages += counts[0] + counts[1] + counts[2]  # Count.IN_*
            errors = self.hot_kicks[1]
            for (target, key), n in zip(self._fold_into, counts, strict=True):
                if n:
                    target[key] += n
            if self.hot_kicks[1] != errors:
                logger.warning("%d queue kick(s) could not be written", self.hot_kicks[1] - errors)
        if not pending & _LOGS:
            return
        records, drops = hot.take_logs()
        if records:
            self._observe_records(records)
        if drops and self._dropped_write is not None:
            for offset, length in drops:
                self._dropped_write(offset, length)

    def _process_buffered(self) -> None:
        decoder = self._decoder
        received, sent = self._received, self._sent
        while decoder is not None and decoder is self._decoder:
            try:
                message = decoder.next_message()
            except DecodeError as exc:
                raw_reply = None if exc.fatal else error_reply_for(exc)
                name = f"invalid:{_command_name(exc.request)}"
                received[name] += 1
                if self._observed:
                    self._observe_refused(exc, raw_reply)
                if exc.fatal:
                    raise
                logger.warning("bad vfio-user message: %s", exc)
                if raw_reply is not None:
                    self._send_raw(raw_reply)
                    sent[name] += 1
                continue
            if message is None:
                return
            command = message.command
            received[command] += 1
            if self._observed:
                self._observe(message, "in", message.size)
            reply = self._handle(message)
            if reply is not None:
                self._send(reply)
                sent[command] += 1

    def _handle(self, message: Message) -> Reply:
        """Run the handler; turn refusals into error replies. Closes unclaimed fds."""
        try:
            if not self._negotiated and message.command is not m.Command.VERSION:
                raise RemoteProtocolError(f"{message.command.name} before VERSION")
            handler = self._handlers.get(message.command)
            if handler is None:
                raise RemoteProtocolError(f"{message.command.name} is not served", errno.ENOTSUP)
            reply = handler(message)
        except RemoteProtocolError as exc:
            logger.warning("refused %s id=%d: %s", message.command.name, message.msg_id, exc)
            reply = message.error_reply(exc.errno)
        except (TransportError, OSError):
            raise
        except Exception:
            logger.exception("handler for %s failed", message.command.name)
            reply = message.error_reply(errno.EIO)
        finally:
            if message.fds:
                message.close()
        return reply if message.reply_expected else None

    def _send(self, reply: Message | bytes) -> None:
        fds: tuple[int, ...]
        if isinstance(reply, bytes):
            data, fds = reply, ()
            if self._observed:
                self._observe(_decode_reply(data), "out", len(data))
        else:
            data, fds = encode(reply)
            if self._observed:
                self._observe(reply, "out", len(data))
        self._send_raw(data, fds)

    def _send_raw(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        if self._client is None:
            return
        try:
            send_with_fds(self._client, data, fds)
        except OSError as exc:
            raise TransportError(f"cannot send to the client: {exc}") from exc

    # -- observers: the DEBUG line and the trace record, never a different path -----------

    def _observe(self, message: Message, direction: str, size: int) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s %s id=%d size=%d nfds=%d%s",
                "-->" if direction == "in" else "<--",
                message.command.name,
                message.msg_id,
                size,
                len(message.fds),
                f" error={message.error}" if message.is_error else "",
            )
        if self.tracer.enabled:
            self.tracer.record(
                TRACE_CHANNEL,
                direction,
                message.command.name,
                msg_id=message.msg_id,
                size=size,
                nfds=len(message.fds),
                payload=message.payload,
                error=message.error if message.is_error else None,
            )

    def _observe_records(self, records: list[Record]) -> None:
        """C's records as the messages the Python path would have observed: same DEBUG lines,
        same trace records (bulk data is only ever shown by its length)."""
        at = 0
        while at < len(records):
            r = records[at]
            at += 1
            command = m.Command(r.command)
            payload: m.Payload
            if r.direction == Direction.IN:
                if command is m.Command.REGION_WRITE_MULTI:
                    entries = records[at : at + r.count]
                    at += r.count
                    payload = m.RegionWriteMulti(
                        tuple(
                            m.RegionAccess(e.offset, e.region, e.count, bytes(e.count))
                            for e in entries
                        )
                    )
                else:
                    data = bytes(r.count) if command is m.Command.REGION_WRITE else b""
                    payload = m.RegionAccess(r.offset, r.region, r.count, data)
                flags = m.HeaderFlags(r.flags)
                message = Message(command, r.msg_id, payload, (), m.MsgType.COMMAND, flags)
                self._observe(message, "in", r.size)
            elif r.direction == Direction.OUT:
                if command is m.Command.REGION_WRITE_MULTI:
                    payload = m.RegionWriteMultiReply(r.count)
                else:
                    data = bytes(r.count) if command is m.Command.REGION_READ else b""
                    payload = m.RegionAccess(r.offset, r.region, r.count, data)
                message = Message(command, r.msg_id, payload, (), m.MsgType.REPLY)
                self._observe(message, "out", r.size)

    def _observe_refused(self, exc: DecodeError, raw_reply: bytes | None) -> None:
        """A message the codec refused (its raw header, fd count and why, framing errors
        included), and the error reply it gets (if one is due)."""
        command = _command_name(exc.request)
        name, msg_id, err = f"invalid:{command}", exc.msg_id, exc.errno
        debug = logger.isEnabledFor(logging.DEBUG)
        if debug:
            flags = "?" if exc.flags is None else f"{exc.flags:#x}"
            logger.debug(
                "--> %s id=%s flags=%s size=%s nfds=%d error=%d: %s",
                name,
                msg_id,
                flags,
                exc.size,
                exc.nfds,
                err,
                exc,
            )
        if self.tracer.enabled:
            self.tracer.record_refused(TRACE_CHANNEL, command, exc, size=exc.size)
        if raw_reply is None:
            return
        if debug:
            logger.debug("<-- %s id=%s size=%d nfds=0 error=%d", name, msg_id, len(raw_reply), err)
        if self.tracer.enabled:
            size = len(raw_reply)
            self.tracer.record(TRACE_CHANNEL, "out", name, msg_id=msg_id, size=size, error=err)

    # -- handlers: one per command -----------------------------------------------------------

    def _version(self, message: Message) -> Message:
        request = _payload(message, m.Version)
        if self._negotiated:
            raise RemoteProtocolError("VERSION sent twice")
        if request.major != 0:
            raise RemoteProtocolError(
                f"unsupported protocol version {request.major}.{request.minor}"
            )
        client_caps = request.caps
        xfer = client_caps.get(m.CAP_MAX_DATA_XFER_SIZE, m.DEFAULT_MAX_DATA_XFER_SIZE)
        self._max_data_xfer = min(int(xfer), m.DEFAULT_MAX_DATA_XFER_SIZE)
        self._negotiated = True
        self._hot.set_negotiated(self._max_data_xfer)
        logger.info("vfio-user client speaks %d.%d: %s", request.major, request.minor, client_caps)
        reply = m.Version(0, 0, {m.CAPABILITIES: dict(SERVER_CAPABILITIES)})
        return message.reply(reply)

    def _dma_map(self, message: Message) -> Message:
        request = _payload(message, m.DmaMap)
        fds = message.fds
        if len(fds) > 1:
            raise RemoteProtocolError("DMA_MAP carries at most one fd")
        flags = m.DmaMapFlags(request.flags)
        self.memory.map(
            request.address,
            request.size,
            fd=fds[0] if fds else None,
            fd_offset=request.offset,
            readable=bool(flags & m.DmaMapFlags.READ),
            writable=bool(flags & m.DmaMapFlags.WRITE),
        )
        return message.reply()

    def _dma_unmap(self, message: Message) -> Message:
        request = _payload(message, m.DmaUnmap)
        flags = m.DmaUnmapFlags(request.flags)
        if flags & m.DmaUnmapFlags.GET_DIRTY_BITMAP:
            raise RemoteProtocolError("dirty page tracking is not supported", errno.ENOTSUP)
        if flags & m.DmaUnmapFlags.ALL:
            if request.address or request.size:
                raise RemoteProtocolError("DMA_UNMAP ALL with an address or size")
            self.memory.unmap_all()
        else:
            self.memory.unmap(request.address, request.size)
        return message.reply(request)

    def _device_get_info(self, message: Message) -> Message:
        request = _payload(message, m.DeviceInfo)
        size = m.DeviceInfo.STRUCT.size
        if request.argsz < size:
            raise RemoteProtocolError(f"DEVICE_GET_INFO argsz {request.argsz} < {size}")
        flags = m.DeviceFlags.RESET | m.DeviceFlags.PCI
        return message.reply(m.DeviceInfo(size, flags, NUM_REGIONS, NUM_IRQS))

    def _get_region_info(self, message: Message) -> Message:
        request = _payload(message, m.RegionInfo)
        if request.argsz < _REGION_INFO_SIZE:
            raise RemoteProtocolError(f"region info argsz {request.argsz} < {_REGION_INFO_SIZE}")
        info = self._region(request.index)
        flags = m.RegionFlags(0)
        if info.access & RegionPermission.READ:
            flags |= m.RegionFlags.READ
        if info.access & RegionPermission.WRITE:
            flags |= m.RegionFlags.WRITE
        # No region is mmappable: QEMU maps region fds once and never again, and the
        # shared-memory BAR changes under it. Without capabilities the answer is 32 bytes.
        return message.reply(m.RegionInfo(_REGION_INFO_SIZE, flags, info.index, 0, info.size, 0))

    def _get_region_io_fds(self, message: Message) -> Message:
        request = _payload(message, m.RegionIoFdsRequest)
        self._region(request.index)
        size = m.RegionIoFdsRequest.STRUCT.size
        return message.reply(m.RegionIoFdsReply(size, 0, request.index, 0))

    def _get_irq_info(self, message: Message) -> Message:
        request = _payload(message, m.IrqInfo)
        if not 0 <= request.index < NUM_IRQS:
            raise RemoteProtocolError(f"no IRQ index {request.index}")
        flags = _IRQ_FLAGS[IrqIndex(request.index)]
        count = self.device.irq_count(request.index)
        return message.reply(m.IrqInfo(m.IrqInfo.STRUCT.size, flags, request.index, count))

    def _set_irqs(self, message: Message) -> Message:
        request = _payload(message, m.SetIrqs)
        vectors = self._irqs.get(request.index)
        if vectors is None:
            raise RemoteProtocolError(f"IRQ index {request.index} takes no SET_IRQS")
        self._apply_irq_set(vectors, request, message.fds)
        return message.reply()

    def _apply_irq_set(
        self, vectors: IrqEventfds, request: m.SetIrqs, fds: tuple[int, ...]
    ) -> None:
        flags = m.IrqSetFlags(request.flags)
        start, count = request.start, request.count
        # As the kernel's vfio_set_irqs_validate_and_prepare: start must name a vector even
        # when count is 0.
        if start >= vectors.count or start + count > vectors.count:
            raise RemoteProtocolError(f"vectors {start}+{count} outside 0..{vectors.count}")
        if flags & m.IrqSetFlags.ACTION_TRIGGER:
            if flags & m.IrqSetFlags.DATA_EVENTFD:
                if fds and len(fds) != count:
                    raise RemoteProtocolError(f"{len(fds)} eventfds for {count} vectors")
                # No fds for a run of vectors means QEMU passed -1 for each: disconnect them.
                vectors.set_eventfds(start, fds or [None] * count)
            elif fds:
                raise RemoteProtocolError("fds sent without DATA_EVENTFD")
            elif count == 0 and flags & m.IrqSetFlags.DATA_NONE:
                vectors.disable()
            elif flags & m.IrqSetFlags.DATA_NONE:
                for vector in range(start, start + count):
                    vectors.trigger(vector)
            else:
                for vector, fire in enumerate(request.data, start):
                    if fire:
                        vectors.trigger(vector)
            return
        if fds:
            raise RemoteProtocolError("fds sent with a MASK/UNMASK action")
        masked = bool(flags & m.IrqSetFlags.ACTION_MASK)
        if flags & m.IrqSetFlags.DATA_BOOL:
            for vector, bit in enumerate(request.data, start):
                if bit:
                    vectors.set_masked(vector, 1, masked)
        else:
            vectors.set_masked(start, count, masked)

    # The two guest BAR accesses return their reply encoded (``region_reply``): same bytes,
    # two objects fewer per access; the observers decode it again only when they are on.
    def _region_read(self, message: Message) -> bytes:
        access = _payload(message, m.RegionAccess)
        self._check_access(access, self._readable, _READ)
        region = access.region
        data = self.device.region_read(region, access.offset, access.count)
        self._reads[region] += 1
        self._read_bytes[region] += access.count
        return region_reply(message, access.offset, access.region, len(data), data)

    def _region_write(self, message: Message) -> bytes | None:
        access = _payload(message, m.RegionAccess)
        self._check_access(access, self._writable, _WRITE)
        region = access.region
        self.device.region_write(region, access.offset, access.data)
        self._writes[region] += 1
        self._write_bytes[region] += access.count
        if not message.reply_expected:  # a posted write: nothing to build
            return None
        return region_reply(message, access.offset, access.region, access.count, b"")

    def _region_write_multi(self, message: Message) -> Message:
        request = _payload(message, m.RegionWriteMulti)
        for access in request.writes:
            self._check_access(access, self._writable, _WRITE)
        for access in request.writes:
            self.device.region_write(access.region, access.offset, access.data)
            self._writes[access.region] += 1
            self._write_bytes[access.region] += access.count
        return message.reply(m.RegionWriteMultiReply(len(request.writes)))

    def _device_reset(self, message: Message) -> Message:
        self.device.reset()
        return message.reply()

    # -- checks ------------------------------------------------------------------------------

    def _region(self, index: int) -> DeviceRegion:
        if not 0 <= index < NUM_REGIONS:
            raise RemoteProtocolError(f"no region {index}")
        return self._region_infos[index]

    def _check_access(
        self, access: m.RegionAccess, allowed: tuple[bool, ...], need: RegionPermission
    ) -> None:
        """``allowed`` is ``_readable`` or ``_writable``: a tuple lookup, not an IntFlag test
        per guest access."""
        region = access.region
        info = self._region(region)
        if not allowed[region]:
            raise RemoteProtocolError(f"region {access.region} does not allow {need.name}")
        if access.count > self._max_data_xfer:
            raise RemoteProtocolError(f"access of {access.count} bytes exceeds the maximum")
        if access.offset + access.count > info.size:
            raise RemoteProtocolError(
                f"access {access.offset:#x}+{access.count} outside region {access.region} "
                f"of {info.size:#x} bytes"
            )


def _command_name(request: int | None) -> str:
    """A refused message's command as the trace names it: the enum name, the raw number, or
    ``?`` when the header was not even read."""
    if request is None:
        return "?"
    try:
        return m.Command(request).name
    except ValueError:
        return str(request)


def _decode_reply(data: bytes) -> Message:
    """An encoded reply as a Message again, for the observers (never on the unobserved path)."""
    decoder = VfioUserDecoder(Role.CLIENT)
    decoder.feed(data)
    reply = decoder.next_message()
    decoder.close()
    assert reply is not None
    return reply


def _payload(message: Message, kind: type[_P]) -> _P:
    payload = message.payload
    if not isinstance(payload, kind):
        raise RemoteProtocolError(f"{message.command.name} without a {kind.__name__} payload")
    return payload
