"""Check results: the verdicts, one ``Check`` per check id, and the catalogue of ids.

The ids, groups and spec references are the stable contract of the JSON report (format 1):
ids may be added, never renamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    WARN = "warn"
    NA = "n/a"


@dataclass(frozen=True, slots=True)
class CheckInfo:
    """What a check id stands for: its title and the spec sentence it rests on."""

    id: str
    title: str
    spec: str

    @property
    def group(self) -> str:
        return self.id.split(".", 1)[0]


@dataclass(frozen=True, slots=True)
class Check:
    """One verdict, with the bytes behind it (hex) when they matter."""

    id: str
    group: str
    title: str
    verdict: Verdict
    detail: str
    spec: str
    sent: str | None = None
    received: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {
            "id": self.id,
            "group": self.group,
            "title": self.title,
            "verdict": str(self.verdict),
            "detail": self.detail,
            "spec": self.spec,
            "sent": self.sent,
            "received": self.received,
        }


_RST = "vhost-user.rst: "
CATALOGUE: tuple[CheckInfo, ...] = (
    CheckInfo(
        "negotiation.features",
        "GET_FEATURES answered, VIRTIO_F_VERSION_1 offered",
        _RST + 'VHOST_USER_GET_FEATURES: "Get from the underlying vhost implementation the '
        'features bitmask"; virtio 1.x devices offer VIRTIO_F_VERSION_1 (bit 32)',
    ),
    CheckInfo(
        "negotiation.protocol_features",
        "protocol features offered vs what a shared-memory front-end needs",
        _RST + 'VHOST_USER_GET_PROTOCOL_FEATURES: "Only legal if feature bit '
        'VHOST_USER_F_PROTOCOL_FEATURES is present in VHOST_USER_GET_FEATURES"',
    ),
    CheckInfo(
        "negotiation.shmem_bit",
        "the shared-memory protocol feature bit (22 upstream)",
        _RST + "Protocol features: VHOST_USER_PROTOCOL_F_SHMEM is bit 22 upstream (the draft "
        "patches used 20, now GET_VRING_BASE_INFLIGHT; rust-vmm vhost <= 0.16 used 21, now "
        "GPA_ADDRESSES)",
    ),
    CheckInfo(
        "negotiation.reply_ack",
        "a reply when and only when NEED_REPLY was set",
        _RST + 'REPLY_ACK: "the sender (QEMU) can set the need_reply [Bit 3] flag to any '
        'command. This indicates that the back-end MUST respond with a Payload VhostUserMsg"; '
        'Communication: "Most of the requests don\'t require replies"',
    ),
    CheckInfo(
        "negotiation.reply_header",
        "replies carry the request's number, the REPLY flag and version 1",
        _RST + 'Header: "Lower 2 bits are the version (currently 0x01)"; "Bit 2 is the reply '
        'flag - needs to be sent on each reply from the back-end"',
    ),
    CheckInfo(
        "negotiation.unknown_request",
        "an unknown request gets an error reply or a clean close (destructive)",
        _RST + 'REPLY_ACK: "The payload should be set to zero on success or non-zero on '
        'failure"; Communication: "If back-end detects some error ... it may also close the '
        'connection"',
    ),
    CheckInfo(
        "config.get_config",
        "GET_CONFIG at offset 0 answered with the asked size",
        _RST + "VHOST_USER_GET_CONFIG: \"vhost-user back-end's payload size MUST match the "
        "front-end's request, vhost-user back-end uses zero length of payload to indicate an "
        'error"',
    ),
    CheckInfo(
        "config.offset",
        "GET_CONFIG at an offset inside the config space",
        _RST + "Virtio device config space: \":offset: a 32-bit offset of virtio device's "
        'configuration space"',
    ),
    CheckInfo(
        "config.change_msg",
        "CONFIG_CHANGE_MSG, when the back-end sends one",
        _RST + 'VHOST_USER_BACKEND_CONFIG_CHANGE_MSG: "When VHOST_USER_PROTOCOL_F_CONFIG is '
        "negotiated, vhost-user back-end sends such messages to notify that the virtio device's "
        'configuration space has changed"; request payload: N/A',
    ),
    CheckInfo(
        "shmem.get_shmem_config",
        "GET_SHMEM_CONFIG answered",
        _RST + 'VHOST_USER_GET_SHMEM_CONFIG: "The back-end will respond with the number of '
        "VIRTIO Shared Memory Regions it requires, and each shared memory region size in an "
        'array"',
    ),
    CheckInfo(
        "shmem.regions",
        "nregions consistent with the sizes, page multiples, count vs a virtio-pci config space",
        _RST + 'VIRTIO Shared Memory Region configuration: "num regions specifies the number '
        'of valid regions (non-zero size)"; "The Shared Memory Region size must be a multiple '
        'of the page size supported by mmap(2)"',
    ),
    CheckInfo(
        "shmem.map_rules",
        "every SHMEM_MAP the back-end sent follows the rules",
        _RST + 'VHOST_USER_BACKEND_SHMEM_MAP: "Mapping over an already existing map is not '
        "allowed and requests shall fail. Therefore, the memory range in the request must "
        'correspond with a valid, free region of the VIRTIO Shared Memory Region"; request '
        "payload: fd and struct VhostUserMMap",
    ),
    CheckInfo(
        "shmem.unmap_rules",
        "every SHMEM_UNMAP names one whole live mapping",
        _RST + 'VHOST_USER_BACKEND_SHMEM_UNMAP: "Note that the given range shall correspond to '
        "the entirety of a valid mapped region. A reply is generated indicating whether "
        'unmapping succeeded."',
    ),
    CheckInfo(
        "shmem.refusal",
        "the back-end survives a refused SHMEM_MAP",
        _RST + 'VHOST_USER_BACKEND_SHMEM_MAP: "note that mappings consume resources and that '
        'the request can fail when there are no resources available"',
    ),
    CheckInfo(
        "rings.setup",
        "SET_MEM_TABLE, then per queue NUM, ADDR, BASE, CALL, KICK, ENABLE accepted",
        _RST + 'Ring states: "The back-end must start a ring upon receiving a kick ... on the '
        'descriptor specified by VHOST_USER_SET_VRING_KICK"; SET_MEM_TABLE: "Sets the memory '
        'map regions on the back-end so it can translate the vring addresses"',
    ),
    CheckInfo(
        "rings.kick_call",
        "a kick answered by a call within the timeout",
        _RST + 'Ring states: "started and enabled: The back-end must process the ring '
        'normally, i.e. process all requests and execute them"; SET_VRING_CALL sets the call '
        "eventfd",
    ),
    CheckInfo(
        "rings.vring_base",
        "GET_VRING_BASE on stop returns a sane index",
        _RST + 'VHOST_USER_GET_VRING_BASE: "Stops the vring and returns the current descriptor '
        "index ... For a split virtqueue, returns only the 16-bit next descriptor index to "
        'process in the Available Ring"',
    ),
    CheckInfo(
        "lifecycle.reset",
        "RESET_DEVICE (or reset by GET_VRING_BASE) accepted",
        _RST + 'VHOST_USER_RESET_DEVICE: "Ask the vhost user back-end to disable all rings and '
        'reset all internal device state to the initial state, ready to be reinitialized"',
    ),
    CheckInfo(
        "lifecycle.reactivate",
        "the device works again after the reset",
        _RST + 'VHOST_USER_RESET_DEVICE: "ready to be reinitialized. The back-end retains '
        'ownership of the device throughout the reset operation"',
    ),
    CheckInfo(
        "lifecycle.mappings_after_reset",
        "after a reset the back-end does not unmap what the front-end dropped",
        _RST + 'VHOST_USER_BACKEND_SHMEM_MAP: "mappings are automatically unmapped by the '
        'front-end across device reset operation"',
    ),
    CheckInfo(
        "lifecycle.reconnect",
        "after a disconnect: a new connection, a clean exit, or a crash (destructive)",
        _RST + 'Communication: "An optional reconnection mechanism can be implemented"; '
        'Backend program conventions: "The back-end program must end (as quickly and cleanly '
        'as possible) when the SIGTERM signal is received"',
    ),
    CheckInfo(
        "hostile.malformed",
        "malformed messages neither crash nor hang the back-end (--hostile)",
        _RST + 'Communication: "If back-end detects some error such as incompatible features, '
        'it may also close the connection"',
    ),
)
BY_ID: dict[str, CheckInfo] = {info.id: info for info in CATALOGUE}


def make(
    check_id: str,
    verdict: Verdict,
    detail: str,
    *,
    sent: bytes | None = None,
    received: bytes | None = None,
) -> Check:
    """The ``Check`` for ``check_id`` (which must be in the catalogue)."""
    info = BY_ID[check_id]
    return Check(
        info.id,
        info.group,
        info.title,
        verdict,
        detail,
        info.spec,
        None if sent is None else sent.hex(),
        None if received is None else received.hex(),
    )
