"""Command-line options both roles' commands share, worded once.

The shared-memory feature bit is the one a user most often gets wrong (20 in the draft patches,
21 in rust-vmm vhost <= 0.16, 22 upstream), so every command offers the same three choices with
the same explanation, built from ``SHMEM_FEATURE_BITS``.
"""

from __future__ import annotations

import argparse

from vhost_user.messages import SHMEM_FEATURE_BIT_UPSTREAM, SHMEM_FEATURE_BITS


def add_shmem_feature_bit(parser: argparse.ArgumentParser) -> None:
    """Add ``--shmem-feature-bit {22,20,21}`` (default 22) with what each bit means upstream."""
    meanings = "; ".join(
        f"{bit}: {meaning}" + (" (the default)" if bit == SHMEM_FEATURE_BIT_UPSTREAM else "")
        for bit, meaning in SHMEM_FEATURE_BITS.items()
    )
    parser.add_argument(
        "--shmem-feature-bit",
        type=int,
        choices=tuple(SHMEM_FEATURE_BITS),
        default=SHMEM_FEATURE_BIT_UPSTREAM,
        metavar="{22,20,21}",
        help=f"protocol feature bit for shared memory; both ends must agree. {meanings}",
    )
