"""The house's one fd rule, as a base class for messages (docs/architecture.md).

A received message owns its fds and closes them when its ``with`` block ends; a function given
an fd borrows it, and whoever keeps one beyond the message ``dup``-s it.
"""

from __future__ import annotations

from typing import Self

from wire.unix import close_fds


class OwnsFds:
    """Mixed into both stacks' message classes, which declare ``fds`` as a field."""

    __slots__ = ()
    fds: tuple[int, ...]

    def close(self) -> None:
        """Close the fds (idempotent): whoever keeps one beyond this message has dup-ed it."""
        fds = self.fds
        object.__setattr__(self, "fds", ())  # the slot is the subclass's dataclass field
        close_fds(fds)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
