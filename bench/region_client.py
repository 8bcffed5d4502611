"""``python -m bench.region_client SOCKET``: a QEMU-like vfio-user client in its own process.

It starts up like QEMU 11.1 (``VfioUserClient.startup``), then per stdin line ``read N`` or
``write N`` makes N lockstep 8-byte BAR 4 reads, or N posted 8-byte writes followed by one
read (which returns only after the server handled every write), or with ``pipelined N`` sends
N reads at once and then collects the N replies (the server handles them in one wake-up, so
its CPU time per message leaves out the sleep and wake-up), and prints the wall time in
nanoseconds. Running apart from the emulator keeps our GIL out of the server's CPU time.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Sequence

from emulator.pci.device import RegionIndex
from emulator.vfio_user import messages as m
from emulator.vfio_user.client import VfioUserClient
from emulator.vfio_user.codec import Message, Role, VfioUserDecoder, encode
from wire.unix import recv_with_fds

RAM_SIZE = 16 << 20


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    ram = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, RAM_SIZE)
    bar = RegionIndex.BAR4
    value = bytes(8)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args[0])
    with VfioUserClient(sock, timeout=30) as client:
        client.startup(ram, RAM_SIZE)
        print("ready", flush=True)
        for line in sys.stdin:
            op, _, number = line.partition(" ")
            count = int(number or 0)
            start = time.perf_counter_ns()
            if op == "read":
                for i in range(count):
                    client.region_read(bar, (i * 8) & 0xFFF, 8)
            elif op == "write":
                for i in range(count):
                    client.region_write(bar, (i * 8) & 0xFFF, value, posted=True)
                client.region_read(bar, 0, 8)
            elif op == "pipelined":
                _pipelined(sock, count)
            else:
                break
            print(time.perf_counter_ns() - start, flush=True)
    os.close(ram)
    return 0


def _pipelined(sock: socket.socket, count: int) -> None:
    """Send ``count`` reads in one go, then wait for all the replies (the client is idle)."""
    wire = b"".join(
        encode(Message(m.Command.REGION_READ, i & 0xFFFF, m.RegionAccess((i * 8) & 0xFFF, 4, 8)))[0]
        for i in range(count)
    )
    decoder = VfioUserDecoder(Role.CLIENT)
    sock.sendall(wire)
    replies = 0
    while replies < count:
        data, fds = recv_with_fds(sock, 1 << 16)
        decoder.feed(data, fds)
        while (reply := decoder.next_message()) is not None:
            reply.close()
            replies += 1
    decoder.close()


if __name__ == "__main__":
    sys.exit(main())
