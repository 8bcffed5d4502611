"""cffi's API-mode build of ``emulator._hotpath`` from ``hotpath.c``.

``setup.py`` names this file in ``cffi_modules``, so ``pip install -e .`` (and ``make setup``)
compiles the module with the host's C compiler. The cdef is ``hotpath.h`` itself: one list of
declarations for the compiler and for cffi. Paths are relative to the project root, where pip
runs the build (setuptools refuses absolute source paths).
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

_HERE = Path("emulator/hotpath")

ffibuilder = FFI()
ffibuilder.cdef((_HERE / "hotpath.h").read_text(encoding="ascii"))
ffibuilder.set_source(
    "emulator._hotpath",
    '#include <stdint.h>\n#include <stddef.h>\n#include "hotpath.h"\n',
    sources=[str(_HERE / "hotpath.c")],
    include_dirs=[str(_HERE)],
    depends=[str(_HERE / "hotpath.h")],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
