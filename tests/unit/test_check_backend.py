"""check-backend's judgements on crafted evidence, and its three report formats.

The rule functions (``conformance.rules``) and the checks (``conformance.checks``) are pure:
each test hands them the bytes a back-end could send and reads the verdict. A malformed reply
must become a fail that carries its bytes.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from conformance import checks, report
from conformance.channel import ChannelEvent
from conformance.peer import Exchange
from conformance.rules import map_problems, region_problems, reply_header_problems, unmap_problems
from conformance.verdict import BY_ID, CATALOGUE, Check, Verdict, make
from conformance.wire import FdFacts, RawMessage
from vhost_user.messages import (
    BackendReq,
    FrontendReq,
    VhostUserConfig,
    VhostUserMMap,
    VhostUserShMemConfig,
    VhostUserU64,
)

V1, REPLY, NEED = 0x1, 0x4, 0x8
PAGE = 0x1000
MEMFD = FdFacts(regular=True, size=0x10000)


def mmap_msg(
    req: BackendReq,
    shmid: int = 0,
    shm_offset: int = 0,
    length: int = PAGE,
    *,
    fd_offset: int = 0,
    flags: int = 0,
    need_reply: bool = True,
    fds: tuple[FdFacts, ...] | None = None,
) -> RawMessage:
    body = VhostUserMMap(shmid, fd_offset, shm_offset, length, flags).pack()
    if fds is None:
        fds = (MEMFD,) if req is BackendReq.SHMEM_MAP else ()
    return RawMessage(req, V1 | (NEED if need_reply else 0), len(body), body, fds)


def reply(req: int, body: bytes, flags: int = V1 | REPLY) -> RawMessage:
    return RawMessage(req, flags, len(body), body)


def exchange(req: int, body: bytes, flags: int = V1 | REPLY) -> Exchange:
    return Exchange(b"\x01\x02", reply(req, body, flags))


# -- the contract ------------------------------------------------------------------------------
def test_the_catalogue_holds_the_contract_ids_in_order() -> None:
    assert [info.id for info in CATALOGUE] == [
        "negotiation.features", "negotiation.protocol_features", "negotiation.shmem_bit",
        "negotiation.reply_ack", "negotiation.reply_header", "negotiation.unknown_request",
        "config.get_config", "config.offset", "config.change_msg",
        "shmem.get_shmem_config", "shmem.regions", "shmem.map_rules", "shmem.unmap_rules",
        "shmem.refusal", "rings.setup", "rings.kick_call", "rings.vring_base",
        "lifecycle.reset", "lifecycle.reactivate", "lifecycle.mappings_after_reset",
        "lifecycle.reconnect", "hostile.malformed",
    ]  # fmt: skip
    assert [str(v) for v in Verdict] == ["pass", "fail", "warn", "n/a"]
    assert all(info.spec.startswith("vhost-user.rst: ") for info in CATALOGUE)


# -- rules on single messages --------------------------------------------------------------------
REGIONS = {0: 0x10000, 2: 0x4000}


def test_a_good_map_has_no_problem() -> None:
    assert map_problems(mmap_msg(BackendReq.SHMEM_MAP, 2, PAGE, PAGE), REGIONS, {}) == []


@pytest.mark.parametrize(
    ("msg", "words"),
    [
        (mmap_msg(BackendReq.SHMEM_MAP, shmid=1), "shmid 1 not declared"),
        (mmap_msg(BackendReq.SHMEM_MAP, 2, 0x3000, 0x2000), "ends past the 0x4000-byte region"),
        (mmap_msg(BackendReq.SHMEM_MAP, shm_offset=0x800), "not page-aligned"),
        (mmap_msg(BackendReq.SHMEM_MAP, fd_offset=0x10), "not page-aligned"),
        (mmap_msg(BackendReq.SHMEM_MAP, need_reply=False), "NEED_REPLY not set"),
        (mmap_msg(BackendReq.SHMEM_MAP, fds=()), "0 fds, exactly one"),
        (mmap_msg(BackendReq.SHMEM_MAP, fds=(MEMFD, MEMFD)), "2 fds, exactly one"),
        (mmap_msg(BackendReq.SHMEM_MAP, flags=0x6), "unknown flags 0x6"),
        (mmap_msg(BackendReq.SHMEM_MAP, length=0), "length 0"),
        (mmap_msg(BackendReq.SHMEM_MAP, 0, 0x1000, 0x2000), "overlaps the live mapping [0x2000"),
    ],
)
def test_each_map_rule_fails_on_its_own(msg: RawMessage, words: str) -> None:
    live = {(0, 0x2000): 0x1000, (2, 0): 0x1000}
    problems = map_problems(msg, REGIONS, live)
    assert [v for v, _ in problems] == [Verdict.FAIL]
    assert words in problems[0][1]


def test_a_map_past_the_end_of_its_file_is_a_warning() -> None:
    short = FdFacts(regular=True, size=0x800)
    problems = map_problems(mmap_msg(BackendReq.SHMEM_MAP, fds=(short,)), REGIONS, {})
    assert [v for v, _ in problems] == [Verdict.WARN]
    assert "0x800 bytes" in problems[0][1]
    device = FdFacts(regular=False, size=0)  # a character device: its size says nothing
    assert map_problems(mmap_msg(BackendReq.SHMEM_MAP, fds=(device,)), REGIONS, {}) == []


def test_without_a_layout_only_the_region_rules_are_skipped() -> None:
    assert map_problems(mmap_msg(BackendReq.SHMEM_MAP, shmid=7), None, {}) == []
    live = {(7, 0): PAGE}
    assert "overlaps" in map_problems(mmap_msg(BackendReq.SHMEM_MAP, shmid=7), None, live)[0][1]


def test_a_truncated_map_payload_is_a_fail_not_an_exception() -> None:
    msg = RawMessage(BackendReq.SHMEM_MAP, V1 | NEED, 8, bytes(8), (MEMFD,))
    ((verdict, text),) = map_problems(msg, REGIONS, {})
    assert verdict is Verdict.FAIL and "payload" in text


def test_unmap_rules() -> None:
    live = {(0, 0): 0x2000}
    assert unmap_problems(mmap_msg(BackendReq.SHMEM_UNMAP, 0, 0, 0x2000), live) == []
    part = unmap_problems(mmap_msg(BackendReq.SHMEM_UNMAP, 0, 0, PAGE), live)
    assert "not one whole live mapping" in part[0][1]
    with_fd = unmap_problems(mmap_msg(BackendReq.SHMEM_UNMAP, 0, 0, 0x2000, fds=(MEMFD,)), live)
    assert "fds with an unmap" in with_fd[0][1]
    silent = unmap_problems(mmap_msg(BackendReq.SHMEM_UNMAP, 0, 0, 0x2000, need_reply=False), live)
    assert "NEED_REPLY" in silent[0][1]


def test_region_rules() -> None:
    assert region_problems(VhostUserShMemConfig.declaring([PAGE, 0, 2 * PAGE]), 3) == []
    uncounted = VhostUserShMemConfig(1, (PAGE, PAGE))
    assert "nregions=1 but 2 non-zero sizes" in region_problems(uncounted, 2)[0][1]
    odd = VhostUserShMemConfig.declaring([PAGE + 1])
    assert "rule page-multiple" in region_problems(odd, 1)[0][1]
    five = region_problems(VhostUserShMemConfig.declaring([PAGE] * 5), 5)
    assert [v for v, _ in five] == [Verdict.WARN]


def test_reply_header_rules() -> None:
    good = reply(FrontendReq.GET_FEATURES, bytes(8))
    assert reply_header_problems(good, FrontendReq.GET_FEATURES) == []
    wrong = reply_header_problems(reply(FrontendReq.SET_FEATURES, bytes(8), V1), 1)
    assert [t for _, t in wrong] == ["request number 2, expected 1", "flags 0x1 lack REPLY (0x4)"]


# -- checks on crafted replies -----------------------------------------------------------------
def test_features_need_version_1() -> None:
    ok = checks.features(exchange(1, VhostUserU64(1 << 32 | 1 << 30).pack()))
    assert ok.verdict is Verdict.PASS
    legacy = checks.features(exchange(1, VhostUserU64(1 << 30).pack()))
    assert legacy.verdict is Verdict.FAIL and "VIRTIO_F_VERSION_1" in legacy.detail


def test_a_malformed_reply_is_a_fail_with_its_bytes() -> None:
    bad = exchange(FrontendReq.GET_FEATURES, b"\x00\x01\x02")
    check = checks.features(bad)
    assert check.verdict is Verdict.FAIL
    assert check.sent == "0102"
    assert check.received == "01000000" + "05000000" + "03000000" + "000102"
    config = checks.get_config(exchange(FrontendReq.GET_CONFIG, bytes(5)), 16, offered=True)
    assert config.verdict is Verdict.FAIL and config.received is not None
    short = checks.shmem_config(exchange(FrontendReq.GET_SHMEM_CONFIG, bytes(4)), None, 3)
    assert short.verdict is Verdict.FAIL and "rule head" in short.detail


@pytest.mark.parametrize(
    ("bits", "verdict", "words"),
    [
        (1 << 22, Verdict.PASS, "bit 22"),
        (1 << 20, Verdict.FAIL, "draft/rust-vmm 0.16 numbering"),
        (1 << 21, Verdict.FAIL, "GPA_ADDRESSES upstream"),
        (1 << 22 | 1 << 20, Verdict.PASS, "bit 20 too"),
        (0, Verdict.NA, "no shared-memory bit"),
    ],
)
def test_shmem_bit(bits: int, verdict: Verdict, words: str) -> None:
    check = checks.shmem_bit(bits | 1 << 3)
    assert check.verdict is verdict and words in check.detail


def test_protocol_features_a_shared_memory_back_end_needs() -> None:
    def offered(mask: int) -> Exchange:
        return exchange(FrontendReq.GET_PROTOCOL_FEATURES, VhostUserU64(mask).pack())

    features = 1 << 32 | 1 << 30
    full = 1 << 3 | 1 << 5 | 1 << 10 | 1 << 9 | 1 << 22
    assert checks.protocol_features(features, offered(full), True).verdict is Verdict.PASS
    no_fd = checks.protocol_features(features, offered(full & ~(1 << 10)), False)
    assert no_fd.verdict is Verdict.FAIL and "BACKEND_SEND_FD" in no_fd.detail
    plain = checks.protocol_features(features, offered(1 << 3), False)
    assert plain.verdict is Verdict.PASS and "would also need" in plain.detail
    no_config = checks.protocol_features(features, offered(full & ~(1 << 9)), True)
    assert no_config.verdict is Verdict.WARN
    legacy = checks.protocol_features(1 << 32, None, False)
    assert legacy.verdict is Verdict.FAIL


def test_reply_ack() -> None:
    acked = exchange(FrontendReq.SET_FEATURES, VhostUserU64(0).pack())
    assert checks.reply_ack(True, [], acked).verdict is Verdict.PASS
    stray = reply(FrontendReq.SET_FEATURES, VhostUserU64(0).pack())
    chatty = checks.reply_ack(True, [(b"\xaa", stray)], acked)
    assert chatty.verdict is Verdict.FAIL and chatty.sent == "aa" and chatty.received
    assert checks.reply_ack(True, [], Exchange(b"", None)).verdict is Verdict.FAIL
    refused = exchange(FrontendReq.SET_FEATURES, VhostUserU64(22).pack())
    assert checks.reply_ack(True, [], refused).verdict is Verdict.FAIL
    assert checks.reply_ack(False, [], None).verdict is Verdict.NA


def test_shmem_config_short_reply_is_a_pass_with_a_note() -> None:
    body = VhostUserShMemConfig.declaring([PAGE, PAGE]).pack()[:24]
    check = checks.shmem_config(exchange(FrontendReq.GET_SHMEM_CONFIG, body), None, 3)
    assert check.verdict is Verdict.PASS and "libvhost-user style" in check.detail
    silent = checks.shmem_config(Exchange(b"\x2c", None), "no reply within 3 s", 3)
    assert silent.verdict is Verdict.FAIL and silent.detail == "no reply within 3 s"


def test_config_offset() -> None:
    whole = bytes(range(16))

    def at(offset: int, data: bytes) -> Exchange:
        return exchange(24, VhostUserConfig(offset, len(data), 0, data).pack())

    assert checks.config_offset(whole, 4, at(4, whole[4:])).verdict is Verdict.PASS
    ignored = checks.config_offset(whole, 4, at(4, whole[:12]))
    assert ignored.verdict is Verdict.WARN and "ignored" in ignored.detail
    assert checks.config_offset(whole, 4, at(4, bytes(12))).verdict is Verdict.FAIL


def event(msg: RawMessage, problems: list[tuple[Verdict, str]] | None = None) -> ChannelEvent:
    return ChannelEvent("activation", msg, problems or [])


def test_map_rules_over_the_session() -> None:
    good = event(mmap_msg(BackendReq.SHMEM_MAP))
    assert checks.map_rules([good]).verdict is Verdict.PASS
    assert checks.map_rules([]).verdict is Verdict.NA
    clash = event(mmap_msg(BackendReq.SHMEM_MAP, 0, PAGE), [(Verdict.FAIL, "overlaps it")])
    check = checks.map_rules([good, clash])
    assert check.verdict is Verdict.FAIL
    assert "SHMEM_MAP shmid 0 [0x1000, +0x1000) (activation): overlaps it" in check.detail
    assert check.received == clash.msg.raw.hex()


def test_mappings_after_reset_and_refusal() -> None:
    unmap = event(mmap_msg(BackendReq.SHMEM_UNMAP))
    unmap.unmaps_dropped = True
    assert checks.mappings_after_reset([unmap], 1).verdict is Verdict.FAIL
    assert checks.unmap_rules([unmap]).verdict is Verdict.NA  # judged there, not twice
    assert checks.mappings_after_reset([], 1).verdict is Verdict.PASS
    assert checks.mappings_after_reset([], 0).verdict is Verdict.NA
    refused = event(mmap_msg(BackendReq.SHMEM_MAP))
    refused.refused_on_purpose = True
    assert checks.refusal([refused], alive=True).verdict is Verdict.PASS
    assert checks.refusal([refused], alive=False).verdict is Verdict.FAIL
    assert checks.refusal([], alive=True).verdict is Verdict.NA


def test_vring_base() -> None:
    def base(q: int, num: int) -> tuple[int, Exchange]:
        body = q.to_bytes(4, "little") + num.to_bytes(4, "little")
        return q, exchange(FrontendReq.GET_VRING_BASE, body)

    assert checks.vring_base([base(0, 3)], {0: 3}, {0: 3}).verdict is Verdict.PASS
    assert checks.vring_base([base(0, 4)], {0: 3}, {0: 3}).verdict is Verdict.FAIL
    assert checks.vring_base([base(1, 3)], {1: 5}, {1: 5}).verdict is Verdict.FAIL


# -- report formats ------------------------------------------------------------------------------
INFO = report.BackendInfo(["be", "--socket-path", "{socket}"], "/s.sock", 4, "2026-12-03")
SAMPLE: list[Check] = [
    make("negotiation.features", Verdict.PASS, "features 0x100000000"),
    make("negotiation.shmem_bit", Verdict.FAIL, "bit 20 | alone", sent=b"\x0f", received=b"\x10"),
    make("config.change_msg", Verdict.NA, "none sent"),
    make("shmem.map_rules", Verdict.WARN, "past EOF"),
]


def test_json_report_shape() -> None:
    data = json.loads(report.json_text(INFO, SAMPLE))
    assert data["tool"] == "virtio-emu check-backend" and data["format"] == 1
    assert data["backend"] == {
        "command": INFO.command,
        "socket": "/s.sock",
        "virtio_id": 4,
        "version": None,
    }
    assert data["summary"] == {"pass": 1, "fail": 1, "warn": 1, "n/a": 1}
    shmem_bit = data["checks"][1]
    assert shmem_bit == {
        "id": "negotiation.shmem_bit",
        "group": "negotiation",
        "title": BY_ID["negotiation.shmem_bit"].title,
        "verdict": "fail",
        "detail": "bit 20 | alone",
        "spec": BY_ID["negotiation.shmem_bit"].spec,
        "sent": "0f",
        "received": "10",
    }
    assert data["checks"][0]["sent"] is None


def test_table_colours_only_when_asked() -> None:
    plain = report.table(SAMPLE, colour=False, width=100)
    assert "\x1b[" not in plain
    lines = plain.splitlines()
    assert lines[0].split() == ["group", "check", "verdict", "detail"]
    assert lines[2].split()[:3] == ["negotiation", "shmem_bit", "fail"]
    assert lines[-1] == "1 pass, 1 fail, 1 warn, 1 n/a"
    coloured = report.table(SAMPLE, colour=True, width=100)
    assert "\x1b[31mfail" in coloured


def test_table_cuts_long_details_to_the_width() -> None:
    long = [make("shmem.regions", Verdict.PASS, "x" * 500)]
    assert all(len(line) <= 80 for line in report.table(long, colour=False, width=80).splitlines())


def test_markdown_report_has_the_evidence_of_failures() -> None:
    text = report.markdown(INFO, SAMPLE)
    assert text.startswith("# virtio-emu check-backend report\n")
    assert "- back-end: `be --socket-path {socket}`" in text
    assert "| negotiation | shmem_bit | fail | bit 20 \\| alone |" in text
    assert "### negotiation.shmem_bit: fail" in text
    assert "Sent: `0f`" in text and "Received: `10`" in text
    assert "Spec: vhost-user.rst: Protocol features" in text
    assert "### shmem.map_rules: warn" in text
    assert "### config.change_msg" not in text


def test_markdown_and_json_carry_a_given_title_and_backend_version() -> None:
    named = dataclasses.replace(INFO, title="virtiofsd (Debian)", version="virtiofsd 1.13.2")
    text = report.markdown(named, SAMPLE)
    assert text.startswith("# virtiofsd (Debian)\n")
    assert text.count("\n# ") == 0
    assert "- back-end version: virtiofsd 1.13.2\n" in text
    assert report.to_json(named, SAMPLE)["backend"]["version"] == "virtiofsd 1.13.2"
