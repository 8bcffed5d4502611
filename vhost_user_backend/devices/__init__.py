"""Devices built on the back-end library; each is a module with its own ``main``."""
