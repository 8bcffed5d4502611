"""``python -m bench.emulator_main [--max-mappings N] <emulator options>``: the emulator's CLI
with the BAR-wide mapping cap raised, for the scale benchmark.

The default cap is derived from vm.max_map_count (65,530 here: about 28,000 live mappings, each
possibly costing two VMAs). The scale benchmark maps 4 KiB pages of one memfd at contiguous file
and BAR offsets, which the kernel merges into a few VMAs, so it can safely hold 65,536 live
mappings; this entry point says so explicitly instead of changing the product's default.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from emulator import cli
from emulator.shmem import region


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--max-mappings", type=int, default=None)
    args, rest = parser.parse_known_args(argv)
    if args.max_mappings is not None:
        cap: int = args.max_mappings

        def raised_cap() -> int:
            return cap

        region.default_max_mappings = raised_cap
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
