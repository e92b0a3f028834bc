"""The optimiser set-up shared by the iterative methods (GA, ℓ1-sparse, SalUn).

All three follow the OPTML reference code (notes-unlearning §1.4): a fresh SGD optimiser
with momentum 0.9 and weight decay 5e-4 per run, a constant learning rate (the reference
milestones 91/136 are never reached within 5–10 epochs), mini-batches of 256 and the
training augmentation (random crop with 4-pixel padding, horizontal flip) kept on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch
from torch import nn

from unlearnshield.unlearning.base import (
    BN_MIN_BATCH,
    BN_MODES,
    AugmentOptions,
    check_config,
    require,
    set_bn_mode,
)


@dataclasses.dataclass(frozen=True)
class IterativeConfig:
    """Fields common to the iterative methods; each method's config redeclares the defaults.

    Attributes:
        lr: SGD learning rate η (constant).
        epochs: passes over the method's data.
        batch_size: images per step.
        momentum: SGD momentum (0 = none).
        weight_decay: SGD L2 weight decay coefficient.
        crop_padding: random-crop padding in pixels applied to training batches; 0 = none.
        flip: random horizontal flips of training batches.
        bn_mode: BatchNorm while training: ``"auto"``, ``"train"`` or ``"eval"``
            (:func:`~unlearnshield.unlearning.base.set_bn_mode`).
        bn_min_batch: with ``"auto"``, batches of fewer images run BatchNorm in eval mode.
    """

    lr: float = 0.01
    epochs: int = 10
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    crop_padding: int = 4
    flip: bool = True
    bn_mode: str = "auto"
    bn_min_batch: int = BN_MIN_BATCH

    def __post_init__(self) -> None:
        check_config(self)
        require(math.isfinite(self.lr) and self.lr > 0, f"lr must be positive, got {self.lr}")
        require(self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}")
        require(self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}")
        require(0.0 <= self.momentum < 1.0, f"momentum must lie in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0.0, f"weight_decay must be ≥ 0, got {self.weight_decay}")
        require(self.crop_padding >= 0, f"crop_padding must be ≥ 0, got {self.crop_padding}")
        require(
            self.bn_mode in BN_MODES,
            f"bn_mode must be one of {', '.join(BN_MODES)}, got {self.bn_mode!r}",
        )
        require(self.bn_min_batch >= 1, f"bn_min_batch must be ≥ 1, got {self.bn_min_batch}")

    @property
    def augmentation(self) -> AugmentOptions:
        """The augmentation applied to each training batch."""
        return AugmentOptions(crop_padding=self.crop_padding, flip=self.flip)

    def bn_mode_for(self, model: nn.Module, batch_size: int) -> str:
        """Apply :func:`set_bn_mode` for a batch of ``batch_size`` images; returns the mode."""
        return set_bn_mode(
            model, bn_mode=self.bn_mode, batch_size=batch_size, bn_min_batch=self.bn_min_batch
        )


def make_sgd(params: Iterable[nn.Parameter], config: IterativeConfig) -> torch.optim.SGD:
    """The reference optimiser: plain SGD with the config's lr, momentum and weight decay."""
    return torch.optim.SGD(
        list(params), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
