"""``import graftopt`` loads neither timm nor torchvision (seconds of import); they come with
``graftopt.models`` (the CIFAR networks registered with timm)."""

from __future__ import annotations

import subprocess
import sys


def test_import_graftopt_loads_no_timm() -> None:
    code = (
        "import sys, graftopt; heavy = [m for m in ('timm', 'torchvision', 'matplotlib') "
        "if m in sys.modules]; print(heavy); import timm; graftopt.models; "
        "print(timm.is_model('cifar_resnet20'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "True"], done.stdout
