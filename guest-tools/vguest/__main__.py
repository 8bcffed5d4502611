"""Entry point for ``python3 -m vguest``."""

import sys

from vguest.cli import main

sys.exit(main())
