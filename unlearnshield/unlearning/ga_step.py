"""One-step gradient ascent: the approximate unlearning of the unlearning-inversion attack."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from unlearnshield.data import ImageSplit
from unlearnshield.unlearning.base import (
    UNLEARNERS,
    Unlearner,
    check_config,
    require,
    trainable_parameters,
)


@dataclasses.dataclass(frozen=True)
class GAStepConfig:
    """Options of ``ga-step``.

    Attributes:
        step_size: the ascent step η (unitless multiplier of the gradient); default 1e-3,
            the value of the attack paper's materialised unlearned models
            (``label_inference.py``). The parameter difference Δ = θu − θo is exactly
            η·∇θ L, so η sets the scale of Δ that a defense works against.
        batch_size: forget images per forward pass when accumulating the mean gradient;
            default None, all k at once. Chunking gives the same mean up to float rounding
            (BatchNorm is in eval mode, so samples do not interact).
    """

    step_size: float = 1e-3
    batch_size: int | None = None

    def __post_init__(self) -> None:
        check_config(self)
        require(
            math.isfinite(self.step_size) and self.step_size > 0,
            f"step_size must be a positive number, got {self.step_size}",
        )
        require(
            self.batch_size is None or self.batch_size >= 1,
            f"batch_size must be at least 1 (or None for all at once), got {self.batch_size}",
        )


@UNLEARNERS.register("ga-step")
class GradientAscentStep(Unlearner):
    """θu = θo + η·∇θ CE(f_θo(x_f), y_f): one gradient-ascent step on the forget set.

    Reference: Hu et al., "Learn what you want to unlearn" (S&P'24), approximate unlearning
    (``recovery_algo.loss_steps`` with one local step; notes-uia §2b). The loss is the mean
    cross-entropy over the k forget samples; every parameter that requires a gradient moves
    (convolutions, BatchNorm affine parameters, the linear head). BatchNorm is in eval mode:
    the running statistics are used and are not updated, so the buffers of θu are θo's.

    Presets: ``reference`` and ``cpu`` (η = 1e-3), ``recovery`` (η = 1, the attack's
    feature-recovery target, where θu − θo is the raw gradient).

    Notes:
        The attack paper never materialises θu for feature recovery; η only rescales the
        cosine target there. For a released θu, η = 1 would usually wreck the model.
    """

    name = "ga-step"
    Config = GAStepConfig
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "reference": {"step_size": 1e-3},
        "cpu": {"step_size": 1e-3},
        "recovery": {"step_size": 1.0},
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
        config: GAStepConfig = self.config
        model.eval()
        params = trainable_parameters(model)
        gradient = mean_loss_gradient(model, params, forget_x, forget_y, config.batch_size)

        # ascent step θu = θo + η·g
        with torch.no_grad():
            for p, g in zip(params, gradient, strict=True):
                p.add_(g, alpha=config.step_size)
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in gradient))
        return {"gradient_norm": norm, "update_norm": config.step_size * norm}


def mean_loss_gradient(
    model: nn.Module,
    params: list[nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int | None = None,
) -> list[torch.Tensor]:
    """∇θ of the mean cross-entropy over ``(x, y)``, with the model in its current mode.

    Args:
        model: the classifier (put it in eval mode first for running-statistics BatchNorm).
        params: the parameters to differentiate with respect to.
        x: float images in [0, 1], shape ``(k, C, H, W)``, on the model's device.
        y: int64 labels, shape ``(k,)``.
        batch_size: images per forward pass; None = all at once (one backward pass).

    Returns:
        One gradient tensor per parameter, shaped like it.
    """
    k = x.shape[0]
    if batch_size is None or batch_size >= k:
        loss = F.cross_entropy(model(x), y)
        return list(torch.autograd.grad(loss, params))
    total = [torch.zeros_like(p) for p in params]
    for start in range(0, k, batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        loss = F.cross_entropy(model(xb), yb, reduction="sum") / k
        for acc, g in zip(total, torch.autograd.grad(loss, params), strict=True):
            acc.add_(g)
    return total
