"""One judgement per check id: evidence in, a ``Check`` out (no I/O here).

Each function's docstring names the spec sentence it rests on; the catalogue
(``verdict.CATALOGUE``) carries the quotation into the report. The runner gathers the
evidence (``runner.py``); unit tests feed crafted evidence.
"""

from __future__ import annotations

from collections.abc import Sequence

from conformance.channel import ChannelEvent
from conformance.peer import Exchange, evidence
from conformance.rules import Problem, parse_shmem_config, region_problems, reply_header_problems
from conformance.session import PROTOCOL_FEATURES, VIRTIO_F_VERSION_1
from conformance.verdict import Check, Verdict, make
from conformance.wire import RawMessage
from vhost_user.messages import (
    SHMEM_FEATURE_BIT_UPSTREAM,
    SHMEM_FEATURE_BITS,
    BackendReq,
    VhostUserConfig,
    VhostUserProtocolFeature,
)
from wire.errors import RemoteProtocolError

PF = VhostUserProtocolFeature


def _worst(problems: Sequence[Problem]) -> Verdict:
    verdicts = {v for v, _ in problems}
    if Verdict.FAIL in verdicts:
        return Verdict.FAIL
    return Verdict.WARN if Verdict.WARN in verdicts else Verdict.PASS


def features(exchange: Exchange) -> Check:
    """GET_FEATURES: "Get from the underlying vhost implementation the features bitmask";
    a virtio 1.x device offers VIRTIO_F_VERSION_1."""
    value = exchange.u64()
    if value is None:
        return make(
            "negotiation.features",
            Verdict.FAIL,
            "the reply is not a u64",
            **evidence(exchange),
        )
    missing = []
    if not value & VIRTIO_F_VERSION_1:
        missing.append("VIRTIO_F_VERSION_1 (bit 32)")
    note = "" if value & PROTOCOL_FEATURES else "; no VHOST_USER_F_PROTOCOL_FEATURES (bit 30)"
    if missing:
        return make(
            "negotiation.features",
            Verdict.FAIL,
            f"features {value:#x} lack {', '.join(missing)}{note}",
            **evidence(exchange),
        )
    return make("negotiation.features", Verdict.PASS, f"features {value:#x}{note}")


def protocol_features(features_value: int, exchange: Exchange | None, has_config: bool) -> Check:
    """GET_PROTOCOL_FEATURES answered. A back-end with a shared-memory bit needs REPLY_ACK,
    BACKEND_REQ and BACKEND_SEND_FD (SHMEM_MAP travels on the back-end channel with an fd and
    waits for its status: "If VHOST_USER_PROTOCOL_F_REPLY_ACK is negotiated, and back-end set
    the VHOST_USER_NEED_REPLY flag, the front-end must respond"); a device with a config
    space needs CONFIG."""
    cid = "negotiation.protocol_features"
    if not features_value & PROTOCOL_FEATURES:
        return make(
            cid,
            Verdict.FAIL,
            "VHOST_USER_F_PROTOCOL_FEATURES not offered: no protocol feature (and no shared "
            "memory) can be negotiated",
        )
    offered = None if exchange is None else exchange.u64()
    if exchange is None or offered is None:
        return make(
            cid,
            Verdict.FAIL,
            "GET_PROTOCOL_FEATURES reply is not a u64",
            sent=None if exchange is None else exchange.sent,
            received=None if exchange is None else exchange.received,
        )
    shmem_bits = set(SHMEM_FEATURE_BITS)
    names = [f.name or "" for f in PF if offered & f and f.bit_length() - 1 not in shmem_bits]
    detail = f"offered {offered:#x} ({', '.join(names) or 'nothing'})"
    for_shmem = PF.REPLY_ACK | PF.BACKEND_REQ | PF.BACKEND_SEND_FD
    missing = [f.name or "" for f in PF if f & for_shmem and not offered & f]
    has_shmem = any(offered & (1 << bit) for bit in shmem_bits)
    if missing and has_shmem:
        return make(
            cid,
            Verdict.FAIL,
            f"{detail}; shared memory also needs {', '.join(missing)}: without them no "
            "SHMEM_MAP can be sent and answered",
            **evidence(exchange),
        )
    if has_config and not offered & PF.CONFIG:
        return make(
            cid,
            Verdict.WARN,
            f"{detail}; the device has a config space but CONFIG is not offered",
            **evidence(exchange),
        )
    if missing:
        detail += f" (shared memory would also need {', '.join(missing)})"
    return make(cid, Verdict.PASS, detail)


def shmem_bit(
    offered: int | None, answered_shmem_config: bool = False, evidence: Exchange | None = None
) -> Check:
    """Protocol feature VHOST_USER_PROTOCOL_F_SHMEM is bit 22 upstream; 20 (the draft
    patches) is GET_VRING_BASE_INFLIGHT upstream and 21 (rust-vmm vhost <= 0.16) is
    GPA_ADDRESSES."""
    cid = "negotiation.shmem_bit"
    if offered is None:
        return make(cid, Verdict.NA, "no protocol features")
    bits = [bit for bit in SHMEM_FEATURE_BITS if offered & (1 << bit)]
    if SHMEM_FEATURE_BIT_UPSTREAM in bits:
        others = [b for b in bits if b != SHMEM_FEATURE_BIT_UPSTREAM]
        more = "".join(f"; bit {b} too: {SHMEM_FEATURE_BITS[b]}" for b in others)
        return make(cid, Verdict.PASS, f"bit 22 (SHMEM upstream){more}")
    sent = None if evidence is None else evidence.sent
    received = None if evidence is None else evidence.received
    if bits:
        named = ", ".join(f"bit {b} ({SHMEM_FEATURE_BITS[b]})" for b in bits)
        return make(
            cid,
            Verdict.FAIL,
            f"{named} without bit 22: draft/rust-vmm 0.16 "
            "numbering; upstream front-ends (QEMU, ours) negotiate no shared memory",
            sent=sent,
            received=received,
        )
    if answered_shmem_config:
        return make(
            cid,
            Verdict.FAIL,
            "no shared-memory bit offered, yet GET_SHMEM_CONFIG was answered",
            sent=sent,
            received=received,
        )
    return make(cid, Verdict.NA, "no shared-memory bit (20, 21 or 22) offered")


def reply_ack(
    acked: bool,
    unsolicited: Sequence[tuple[bytes, RawMessage]],
    asked: Exchange | None,
) -> Check:
    """REPLY_ACK: with need_reply set "the back-end MUST respond"; Communication: "Most of
    the requests don't require replies" (so without it, none comes)."""
    cid = "negotiation.reply_ack"
    if unsolicited:
        sent, msg = unsolicited[0]
        return make(
            cid,
            Verdict.FAIL,
            f"{len(unsolicited)} reply(ies) to requests without "
            "NEED_REPLY: a front-end reads them as the answer to its next request",
            sent=sent,
            received=msg.raw,
        )
    if not acked:
        return make(cid, Verdict.NA, "REPLY_ACK not offered; no reply came unasked")
    if asked is None or asked.reply is None:
        return make(
            cid,
            Verdict.FAIL,
            "no reply to a SET_* with NEED_REPLY",
            sent=None if asked is None else asked.sent,
        )
    status = asked.u64()
    if status != 0:
        return make(
            cid,
            Verdict.FAIL,
            f"ack status {status} to a valid SET_FEATURES",
            sent=asked.sent,
            received=asked.received,
        )
    return make(cid, Verdict.PASS, "acked with NEED_REPLY, silent without it")


def reply_header(samples: Sequence[tuple[int, Exchange]]) -> Check:
    """Header: "Bit 2 is the reply flag - needs to be sent on each reply from the back-end";
    version bits 0x01; the reply answers the request's number."""
    cid = "negotiation.reply_header"
    problems: list[Problem] = []
    for request, exchange in samples:
        if exchange.reply is None:
            continue
        for verdict, text in reply_header_problems(exchange.reply, request):
            problems.append((verdict, text))
            if verdict is Verdict.FAIL:
                return make(cid, Verdict.FAIL, text, **evidence(exchange))
    if not samples:
        return make(cid, Verdict.NA, "no reply seen")
    if problems:
        return make(cid, _worst(problems), "; ".join(t for _, t in problems))
    return make(cid, Verdict.PASS, f"{len(samples)} replies checked")


def get_config(exchange: Exchange | None, size: int, offered: bool) -> Check:
    """GET_CONFIG: "vhost-user back-end's payload size MUST match the front-end's request,
    vhost-user back-end uses zero length of payload to indicate an error"."""
    cid = "config.get_config"
    if not offered:
        return make(cid, Verdict.NA, "CONFIG not offered")
    assert exchange is not None and exchange.reply is not None
    body = exchange.reply.body
    if not body:
        return make(
            cid,
            Verdict.WARN,
            f"empty reply (an error) to {size} bytes at offset 0",
            **evidence(exchange),
        )
    try:
        cfg = VhostUserConfig.unpack(body)
    except RemoteProtocolError as exc:
        return make(
            cid,
            Verdict.FAIL,
            f"malformed reply: {exc}",
            **evidence(exchange),
        )
    if cfg.size != size or len(cfg.payload) != size:
        return make(
            cid,
            Verdict.FAIL,
            f"answered {cfg.size} bytes for {size}",
            **evidence(exchange),
        )
    return make(cid, Verdict.PASS, f"{size} bytes at offset 0")


def config_offset(whole: bytes | None, offset: int, exchange: Exchange | None) -> Check:
    """The config payload's ``offset`` is "a 32-bit offset of virtio device's configuration
    space": the answer at an offset is the slice of the whole space."""
    cid = "config.offset"
    if whole is None or exchange is None or exchange.reply is None:
        return make(cid, Verdict.NA, "no config space read at offset 0")
    try:
        cfg = VhostUserConfig.unpack(exchange.reply.body)
    except RemoteProtocolError as exc:
        return make(
            cid,
            Verdict.FAIL,
            f"malformed reply: {exc}",
            **evidence(exchange),
        )
    want = whole[offset:]
    if cfg.payload == want:
        same = cfg.payload == whole[: len(want)]
        note = " (the bytes cannot tell it from an ignored offset)" if same else ""
        return make(cid, Verdict.PASS, f"offset {offset} returns the slice{note}")
    if cfg.payload == whole[: len(want)]:
        return make(
            cid,
            Verdict.WARN,
            f"offset {offset} ignored: the answer starts at offset "
            "0 (libvhost-user style); front-ends must always read from offset 0",
            **evidence(exchange),
        )
    return make(
        cid,
        Verdict.FAIL,
        f"at offset {offset}: neither the slice nor the start",
        **evidence(exchange),
    )


def change_msg(events: Sequence[ChannelEvent], config_acked: bool) -> Check:
    """BACKEND_CONFIG_CHANGE_MSG: sent "when VHOST_USER_PROTOCOL_F_CONFIG is negotiated";
    its request payload is N/A (empty) and it carries no fd."""
    cid = "config.change_msg"
    seen = [e for e in events if e.request is BackendReq.CONFIG_CHANGE_MSG]
    if not seen:
        return make(cid, Verdict.NA, "the back-end sent no CONFIG_CHANGE_MSG")
    for event in seen:
        if not config_acked:
            return make(
                cid,
                Verdict.FAIL,
                "CONFIG_CHANGE_MSG without CONFIG negotiated",
                received=event.msg.raw,
            )
        if event.msg.body or event.msg.fds:
            return make(
                cid, Verdict.FAIL, "CONFIG_CHANGE_MSG with a payload or fds", received=event.msg.raw
            )
    return make(cid, Verdict.PASS, f"{len(seen)} CONFIG_CHANGE_MSG, well formed")


def shmem_config(exchange: Exchange | None, error: str | None, timeout: float) -> Check:
    """GET_SHMEM_CONFIG: "The back-end will respond with the number of VIRTIO Shared Memory
    Regions it requires, and each shared memory region size in an array"."""
    cid = "shmem.get_shmem_config"
    if exchange is None:
        return make(cid, Verdict.NA, error or "no shared-memory bit negotiated")
    if exchange.reply is None:
        return make(
            cid, Verdict.FAIL, error or f"no reply within {timeout:g} s", sent=exchange.sent
        )
    config, problem = parse_shmem_config(exchange.reply.body)
    if config is None:
        return make(cid, Verdict.FAIL, problem, **evidence(exchange))
    size = len(exchange.reply.body)
    if size < 2056:
        return make(
            cid,
            Verdict.PASS,
            f"short reply of {size} bytes (libvhost-user style): "
            f"regions {fmt_regions(config.regions())}",
        )
    return make(cid, Verdict.PASS, f"regions {fmt_regions(config.regions())}")


def fmt_regions(regions: dict[int, int]) -> str:
    return "{" + ", ".join(f"{k}: {v:#x}" for k, v in sorted(regions.items())) + "}"


def regions(exchange: Exchange | None) -> Check:
    """VIRTIO Shared Memory Region configuration: "num regions specifies the number of valid
    regions (non-zero size)"; "The Shared Memory Region size must be a multiple of the page
    size supported by mmap(2)"."""
    cid = "shmem.regions"
    if exchange is None or exchange.reply is None:
        return make(cid, Verdict.NA, "no GET_SHMEM_CONFIG reply")
    config, _ = parse_shmem_config(exchange.reply.body)
    if config is None:
        return make(cid, Verdict.NA, "the reply could not be read (see shmem.get_shmem_config)")
    sent_sizes = (len(exchange.reply.body) - 8) // 8
    problems = region_problems(config, sent_sizes)
    if problems:
        return make(
            cid,
            _worst(problems),
            "; ".join(t for _, t in problems),
            **evidence(exchange),
        )
    count = config.nregions
    return make(cid, Verdict.PASS, f"{count} region(s), page multiples, nregions consistent")


def map_rules(events: Sequence[ChannelEvent]) -> Check:
    """SHMEM_MAP: "Mapping over an already existing map is not allowed and requests shall
    fail"; the range "must correspond with a valid, free region"; payload fd + VhostUserMMap;
    the back-end asks for the outcome (NEED_REPLY) and waits for it."""
    cid = "shmem.map_rules"
    maps = [e for e in events if e.request is BackendReq.SHMEM_MAP]
    if not maps:
        return make(cid, Verdict.NA, "the back-end sent no SHMEM_MAP")
    return _judge_events(cid, maps, "SHMEM_MAP")


def unmap_rules(events: Sequence[ChannelEvent]) -> Check:
    """SHMEM_UNMAP: "the given range shall correspond to the entirety of a valid mapped
    region. A reply is generated indicating whether unmapping succeeded"."""
    cid = "shmem.unmap_rules"
    unmaps = [e for e in events if e.request is BackendReq.SHMEM_UNMAP and not e.unmaps_dropped]
    if not unmaps:
        return make(cid, Verdict.NA, "the back-end sent no SHMEM_UNMAP")
    return _judge_events(cid, unmaps, "SHMEM_UNMAP")


def _judge_events(cid: str, events: Sequence[ChannelEvent], what: str) -> Check:
    problems = [(e, v, t) for e in events for v, t in e.problems]
    for verdict in (Verdict.FAIL, Verdict.WARN):
        found = [(e, t) for e, v, t in problems if v is verdict]
        if found:
            event, text = found[0]
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            return make(
                cid,
                verdict,
                f"{event.describe()}: {text}{more}",
                sent=event.reply,
                received=event.msg.raw,
            )
    return make(cid, Verdict.PASS, f"{len(events)} {what} checked")


def refusal(events: Sequence[ChannelEvent], alive: bool) -> Check:
    """SHMEM_MAP: "the request can fail when there are no resources available": a refused
    map is an answer the back-end must survive."""
    cid = "shmem.refusal"
    refused = [e for e in events if e.refused_on_purpose]
    if not refused:
        return make(cid, Verdict.NA, "no SHMEM_MAP arrived to refuse")
    if not alive:
        return make(
            cid,
            Verdict.FAIL,
            "the back-end stopped answering after a refused map",
            received=refused[0].msg.raw,
        )
    return make(
        cid,
        Verdict.PASS,
        f"refused {refused[0].describe()} with ENOSPC; the back-end still answers",
    )


def vring_base(
    answers: Sequence[tuple[int, Exchange]], posted: dict[int, int], used: dict[int, int]
) -> Check:
    """GET_VRING_BASE: "Stops the vring and returns the current descriptor index ... the
    16-bit next descriptor index to process in the Available Ring"."""
    cid = "rings.vring_base"
    if not answers:
        return make(cid, Verdict.NA, "no ring was set up")
    details = []
    for q, exchange in answers:
        reply = exchange.reply
        if reply is None or len(reply.body) != 8:
            return make(
                cid,
                Verdict.FAIL,
                f"queue {q}: malformed reply",
                **evidence(exchange),
            )
        index, num = (
            int.from_bytes(reply.body[:4], "little"),
            int.from_bytes(reply.body[4:], "little"),
        )
        if index != q:
            return make(
                cid,
                Verdict.FAIL,
                f"queue {q}: reply names queue {index}",
                **evidence(exchange),
            )
        avail, done = posted.get(q, 0), used.get(q, 0)
        if num > avail or num != done:
            return make(
                cid,
                Verdict.FAIL,
                f"queue {q}: base {num}, {avail} made available, used idx {done}",
                **evidence(exchange),
            )
        details.append(f"q{q}={num}")
    return make(cid, Verdict.PASS, "base == used idx: " + ", ".join(details))


def mappings_after_reset(events: Sequence[ChannelEvent], dropped: int) -> Check:
    """SHMEM_MAP: "mappings are automatically unmapped by the front-end across device reset
    operation": a back-end must not unmap them again afterwards."""
    cid = "lifecycle.mappings_after_reset"
    wrong = [e for e in events if e.unmaps_dropped]
    if wrong:
        return make(
            cid,
            Verdict.FAIL,
            f"{wrong[0].describe()}: unmaps what the reset dropped",
            received=wrong[0].msg.raw,
        )
    if not dropped:
        return make(cid, Verdict.NA, "no mapping was live at the reset")
    return make(
        cid, Verdict.PASS, f"{dropped} mapping(s) dropped at the reset; none unmapped again"
    )
