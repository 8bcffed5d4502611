"""Shared test helpers: real emulator/back-end processes and a small virtio driver."""
