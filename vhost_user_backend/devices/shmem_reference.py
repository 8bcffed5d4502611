"""``vhost-device-shmem``: the reference shared-memory back-end, built on the back-end library.

The device is virtio-rng compatible by default (virtio id 4, one request queue) so a real Linux
guest's virtio_rng driver brings it up and exercises the data plane. It declares VIRTIO Shared
Memory Regions (``--shmem-region SHMID:SIZE``) and maps memfds into them on request from a
control socket speaking JSON lines::

    {"cmd": "map", "shmid": 0, "shm_offset": 0, "length": 4096,
     "pattern": "counter", "seed": 1, "writable": false}
    {"cmd": "unmap", "shmid": 0, "shm_offset": 0, "length": 4096}
    {"cmd": "read", "shmid": 0, "shm_offset": 0, "length": 4096}        (hex + crc32c)
    {"cmd": "write", "shmid": 0, "shm_offset": 0, "offset": 0, "data": "00ff"}
    {"cmd": "status"}

Each reply is one line: ``{"ok": true, ...}`` or ``{"ok": false, "error": "...", "code": N}``
(``code`` is the front-end's status for refused SHMEM requests, else an errno; ``error`` then
says what the status means, e.g. ``EEXIST: overlaps a live mapping``).

Those mappings last until the next device reset, which drops them (the spec says so).
``--map-at-start SHMID:OFFSET:LENGTH:PATTERN[:SEED]`` (repeatable) declares mappings that the
library keeps instead (``VhostUserDaemon.persistent_map``): mapped after every RESET_DEVICE and
whenever the queues start, until an ``unmap`` of exactly that range; ``status`` lists them
under ``persistent``.
``ControlClient`` is the client side of this protocol (tests, the benchmarks and ``vm.scenario``
use it through ``testkit``).

Patterns and checksums are the guest tools' own (``vguest.pattern``), so what the guest
verifies with ``vguest verify`` is byte for byte what the back-end wrote: "counter" is
little-endian u64 words counting up from ``seed``, "xorshift" and "constant" as documented
there, "zero" all zeros; checksums are CRC-32C.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vguest.pattern import PatternKind, crc32c, generate

from vhost_user.options import add_shmem_feature_bit
from vhost_user_backend import control
from vhost_user_backend.control import ControlServer
from vhost_user_backend.daemon import (
    VIRTIO_F_VERSION_1,
    VhostUserDaemon,
    VhostUserDevice,
)
from vhost_user_backend.errors import DaemonError, DeviceConfigError, FrontendRefused
from vhost_user_backend.vring import Vring
from wire.errors import StateError, WireError

log = logging.getLogger(__name__)

VIRTIO_ID_RNG = 4
DEFAULT_REGION = (0, 4 << 20)
_SIZE_RE = re.compile(r"^(0x[0-9a-fA-F]+|\d+)\s*([KMG]i?B?|[KMG])?$")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def make_pattern(name: str, length: int, seed: int) -> bytes:
    """The bytes a mapping is filled with: "zero" or one of ``vguest.pattern.PatternKind``."""
    if name == "zero":
        return bytes(length)
    try:
        kind = PatternKind[name.upper()]
    except KeyError:
        kinds = ", ".join(k.name.lower() for k in PatternKind)
        raise ValueError(f"unknown pattern {name!r} ({kinds}, zero)") from None
    return generate(kind, seed, length)


def parse_size(text: str) -> int:
    """``4096``, ``0x1000``, ``64K``, ``4M``, ``4MiB``, ``1G``."""
    match = _SIZE_RE.match(text.strip())
    if not match:
        raise DeviceConfigError(f"bad size {text!r}")
    value = int(match.group(1), 0)
    unit = match.group(2)
    return value * _UNITS[unit[0]] if unit else value


def parse_region(text: str) -> tuple[int, int]:
    """``SHMID:SIZE``; the layout rules (``vhost_user.shmem``) are the daemon's to apply."""
    shmid_text, sep, size_text = text.partition(":")
    if not sep:
        raise DeviceConfigError(f"shared memory region {text!r} is not SHMID:SIZE")
    try:
        shmid = int(shmid_text, 0)
    except ValueError as exc:
        raise DeviceConfigError(f"bad shmid in {text!r}") from exc
    size = parse_size(size_text)
    if size == 0:
        raise DeviceConfigError(f"shared memory region {shmid}: size 0 declares nothing")
    return shmid, size


@dataclass(frozen=True)
class StartMapping:
    """One ``--map-at-start SHMID:OFFSET:LENGTH:PATTERN[:SEED]``."""

    shmid: int
    shm_offset: int
    length: int
    pattern: str
    seed: int = 0


def parse_start_mapping(text: str) -> StartMapping:
    fields = text.split(":")
    if len(fields) not in (4, 5):
        raise DeviceConfigError(
            f"--map-at-start {text!r} is not SHMID:OFFSET:LENGTH:PATTERN[:SEED]"
        )
    try:
        shmid = int(fields[0], 0)
        seed = int(fields[4], 0) if len(fields) == 5 else 0
    except ValueError as exc:
        raise DeviceConfigError(f"--map-at-start {text!r}: {exc}") from exc
    try:
        make_pattern(fields[3], 0, seed)
    except ValueError as exc:
        raise DeviceConfigError(f"--map-at-start {text!r}: {exc}") from exc
    return StartMapping(shmid, parse_size(fields[1]), parse_size(fields[2]), fields[3], seed)


def pattern_memfd(name: str, pattern: str, length: int, seed: int) -> int:
    """A sealed memfd of ``length`` bytes holding the pattern: it can neither shrink under a
    front-end's mapping (SIGBUS) nor grow."""
    content = make_pattern(pattern, length, seed)
    memfd = os.memfd_create(name, os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, length)
        os.pwrite(memfd, content, 0)
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    except BaseException:
        os.close(memfd)
        raise
    return memfd


@dataclass
class DeviceMapping:
    """One live SHMEM_MAP: the memfd we created and keep, and where it is mapped."""

    shmid: int
    shm_offset: int
    length: int
    writable: bool
    memfd: int
    pattern: str
    seed: int


class ShmemRngDevice(VhostUserDevice):
    """virtio-rng compatible device with VIRTIO Shared Memory Regions and memfd mappings."""

    def __init__(
        self,
        regions: Sequence[tuple[int, int]] = (DEFAULT_REGION,),
        *,
        virtio_id: int = VIRTIO_ID_RNG,
        rng_source: str = "urandom",
        rng_seed: int = 0,
    ) -> None:
        self.virtio_id = virtio_id
        self.features = VIRTIO_F_VERSION_1
        self.num_queues = 1
        self.rng_source = rng_source
        self._rng_counter = rng_seed
        sizes: dict[int, int] = {}
        for shmid, size in regions:
            if shmid in sizes:
                raise DeviceConfigError(f"shmid {shmid} declared twice")
            sizes[shmid] = size
        self.sizes = [sizes.get(i, 0) for i in range(max(sizes) + 1)] if sizes else []
        self.mappings: dict[tuple[int, int], DeviceMapping] = {}
        self.lock = threading.Lock()
        self.backend: VhostUserDaemon | None = None

    def shmem_sizes(self) -> Sequence[int]:
        return self.sizes

    def on_connect(self, backend: VhostUserDaemon) -> None:
        self.backend = backend

    def reset(self) -> None:
        """RESET_DEVICE or a lost front-end: its mappings are gone, so drop our records."""
        with self.lock:
            for mapping in self.mappings.values():
                os.close(mapping.memfd)
            self.mappings.clear()

    def _entropy(self, n: int) -> bytes:
        if self.rng_source == "urandom":
            return os.urandom(n)
        data = make_pattern("counter", n, self._rng_counter)
        self._rng_counter += (n + 7) // 8
        return data

    def handle_queue(self, index: int, vring: Vring) -> None:
        used = 0
        while (chain := vring.pop()) is not None:
            written = chain.write(vring.memory, self._entropy(chain.writable_len))
            vring.push(chain.head, written)
            used += 1
        if used:
            vring.notify()

    # -- control operations (called from the control thread) ----------------------------------
    def _require_backend(self) -> VhostUserDaemon:
        if self.backend is None or not self.backend.connected:
            raise StateError("no front-end", state="disconnected", required="connected")
        return self.backend

    def map(
        self, shmid: int, shm_offset: int, length: int, pattern: str, seed: int, *, writable: bool
    ) -> DeviceMapping:
        backend = self._require_backend()
        if length <= 0:
            raise ValueError("length must be positive")
        memfd = pattern_memfd(f"vhost-shmem-{shmid}", pattern, length, seed)
        try:
            backend.shmem_map(shmid, memfd, 0, shm_offset, length, writable=writable)
        except BaseException:
            os.close(memfd)
            raise
        mapping = DeviceMapping(shmid, shm_offset, length, writable, memfd, pattern, seed)
        with self.lock:
            old = self.mappings.pop((shmid, shm_offset), None)
            self.mappings[(shmid, shm_offset)] = mapping
        if old is not None:
            os.close(old.memfd)
        return mapping

    def _mapping(self, shmid: int, shm_offset: int) -> DeviceMapping:
        with self.lock:
            mapping = self.mappings.get((shmid, shm_offset))
        if mapping is None:
            raise KeyError(f"no mapping at shmid {shmid} offset {shm_offset:#x}")
        return mapping

    def unmap(self, shmid: int, shm_offset: int, length: int) -> None:
        self._require_backend().shmem_unmap(shmid, shm_offset, length)
        with self.lock:
            mapping = self.mappings.pop((shmid, shm_offset), None)
        if mapping is not None:
            os.close(mapping.memfd)

    def read(self, shmid: int, shm_offset: int, length: int | None, offset: int = 0) -> bytes:
        mapping = self._mapping(shmid, shm_offset)
        n = mapping.length - offset if length is None else length
        if offset < 0 or n < 0 or offset + n > mapping.length:
            raise ValueError("read outside the mapping")
        return os.pread(mapping.memfd, n, offset)

    def write(self, shmid: int, shm_offset: int, offset: int, data: bytes) -> None:
        mapping = self._mapping(shmid, shm_offset)
        if offset < 0 or offset + len(data) > mapping.length:
            raise ValueError("write outside the mapping")
        os.pwrite(mapping.memfd, data, offset)

    def status(self) -> dict[str, Any]:
        with self.lock:
            mappings = [
                {
                    "shmid": m.shmid,
                    "shm_offset": m.shm_offset,
                    "length": m.length,
                    "writable": m.writable,
                    "pattern": m.pattern,
                    "seed": m.seed,
                }
                for m in self.mappings.values()
            ]
        base = self.backend.status() if self.backend is not None else {"connected": False}
        persistent = [
            {
                "shmid": m.shmid,
                "shm_offset": m.shm_offset,
                "length": m.length,
                "writable": m.writable,
            }
            for m in (self.backend.persistent_mappings if self.backend is not None else [])
        ]
        return {
            **base,
            "virtio_id": self.virtio_id,
            "shmem_regions": {str(i): s for i, s in enumerate(self.sizes) if s},
            "mappings": mappings,
            "persistent": persistent,
        }


def _int(req: dict[str, Any], key: str, default: int | None = None) -> int:
    value = req.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key!r} must be an integer")
    return value


def handle_command(device: ShmemRngDevice, req: dict[str, Any]) -> dict[str, Any]:
    """One control command to one reply; never raises."""
    try:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, **device.status()}
        shmid = _int(req, "shmid", 0)
        shm_offset = _int(req, "shm_offset", 0)
        if cmd == "map":
            mapping = device.map(
                shmid,
                shm_offset,
                _int(req, "length"),
                str(req.get("pattern", "counter")),
                _int(req, "seed", 0),
                writable=bool(req.get("writable", False)),
            )
            return {"ok": True, "shmid": shmid, "shm_offset": shm_offset, "length": mapping.length}
        if cmd == "unmap":
            device.unmap(shmid, shm_offset, _int(req, "length"))
            return {"ok": True}
        if cmd == "read":
            length = req.get("length")
            data = device.read(
                shmid,
                shm_offset,
                None if length is None else _int(req, "length"),
                _int(req, "offset", 0),
            )
            return {"ok": True, "data": data.hex(), "crc32c": crc32c(data)}
        if cmd == "write":
            offset = _int(req, "offset", 0)
            if "data" in req:
                data = bytes.fromhex(str(req["data"]))
            else:
                data = make_pattern(
                    str(req.get("pattern", "counter")), _int(req, "length"), _int(req, "seed", 0)
                )
            device.write(shmid, shm_offset, offset, data)
            return {"ok": True, "written": len(data)}
        return {"ok": False, "error": f"unknown command {cmd!r}", "code": errno.ENOSYS}
    except FrontendRefused as exc:
        return {"ok": False, "error": str(exc), "code": exc.code}
    except StateError as exc:
        return {"ok": False, "error": str(exc), "code": errno.ENOTCONN}
    except (DaemonError, WireError) as exc:
        return {"ok": False, "error": str(exc), "code": errno.EIO}
    except KeyError as exc:
        return {"ok": False, "error": str(exc.args[0]), "code": errno.ENOENT}
    except (ValueError, TypeError) as exc:
        return {"ok": False, "error": str(exc), "code": errno.EINVAL}
    except OSError as exc:
        return {"ok": False, "error": str(exc), "code": exc.errno or errno.EIO}


class ControlClient(control.ControlClient):
    """``vhost_user_backend.control.ControlClient`` with this device's commands as methods."""

    def map(
        self,
        shmid: int,
        shm_offset: int,
        length: int,
        *,
        pattern: str = "counter",
        seed: int = 0,
        writable: bool = False,
    ) -> dict[str, Any]:
        return self(
            "map",
            shmid=shmid,
            shm_offset=shm_offset,
            length=length,
            pattern=pattern,
            seed=seed,
            writable=writable,
        )

    def unmap(self, shmid: int, shm_offset: int, length: int) -> dict[str, Any]:
        return self("unmap", shmid=shmid, shm_offset=shm_offset, length=length)

    def read(self, shmid: int, shm_offset: int, length: int, offset: int = 0) -> bytes:
        reply = self.ok("read", shmid=shmid, shm_offset=shm_offset, length=length, offset=offset)
        return bytes.fromhex(reply["data"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vhost-device-shmem",
        description="Reference vhost-user back-end with VIRTIO Shared Memory Regions "
        "(virtio-rng compatible by default).",
    )
    parser.add_argument("--socket-path", required=True, help="vhost-user UNIX socket to listen on")
    parser.add_argument(
        "--shmem-region",
        action="append",
        type=str,
        metavar="SHMID:SIZE",
        help="a shared memory region (repeatable; default 0:4MiB)",
    )
    add_shmem_feature_bit(parser)
    parser.add_argument("--virtio-id", type=int, default=VIRTIO_ID_RNG, help="virtio device id")
    parser.add_argument(
        "--rng-source",
        choices=("urandom", "counter"),
        default="urandom",
        help="bytes for the request queue: os.urandom or the deterministic counter pattern",
    )
    parser.add_argument("--control-socket", help="JSON-lines control socket path")
    parser.add_argument(
        "--map-at-start",
        action="append",
        default=[],
        metavar="SHMID:OFFSET:LENGTH:PATTERN[:SEED]",
        help="a read-only mapping the library keeps across resets (repeatable): mapped after "
        "every RESET_DEVICE and whenever the queues start, until an unmap of that range",
    )
    parser.add_argument(
        "--serve-once",
        action="store_true",
        help="exit (status 0) once the first front-end has left, instead of waiting for the next",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        regions = [parse_region(r) for r in args.shmem_region or []] or [DEFAULT_REGION]
        start_maps = [parse_start_mapping(m) for m in args.map_at_start]
        device = ShmemRngDevice(regions, virtio_id=args.virtio_id, rng_source=args.rng_source)
        backend = VhostUserDaemon(
            device,
            args.socket_path,
            shmem_feature_bit=args.shmem_feature_bit,
            serve_once=args.serve_once,
        )
        device.backend = backend
        for m in start_maps:
            memfd = pattern_memfd(f"vhost-shmem-start-{m.shmid}", m.pattern, m.length, m.seed)
            try:
                backend.persistent_map(m.shmid, memfd, 0, m.shm_offset, m.length, writable=False)
            finally:
                os.close(memfd)  # the daemon keeps its own dup
    except DeviceConfigError as exc:
        print(f"vhost-device-shmem: {exc}", file=sys.stderr)
        return 2
    server: ControlServer | None = None
    if args.control_socket:
        server = ControlServer(args.control_socket, lambda req: handle_command(device, req))
        server.serve_in_thread()
        log.info("control socket on %s", args.control_socket)
    signal.signal(signal.SIGTERM, lambda *_: backend.stop())
    signal.signal(signal.SIGINT, lambda *_: backend.stop())
    try:
        backend.serve_forever()
    finally:
        if server is not None:
            server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
