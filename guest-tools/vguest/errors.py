"""Exceptions of the guest tools, each carrying the CLI exit code it maps to.

Hierarchy::

    VguestError
      UsageError          2  bad arguments (malformed BDF, misaligned offset, ...)
      DeviceMissing       3  no such PCI device (or it did not appear in time)
      AccessError         4  range outside region/BAR, BAR not memory, permission
      EnvironmentProblem  5  libvguest.so or pyudev/libudev missing

Exit code 1 (mismatch) is a result, not an error, and has no exception.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of ``vguest``; distinct so scripts can tell them apart."""

    OK = 0
    MISMATCH = 1
    USAGE = 2
    DEVICE_MISSING = 3
    ACCESS = 4
    ENVIRONMENT = 5


class VguestError(Exception):
    """Root of every error the guest tools raise on purpose."""

    exit_code = ExitCode.ACCESS


class UsageError(VguestError):
    """The request itself is invalid, whatever the device."""

    exit_code = ExitCode.USAGE


class DeviceMissing(VguestError):
    """The named PCI device does not exist under the sysfs root."""

    exit_code = ExitCode.DEVICE_MISSING


class AccessError(VguestError):
    """The device exists but the access cannot be made."""

    exit_code = ExitCode.ACCESS


class EnvironmentProblem(VguestError):
    """A run-time dependency (libvguest.so, pyudev, libudev) is missing."""

    exit_code = ExitCode.ENVIRONMENT
