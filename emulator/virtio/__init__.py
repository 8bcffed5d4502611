"""Transport-independent virtio state: status machine, feature negotiation, queue state.

The PCI transport (``emulator.pci.virtio_pci``) maps registers onto this state; the real queues
and device config live behind ``emulator.virtio.device.VirtioDevice``.
"""
