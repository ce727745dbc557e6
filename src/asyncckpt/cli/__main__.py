import sys

from asyncckpt.cli.commands import main

sys.exit(main())
