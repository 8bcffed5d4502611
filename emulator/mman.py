"""``mmap``/``munmap`` at addresses of our choosing, which Python's ``mmap`` module cannot do.

Guest RAM (``emulator.memory``) and the shared-memory BAR (``emulator.shmem``) both need raw
mappings whose addresses they keep; errors come back as ``OSError`` with the C errno.
"""

from __future__ import annotations

import ctypes
import mmap
import os

PROT_NONE = mmap.PROT_NONE if hasattr(mmap, "PROT_NONE") else 0x0
PROT_READ = mmap.PROT_READ
PROT_WRITE = mmap.PROT_WRITE
MAP_SHARED = mmap.MAP_SHARED
MAP_PRIVATE = mmap.MAP_PRIVATE
MAP_FIXED = 0x10
MAP_ANONYMOUS = mmap.MAP_ANONYMOUS
MAP_NORESERVE = 0x4000
#: The largest file offset mmap takes (off_t is signed 64-bit).
MAX_FILE_OFFSET = 1 << 63

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int64,
]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def map_memory(
    address: int, length: int, prot: int, flags: int, *, fd: int = -1, offset: int = 0
) -> int:
    """mmap(2); returns the mapping's address. ``address`` 0 lets the kernel choose."""
    if not 0 <= offset < MAX_FILE_OFFSET:
        raise OSError(22, f"file offset {offset:#x} is not an off_t")
    result = _mmap(address, length, prot, flags, fd, offset)
    if result is None or result == _MAP_FAILED:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(result)


def unmap_memory(address: int, length: int) -> None:
    """munmap(2)."""
    if _munmap(address, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
