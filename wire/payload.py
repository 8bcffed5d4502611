"""The one payload base of both wire stacks (the Python counterpart of rust-vmm's ``ByteValued``).

Most vhost-user and vfio-user payloads are a fixed-size C struct whose fields are the
dataclass's fields in order. For those, a subclass declares only its ``STRUCT`` (with the
byte order of its protocol: ``=`` native for vhost-user, ``<`` little-endian for vfio-user)
and its fields; ``pack()`` and ``unpack()`` here do the rest, so the size check, the error
types and the error wording are written once for both stacks. Variable-size payloads (a
header plus data, a counted table, JSON) override both methods.

Errors: ``pack()`` of a value that does not fit raises ``LocalProtocolError`` (a bug on our
side); ``unpack()`` of the wrong number of bytes raises ``RemoteProtocolError(EINVAL)`` (the
peer's fault, answered with an error reply). Fields hold the wire's integers as they are:
flag fields are plain ints, which the handlers wrap in their ``IntFlag`` where the bits matter.
"""

from __future__ import annotations

import errno
import struct
from typing import ClassVar, Self

from wire.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["Payload", "check_size"]


def check_size(cls: type, data: bytes | memoryview, size: int, *, at_least: bool = False) -> None:
    """Refuse ``data`` unless it is ``size`` bytes (or at least ``size`` with ``at_least``)."""
    if len(data) < size if at_least else len(data) != size:
        expected = f"at least {size}" if at_least else str(size)
        raise RemoteProtocolError(
            f"{cls.__name__} payload is {len(data)} bytes, expected {expected}", errno.EINVAL
        )


class Payload:
    """Base of every payload: a frozen slots dataclass with a class-level ``STRUCT``.

    Subclasses are ``@dataclass(frozen=True, slots=True)``; their ``__match_args__`` (the
    fields in order) is what the generic ``pack()`` hands to ``STRUCT``.
    """

    __slots__ = ()
    STRUCT: ClassVar[struct.Struct]
    __match_args__: ClassVar[tuple[str, ...]] = ()

    def pack(self) -> bytes:
        """The wire bytes; ``LocalProtocolError`` when a field does not fit its C type."""
        try:
            return self.STRUCT.pack(*[getattr(self, name) for name in self.__match_args__])
        except struct.error as exc:
            raise LocalProtocolError(f"{type(self).__name__} out of range: {exc}") from exc

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Self:
        """Parse exactly ``STRUCT.size`` bytes; ``RemoteProtocolError(EINVAL)`` otherwise."""
        check_size(cls, data, cls.STRUCT.size)
        return cls(*cls.STRUCT.unpack(data))
