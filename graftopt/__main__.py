"""``python -m graftopt`` is the ``graftopt`` command: ``train`` (the default), ``report``,
``inspect``."""

import runpy

runpy.run_module("graftopt.train", run_name="__main__")
