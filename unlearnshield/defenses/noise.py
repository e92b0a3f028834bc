"""The no-defense baseline and additive Gaussian noise."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from unlearnshield.defenses.base import DEFENSES, DifferenceDefense, check_config, require


@dataclasses.dataclass(frozen=True)
class NoDefenseConfig:
    """``none`` has no options."""


@DEFENSES.register("none")
class NoDefense(DifferenceDefense):
    """Release θu as it is: the paper's "Baseline" column (Table 1).

    The release is a copy of θu, bit for bit; the report measures cos(Δ, Δ*) = 1, ‖δ‖ = 0 and
    OutDiff = 0, so every other defense is read against it.
    """

    name = "none"
    Config = NoDefenseConfig

    def defend(
        self,
        delta: dict[str, torch.Tensor],
        *,
        original: nn.Module,
        forget_x: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return dict(delta), {}


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
    """Options of ``noise``.

    Attributes:
        std: σ, the standard deviation of the Gaussian noise added to every entry of Δ, in
            parameter units; default 0.1 (the paper's §4.1 setting, also GGL's
            ``additive_noise`` default).
    """

    std: float = 0.1

    def __post_init__(self) -> None:
        check_config(self)
        require(math.isfinite(self.std) and self.std >= 0, f"std must be ≥ 0, got {self.std}")


@DEFENSES.register("noise")
class GaussianNoise(DifferenceDefense):
    """Δ' = Δ + ε, ε ~ N(0, σ²) i.i.d. on every parameter entry (not on buffers).

    Reference: the "Noise" defense of the gradient-leakage literature as the paper runs it
    (§4.1, σ = 0.1; Carletti et al., SoK USENIX Security'25); GGL ``defense.additive_noise``
    and breaching's ``local_diff_privacy.gradient_noise`` with a Gaussian distribution
    (notes-defenses §1).

    Notes:
        One-shot simplification: the references add the noise to each training step's
        gradient; here it is added once to the final difference. σ is absolute, not relative
        to Δ: with one-step unlearning Δ's entries are far below 0.1, so the release is
        essentially noise and accuracy collapses (the paper's Table 1 reports 10% on
        CIFAR-10).
    """

    name = "noise"
    Config = NoiseConfig

    def defend(
        self,
        delta: dict[str, torch.Tensor],
        *,
        original: nn.Module,
        forget_x: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        std = self.config.std
        out = {}
        for name, d in delta.items():
            noise = torch.empty_like(d).normal_(0.0, std, generator=generator) if std else 0.0
            out[name] = d + noise
        return out, {}
