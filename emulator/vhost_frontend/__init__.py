"""The vhost-user front-end: the emulator's virtio device whose queues and config live in an
external vhost-user back-end."""
