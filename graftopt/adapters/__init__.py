"""Layer adapters: which tensors of an architecture are scored and blended together."""

from .base import Adapter as Adapter
from .base import Unit as Unit
from .base import unwrap as unwrap
from .generic import GenericAdapter as GenericAdapter
from .registry import family_of as family_of
from .registry import get_adapter as get_adapter
from .registry import list_adapters as list_adapters
from .registry import register_adapter as register_adapter

__all__ = [
    "Adapter",
    "GenericAdapter",
    "Unit",
    "family_of",
    "get_adapter",
    "list_adapters",
    "register_adapter",
    "unwrap",
]
