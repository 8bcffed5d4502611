"""The DAX window's rules against a recording mapper (a fake front-end) and real files."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.procfs import fd_count
from vhost_user_backend.devices.virtiofs.window import DaxWindow, MapRefused, WindowError

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 2 * MiB
KEY = (1, 2)


class Recorder:
    """Accepts or refuses like a front-end; records ("map", shm_offset, length, fd_offset)."""

    def __init__(self, *, refuse_past_eof: bool = False, fail_after: int | None = None) -> None:
        self.calls: list[tuple[str, int, int, int]] = []
        self.live: dict[int, int] = {}
        self.refuse_past_eof = refuse_past_eof
        self.fail_after = fail_after

    def map(self, fd: int, fd_offset: int, shm_offset: int, length: int, writable: bool) -> None:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise ConnectionError("channel broke")
        self.calls.append(("map", shm_offset, length, fd_offset))
        size = os.fstat(fd).st_size
        if self.refuse_past_eof and size and fd_offset + length > size:
            raise MapRefused(1)
        if any(o < shm_offset + length and shm_offset < o + n for o, n in self.live.items()):
            raise MapRefused(errno.EEXIST)  # overlaps a live mapping
        self.live[shm_offset] = length

    def unmap(self, shm_offset: int, length: int) -> None:
        self.calls.append(("unmap", shm_offset, length, 0))
        if self.live.get(shm_offset) != length:
            raise MapRefused(1)
        del self.live[shm_offset]


@pytest.fixture
def file(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    path = tmp_path / "f"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    yield path, fd
    os.close(fd)


def test_host_truncation_to_zero_unmaps_everything(file: tuple[Path, int]) -> None:
    _, fd = file
    os.pwrite(fd, b"x" * (3 * 4096 + 10), 0)
    rec = Recorder()
    window = DaxWindow(8 * MiB, rec)
    window.setup(fd, KEY, 0, CHUNK, CHUNK, writable=False)
    assert rec.live == {CHUNK: 16 * KiB}
    os.ftruncate(fd, 0)
    window.resync(KEY, 0)
    assert rec.live == {} and window.live_pieces == 0 and len(window.chunks) == 1
    os.ftruncate(fd, 100)
    window.resync(KEY, 100)
    assert rec.live == {CHUNK: 4 * KiB}


def test_a_chunk_inside_a_file_maps_from_its_offset(file: tuple[Path, int]) -> None:
    _, fd = file
    os.ftruncate(fd, CHUNK + 5 * 4096)
    rec = Recorder()
    window = DaxWindow(8 * MiB, rec)
    window.setup(fd, KEY, CHUNK, CHUNK, 0, writable=True)
    assert rec.calls == [("map", 0, 20 * KiB, CHUNK)]
    window.setup(fd, KEY, 0, CHUNK, CHUNK, writable=True)
    assert rec.calls[-1] == ("map", CHUNK, CHUNK, 0)  # the whole chunk is within EOF


def test_refusals_that_are_not_about_eof_fail_the_request(file: tuple[Path, int]) -> None:
    _, fd = file
    os.ftruncate(fd, 8192)  # whole pages: a refusal cannot be the past-EOF check
    rec = Recorder()
    rec.live[4096] = 4096  # something the window does not know about is in the way
    window = DaxWindow(8 * MiB, rec)
    with pytest.raises(MapRefused):
        window.setup(fd, KEY, 0, CHUNK, 0, writable=False)
    assert window.chunks == {} and not window.refuses_past_eof


def test_a_broken_channel_leaves_no_piece_and_no_fd(file: tuple[Path, int]) -> None:
    _, fd = file
    os.ftruncate(fd, 5000)
    before = fd_count()
    rec = Recorder(refuse_past_eof=True, fail_after=2)  # the refused map, the file page, then
    window = DaxWindow(8 * MiB, rec)
    with pytest.raises(ConnectionError):
        window.setup(fd, KEY, 0, CHUNK, 0, writable=True)
    assert window.chunks == {} and rec.live == {}  # the file page was unmapped again
    assert fd_count() == before


def test_remove_needs_whole_chunks(file: tuple[Path, int]) -> None:
    _, fd = file
    os.ftruncate(fd, 4096)
    rec = Recorder()
    window = DaxWindow(8 * MiB, rec)
    window.setup(fd, KEY, 0, CHUNK, 0, writable=False)
    window.setup(fd, KEY, 0, CHUNK, CHUNK, writable=False)
    with pytest.raises(WindowError) as cut:
        window.remove(0, CHUNK // 2)
    assert cut.value.errno == errno.EINVAL and len(window.chunks) == 2
    window.remove(0, 2 * CHUNK)  # one range may hold several chunks
    assert window.chunks == {} and rec.live == {}
    with pytest.raises(WindowError):
        window.remove(0, CHUNK)


def test_forget_and_clear(file: tuple[Path, int]) -> None:
    _, fd = file
    os.ftruncate(fd, 4096)
    rec = Recorder()
    window = DaxWindow(8 * MiB, rec)
    before = fd_count()
    window.setup(fd, KEY, 0, CHUNK, 0, writable=False)
    calls = len(rec.calls)
    window.forget()  # a device reset: the front-end dropped its mappings, nothing is sent
    assert window.chunks == {} and len(rec.calls) == calls and fd_count() == before
    rec.live.clear()
    window.setup(fd, KEY, 0, CHUNK, 0, writable=False)
    assert rec.calls[calls:] == [("map", 0, 4096, 0)]
    window.clear()  # a new session: unmapped
    assert rec.calls[-1] == ("unmap", 0, 4096, 0) and rec.live == {}
    window.setup(fd, KEY, 0, CHUNK, 0, writable=False)
    rec.live.clear()
    window.clear()  # the front-end dropped it without our knowing: the refusal is tolerated
    assert window.chunks == {} and fd_count() == before
