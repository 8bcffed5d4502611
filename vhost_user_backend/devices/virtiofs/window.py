"""The DAX window: which file pages are mapped where, and the rules that keep them valid.

Linux's virtio-fs DAX code (fs/fuse/dax.c) asks for 2 MiB chunks: SETUPMAPPING maps ``len``
bytes of a file at ``foffset`` to window offset ``moffset``; REMOVEMAPPING takes chunks back.
We turn each chunk into one or more SHMEM_MAPs ("pieces") through a ``WindowMapper``; an
unmap must name one whole mapping, so every piece is remembered.

Rules, and why:

- Map at most to the page-rounded end of the file, never past the chunk. A front-end mmaps
  our fd, and a page wholly past EOF would SIGBUS whoever touches it; QEMU 11.1's native
  front-end also refuses any map whose page-rounded end passes the file's size (its
  RAM-from-fd size check; a file of size 0 is not checked), and so does our emulator today.
  An empty file, or a chunk starting at or past EOF, maps nothing and still succeeds: the
  guest reads nothing there, and a write that extends the file comes as FUSE_WRITE first.
- The bounce fallback, only behind such refusing front-ends: when the page-rounded map is
  refused and the file's last page is partial, map the whole pages from the file and, for
  the tail page, a private memfd page ("bounce") holding a copy of the tail bytes. The copy is
  kept consistent by the server: bytes the guest wrote into it (only those within EOF) go back
  to the file on FLUSH, FSYNC, RELEASE, REMOVEMAPPING and before READ/GETATTR/WRITE/SETATTR of
  the inode (``write_back``), and it is reloaded from the file whenever the server re-checks
  the file (``resync``). Once refused, we go straight to the fallback for that front-end.
- A file that grows under a live chunk gets the newly covered pages mapped (more pieces, or
  the bounce page replaced by file pages) when the server re-checks its size (LOOKUP,
  GETATTR, SETATTR, WRITE); a truncated file's pieces past the new end are unmapped.
- A device reset drops every mapping on the front-end side: ``forget`` clears the table and
  sends nothing. A new FUSE session (INIT) or DESTROY unmaps what is left (``clear``),
  tolerating refusals, since a front-end may have dropped them without our knowing.

Not thread-safe: one thread (the device's worker) owns the window.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class MapRefused(Exception):
    """The front-end answered a map or unmap with the non-zero status ``code``."""

    def __init__(self, code: int, what: str = "") -> None:
        super().__init__(f"front-end refused {what}: status {code}")
        self.code = code


class WindowMapper(Protocol):
    """What the window needs from the device: SHMEM_MAP/UNMAP in shared memory region 0.

    ``fd`` is lent for the call. Raises ``MapRefused`` on a non-zero status; any other
    exception means the front-end could not be asked (the request failed with EIO)."""

    def map(self, fd: int, fd_offset: int, shm_offset: int, length: int, writable: bool) -> None:
        raise NotImplementedError

    def unmap(self, shm_offset: int, length: int) -> None:
        raise NotImplementedError


class WindowError(Exception):
    """A SETUPMAPPING/REMOVEMAPPING that fails with ``errno``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


def page_up(value: int) -> int:
    return -(-value // PAGE_SIZE) * PAGE_SIZE


def page_down(value: int) -> int:
    return value // PAGE_SIZE * PAGE_SIZE


@dataclass
class Piece:
    """One live SHMEM_MAP: ``[offset, offset + length)`` from the chunk's start."""

    offset: int
    length: int
    bounce: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class Chunk:
    """One SETUPMAPPING: ``length`` bytes of the file (``key`` = st_dev, st_ino) at
    ``foffset``, at window offset ``moffset``. ``fd`` is ours (a dup), opened read-write for a
    writable chunk. ``bounce_fd``/``bounce_seen`` are the tail page's copy and the bytes it
    held when last synchronised with the file."""

    moffset: int
    length: int
    key: tuple[int, int]
    fd: int
    foffset: int
    writable: bool
    pieces: list[Piece] = field(default_factory=list)
    bounce_fd: int | None = None
    bounce_seen: bytes = b""
    bounce_valid: int = 0

    @property
    def end(self) -> int:
        return self.moffset + self.length

    def file_end(self) -> int:
        return max((p.end for p in self.pieces if not p.bounce), default=0)

    def bounce_piece(self) -> Piece | None:
        return next((p for p in self.pieces if p.bounce), None)


@dataclass
class WindowStats:
    setups: int = 0
    removes: int = 0
    maps: int = 0
    unmaps: int = 0
    refusals: int = 0
    bounces: int = 0
    grows: int = 0
    shrinks: int = 0
    write_backs: int = 0
    forgotten: int = 0


class DaxWindow:
    """The DAX window of ``size`` bytes, driven by the FUSE server, mapped through ``mapper``."""

    def __init__(self, size: int, mapper: WindowMapper | None) -> None:
        self.size = size
        self.mapper = mapper
        self.chunks: dict[int, Chunk] = {}
        self.stats = WindowStats()
        #: the front-end refused a page-rounded map past EOF once: go straight to the bounce
        self.refuses_past_eof = False

    # -- requests ---------------------------------------------------------------------------
    def setup(
        self,
        fd: int,
        key: tuple[int, int],
        foffset: int,
        length: int,
        moffset: int,
        *,
        writable: bool,
    ) -> Chunk:
        """SETUPMAPPING with the file open as ``fd`` (lent; the chunk keeps a dup)."""
        if self.mapper is None or self.size == 0:
            raise WindowError(errno.ENOSYS, "no DAX window")
        if length <= 0 or (moffset | foffset | length) % PAGE_SIZE:
            raise WindowError(errno.EINVAL, f"unaligned mapping {moffset:#x}+{length:#x}")
        if moffset + length > self.size:
            raise WindowError(errno.EINVAL, f"mapping {moffset:#x}+{length:#x} past the window")
        self.stats.setups += 1
        # Linux re-sends SETUPMAPPING over a live read-only chunk to make it writable, and
        # front-ends refuse overlapping maps: whatever overlaps goes first.
        for old in [
            c for c in self.chunks.values() if c.moffset < moffset + length and moffset < c.end
        ]:
            self._drop(old, tolerant=True)
        chunk = Chunk(moffset, length, key, os.dup(fd), foffset, writable)
        try:
            self._reconcile(chunk, os.fstat(fd).st_size)
        except BaseException:
            self._drop(chunk, tolerant=True)
            raise
        self.chunks[moffset] = chunk
        return chunk

    def remove(self, moffset: int, length: int) -> None:
        """REMOVEMAPPING of one range: every chunk inside it goes; EINVAL if the range holds
        none or cuts one in two."""
        self.stats.removes += 1
        end = moffset + length
        inside = [c for c in self.chunks.values() if moffset <= c.moffset and c.end <= end]
        cut = [
            c
            for c in self.chunks.values()
            if c.moffset < end and moffset < c.end and c not in inside
        ]
        for chunk in inside:
            self._drop(chunk, tolerant=False)
        if cut or not inside:
            raise WindowError(errno.EINVAL, f"no whole mapping in {moffset:#x}+{length:#x}")

    def resync(self, key: tuple[int, int], size: int) -> None:
        """The server saw ``key``'s size: map what grew, unmap what shrank, reload bounces."""
        for chunk in self._of(key):
            self._reconcile(chunk, size)

    def write_back(self, key: tuple[int, int]) -> None:
        """Copy guest writes to bounce pages of ``key`` (within EOF) back to the file."""
        for chunk in self._of(key):
            self._write_back(chunk)

    def forget(self) -> None:
        """Device reset: the front-end dropped every mapping. Nothing is sent."""
        for chunk in self.chunks.values():
            self.stats.forgotten += len(chunk.pieces)
            chunk.pieces.clear()
            self._close(chunk)
        self.chunks.clear()

    def clear(self) -> None:
        """Unmap everything (INIT of a new session, DESTROY); refusals are tolerated."""
        for chunk in list(self.chunks.values()):
            self._drop(chunk, tolerant=True)

    def close(self) -> None:
        self.forget()

    # -- introspection ----------------------------------------------------------------------
    @property
    def live_pieces(self) -> int:
        return sum(len(c.pieces) for c in self.chunks.values())

    def status(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "refuses_past_eof": self.refuses_past_eof,
            "counters": vars(self.stats).copy(),
            "live_chunks": len(self.chunks),
            "live_mappings": self.live_pieces,
            "chunks": [
                {
                    "moffset": c.moffset,
                    "length": c.length,
                    "inode": c.key[1],
                    "foffset": c.foffset,
                    "writable": c.writable,
                    "pieces": [
                        {"offset": p.offset, "length": p.length, "bounce": p.bounce}
                        for p in c.pieces
                    ],
                }
                for c in sorted(self.chunks.values(), key=lambda c: c.moffset)
            ],
        }

    # -- the rules --------------------------------------------------------------------------
    def _of(self, key: tuple[int, int]) -> list[Chunk]:
        return [c for c in self.chunks.values() if c.key == key]

    def _reconcile(self, chunk: Chunk, size: int) -> None:
        """Bring the chunk's pieces to what ``size`` allows (see the module docstring)."""
        self._write_back(chunk)
        want = min(max(page_up(size) - chunk.foffset, 0), chunk.length)
        full = min(max(page_down(size) - chunk.foffset, 0), chunk.length)
        bounce = chunk.bounce_piece()
        keep_bounce = bounce is not None and (bounce.offset, bounce.end) == (full, want)
        before = chunk.file_end() + (bounce.length if bounce else 0)
        for piece in list(chunk.pieces):
            if (piece.bounce and not keep_bounce) or (not piece.bounce and piece.end > want):
                self._unmap(chunk, piece, tolerant=False)
        if not keep_bounce and chunk.bounce_fd is not None:
            os.close(chunk.bounce_fd)
            chunk.bounce_fd = None
        start = chunk.file_end()
        if want < before:
            self.stats.shrinks += 1
        elif want > before and chunk.pieces:
            self.stats.grows += 1
        if keep_bounce:
            self._map_file(chunk, start, full)
            self._load_bounce(chunk, size)
        elif start < want:
            partial = want > full
            if not (partial and self.refuses_past_eof):
                try:
                    self._map_file(chunk, start, want)
                    return
                except MapRefused:
                    if not partial:
                        raise
                    self.refuses_past_eof = True
                    log.info("front-end refuses maps past EOF: using bounce pages for tails")
            self._map_file(chunk, start, full)
            self._map_bounce(chunk, full, want, size)

    def _map_file(self, chunk: Chunk, start: int, end: int) -> None:
        if start >= end:
            return
        self._send_map(chunk, chunk.fd, chunk.foffset + start, start, end - start)
        chunk.pieces.append(Piece(start, end - start))

    def _map_bounce(self, chunk: Chunk, start: int, end: int, size: int) -> None:
        memfd = os.memfd_create("virtiofs-dax-tail", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(memfd, PAGE_SIZE)
            # The front-end maps it: it must never shrink (SIGBUS) or grow under the mapping.
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            chunk.bounce_fd = memfd
            self._load_bounce(chunk, size)
            self._send_map(chunk, memfd, 0, start, end - start)
        except BaseException:
            chunk.bounce_fd = None
            os.close(memfd)
            raise
        chunk.pieces.append(Piece(start, end - start, bounce=True))
        self.stats.bounces += 1

    def _load_bounce(self, chunk: Chunk, size: int) -> None:
        """Fill the bounce page from the file: its bytes within EOF, zeros after them."""
        assert chunk.bounce_fd is not None
        offset = chunk.foffset + chunk.file_end()
        valid = min(max(size - offset, 0), PAGE_SIZE)
        data = os.pread(chunk.fd, valid, offset) if valid else b""
        page = data + bytes(PAGE_SIZE - len(data))
        if os.pread(chunk.bounce_fd, PAGE_SIZE, 0) != page:
            os.pwrite(chunk.bounce_fd, page, 0)
        chunk.bounce_seen = page
        chunk.bounce_valid = valid

    def _write_back(self, chunk: Chunk) -> None:
        bounce = chunk.bounce_piece()
        if chunk.bounce_fd is None or bounce is None or not chunk.writable:
            return
        # Only bytes within EOF both when the page was loaded and now: a guest store past EOF
        # stays in the page, as it would in the file's own page cache.
        offset = chunk.foffset + bounce.offset
        size = os.fstat(chunk.fd).st_size
        valid = min(chunk.bounce_valid, max(size - offset, 0))
        now = os.pread(chunk.bounce_fd, PAGE_SIZE, 0)
        seen = chunk.bounce_seen
        if now[:valid] == seen[:valid]:
            return
        first = next(i for i in range(valid) if now[i] != seen[i])
        last = next(i for i in range(valid - 1, -1, -1) if now[i] != seen[i])
        os.pwrite(chunk.fd, now[first : last + 1], offset + first)
        chunk.bounce_seen = now[:valid] + seen[valid:]
        self.stats.write_backs += 1

    def _send_map(self, chunk: Chunk, fd: int, fd_offset: int, start: int, length: int) -> None:
        assert self.mapper is not None
        try:
            self.mapper.map(fd, fd_offset, chunk.moffset + start, length, chunk.writable)
        except MapRefused:
            self.stats.refusals += 1
            raise
        self.stats.maps += 1

    def _unmap(self, chunk: Chunk, piece: Piece, *, tolerant: bool) -> None:
        assert self.mapper is not None
        chunk.pieces.remove(piece)
        try:
            self.mapper.unmap(chunk.moffset + piece.offset, piece.length)
        except MapRefused as exc:
            self.stats.refusals += 1
            if not tolerant:
                raise
            log.info("unmap of %#x+%#x refused (%s): already gone", piece.offset, piece.length, exc)
            return
        self.stats.unmaps += 1

    def _drop(self, chunk: Chunk, *, tolerant: bool) -> None:
        """Write the tail back, unmap every piece (all are tried), forget the chunk."""
        if self.chunks.get(chunk.moffset) is chunk:
            del self.chunks[chunk.moffset]
        failure: BaseException | None = None
        try:
            self._write_back(chunk)
        except OSError as exc:
            log.warning("window %#x: tail write-back failed: %s", chunk.moffset, exc)
        for piece in list(chunk.pieces):
            try:
                self._unmap(chunk, piece, tolerant=tolerant)
            except Exception as exc:
                failure = failure or exc
        self._close(chunk)
        if failure is not None:
            raise failure

    @staticmethod
    def _close(chunk: Chunk) -> None:
        for fd in (chunk.fd, chunk.bounce_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        chunk.fd = -1
        chunk.bounce_fd = None
