"""Training runs with filter grafting: the ``graftopt`` console script and its parts.

``graftopt train`` (also ``python -m graftopt.train``) trains K grafted peers, optionally beside
K baselines, with timm's models, optimizers, schedulers and data; ``graftopt report`` plots a
run; ``graftopt inspect`` prints per-layer entropy and invalid filters.
"""

from .config import TrainConfig as TrainConfig
from .integration import create_graft_optimizer as create_graft_optimizer

__all__ = ["TrainConfig", "create_graft_optimizer"]
