"""``python -m graftopt`` is the ``graftopt`` command: ``train``, ``report``, ``inspect``."""

import sys

from graftopt.train.cli import main

sys.exit(main())
