"""Optimizers and learning-rate schedules (see ``build.py`` and ``schedules.py``).

Example::

    from jaxlm.config import Config
    from jaxlm.optim import build_optimizer, lr_at
    tx = build_optimizer(Config())   # optim.name=adamw: clip -> AdamW with masked decay
"""

from jaxlm.optim.build import (OPTIMIZERS, applied_lr, build_adamw, build_optimizer, decay_mask,
                               learning_rate, lr_at, register_optimizer, with_clipping)
from jaxlm.optim.schedules import make_schedule

__all__ = ["OPTIMIZERS", "applied_lr", "build_adamw", "build_optimizer", "decay_mask",
           "learning_rate", "lr_at",
           "make_schedule", "register_optimizer", "with_clipping"]

from jaxlm.optim import fira, galore, lowrank  # noqa: E402,F401  (register galore/fira/lowrank/sltrain)
