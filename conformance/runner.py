"""The battery, in order: non-destructive checks on one session, destructive ones last.

Main session: negotiation (features, protocol features, the shared-memory bit, REPLY_ACK,
reply headers), config, the back-end channel, GET_SHMEM_CONFIG, ring activation, the device's
kick request, the stimulus, GET_VRING_BASE, a reset, re-activation with one SHMEM_MAP refused
on purpose; then the back-end channel's record is judged (map and unmap rules, mappings after
the reset, CONFIG_CHANGE_MSG). A step that loses the connection (or gets no reply, which
leaves the stream out of step) fails its check and the session is rebuilt on a new
connection, restarting a ``-- CMD`` back-end if it went away, so one mistake fails one check.

Destructive checks follow, each on a fresh connection: an unknown request, a disconnect and
reconnect, and with ``--hostile`` a few malformed messages. Without a command to restart the
back-end, the ones it did not survive leave the rest "n/a" with the reason.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from conformance import checks
from conformance.channel import ChannelEvent
from conformance.memory import MAX_QUEUES, wait_call
from conformance.peer import BackendFailed, Exchange
from conformance.rules import parse_shmem_config
from conformance.session import PF, PROTOCOL_FEATURES, Session
from conformance.stimuli import (
    DEFAULT_QUEUES,
    KICK_REQUESTS,
    VIRTIO_ID_BLK,
    VIRTIO_ID_FS,
    Stimulus,
    StimulusError,
)
from conformance.target import Target, TargetError
from conformance.verdict import CATALOGUE, Check, Verdict, make
from conformance.wire import NoReply, PeerLost, RawMessage
from vhost_user.codec import VhostUserHeader
from vhost_user.messages import (
    VHOST_USER_VERSION,
    FrontendReq,
    VhostUserConfig,
    VhostUserHeaderFlag,
    VhostUserU64,
)

#: A request number no vhost-user revision defines.
UNKNOWN_REQUEST = 99
#: Device config sizes this tool reads (virtio-fs: tag + num_request_queues; virtio-blk: the
#: fields every back-end has); others get ``DEFAULT_CONFIG`` bytes.
CONFIG_SIZES: dict[int, tuple[int, int]] = {VIRTIO_ID_FS: (40, 36), VIRTIO_ID_BLK: (32, 8)}
DEFAULT_CONFIG = (16, 4)
ERRORS = (BackendFailed, PeerLost)


@dataclass(frozen=True)
class Options:
    virtio_id: int | None
    num_queues: int | None
    stimulus: Stimulus
    hostile: bool
    timeout: float


class Abort(Exception):
    """The main session cannot go on (no back-end to talk to)."""


def _header(request: int, flags: int, size: int) -> bytes:
    return VhostUserHeader(request, flags, size).pack()


class Runner:
    def __init__(self, target: Target, options: Options) -> None:
        self.target = target
        self.opts = options
        self.virtio_id = options.virtio_id or options.stimulus.virtio_id
        self.results: dict[str, Check] = {}
        self.session: Session | None = None
        self.samples: list[tuple[int, Exchange]] = []
        self.notes: list[str] = []
        #: What each stimulus did (also in ``notes``), quoted when no map came.
        self.stimulus_notes: list[str] = []
        self.why_not: str = "not reached"
        #: Mappings live when the front-end reset the device (``_reset``).
        self.dropped = 0
        #: What earlier sessions' back-end channels recorded (a session lost mid-way).
        self.past_events: list[ChannelEvent] = []

    # -- bookkeeping ----------------------------------------------------------------------
    def record(self, check: Check) -> None:
        old = self.results.get(check.id)
        if old is None or old.verdict is not Verdict.FAIL:
            self.results[check.id] = check

    def fail(self, cid: str, exc: Exception) -> None:
        sent = getattr(exc, "sent", None)
        received = getattr(exc, "received", None)
        self.record(make(cid, Verdict.FAIL, self._why(exc), sent=sent, received=received))

    def _why(self, exc: Exception) -> str:
        """The exception's words, and the back-end's exit status if it died meanwhile."""
        status = self._crashed()
        died = f" (the back-end died: exit status {status})" if status is not None else ""
        return f"{exc}{died}"

    def na(self, cid: str, why: str) -> None:
        if cid not in self.results:
            self.results[cid] = make(cid, Verdict.NA, why)

    def ordered(self) -> list[Check]:
        for info in CATALOGUE:
            self.na(info.id, self.why_not)
        return [self.results[info.id] for info in CATALOGUE]

    # -- sessions ---------------------------------------------------------------------------
    def _connect(self, *, shmem_config: bool = True, negotiate: bool = True) -> Session:
        """A new, negotiated connection. A ``-- CMD`` back-end that was on its way out (one
        that ends with its front-end, as virtiofsd does, still holds its socket for a moment)
        is started again and tried once more."""
        try:
            return self._connect_once(shmem_config, negotiate)
        except Abort:
            if not self.target.can_restart or self.target.wait_exit(1.0) is None:
                raise
        return self._connect_once(shmem_config, negotiate)

    def _connect_once(self, shmem_config: bool, negotiate: bool) -> Session:
        try:
            self.target.ensure()
            session = Session(self.target.connect(self.opts.timeout), self.opts.timeout)
        except TargetError as exc:
            raise Abort(str(exc)) from exc
        if negotiate:
            try:
                session.negotiate(shmem_config=shmem_config)
            except ERRORS as exc:
                session.close()
                raise Abort(f"negotiation on a new connection failed: {exc}") from exc
        return session

    def _recover(self, after: str, *, shmem_config: bool = True) -> Session:
        """A new main session after ``after`` broke the last one."""
        if self.session is not None:
            if self.session.recorder is not None:
                self.past_events += self.session.recorder.snapshot()
            self.session.close()
            self.session = None
        try:
            self.session = self._connect(shmem_config=shmem_config)
        except Abort as exc:
            self.why_not = f"not reached: the back-end was lost at {after} ({exc})"
            raise
        self.notes.append(f"reconnected after {after}")
        return self.session

    def _broken(self, session: Session) -> bool:
        return session.peer.lost is not None

    # -- the battery ------------------------------------------------------------------------
    def run(self) -> list[Check]:
        """Every check of the catalogue, in its order. ``TargetError``: could not run."""
        self.target.start()
        try:
            try:
                self.session = self._connect(negotiate=False)
            except Abort as exc:
                raise TargetError(str(exc)) from exc
            try:
                self._main()
            except Abort as exc:
                self.why_not = self.why_not if "lost" in self.why_not else f"not reached: {exc}"
            finally:
                if self.session is not None:
                    self.session.close()
                    self.session = None
            self._destructive()
        finally:
            self.target.close()
            self._note_restarts()
        return self.ordered()

    def _note_restarts(self) -> None:
        if self.target.starts > 1:
            self.notes.append(f"the back-end was started {self.target.starts} times")
        crashes = [status for status in self.target.exits if status != 0]
        if crashes:
            self.notes.append(f"back-end exit statuses seen: {crashes}; log: {self.target.tail()}")

    def _main(self) -> None:
        s = self.session
        assert s is not None
        s = self._negotiation(s)
        s = self._config(s)
        s = self._channel_and_shmem(s)
        num_queues = self._queue_count(s)
        s = self._activate(s, "rings.setup", num_queues)
        if s.recorder is not None:
            s.recorder.settle(0.15, self.opts.timeout)
        if s.active:
            self._kick(s, "rings.kick_call")
        self._fire(s, "stimulus")
        posted = {q.index: q.avail_idx for q in s.queues}
        if s.active:
            try:
                answers = s.stop_rings()
                used = {q.index: q.used_idx for q in s.queues}
                self.record(checks.vring_base(answers, posted, used))
            except ERRORS as exc:
                self.fail("rings.vring_base", exc)
                s = self._recover("rings.vring_base")
        else:
            self.na("rings.vring_base", "the rings were not set up")
        s = self._reset(s)
        s = self._activate(s, "lifecycle.reactivate", num_queues)
        if s.active:
            if s.recorder is not None:
                s.recorder.settle(0.15, self.opts.timeout)
            self._kick(s, "lifecycle.reactivate")
            if "lifecycle.reactivate" not in self.results:
                self.record(
                    make(
                        "lifecycle.reactivate",
                        Verdict.PASS,
                        f"{num_queues} queue(s) set up again after the reset",
                    )
                )
        self._fire(s, "stimulus after reset")
        self._judge_channel(s)

    def _negotiation(self, s: Session) -> Session:
        try:
            exchange = s.get_features()
        except ERRORS as exc:
            self.fail("negotiation.features", exc)
            raise Abort("GET_FEATURES was not answered") from exc
        self.samples.append((FrontendReq.GET_FEATURES, exchange))
        self.record(checks.features(exchange))
        proto = None
        try:
            if s.n.features & PROTOCOL_FEATURES:
                proto = s.get_protocol_features()
                self.samples.append((FrontendReq.GET_PROTOCOL_FEATURES, proto))
                s.set_protocol_features()
            s.peer.call(FrontendReq.SET_OWNER, need_reply=False)
        except ERRORS as exc:
            self.fail("negotiation.protocol_features", exc)
            s = self._recover("negotiation.protocol_features", shmem_config=False)
        has_config = self.virtio_id in CONFIG_SIZES
        self.record(checks.protocol_features(s.n.features, proto, has_config))
        offered = s.n.protocol_offered if proto is not None else None
        self.record(checks.shmem_bit(offered, evidence=proto))
        asked = None
        try:
            driver = VhostUserU64(s.driver_features())
            s.peer.call(FrontendReq.SET_FEATURES, driver, need_reply=False)
            s.peer.call(FrontendReq.GET_FEATURES)
            if s.n.has(PF.REPLY_ACK):
                asked = s.peer.call(FrontendReq.SET_FEATURES, driver, need_reply=True)
                self.samples.append((FrontendReq.SET_FEATURES, asked))
                s.peer.ack_all = True
        except ERRORS as exc:
            self.fail("negotiation.reply_ack", exc)
            s = self._recover("negotiation.reply_ack", shmem_config=False)
        self.record(checks.reply_ack(s.n.has(PF.REPLY_ACK), s.peer.unsolicited, asked))
        return s

    def _config(self, s: Session) -> Session:
        size, offset = CONFIG_SIZES.get(self.virtio_id or 0, DEFAULT_CONFIG)
        if not s.n.has(PF.CONFIG):
            self.record(checks.get_config(None, size, offered=False))
            self.na("config.offset", "CONFIG not offered")
        else:
            try:
                whole = s.peer.call(
                    FrontendReq.GET_CONFIG, VhostUserConfig(0, size, 0, bytes(size))
                )
                self.samples.append((FrontendReq.GET_CONFIG, whole))
                check = checks.get_config(whole, size, offered=True)
                self.record(check)
                data = None
                if check.verdict is Verdict.PASS and whole.reply is not None:
                    data = VhostUserConfig.unpack(whole.reply.body).payload
                part = size - offset
                at = s.peer.call(
                    FrontendReq.GET_CONFIG, VhostUserConfig(offset, part, 0, bytes(part))
                )
                self.record(checks.config_offset(data, offset, at))
            except ERRORS as exc:
                self.fail("config.get_config", exc)
                s = self._recover("config.get_config", shmem_config=False)
        self.record(checks.reply_header(self.samples))
        return s

    def _channel_and_shmem(self, s: Session) -> Session:
        try:
            if s.n.has(PF.BACKEND_REQ):
                s.open_channel()
            if s.n.has(PF.MQ):
                s.n.queue_num = s.peer.call(FrontendReq.GET_QUEUE_NUM).u64()
        except ERRORS as exc:
            self.fail("negotiation.protocol_features", exc)
            s = self._recover("SET_BACKEND_REQ_FD", shmem_config=False)
        if s.n.shmem_bit is None:
            self.record(checks.shmem_config(None, None, self.opts.timeout))
            self.na("shmem.regions", "no shared-memory bit negotiated")
            return s
        try:
            exchange = s.get_shmem_config()
        except BackendFailed as exc:
            self.record(
                checks.shmem_config(Exchange(exc.sent, None), self._why(exc), self.opts.timeout)
            )
            self.na("shmem.regions", "no GET_SHMEM_CONFIG reply")
            return self._recover("shmem.get_shmem_config", shmem_config=False)
        except PeerLost as exc:
            self.fail("shmem.get_shmem_config", exc)
            return self._recover("shmem.get_shmem_config", shmem_config=False)
        self.record(checks.shmem_config(exchange, None, self.opts.timeout))
        self.record(checks.regions(exchange))
        return s

    def _queue_count(self, s: Session) -> int:
        wanted = self.opts.num_queues or DEFAULT_QUEUES.get(self.virtio_id or 0, 1)
        if s.n.queue_num is not None and s.n.queue_num < wanted:
            self.notes.append(f"GET_QUEUE_NUM says {s.n.queue_num}, {wanted} wanted")
            wanted = max(1, s.n.queue_num)
        return max(1, min(wanted, MAX_QUEUES))

    def _activate(self, s: Session, cid: str, num_queues: int) -> Session:
        if s.recorder is not None:
            s.recorder.phase = "activation" if cid == "rings.setup" else "after reset"
        try:
            s.activate(num_queues)
        except ERRORS as exc:
            self.fail(cid, exc)
            if self._broken(s) or not isinstance(exc, BackendFailed) or exc.received is None:
                return self._recover(cid)
            return s
        if cid == "rings.setup":
            self.record(
                make(
                    cid,
                    Verdict.PASS,
                    f"{num_queues} queue(s): SET_MEM_TABLE, then "
                    "NUM, ADDR, BASE, CALL, KICK"
                    + (", ENABLE" if s.n.features & PROTOCOL_FEATURES else ""),
                )
            )
        return s

    def _kick(self, s: Session, cid: str) -> None:
        request = KICK_REQUESTS.get(self.virtio_id or 0)
        if request is None:
            if cid != "rings.kick_call":
                return  # re-activation is judged by its messages alone
            known = ", ".join(f"{k}" for k in sorted(KICK_REQUESTS))
            self.na(
                cid,
                f"no request known for virtio id {self.virtio_id} (known: {known}; "
                "give --virtio-id or --device)",
            )
            return
        if request.queue >= len(s.queues) or s.memory is None:
            if cid == "rings.kick_call":
                self.na(cid, f"{request.name}: queue {request.queue} not set up")
            return
        queue = s.queues[request.queue]
        chain = request.build(s.memory)
        started = time.monotonic()
        queue.post(chain)
        os.eventfd_write(s.kicks[request.queue], 1)
        used, called = wait_call(s.calls[request.queue], queue, self.opts.timeout)
        took = (time.monotonic() - started) * 1000
        if used is None:
            self.record(
                make(
                    cid,
                    Verdict.FAIL,
                    f"{request.name}: no used buffer within "
                    f"{self.opts.timeout:g} s" + (" (a call came)" if called else ""),
                )
            )
        elif not called:
            self.record(
                make(
                    cid,
                    Verdict.FAIL,
                    f"{request.name}: used ring advanced, no call "
                    "(the driver did not suppress notifications)",
                )
            )
        elif problem := request.judge(s.memory, chain, used.length):
            self.record(make(cid, Verdict.FAIL, f"{request.name}: {problem}"))
        elif cid == "rings.kick_call":
            self.record(
                make(cid, Verdict.PASS, f"{request.name}: answered with a call in {took:.0f} ms")
            )

    def _fire(self, s: Session, phase: str) -> None:
        stimulus = self.opts.stimulus
        if stimulus.name == "none":
            return
        if s.recorder is not None:
            s.recorder.phase = phase
        try:
            if not s.active:
                raise StimulusError("the rings are not set up")
            done = stimulus.fire(s)
        except (StimulusError, *ERRORS) as exc:
            self.stimulus_notes.append(f"{stimulus.name} ({phase}): {exc}")
            self.notes.append(self.stimulus_notes[-1])
            return
        self.stimulus_notes.append(f"{stimulus.name} ({phase}): {done}")
        self.notes.append(self.stimulus_notes[-1])
        if s.recorder is not None:
            s.recorder.settle(0.15, self.opts.timeout)

    def _reset(self, s: Session) -> Session:
        if s.recorder is not None:
            s.recorder.settle(0.15, self.opts.timeout)
            s.recorder.front_end_reset()
            self.dropped = len(s.recorder.dropped)
            s.recorder.phase = "reset"
            # The first map after the reset is refused on purpose (shmem.refusal).
            s.recorder.refuse_next_map = True
        if not s.n.has(PF.RESET_DEVICE):
            stopped = self.results.get("rings.vring_base")
            verdict = Verdict.PASS if stopped and stopped.verdict is Verdict.PASS else Verdict.NA
            self.record(
                make(
                    "lifecycle.reset",
                    verdict,
                    "RESET_DEVICE not offered: reset by GET_VRING_BASE (QEMU's way)",
                )
            )
            return s
        try:
            s.peer.ack(FrontendReq.RESET_DEVICE)
        except ERRORS as exc:
            self.fail("lifecycle.reset", exc)
            return self._recover("lifecycle.reset")
        self.record(make("lifecycle.reset", Verdict.PASS, "RESET_DEVICE accepted"))
        return s

    def _judge_channel(self, s: Session) -> None:
        recorder = s.recorder
        if recorder is None:
            why = "no back-end channel (BACKEND_REQ not offered)"
            for cid in (
                "shmem.map_rules",
                "shmem.unmap_rules",
                "shmem.refusal",
                "lifecycle.mappings_after_reset",
                "config.change_msg",
            ):
                self.na(cid, why)
            return
        recorder.settle(0.15, self.opts.timeout)
        events = self.past_events + recorder.snapshot()
        alive = s.alive()
        recorder.refuse_next_map = False
        stim = "; ".join(self.stimulus_notes)
        maps = checks.map_rules(events)
        if maps.verdict is Verdict.NA and stim:
            maps = make(maps.id, Verdict.NA, f"{maps.detail} ({stim})")
        self.record(maps)
        if recorder.error is not None:
            if "closed" in recorder.error:
                self.notes.append(f"the back-end closed its channel: {recorder.error}")
            else:
                self.record(
                    make(maps.id, Verdict.FAIL, f"the back-end channel broke: {recorder.error}")
                )
        self.record(checks.unmap_rules(events))
        self.record(checks.refusal(events, alive))
        self.record(checks.mappings_after_reset(events, self.dropped))
        self.record(checks.change_msg(events, s.n.has(PF.CONFIG)))

    # -- destructive --------------------------------------------------------------------------
    def _fresh(self, cid: str) -> Session | None:
        try:
            return self._connect(shmem_config=False)
        except Abort as exc:
            self.na(
                cid,
                f"needs a fresh back-end: {exc}"
                + (
                    ""
                    if self.target.can_restart
                    else " (run with -- CMD so the tool can restart it)"
                ),
            )
            return None

    def _crashed(self) -> int | None:
        """The back-end's exit status if it ended abnormally (signal or non-zero)."""
        status = self.target.wait_exit(0.1)
        return status if status not in (None, 0) else None

    def _destructive(self) -> None:
        if "negotiation.features" not in self.results or (
            self.results["negotiation.features"].verdict is Verdict.FAIL
            and self.results["negotiation.features"].detail.startswith("no reply")
        ):
            self.why_not = "not reached: the back-end does not answer GET_FEATURES"
            return
        self._unknown_request()
        self._unasked_shmem_config()
        self._reconnect()
        self._hostile()

    def _unasked_shmem_config(self) -> None:
        """Without a shared-memory bit, does the back-end answer GET_SHMEM_CONFIG anyway
        (a bit under another number)? Destructive: a back-end may drop the connection."""
        offered = self.results.get("negotiation.shmem_bit")
        if offered is None or offered.verdict is not Verdict.NA:
            return
        s = self._fresh("negotiation.shmem_bit")
        if s is None:
            return
        try:
            exchange = s.peer.call(FrontendReq.GET_SHMEM_CONFIG)
        except ERRORS:
            return
        finally:
            s.close()
        config, _ = parse_shmem_config(exchange.reply.body if exchange.reply else b"")
        if config is not None:
            check = checks.shmem_bit(
                s.n.protocol_offered, answered_shmem_config=True, evidence=exchange
            )
            self.results[check.id] = check

    def _unknown_request(self) -> None:
        cid = "negotiation.unknown_request"
        s = self._fresh(cid)
        if s is None:
            return
        try:
            ack = s.n.has(PF.REPLY_ACK)
            flags = VHOST_USER_VERSION | (VhostUserHeaderFlag.NEED_REPLY if ack else 0)
            sent = _header(UNKNOWN_REQUEST, flags, 0)
            s.peer.send_raw(sent)
            if not ack:
                s.peer.call(FrontendReq.GET_FEATURES)
                self.record(
                    make(
                        cid,
                        Verdict.PASS,
                        "ignored (no REPLY_ACK to answer with); the next request is answered",
                    )
                )
                return
            try:
                msg = s.peer.read()
            except NoReply:
                self.record(
                    make(
                        cid,
                        Verdict.FAIL,
                        f"no reply and no close within "
                        f"{self.opts.timeout:g} s: a front-end waiting for the "
                        "NEED_REPLY answer hangs",
                        sent=sent,
                    )
                )
                return
            except PeerLost:
                status = self._crashed()
                if status is not None:
                    self.record(
                        make(
                            cid, Verdict.FAIL, f"the back-end crashed (status {status})", sent=sent
                        )
                    )
                else:
                    self.record(make(cid, Verdict.PASS, "closed the connection", sent=sent))
                return
            self.record(self._judge_unknown(sent, msg))
        except ERRORS as exc:
            self.fail(cid, exc)
        finally:
            s.close()

    @staticmethod
    def _judge_unknown(sent: bytes, msg: RawMessage) -> Check:
        cid = "negotiation.unknown_request"
        if msg.request != UNKNOWN_REQUEST or not msg.is_reply or len(msg.body) != 8:
            return make(
                cid,
                Verdict.FAIL,
                "answered with something else than a u64 reply",
                sent=sent,
                received=msg.raw,
            )
        status = int.from_bytes(msg.body, "little")
        if status == 0:
            return make(
                cid,
                Verdict.WARN,
                "acked an unknown request as success",
                sent=sent,
                received=msg.raw,
            )
        return make(cid, Verdict.PASS, f"error reply (status {status})")

    def _reconnect(self) -> None:
        cid = "lifecycle.reconnect"
        s = self._fresh(cid)
        if s is None:
            return
        s.close()
        deadline = time.monotonic() + max(self.opts.timeout, 1.0)
        while time.monotonic() < deadline:
            status = self.target.status()
            if status is not None:
                verdict = Verdict.PASS if status == 0 else Verdict.FAIL
                what = "exits cleanly" if status == 0 else "crashed or failed"
                self.record(
                    make(cid, verdict, f"{what} when the front-end leaves (status {status})")
                )
                return
            try:
                again = Session(self.target.connect(0.2), self.opts.timeout)
            except TargetError:
                time.sleep(0.05)
                continue
            try:
                again.get_features()
                self.record(make(cid, Verdict.PASS, "accepts a new connection"))
                return
            except ERRORS:
                time.sleep(0.05)
            finally:
                again.close()
        if self.target.command is None:
            self.record(
                make(
                    cid,
                    Verdict.WARN,
                    "stopped accepting connections (whether it "
                    "exited cleanly is unknown without -- CMD)",
                )
            )
            return
        self.record(
            make(
                cid,
                Verdict.FAIL,
                f"neither accepts a new connection nor exits within {self.opts.timeout:g} s",
            )
        )

    def _hostile(self) -> None:
        cid = "hostile.malformed"
        if not self.opts.hostile:
            self.na(cid, "run with --hostile")
            return
        v1 = VHOST_USER_VERSION
        nine = (9).to_bytes(4, "little") + bytes(4) + bytes(32 * 9)
        cases: list[tuple[str, bytes, bool]] = [
            ("a header announcing 1 MiB", _header(FrontendReq.GET_FEATURES, v1, 1 << 20), False),
            ("version bits 2", _header(FrontendReq.GET_FEATURES, 0x2, 0), False),
            (
                "SET_MEM_TABLE with nregions=9 and no fds",
                _header(FrontendReq.SET_MEM_TABLE, v1, len(nine)) + nine,
                True,
            ),
            (
                "SET_VRING_KICK without its fd",
                _header(FrontendReq.SET_VRING_KICK, v1, 8) + bytes(8),
                True,
            ),
            (
                "SET_VRING_NUM for vring 255",
                _header(FrontendReq.SET_VRING_NUM, v1, 8)
                + (255).to_bytes(4, "little")
                + (64).to_bytes(4, "little"),
                True,
            ),
            (
                "GET_SHMEM_CONFIG with an 8-byte payload",
                _header(FrontendReq.GET_SHMEM_CONFIG, v1, 8) + bytes(8),
                True,
            ),
            (
                "a reply where a request belongs",
                _header(FrontendReq.GET_FEATURES, v1 | VhostUserHeaderFlag.REPLY, 8) + bytes(8),
                True,
            ),
        ]
        survived: list[str] = []
        for name, data, must_answer in cases:
            outcome = self._hostile_case(data, must_answer)
            if outcome is None:
                self.record(
                    make(
                        cid,
                        Verdict.PASS if survived else Verdict.NA,
                        f"{len(survived)} case(s) survived; the back-end no longer "
                        f"accepts connections after them (run with -- CMD)",
                    )
                )
                return
            verdict, text = outcome
            if verdict is Verdict.FAIL:
                self.record(make(cid, Verdict.FAIL, f"{name}: {text}", sent=data))
                return
            survived.append(f"{name}: {text}")
        self.record(make(cid, Verdict.PASS, "; ".join(survived)))

    def _hostile_case(self, data: bytes, must_answer: bool) -> tuple[Verdict, str] | None:
        try:
            s = self._connect(shmem_config=False)
        except Abort:
            return None
        try:
            s.peer.send_raw(data)
            try:
                s.peer.call(FrontendReq.GET_FEATURES)
                return Verdict.PASS, "still answers"
            except BackendFailed:
                if s.peer.lost is None:
                    if must_answer:
                        return Verdict.FAIL, f"no answer within {self.opts.timeout:g} s (hang)"
                    return Verdict.PASS, "waits (no crash)"
            status = self._crashed()
            if status is not None:
                return Verdict.FAIL, f"the back-end crashed (status {status})"
            return Verdict.PASS, "closed the connection"
        except PeerLost:
            status = self._crashed()
            if status is not None:
                return Verdict.FAIL, f"the back-end crashed (status {status})"
            return Verdict.PASS, "closed the connection"
        finally:
            s.close()
