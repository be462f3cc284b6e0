"""``python -m graftopt.train [flags]`` trains; ``python -m graftopt.train report|inspect ...``."""

import sys

from .cli import COMMANDS, main

argv = sys.argv[1:]
if not argv or argv[0] not in COMMANDS:
    argv = ["train", *argv]
sys.exit(main(argv))
