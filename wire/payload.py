"""The one payload base of both wire stacks (the Python counterpart of rust-vmm's ``ByteValued``).

Most vhost-user and vfio-user payloads are a fixed-size C struct whose fields are the
dataclass's fields in order. For those, a subclass declares only its ``STRUCT`` (with the
byte order of its protocol: ``=`` native for vhost-user, ``<`` little-endian for vfio-user)
and its fields; ``pack()`` and ``unpack()`` here do the rest, so the size check, the error
types and the error wording are written once for both stacks. Variable-size payloads (a
header plus data, a counted table, JSON) override both methods; those that are a fixed head
and an array a sender may cut short subclass ``TrailingArray``, whose ``split`` checks the
size rules once and names the rule a refused payload broke.

Errors: ``pack()`` of a value that does not fit raises ``LocalProtocolError`` (a bug on our
side); ``unpack()`` of the wrong number of bytes raises ``RemoteProtocolError(EINVAL)`` (the
peer's fault, answered with an error reply). Fields hold the wire's integers as they are:
flag fields are plain ints, which the handlers wrap in their ``IntFlag`` where the bits matter.
"""

from __future__ import annotations

import errno
import struct
from typing import Any, ClassVar, Self

from wire.errors import LocalProtocolError, RemoteProtocolError

__all__ = ["Payload", "TrailingArray", "check_size", "rule_broken"]


def check_size(cls: type, data: bytes | memoryview, size: int, *, at_least: bool = False) -> None:
    """Refuse ``data`` unless it is ``size`` bytes (or at least ``size`` with ``at_least``)."""
    if len(data) < size if at_least else len(data) != size:
        expected = f"at least {size}" if at_least else str(size)
        raise RemoteProtocolError(
            f"{cls.__name__} payload is {len(data)} bytes, expected {expected}", errno.EINVAL
        )


def rule_broken(cls: type, data: bytes | memoryview, rule: str, detail: str) -> RemoteProtocolError:
    """The refusal of ``data`` as a ``cls`` because it broke ``rule`` (named in the message, so
    a log line says which check a peer failed)."""
    return RemoteProtocolError(
        f"{cls.__name__} payload of {len(data)} bytes breaks rule {rule}: {detail}", errno.EINVAL
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


class TrailingArray(Payload):
    """A fixed ``HEAD`` then at most ``MAX_ITEMS`` items of ``ITEM``, cut short by some senders.

    ``STRUCT`` stays the whole C struct (what ``pack`` writes). A sender whose message buffer
    cannot hold the whole array (libvhost-user keeps every message in a union of a few hundred
    bytes) sends the head and the items up to the last one it uses; the items it left out read
    as zeros. ``split`` applies the size rules, each named in its refusal:

    - ``head``: at least ``HEAD.size`` bytes;
    - ``whole-items``: after the head, a whole number of ``ITEM.size`` items;
    - ``max-items``: at most ``MAX_ITEMS`` of them.
    """

    __slots__ = ()
    HEAD: ClassVar[struct.Struct]
    ITEM: ClassVar[struct.Struct]
    MAX_ITEMS: ClassVar[int]

    @classmethod
    def split(cls, data: bytes | memoryview) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
        """The head's fields and the items that were sent (``MAX_ITEMS`` or fewer)."""
        head, item = cls.HEAD.size, cls.ITEM.size
        if len(data) < head:
            raise rule_broken(cls, data, "head", f"shorter than its {head}-byte head")
        if (len(data) - head) % item:
            raise rule_broken(
                cls,
                data,
                "whole-items",
                f"{len(data) - head} bytes after the head are not whole {item}-byte items",
            )
        count = (len(data) - head) // item
        if count > cls.MAX_ITEMS:
            raise rule_broken(
                cls,
                data,
                "max-items",
                f"{count} items, at most {cls.MAX_ITEMS} ({head + cls.MAX_ITEMS * item} bytes)",
            )
        return cls.HEAD.unpack_from(data), list(cls.ITEM.iter_unpack(data[head:]))
