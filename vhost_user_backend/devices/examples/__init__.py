"""Small complete devices to copy when starting a new one (``docs/writing-a-device.md``)."""
