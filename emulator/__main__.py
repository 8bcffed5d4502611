"""``python -m emulator``: the same as the ``virtio-emu`` console script."""

import sys

from emulator.cli import main

sys.exit(main())
