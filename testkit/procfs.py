"""What a process holds, read from ``/proc``: fds, eventfds, mappings, memory, CPU time.

``pid`` is a process id or ``"self"`` (the default) for this process.
"""

from __future__ import annotations

import contextlib
import os

Pid = int | str

#: How the reference back-end names its memfds; the emulator maps them into BAR 4.
BACKEND_MEMFD_NAME = "memfd:vhost-shmem-"


def fd_count(pid: Pid = "self") -> int:
    """Open file descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_table(pid: Pid = "self") -> dict[int, str]:
    """Each fd of ``pid`` and what it points at."""
    table = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            table[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return table


def fd_targets(pid: Pid = "self") -> list[str]:
    """``fd -> target`` lines of ``pid`` (for a useful message when counts differ)."""
    return sorted(f"{fd} -> {target}" for fd, target in fd_table(pid).items())


def maps_lines(pid: Pid = "self") -> list[str]:
    with open(f"/proc/{pid}/maps", encoding="ascii", errors="replace") as maps:
        return [line.rstrip("\n") for line in maps]


def vma_count(pid: Pid = "self") -> int:
    return len(maps_lines(pid))


def memfd_mappings(pid: Pid = "self", name: str = BACKEND_MEMFD_NAME) -> list[str]:
    """Lines of ``/proc/PID/maps`` backed by a memfd called ``name...``: in the emulator these
    are the live back-end mappings inside BAR 4."""
    return [line for line in maps_lines(pid) if name in line]


def reserved_vmas(pid: Pid = "self") -> int:
    """Anonymous ``PROT_NONE`` areas of ``pid``: in the emulator, the BAR 4 reservation is made
    of these (plus guard pages), so pieces left behind by unmaps show up as a higher count."""
    count = 0
    for line in maps_lines(pid):
        fields = line.split()
        if fields[1] == "---p" and len(fields) == 5:
            count += 1
    return count


def eventfd_id(pid: Pid, fd: int) -> int | None:
    """The kernel's id of the eventfd behind ``fd`` of ``pid`` (``eventfd-id`` in fdinfo): the
    same eventfd passed to another process over SCM_RIGHTS has the same id there."""
    with open(f"/proc/{pid}/fdinfo/{fd}") as info:
        for line in info:
            key, _, value = line.partition(":")
            if key == "eventfd-id":
                return int(value)
    return None


def eventfd_ids(pid: Pid = "self") -> set[int]:
    """Ids of every eventfd ``pid`` holds open."""
    ids = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError, ValueError):
            found = eventfd_id(pid, int(name))
            if found is not None:
                ids.add(found)
    return ids


def status_field(pid: Pid, name: str) -> int:
    """A numeric field of ``/proc/PID/status`` (e.g. ``VmRSS`` in KiB)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise KeyError(f"/proc/{pid}/status has no {name}")


def rss_kib(pid: Pid = "self") -> int:
    return status_field(pid, "VmRSS")


def cpu_seconds(pid: Pid = "self") -> float:
    """User + system CPU time of the whole process (clock-tick resolution, 10 ms)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
