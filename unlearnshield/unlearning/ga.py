"""Multi-step gradient ascent on the forget set (the OPTML "GA" baseline)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from unlearnshield.data import ImageSplit
from unlearnshield.unlearning.base import (
    UNLEARNERS,
    Unlearner,
    shuffled_batches,
    steps_per_epoch,
    trainable_parameters,
)
from unlearnshield.unlearning.iterative import IterativeConfig, make_sgd


@dataclasses.dataclass(frozen=True)
class GAConfig(IterativeConfig):
    """Options of ``ga`` (the defaults are the ``reference`` preset).

    Attributes:
        lr: SGD learning rate η; default 1e-4 (the Unlearn-Sparse README command; its
            maintainers tune it on a log grid over [1e-5, 1e-3] and suggest 5e-4 to 1e-3
            for random forgetting).
        epochs: passes over the forget set; default 5.
        batch_size: forget images per step; default 256.
        momentum: SGD momentum; default 0.9.
        weight_decay: SGD weight decay; default 5e-4 (the reference code keeps it on).
        crop_padding: random-crop padding in pixels; default 4.
        flip: random horizontal flips; default True.
        bn_mode: BatchNorm while training; default ``"auto"``: train mode as in the
            reference code for batches of at least ``bn_min_batch`` images, eval mode for
            smaller ones (a single forget sample among them).
        bn_min_batch: smallest batch run in train mode under ``"auto"``; default 32.
    """

    lr: float = 1e-4
    epochs: int = 5


@UNLEARNERS.register("ga")
class GradientAscent(Unlearner):
    """Gradient ascent: SGD on −CE(f_θ(x), y) over the forget set for a few epochs.

    Reference: the OPTML code base (Jia et al., NeurIPS'23; Fan et al., ICLR'24),
    ``unlearn/GA.py`` (notes-unlearning §2.1): each epoch is one shuffled pass over D_f in
    batches, loss = −(mean cross-entropy), SGD with momentum 0.9 and weight decay 5e-4,
    BatchNorm in train mode, no retain term, no clamp.

    Presets: ``reference`` (lr 1e-4, 5 epochs, crop + flip) and ``cpu`` (lr 2e-4, 5 epochs,
    flips only), which on the CIFAR-10 cpu ConvNet takes a single forget sample's loss to
    about the mean test loss.

    Notes:
        Small forget sets (the attack paper's single sample): under ``bn_mode="auto"``
        (the default) batches of fewer than ``bn_min_batch`` images run BatchNorm in eval
        mode, as the attack paper does, because train-mode BatchNorm on a few images
        normalises by their own statistics and drags the running statistics towards them
        (measured on the CIFAR-10 cpu ConvNet with 16 forget images: train mode lost 0.8
        points of test accuracy and raised the forget loss less than eval mode, which lost
        none). ``bn_mode="train"`` reproduces the reference code exactly. With momentum
        and several steps, the update Δ is not a pure gradient direction; unbounded
        ascent on one sample diverges quickly (lr 1e-3 for 5 epochs took the CIFAR-10 cpu
        ConvNet from 64.6% to 32.4% test accuracy).
    """

    name = "ga"
    Config = GAConfig
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "reference": {},
        "cpu": {"lr": 2e-4, "epochs": 5, "crop_padding": 0},
    }
    needs_retain = False

    def _unlearn(
        self,
        model: nn.Module,
        forget_x: torch.Tensor,
        forget_y: torch.Tensor,
        retain: ImageSplit | None,
        generator: torch.Generator,
        progress: bool | None,
    ) -> dict[str, Any]:
        config: GAConfig = self.config
        device = forget_x.device
        optimizer = make_sgd(trainable_parameters(model), config)
        k = forget_x.shape[0]
        total = config.epochs * steps_per_epoch(k, config.batch_size)
        bar = tqdm(total=total, desc="ga", disable=None if progress is None else not progress)
        epoch_losses: list[float] = []
        bn_modes: set[str] = set()
        for _ in range(config.epochs):
            loss_sum = 0.0
            for idx in shuffled_batches(k, config.batch_size, generator):
                x = config.augmentation(forget_x[idx.to(device)], generator, device)
                y = forget_y[idx.to(device)]
                bn_modes.add(config.bn_mode_for(model, len(idx)))

                # ascent on the forget batch: minimise −CE
                loss = -F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum -= float(loss.detach()) * len(idx)
                bar.update()
            epoch_losses.append(loss_sum / k)
        bar.close()
        return {"epoch_forget_loss": epoch_losses, "bn_modes_used": sorted(bn_modes)}
