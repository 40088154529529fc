"""A method's training schedule, run by the one training engine (robustmm_fast.train.fit).

The engine owns the loop: epochs, data order (seeded), the global batch's augmentation before
it is sharded across DDP ranks, validation-based model selection, checkpoints and resume. A
recipe says what happens inside: which optimizers, which stage an epoch belongs to, how the
present mask of a training batch is augmented, and one optimisation step.

The default recipe (`Recipe` itself) is one AdamW optimizer on `out.loss`, with optional
per-sample modality dropout (`modality_dropout` > 0). Methods subclass it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["Recipe", "NonFiniteLossError", "check_finite"]



from ..contract import NonFiniteLossError, TrainConfig, check_finite
from ..contract import Recipe as _Recipe


class Recipe(_Recipe):
    """Transitional: robustmm_fast.contract.Recipe taking a dict that may hold a subclass's
    own keys (read by the subclass with config.get). Methods move to typed configs."""

    def __init__(self, config: Optional[dict] = None):
        config = dict(config or {})
        known = {k: v for k, v in config.items() if k in TrainConfig.__dataclass_fields__}
        super().__init__(TrainConfig.from_dict(known))
        self.config = config

