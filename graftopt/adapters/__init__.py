"""Layer adapters: which tensors of an architecture are scored and blended together."""

from .base import Adapter as Adapter
from .base import Unit as Unit
from .base import unwrap as unwrap
from .families import CifarAdapter as CifarAdapter
from .generic import GenericAdapter as GenericAdapter
from .registry import adapter_for as adapter_for
from .registry import family_of as family_of
from .registry import get_adapter as get_adapter
from .registry import list_adapters as list_adapters
from .registry import register_adapter as register_adapter
from .timm_adapter import TimmAdapter as TimmAdapter

__all__ = [
    "Adapter",
    "CifarAdapter",
    "GenericAdapter",
    "TimmAdapter",
    "Unit",
    "adapter_for",
    "family_of",
    "get_adapter",
    "list_adapters",
    "register_adapter",
    "unwrap",
]
