"""``vguest`` command line: list devices, exact-width BAR access and dumps, patterns, checksums,
timing.

Exit codes (see ``vguest.errors.ExitCode``): 0 ok, 1 mismatch (verify found a
difference; watch saw no change before its timeout), 2 usage error, 3 device
missing, 4 access error (range outside region/BAR, BAR not memory, permission),
5 environment (libvguest.so, cffi or pyudev missing).

With ``--json`` every invocation, failures included, prints exactly one JSON
object on stdout; diagnostics go to stderr.
"""

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from vguest import caps, discovery, sysfs
from vguest.errors import AccessError, ExitCode, UsageError, VguestError
from vguest.mmio import VALID_WIDTHS, Mapping, VerifyResult, c_crc32c, c_generate
from vguest.pattern import PatternKind, first_mismatch

log = logging.getLogger("vguest")

_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


@dataclass(slots=True)
class Result:
    """What a command produced: the JSON object, its text rendering, the exit code."""

    data: dict[str, Any]
    lines: list[str] = field(default_factory=list)
    code: ExitCode = ExitCode.OK


@dataclass(frozen=True, slots=True)
class Target:
    """A resolved ``BDF --bar N`` or ``BDF --shm ID``: where in which BAR, how big."""

    device: sysfs.SysfsPciDevice
    bar: int
    base: int
    size: int
    path: Path
    shmid: int | None

    @property
    def label(self) -> str:
        if self.shmid is None:
            return f"BAR {self.bar}"
        return f"shm {self.shmid} (BAR {self.bar} + {self.base:#x})"

    def describe(self) -> dict[str, Any]:
        return {
            "bdf": self.device.bdf,
            "bar": self.bar,
            "shmid": self.shmid,
            "region_offset": self.base,
            "region_size": self.size,
            "path": str(self.path),
        }

    def map(self, off: int, length: int, *, writable: bool) -> Mapping:
        if off < 0 or length <= 0:
            raise UsageError("offset must be >= 0 and length > 0")
        if off + length > self.size:
            raise AccessError(
                f"range [{off:#x}, {off + length:#x}) is outside {self.label} (size {self.size:#x})"
            )
        return Mapping.open(self.path, self.base + off, length, writable=writable)


def parse_int(text: str) -> int:
    """0x/0o/0b/decimal, with an optional K/M/G (binary) suffix."""
    s = text.strip().lower().replace("_", "")
    scale = 1
    if s and s[-1] in _SUFFIXES and not s.startswith("0x"):
        scale = _SUFFIXES[s[-1]]
        s = s[:-1]
    try:
        return int(s, 0) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def resolve_target(args: argparse.Namespace) -> Target:
    dev = sysfs.get_device(args.sysfs_root, args.bdf)
    if args.shm is not None:
        report = caps.parse(dev.config(), dev.resources())
        region = report.shm_region(args.shm)
        if region is None:
            have = ", ".join(str(r.shmid) for r in report.shm_regions) or "none"
            raise AccessError(
                f"{dev.bdf} has no shared-memory region with shmid {args.shm} (has: {have})"
            )
        res = dev.bar(region.bar)
        if region.offset + region.length > res.size:
            raise AccessError(
                f"shmid {region.shmid} [{region.offset:#x}, +{region.length:#x}) lies "
                f"outside BAR {region.bar} (size {res.size:#x})"
            )
        bar, base, size = region.bar, region.offset, region.length
    else:
        res = dev.bar(args.bar)
        bar, base, size = args.bar, 0, res.size
    if not res.is_memory:
        raise AccessError(f"{dev.bdf}: BAR {bar} is {res.kind}, not memory; it cannot be mapped")
    return Target(dev, bar, base, size, dev.resource_file(bar, wc=args.wc), args.shm)


def _check_aligned(off: int, length: int, width: int) -> None:
    if off % width or length % width:
        raise UsageError(
            f"offset {off:#x} and length {length:#x} must be multiples of width {width}"
        )


# ---- commands ----


def _device_json(dev: sysfs.SysfsPciDevice) -> tuple[dict[str, Any], list[str]]:
    resources = dev.resources()
    report = caps.parse(dev.config(), resources, virtio=dev.is_virtio)
    bars = [
        {"index": r.index, "kind": r.kind, "start": r.start, "size": r.size}
        for r in resources[: sysfs.NUM_BARS]
        if r.size
    ]
    data: dict[str, Any] = {
        "bdf": dev.bdf,
        "vendor": dev.vendor,
        "device": dev.device,
        "class": dev.class_code,
        "virtio_id": dev.virtio_id,
        "bars": bars,
        "caps": [{"offset": c.offset, "id": c.cap_id, "name": c.name} for c in report.caps],
        "virtio_caps": [
            {
                "offset": v.cap_offset,
                "cfg_type": v.cfg_type,
                "name": v.name,
                "bar": v.bar,
                "id": v.id,
                "bar_offset": v.offset,
                "length": v.length,
                "notify_off_multiplier": v.notify_off_multiplier,
            }
            for v in report.virtio
        ],
        "shm_regions": [
            {"shmid": r.shmid, "bar": r.bar, "offset": r.offset, "length": r.length}
            for r in report.shm_regions
        ],
        "findings": [
            {"severity": f.severity.name.lower(), "offset": f.offset, "message": f.message}
            for f in report.findings
        ],
    }
    kind = f"virtio id {dev.virtio_id}" if dev.is_virtio else "pci"
    lines = [f"{dev.bdf} {dev.vendor:04x}:{dev.device:04x} {kind} class {dev.class_code:#08x}"]
    lines += [f"  BAR {b['index']} {b['kind']} size {b['size']:#x} @ {b['start']:#x}" for b in bars]
    for v in report.virtio:
        extra = (
            f" notify_off_multiplier {v.notify_off_multiplier}"
            if v.notify_off_multiplier is not None
            else ""
        )
        lines.append(
            f"  cap@{v.cap_offset:#04x} {v.name} bar {v.bar} offset {v.offset:#x} "
            f"length {v.length:#x}{extra}"
        )
    lines += [
        f"  shm {r.shmid}: BAR {r.bar} offset {r.offset:#x} length {r.length:#x}"
        for r in report.shm_regions
    ]
    if not dev.is_virtio:
        lines += [f"  cap@{c.offset:#04x} {c.name}" for c in report.caps]
    lines += [f"  {f}" for f in report.findings]
    return data, lines


def cmd_list(args: argparse.Namespace) -> Result:
    devices = discovery.list_devices(args.sysfs_root, bdf=args.bdf, include_all=args.all)
    if args.bdf is not None and not devices:
        sysfs.get_device(args.sysfs_root, args.bdf)  # raises DeviceMissing
    out: list[dict[str, Any]] = []
    lines: list[str] = []
    for dev in devices:
        data, text = _device_json(dev)
        out.append(data)
        lines += text
    if not devices:
        lines.append("no virtio PCI devices" if not args.all else "no PCI devices")
    return Result({"devices": out}, lines)


def cmd_read(args: argparse.Namespace) -> Result:
    target = resolve_target(args)
    width, count = args.width, args.count
    if count < 1:
        raise UsageError(f"--count {count} must be at least 1")
    _check_aligned(target.base + args.offset, width, width)
    with target.map(args.offset, count * width, writable=False) as m:
        raw = m.read_bytes(0, count * width, width)  # one width-exact access per word
    values = [int.from_bytes(raw[i : i + width], "little") for i in range(0, len(raw), width)]
    data = {
        **target.describe(),
        "offset": args.offset,
        "width": width,
        "value": values[0],
        "count": count,
        "values": values,
    }
    return Result(data, [f"{v:#0{2 + 2 * width}x}" for v in values])


def cmd_write(args: argparse.Namespace) -> Result:
    target = resolve_target(args)
    _check_aligned(target.base + args.offset, args.width, args.width)
    if not 0 <= args.value < 1 << (8 * args.width):
        raise UsageError(f"value {args.value:#x} does not fit in {args.width} bytes")
    with target.map(args.offset, args.width, writable=True) as m:
        m.write(0, args.width, args.value)
    data = {**target.describe(), "offset": args.offset, "width": args.width, "value": args.value}
    return Result(data, [f"wrote {args.value:#x} to {target.label} + {args.offset:#x}"])


def _pattern(args: argparse.Namespace) -> PatternKind:
    return PatternKind[(args.pattern or "counter").upper()]


def cmd_fill(args: argparse.Namespace) -> Result:
    target = resolve_target(args)
    _check_aligned(target.base + args.offset, args.length, args.width)
    kind = _pattern(args)
    with target.map(args.offset, args.length, writable=True) as m:
        m.fill(0, args.length, args.width, kind, args.seed)
    crc = c_crc32c(c_generate(kind, args.seed, args.length))
    data = {
        **target.describe(),
        "offset": args.offset,
        "length": args.length,
        "width": args.width,
        "pattern": kind.name.lower(),
        "seed": args.seed,
        "crc32c": crc,
    }
    return Result(
        data,
        [
            f"filled {args.length:#x} bytes of {target.label} + {args.offset:#x} "
            f"with {kind.name.lower()} seed {args.seed:#x} (crc32c {crc:#010x})"
        ],
    )


def _expected_file(args: argparse.Namespace) -> tuple[bytes, int]:
    """The ``--expect`` file's bytes and the length to compare (LENGTH, or the file's size)."""
    try:
        content = Path(args.expect).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read --expect {args.expect}: {exc.strerror}") from None
    length = len(content) if args.length is None else args.length
    if len(content) < length:
        raise UsageError(f"--expect {args.expect} has {len(content)} bytes, fewer than {length}")
    return content[:length], length


def cmd_verify(args: argparse.Namespace) -> Result:
    if sum(x is not None for x in (args.crc, args.pattern, args.expect)) > 1:
        raise UsageError("give one of --pattern, --crc or --expect, not several")
    if args.expect is not None:
        expected, length = _expected_file(args)
    elif args.length is None:
        raise UsageError("LENGTH is required unless --expect gives it")
    else:
        expected, length = b"", args.length
    target = resolve_target(args)
    _check_aligned(target.base + args.offset, length, args.width)
    base = {**target.describe(), "offset": args.offset, "length": length, "width": args.width}
    with target.map(args.offset, length, writable=False) as m:
        if args.crc is not None:
            crc = m.crc32c(0, length, args.width)
            match = crc == args.crc
            data = {**base, "match": match, "crc32c": crc, "expected_crc32c": args.crc}
            text = f"crc32c {crc:#010x} " + ("matches" if match else f"!= {args.crc:#010x}")
            return Result(data, [text], ExitCode.OK if match else ExitCode.MISMATCH)
        if args.expect is not None:
            res = _compare(expected, m.read_bytes(0, length, args.width), args.width)
            data = {**base, "expect": str(args.expect)}
            what = f"{args.expect} matches"
        else:
            kind = _pattern(args)
            res = m.verify(0, length, args.width, kind, args.seed)
            data = {**base, "pattern": kind.name.lower(), "seed": args.seed}
            what = "pattern matches"
    data |= {
        "match": res.ok,
        "mismatch_offset": res.mismatch_offset,
        "expected": res.expected,
        "actual": res.actual,
    }
    text = what
    if not res.ok:
        text = f"mismatch at +{res.mismatch_offset:#x}: expected {res.expected:#x}, "
        text += f"got {res.actual:#x}"
    return Result(data, [text], ExitCode.OK if res.ok else ExitCode.MISMATCH)


def _compare(expected: bytes, actual: bytes, width: int) -> VerifyResult:
    """As the C helper's verify: the first differing byte, and the values of its access."""
    where = first_mismatch(expected, actual)
    if where is None:
        return VerifyResult(ok=True)
    start = where - where % width
    word = slice(start, start + width)
    return VerifyResult(
        False,
        where,
        int.from_bytes(expected[word], "little"),
        int.from_bytes(actual[word], "little"),
    )


def _hexdump(data: bytes, start: int) -> list[str]:
    """``hexdump -C -v`` lines for ``data`` found at offset ``start``, then the end offset."""
    lines = []
    for pos in range(0, len(data), 16):
        row = data[pos : pos + 16]
        hexes = " ".join(f"{b:02x}" for b in row[:8]) + "  " + " ".join(f"{b:02x}" for b in row[8:])
        ascii_ = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
        lines.append(f"{start + pos:08x}  {hexes.rstrip():<48}  |{ascii_}|")
    lines.append(f"{start + len(data):08x}")
    return lines


def cmd_dump(args: argparse.Namespace) -> Result:
    target = resolve_target(args)
    _check_aligned(target.base + args.offset, args.length, args.width)
    with target.map(args.offset, args.length, writable=False) as m:
        raw = m.read_bytes(0, args.length, args.width)
    data = {
        **target.describe(),
        "offset": args.offset,
        "length": args.length,
        "width": args.width,
        "data": raw.hex(),
    }
    return Result(data, _hexdump(raw, args.offset))


def cmd_checksum(args: argparse.Namespace) -> Result:
    target = resolve_target(args)
    _check_aligned(target.base + args.offset, args.length, args.width)
    with target.map(args.offset, args.length, writable=False) as m:
        crc = m.crc32c(0, args.length, args.width)
    data = {
        **target.describe(),
        "offset": args.offset,
        "length": args.length,
        "width": args.width,
        "crc32c": crc,
    }
    return Result(data, [f"{crc:#010x}"])


def cmd_bench(args: argparse.Namespace) -> Result:
    target = resolve_target(args)
    length = args.length if args.length is not None else min(target.size - args.offset, 4096)
    try:
        widths = sorted({int(w) for w in args.widths.split(",")})
    except ValueError:
        raise UsageError(f"--widths wants a list like 1,2,4,8, not {args.widths!r}") from None
    for w in widths:
        if w not in VALID_WIDTHS:
            raise UsageError(f"width {w} is not one of 1, 2, 4, 8")
        _check_aligned(target.base + args.offset, length, w)
    ops = ["read", "write"] if args.op == "both" else [args.op]
    results = []
    with target.map(args.offset, length, writable="write" in ops) as m:
        for op in ops:
            for w in widths:
                if op == "read":
                    r = m.bench_read(0, length, w, args.count)
                else:
                    r = m.bench_write(0, length, w, args.count, 0)
                results.append(r)
    data = {
        **target.describe(),
        "offset": args.offset,
        "length": length,
        "results": [
            {
                "op": r.op,
                "width": r.width,
                "count": r.count,
                "elapsed_ns": r.elapsed_ns,
                "ops_per_s": r.ops_per_s,
                "ns_per_op": r.ns_per_op,
                "bytes_per_s": r.bytes_per_s,
            }
            for r in results
        ],
    }
    lines = [
        f"{r.op:5} width {r.width}: {r.ops_per_s:12.0f} ops/s {r.ns_per_op:10.1f} ns/op "
        f"{r.bytes_per_s / 1e6:9.2f} MB/s"
        for r in results
    ]
    return Result(data, lines)


def cmd_watch(args: argparse.Namespace) -> Result:
    start = time.monotonic()
    located = args.bar is not None or args.shm is not None
    if located != (args.offset is not None) or (located and args.bdf is None):
        raise UsageError(
            "watch a value with BDF --bar N|--shm ID --offset OFF, a device with [BDF]"
        )
    if not located:
        dev = discovery.wait_for_device(args.sysfs_root, bdf=args.bdf, timeout=args.timeout)
        elapsed = time.monotonic() - start
        return Result(
            {"appeared": True, "bdf": dev.bdf, "elapsed_s": elapsed},
            [f"{dev.bdf} present after {elapsed:.3f} s"],
        )
    target = resolve_target(args)
    _check_aligned(target.base + args.offset, args.width, args.width)
    with target.map(args.offset, args.width, writable=False) as m:
        initial = value = m.read(0, args.width)
        deadline = start + args.timeout

        def done(v: int) -> bool:
            return v == args.until if args.until is not None else v != initial

        while not done(value) and time.monotonic() < deadline:
            time.sleep(min(args.interval, max(deadline - time.monotonic(), 0.0)))
            value = m.read(0, args.width)
    ok = done(value)
    elapsed = time.monotonic() - start
    data = {
        **target.describe(),
        "offset": args.offset,
        "width": args.width,
        "initial": initial,
        "value": value,
        "changed": ok,
        "elapsed_s": elapsed,
    }
    text = (
        f"{initial:#x} -> {value:#x} after {elapsed:.3f} s"
        if ok
        else f"still {value:#x} after {elapsed:.3f} s"
    )
    return Result(data, [text], ExitCode.OK if ok else ExitCode.MISMATCH)


# ---- argument parsing ----


class _Parser(argparse.ArgumentParser):
    """Usage errors become ``UsageError`` so ``--json`` still prints one object."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print one JSON object on stdout",
    )
    common.add_argument(
        "--sysfs-root",
        default=argparse.SUPPRESS,
        help="sysfs mount point (default /sys; tests use a fake tree)",
    )
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)

    target = _Parser(add_help=False)
    target.add_argument("bdf", metavar="BDF", help="PCI address, e.g. 0000:00:03.0")
    where = target.add_mutually_exclusive_group(required=True)
    where.add_argument("--bar", type=int, help="any memory BAR, offsets from its start")
    where.add_argument(
        "--shm",
        type=int,
        metavar="SHMID",
        help="a virtio shared-memory region, offsets from its start",
    )
    target.add_argument(
        "--wc", action="store_true", help="map resource<N>_wc (write-combining) when present"
    )

    width = _Parser(add_help=False)
    width.add_argument(
        "--width",
        type=int,
        choices=VALID_WIDTHS,
        default=4,
        help="access width in bytes (default 4)",
    )

    span = _Parser(add_help=False)
    span.add_argument("offset", metavar="OFFSET", type=parse_int)
    span.add_argument("length", metavar="LENGTH", type=parse_int)

    pattern = _Parser(add_help=False)
    pattern.add_argument(
        "--pattern",
        choices=[k.name.lower() for k in PatternKind],
        help="pattern generator (default counter)",
    )
    pattern.add_argument("--seed", type=parse_int, default=0)

    parser = _Parser(
        prog="vguest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--sysfs-root", default="/sys", help="sysfs mount point")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        func: Callable[[argparse.Namespace], Result],
        help_: str,
        parents: Sequence[_Parser],
    ) -> argparse.ArgumentParser:
        all_parents: list[_Parser] = [common, *parents]
        p = sub.add_parser(name, help=help_, parents=all_parents)
        p.set_defaults(func=func)
        return p

    p = add("list", cmd_list, "virtio devices, their caps and shared-memory regions", [])
    p.add_argument("bdf", metavar="BDF", nargs="?")
    p.add_argument("--all", action="store_true", help="every PCI device, not only virtio")

    p = add("read", cmd_read, "exact-width reads of one or more consecutive words", [target, width])
    p.add_argument("offset", metavar="OFFSET", type=parse_int)
    p.add_argument(
        "--count",
        type=parse_int,
        default=1,
        metavar="N",
        help="consecutive words to read, one per line (default 1)",
    )
    p = add("write", cmd_write, "one exact-width write", [target, width])
    p.add_argument("offset", metavar="OFFSET", type=parse_int)
    p.add_argument("value", metavar="VALUE", type=parse_int)

    add("fill", cmd_fill, "fill a range with a pattern", [target, width, span, pattern])
    p = add(
        "verify",
        cmd_verify,
        "compare a range with a pattern, a CRC-32C or a file",
        [target, width, pattern],
    )
    p.add_argument("offset", metavar="OFFSET", type=parse_int)
    p.add_argument(
        "length", metavar="LENGTH", type=parse_int, nargs="?", help="default: --expect's size"
    )
    p.add_argument("--crc", type=parse_int, help="expected CRC-32C instead of a pattern")
    p.add_argument(
        "--expect", type=Path, metavar="FILE", help="compare byte for byte with this file"
    )
    add("checksum", cmd_checksum, "CRC-32C of a range", [target, width, span])
    add("dump", cmd_dump, "hex dump of a range (as hexdump -C)", [target, width, span])

    p = add("bench", cmd_bench, "timed access loops per width", [target])
    p.add_argument("--offset", type=parse_int, default=0)
    p.add_argument("--length", type=parse_int, help="range to cycle over (default 4 KiB)")
    p.add_argument("--widths", default="1,2,4,8")
    p.add_argument("--count", type=parse_int, default=10000, help="accesses per width")
    p.add_argument(
        "--op",
        choices=["read", "write", "both"],
        default="read",
        help="write and both overwrite the range with zeros",
    )

    p = add("watch", cmd_watch, "wait for a device to appear or a value to change", [width])
    p.add_argument("bdf", metavar="BDF", nargs="?")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--bar", type=int)
    where.add_argument("--shm", type=int, metavar="SHMID")
    p.add_argument("--wc", action="store_true")
    p.add_argument("--offset", type=parse_int, help="offset of the value to watch")
    p.add_argument("--until", type=parse_int, help="wait for this value instead of any change")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--interval", type=float, default=0.01, help="poll interval in seconds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    want_json = "--json" in argv
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vguest: %(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if {"-v", "--verbose"} & set(argv) else logging.WARNING)
    try:
        try:
            args = build_parser().parse_args(argv)
            result = args.func(args)
        except VguestError as exc:
            return _fail(exc, exc.exit_code, want_json)
        except OSError as exc:
            return _fail(exc, ExitCode.ACCESS, want_json)
        if args.json:
            print(
                json.dumps(
                    {
                        "ok": True,
                        "command": args.command,
                        **result.data,
                        "exit_code": int(result.code),
                    }
                )
            )
        else:
            for line in result.lines:
                print(line)
        return int(result.code)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (no flush error at exit)
        return int(ExitCode.OK)
    finally:
        log.removeHandler(handler)


def _fail(exc: Exception, code: ExitCode, want_json: bool) -> int:
    if want_json:
        print(
            json.dumps(
                {
                    "ok": False,
                    "error": str(exc),
                    "error_type": type(exc).__name__,
                    "exit_code": int(code),
                }
            )
        )
    print(f"vguest: error: {exc}", file=sys.stderr)
    return int(code)
