"""The virtio-fs device (virtio id 26) on the back-end library, with a DAX window.

Queues: 0 is the hiprio queue (FORGET, INTERRUPT), 1..N the request queues; all carry FUSE
requests the same way (device-readable ``fuse_in_header`` + arguments, then device-writable
``fuse_out_header`` + reply), so one ``FuseServer`` answers them all. Config space is
``struct virtio_fs_config { char tag[36]; le32 num_request_queues; }``. Shared memory region
0 (``VIRTIO_FS_SHMCAP_ID_CACHE``) is the DAX window, ``cache_size`` bytes.

Why a worker thread: a SETUPMAPPING waits for the front-end's answer to SHMEM_MAP, and a
front-end may want something from us before it answers (QEMU re-sends the memory table when
its address space changes, and waits for our ack). So FUSE requests are served by one worker
thread while the library's loop stays free for the front-end. The worker takes
``VhostUserDaemon.lock`` only to pop a request and to push its reply, never across a map.
Everything else the FUSE server owns (nodes, handles, the window table) is touched by the
worker alone: a device reset, and the control socket's ``status``, are queued to it in order.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import queue
import struct
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from vhost_user_backend.daemon import VIRTIO_F_VERSION_1, VhostUserDaemon, VhostUserDevice
from vhost_user_backend.devices.virtiofs.server import FuseServer
from vhost_user_backend.devices.virtiofs.window import DaxWindow, MapRefused
from vhost_user_backend.errors import DeviceConfigError, FrontendRefused
from vhost_user_backend.memory import MemoryTableError
from vhost_user_backend.vring import Vring

log = logging.getLogger(__name__)

VIRTIO_ID_FS = 26
VIRTIO_FS_SHMCAP_ID_CACHE = 0
TAG_SIZE = 36
CONFIG = struct.Struct("<36sI")
#: Linux maps the window in chunks of this size (FUSE_DAX_SZ).
DAX_CHUNK = 2 << 20
DEFAULT_CACHE_SIZE = 64 << 20
STATUS_TIMEOUT = 5.0


def check_cache_size(size: int) -> int:
    """0 (no DAX window) or a power of two that is a multiple of 2 MiB.

    Linux maps the window in 2 MiB chunks, and QEMU's native front-end aborts in
    pci_register_bar when the shared-memory regions do not add up to a power of two."""
    if size == 0:
        return size
    if size < 0 or size % DAX_CHUNK or size & (size - 1):
        raise DeviceConfigError(
            f"cache size {size:#x} must be a power of two and a multiple of 2 MiB "
            "(e.g. 2M, 64M, 1G), or 0 for no DAX window"
        )
    return size


def check_tag(tag: str) -> bytes:
    raw = tag.encode()
    if not 0 < len(raw) <= TAG_SIZE or b"\0" in raw:
        raise DeviceConfigError(f"tag {tag!r} must be 1 to {TAG_SIZE} bytes of UTF-8 without NUL")
    return raw


class VirtioFsDevice(VhostUserDevice):
    """A virtio-fs device serving ``shared_dir`` under ``tag``."""

    def __init__(
        self,
        shared_dir: str,
        tag: str,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        num_request_queues: int = 1,
    ) -> None:
        if not 1 <= num_request_queues <= 64:
            raise DeviceConfigError(f"{num_request_queues} request queues (1 to 64)")
        self.features = VIRTIO_F_VERSION_1
        self.num_queues = 1 + num_request_queues
        self.num_request_queues = num_request_queues
        self.shared_dir = shared_dir
        self.tag = tag
        self._tag = check_tag(tag)
        self.cache_size = check_cache_size(cache_size)
        self.window = DaxWindow(self.cache_size, self) if self.cache_size else None
        try:
            self.server = FuseServer(shared_dir, self.window)
        except OSError as exc:
            raise DeviceConfigError(f"shared directory {shared_dir!r}: {exc.strerror}") from exc
        self.backend: VhostUserDaemon | None = None
        self.generation = 0
        self.requests = 0
        self.dropped_replies = 0
        self._work: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._run, name="virtiofs-worker", daemon=True)
        self._worker.start()

    # -- VhostUserDevice (called on the library's loop, holding its lock) ------------------------
    def shmem_sizes(self) -> Sequence[int]:
        return [self.cache_size] if self.cache_size else []

    def get_config(self, offset: int, size: int) -> bytes:
        data = CONFIG.pack(self._tag, self.num_request_queues)
        return (data + bytes(max(offset + size - len(data), 0)))[offset : offset + size]

    def on_connect(self, backend: VhostUserDaemon) -> None:
        self.backend = backend

    def handle_queue(self, index: int, vring: Vring) -> None:
        self._work.put(("queue", index))

    def reset(self) -> None:
        """RESET_DEVICE or a lost front-end: its mappings are gone. Replies of requests in
        flight are dropped (their rings are gone too); the server resets in turn."""
        self.generation += 1
        self._work.put(("reset", None))

    # -- WindowMapper (called by the worker) ----------------------------------------------------
    def map(self, fd: int, fd_offset: int, shm_offset: int, length: int, writable: bool) -> None:
        backend = self._backend()
        try:
            backend.shmem_map(
                VIRTIO_FS_SHMCAP_ID_CACHE, fd, fd_offset, shm_offset, length, writable=writable
            )
        except FrontendRefused as exc:
            raise MapRefused(exc.code, f"map {shm_offset:#x}+{length:#x}") from exc

    def unmap(self, shm_offset: int, length: int) -> None:
        backend = self._backend()
        try:
            backend.shmem_unmap(VIRTIO_FS_SHMCAP_ID_CACHE, shm_offset, length)
        except FrontendRefused as exc:
            raise MapRefused(exc.code, f"unmap {shm_offset:#x}+{length:#x}") from exc

    def _backend(self) -> VhostUserDaemon:
        if self.backend is None:
            raise MapRefused(errno.ENOTCONN, "no front-end")
        return self.backend

    # -- the worker -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            kind, arg = self._work.get()
            try:
                if kind == "stop":
                    return
                if kind == "queue":
                    self._serve(arg)
                elif kind == "reset":
                    self.server.reset()
                elif kind == "call":
                    function, future = arg
                    try:
                        future.set_result(function())
                    except Exception as exc:
                        future.set_exception(exc)
            except Exception:
                log.exception("virtiofs worker: %s failed", kind)

    def _serve(self, index: int) -> None:
        """Answer every available request of queue ``index``, one at a time."""
        backend = self.backend
        if backend is None:
            return
        while True:
            with backend.lock:
                if index >= len(backend.vrings):
                    return
                vring = backend.vrings[index]
                if not (vring.started and vring.enabled) or vring.broken:
                    return
                generation = self.generation
                try:
                    chain = vring.pop()
                    if chain is None:
                        return
                    request = chain.read_all(vring.memory)
                except MemoryTableError as exc:
                    self._ring_failed(vring, exc)
                    return
            self.requests += 1
            reply = self.server.handle(request)
            with backend.lock:
                if backend.vrings[index] is not vring or generation != self.generation:
                    self.dropped_replies += 1
                    continue
                try:
                    written = chain.write(vring.memory, reply) if reply else 0
                    if reply and written < len(reply):
                        log.warning("queue %d: %d-byte reply cut to %d", index, len(reply), written)
                    vring.push(chain.head, written)
                    vring.notify()
                except MemoryTableError as exc:
                    self._ring_failed(vring, exc)
                    return

    @staticmethod
    def _ring_failed(vring: Vring, exc: Exception) -> None:
        log.warning("vring %d broken: %s", vring.index, exc)
        vring.broken = True
        with contextlib.suppress(OSError):
            vring.signal_error()

    def in_worker(self, function: Callable[[], Any], timeout: float = STATUS_TIMEOUT) -> Any:
        """Run ``function`` on the worker, after what is queued before it; wait for it."""
        future: Future[Any] = Future()
        self._work.put(("call", (function, future)))
        return future.result(timeout)

    def close(self) -> None:
        """Stop the worker and close every fd the server holds (the front-end is gone)."""
        self._work.put(("stop", None))
        self._worker.join(10)
        self.server.close()

    # -- introspection ----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Counters, the live window table, tag and shared directory (built on the worker)."""

        def snapshot() -> dict[str, Any]:
            return {
                "tag": self.tag,
                "shared_dir": self.shared_dir,
                "cache_size": self.cache_size,
                "num_request_queues": self.num_request_queues,
                "requests": self.requests,
                "dropped_replies": self.dropped_replies,
                "fuse": self.server.status(),
                "window": self.window.status() if self.window is not None else None,
            }

        result: dict[str, Any] = self.in_worker(snapshot)
        result["vhost_user"] = {"connected": False}
        backend = self.backend
        if backend is not None:
            with backend.lock:
                result["vhost_user"] = backend.status()
        return result


def handle_command(device: VirtioFsDevice, req: dict[str, Any]) -> dict[str, Any]:
    """One control command to one reply; never raises. Commands: ``status``."""
    cmd = req.get("cmd")
    if cmd != "status":
        return {"ok": False, "error": f"unknown command {cmd!r}", "code": errno.ENOSYS}
    try:
        return {"ok": True, **device.status()}
    except TimeoutError:
        busy = "the worker is busy (waiting for the front-end?)"
        return {"ok": False, "error": busy, "code": errno.EBUSY}
    except Exception as exc:
        return {"ok": False, "error": str(exc), "code": errno.EIO}
