"""A vhost-user back-end library for prototyping devices, and the devices built on it.

``daemon`` serves one front-end at a time (negotiation, memory table, vrings, kicks and calls,
the back-end channel's SHMEM_MAP/UNMAP); ``memory`` is its view of guest memory, ``vring`` its
split virtqueues; ``devices`` holds the reference device and the examples. Importable without
the emulator.
"""
