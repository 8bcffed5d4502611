"""Only the cffi build step: every other piece of metadata is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["emulator/hotpath/build.py:ffibuilder"])
