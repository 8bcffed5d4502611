"""vguest: guest-side tools for virtio PCI devices and their shared-memory regions.

Runs inside the guest (Python 3.13, no compiler) and on any Linux host with a PCI
device. Exact-width BAR access goes through libvguest.so (cffi ABI mode), which is
loaded lazily so discovery and capability parsing work without it.
"""

__version__ = "0.1.0"
