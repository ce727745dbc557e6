"""``python -m asyncckpt``: the ``asyncckpt`` command, where the script is not on the PATH."""

import sys

from asyncckpt.cli import main

sys.exit(main())
