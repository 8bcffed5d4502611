"""Private cffi (ABI mode) binding of libvguest.so; use ``vguest.mmio`` instead.

The library is found through ``VGUEST_LIB`` (a path) or next to this file. ABI mode
needs no compiler and no Python headers, so a library built on the host loads in a
guest whose Python differs.
"""

import os
import threading
from pathlib import Path
from typing import Any

from vguest.errors import EnvironmentProblem

CDEF = """
struct vg_map {
    void *base;
    uint64_t map_len;
    uint8_t *ptr;
    uint64_t offset;
    uint64_t len;
    int writable;
};
int vg_pattern_generate(int kind, uint64_t seed, uint8_t *buf, uint64_t len);
uint32_t vg_crc32c_buf(uint32_t crc, const uint8_t *buf, uint64_t len);
int vg_map_fd(int fd, uint64_t offset, uint64_t len, int writable, struct vg_map *m);
int vg_map_path(const char *path, uint64_t offset, uint64_t len, int writable,
                struct vg_map *m);
int vg_unmap(struct vg_map *m);
int vg_read(const struct vg_map *m, uint64_t off, unsigned width, uint64_t *value);
int vg_write(const struct vg_map *m, uint64_t off, unsigned width, uint64_t value);
int vg_read_buf(const struct vg_map *m, uint64_t off, uint64_t len, unsigned width,
                uint8_t *dst);
int vg_write_buf(const struct vg_map *m, uint64_t off, uint64_t len, unsigned width,
                 const uint8_t *src);
int vg_fill(const struct vg_map *m, uint64_t off, uint64_t len, unsigned width, int kind,
            uint64_t seed);
int vg_verify(const struct vg_map *m, uint64_t off, uint64_t len, unsigned width, int kind,
              uint64_t seed, uint64_t *where, uint64_t *expected, uint64_t *actual);
int vg_crc32c(const struct vg_map *m, uint64_t off, uint64_t len, unsigned width,
              uint32_t *crc);
int vg_bench_read(const struct vg_map *m, uint64_t off, uint64_t len, unsigned width,
                  uint64_t count, uint64_t *elapsed_ns);
int vg_bench_write(const struct vg_map *m, uint64_t off, uint64_t len, unsigned width,
                   uint64_t count, uint64_t value, uint64_t *elapsed_ns);
"""

LIBRARY_NAME = "libvguest.so"

_lock = threading.Lock()
_loaded: tuple[Any, Any] | None = None


def library_path() -> Path:
    """Where the library is looked for: ``$VGUEST_LIB`` or next to the package."""
    override = os.environ.get("VGUEST_LIB")
    if override:
        return Path(override)
    return Path(__file__).with_name(LIBRARY_NAME)


def load() -> tuple[Any, Any]:
    """Return ``(ffi, lib)``, loading the library on first use."""
    global _loaded
    with _lock:
        if _loaded is None:
            try:
                from cffi import FFI  # noqa: PLC0415 (optional at import time)
            except ImportError as exc:
                raise EnvironmentProblem(
                    "python module cffi is missing (Debian: apt install python3-cffi)"
                ) from exc
            path = library_path()
            if not path.is_file():
                raise EnvironmentProblem(
                    f"{path} not found: build it with `make -C guest-tools` "
                    "or point VGUEST_LIB at libvguest.so"
                )
            ffi = FFI()
            ffi.cdef(CDEF)
            try:
                lib = ffi.dlopen(str(path))
            except OSError as exc:
                raise EnvironmentProblem(f"cannot load {path}: {exc}") from exc
            _loaded = (ffi, lib)
        return _loaded
