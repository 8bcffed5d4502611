"""VIRTIO Shared Memory Regions in BAR 4: layout, mapping table, real mmaps of back-end fds,
the kinds of fd a back-end may send, and the copies that reach them without SIGBUS."""

from emulator.shmem.fdkind import FdKind
from emulator.shmem.layout import PAGE_SIZE, RegionLayout, ShmemLayout
from emulator.shmem.region import (
    MappingInfo,
    MappingRefused,
    RefusalReason,
    SharedMemoryBar,
    SharedMemoryRegion,
    ShmemError,
    default_max_mappings,
)
from emulator.shmem.table import MappingTable, NotMappedError, OverlapError, TableError

__all__ = [
    "PAGE_SIZE",
    "FdKind",
    "MappingInfo",
    "MappingRefused",
    "MappingTable",
    "NotMappedError",
    "OverlapError",
    "RefusalReason",
    "RegionLayout",
    "SharedMemoryBar",
    "SharedMemoryRegion",
    "ShmemError",
    "ShmemLayout",
    "TableError",
    "default_max_mappings",
]
