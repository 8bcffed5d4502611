"""A virtio 1.x PCI device served over vfio-user, fronting a vhost-user back-end.

The guest sees our process as a modern virtio-pci device (QEMU's ``vfio-user-pci`` is the
client). Queues and device config belong to an external vhost-user back-end; the back-end's
``SHMEM_MAP`` requests become real mappings inside a 64-bit prefetchable shared-memory BAR.
"""

__version__ = "0.1.0"
