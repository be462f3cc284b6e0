"""graftopt: filter grafting for any PyTorch training loop."""

from . import adapters as adapters
from . import functional as functional
from .diagnostics import InvalidFilters as InvalidFilters
from .diagnostics import RoundRecord as RoundRecord
from .diagnostics import invalid_filters as invalid_filters
from .optimizer import GraftOptimizer as GraftOptimizer
from .optimizer import ring as ring
from .peers import ModulePeers as ModulePeers
from .peers import PeerSource as PeerSource
from .recalibrate import Recalibration as Recalibration
from .recalibrate import recalibrate_norms as recalibrate_norms
from .rounds import graft_ as graft_
from .settings import GraftSettings as GraftSettings

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # timm (and torchvision under it) take seconds to import: graftopt.models, which registers
    # the CIFAR networks with timm, loads on first use.
    if name == "models":
        import importlib

        return importlib.import_module(".models", __name__)
    raise AttributeError(f"module 'graftopt' has no attribute {name!r}")


__all__ = [
    "GraftOptimizer",
    "GraftSettings",
    "InvalidFilters",
    "ModulePeers",
    "PeerSource",
    "Recalibration",
    "RoundRecord",
    "adapters",
    "functional",
    "graft_",
    "invalid_filters",
    "models",
    "recalibrate_norms",
    "ring",
]
