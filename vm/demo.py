"""``make demo``: the whole path in one short story, from a vhost-user back-end to a real guest.

A reference back-end declares a 4 MiB shared-memory region; our emulator presents it to QEMU
11.1 as a virtio PCI device over vfio-user; a Debian guest finds the region in BAR 4 and
checks, with ``vguest``, what the back-end maps there. Every step prints what happened; any
failure names its step, shows the log tails and exits non-zero, with every process stopped.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from vguest.pattern import PatternKind, crc32c, generate

from vm.scenario import Scenario, ScenarioError, ShmemBackend
from vm.toolchain import ToolchainError, ensure_toolchain

MIB = 1 << 20
LENGTH = 64 << 10
RO_OFFSET = 0x0
RW_OFFSET = 0x100000
ZEROS_CRC = crc32c(bytes(LENGTH))


def say(text: str) -> None:
    print(text, flush=True)


class Story:
    """Numbers the steps as they are told."""

    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.number = 0

    def step(self, text: str) -> str:
        self.number += 1
        title = f"{self.number}. {text}"
        say(title)
        return title

    def shm(self, *args: object) -> dict[str, Any]:
        command, *rest = map(str, args)
        return self.sc.vguest_ok(command, self.sc.bdf(), "--shm", "0", *rest, "--width", "8")

    def tell(self) -> None:
        sc = self.sc

        def announce(what: str) -> None:
            if what == "backend":
                self.step("starting the reference back-end with a 4 MiB shared-memory region")
            else:
                self.step("starting the emulator (it asks the back-end for its regions first)")

        device = sc.add_device(ShmemBackend(regions=((0, 4 * MIB),)), "emulator", announce=announce)
        assert device.emulator is not None
        for line in device.emulator.lines(r"back-end connected|ready:"):
            say(f"   emulator: {line.split(' INFO ', 1)[-1]}")

        self.step("booting a Debian guest under QEMU 11.1 (TCG, ~15 s)")
        guest = sc.boot()
        say(f"   guest agent ready after {guest.boot_seconds:.1f} s ({guest.accel})")

        title = self.step(
            f"back-end maps a counter pattern (read-only) at {RO_OFFSET:#x} and a xorshift "
            f"pattern (read-write) at {RW_OFFSET:#x}, {LENGTH // 1024} KiB each"
        )
        with sc.step(title):
            sc.backend_ok(cmd="map", shmid=0, shm_offset=RO_OFFSET, length=LENGTH,
                          pattern="counter", seed=1, writable=False)  # fmt: skip
            sc.backend_ok(cmd="map", shmid=0, shm_offset=RW_OFFSET, length=LENGTH,
                          pattern="xorshift", seed=2, writable=True)  # fmt: skip

        with sc.step(self.step("inside the guest: vguest list -> device, regions")):
            listed = sc.guest_device()
            say(f"   {listed['bdf']} {listed['vendor']:04x}:{listed['device']:04x} "
                f"virtio id {listed['virtio_id']}")  # fmt: skip
            for bar in listed["bars"]:
                say(f"   BAR {bar['index']}: {bar['kind']}, {bar['size'] // 1024} KiB")
            for region in listed["shm_regions"]:
                say(f"   shared memory {region['shmid']}: BAR {region['bar']} offset "
                    f"{region['offset']:#x}, {region['length'] // MIB} MiB")  # fmt: skip
            if [r["length"] for r in listed["shm_regions"]] != [4 * MIB]:
                raise ScenarioError(f"expected one 4 MiB region, the guest saw {listed}")

        with sc.step(self.step("guest verifies both ranges: checksums match")):
            for offset, pattern, seed in ((RO_OFFSET, "counter", 1), (RW_OFFSET, "xorshift", 2)):
                self.shm("verify", hex(offset), LENGTH, "--pattern", pattern, "--seed", seed)
                guest_crc = self.shm("checksum", hex(offset), LENGTH)["crc32c"]
                back = sc.backend_ok(cmd="read", shmid=0, shm_offset=offset, length=LENGTH)
                if guest_crc != back["crc32c"]:
                    raise ScenarioError(f"guest crc {guest_crc:#x} != back-end {back['crc32c']:#x}")
                say(f"   {offset:#08x} {pattern:8} pattern verified; crc32c guest "
                    f"{guest_crc:#010x} = back-end {back['crc32c']:#010x}")  # fmt: skip

        title = self.step("guest writes a pattern into the RW range; back-end reads it back: match")
        with sc.step(title):
            fill = self.shm("fill", hex(RW_OFFSET), LENGTH, "--pattern", "counter", "--seed", 99)
            back = sc.backend_ok(cmd="read", shmid=0, shm_offset=RW_OFFSET, length=LENGTH)
            want = crc32c(generate(PatternKind.COUNTER, 99, LENGTH))
            if not fill["crc32c"] == back["crc32c"] == want:
                raise ScenarioError(f"guest wrote crc {fill['crc32c']:#x}, back-end has {back}")
            say(f"   back-end's memfd holds what the guest wrote: crc32c {want:#010x}")

        with sc.step(self.step("guest writes into the read-only range: the device drops it")):
            self.shm("write", hex(RO_OFFSET), "0xdeadbeef")
            back = sc.backend_ok(cmd="read", shmid=0, shm_offset=RO_OFFSET, length=8)
            value = self.shm("read", hex(RO_OFFSET))["value"]
            if bytes.fromhex(back["data"]) != generate(PatternKind.COUNTER, 1, 8) or value != 1:
                raise ScenarioError(f"read-only range changed: back-end {back}, guest {value:#x}")
            say(f"   back-end still holds {back['data']}; the guest reads {value:#x}")

        with sc.step(self.step("unmap -> guest reads zeros")):
            for offset in (RO_OFFSET, RW_OFFSET):
                sc.backend_ok(cmd="unmap", shmid=0, shm_offset=offset, length=LENGTH)
                crc = self.shm("checksum", hex(offset), LENGTH)["crc32c"]
                if crc != ZEROS_CRC:
                    raise ScenarioError(f"{offset:#x} after unmap: crc {crc:#x}, not zeros")
            say(f"   both ranges read as zeros (crc32c {ZEROS_CRC:#010x})")

        with sc.step(self.step("the guest's virtio_rng driver reads entropy through the queue")):
            rng = guest.sh("dd if=/dev/hwrng bs=16 count=1 status=none | od -An -tx1", check=True)
            say(f"   /dev/hwrng: {''.join(rng.stdout.split())}")

        self.step("powering the guest off and stopping the emulator and the back-end")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vm.demo", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="show the harness's log")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="   [%(name)s] %(message)s",
    )
    started = time.monotonic()
    try:
        toolchain = ensure_toolchain()
        with Scenario.open("demo", toolchain) as sc:
            Story(sc).tell()
    except (ScenarioError, ToolchainError) as exc:
        say(f"\nDEMO FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        say("\ninterrupted; everything was stopped")
        return 130
    statuses = {p.name: p.returncode for p in sc.processes}
    if sc.guest is not None:
        statuses["QEMU"] = sc.guest.returncode
    if any(rc != 0 for rc in statuses.values()):
        say(f"\nDEMO FAILED: not every process exited cleanly: {statuses}")
        return 1
    say(f"   exit statuses: {', '.join(f'{name} {rc}' for name, rc in statuses.items())}")
    say(f"done in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
