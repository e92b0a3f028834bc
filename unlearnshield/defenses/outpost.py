"""Outpost: risk-scaled noise on the Fisher-selected entries of a pruned difference."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from unlearnshield.defenses.base import (
    DEFENSES,
    DifferenceDefense,
    check_config,
    kept_count,
    percentile_rank,
    require,
    require_fraction,
    top_magnitude_mask,
)


@dataclasses.dataclass(frozen=True)
class OutpostConfig:
    """Options of ``outpost`` (defaults: every configuration file of the reference code).

    Attributes:
        beta: β, the decay speed of the perturbation probability 1 / (1 + β·t); default 0.125.
        phi: φ, the fraction of Fisher-information entries (model-wide) that receive noise;
            default 0.4 (the reference's ``phi: 40`` percent).
        prune_ratio: the fraction of each tensor's smallest |Δ| entries set to zero; default
            0.8 (``prune_base: 80``).
        noise_base: the noise scale: each layer's noise std is ``min(var(θo_l), 1) ·
            noise_base``, in parameter units; default 0.8.
        iteration: t, the local iteration the difference stands for; default 0, where the
            perturbation probability is 1 (see the class notes).
    """

    beta: float = 0.125
    phi: float = 0.4
    prune_ratio: float = 0.8
    noise_base: float = 0.8
    iteration: int = 0

    def __post_init__(self) -> None:
        check_config(self)
        require(math.isfinite(self.beta) and self.beta >= 0, f"beta must be ≥ 0, got {self.beta}")
        require_fraction("phi", self.phi, closed=True)
        require_fraction("prune_ratio", self.prune_ratio)
        require(
            math.isfinite(self.noise_base) and self.noise_base >= 0,
            f"noise_base must be ≥ 0, got {self.noise_base}",
        )
        require(self.iteration >= 0, f"iteration must be ≥ 0, got {self.iteration}")


def layer_risk(weights: torch.Tensor) -> float:
    """Outpost's privacy risk of a layer: ``min(var(θ_l), 1)`` (unbiased variance).

    A one-entry tensor has no spread; its risk is 0 (the reference's ``torch.var`` would
    give NaN there).
    """
    if weights.numel() < 2:
        return 0.0
    return min(float(weights.detach().double().var()), 1.0)


@DEFENSES.register("outpost")
class Outpost(DifferenceDefense):
    """Prune each tensor of Δ, then add risk-scaled Gaussian noise on the Fisher-selected
    entries.

    Reference: Wang, Hugh, Li, "More than enough is too much: adaptive defenses against
    gradient leakage in production federated learning" (INFOCOM'23), the authors' code in
    TL-System/plato ``examples/gradient_leakage_attacks/defense/Outpost/perturb.py`` at
    9bc20a68/badbe27c (notes-defenses §4). For every parameter tensor ``l`` of Δ:

    * risk_l = min(var(θo_l), 1), from the original model's weights;
    * fim_l = mean over dim 0 of Δ_l² (the code's empirical Fisher diagonal), one global
      threshold at the (1 − φ) percentile of all fim entries: positions at or above it are
      selected, broadcast over dim 0 (a bias is selected or not as a whole);
    * Δ'_l = prune(Δ_l, prune_ratio) + mask_l · N(0, (risk_l · noise_base)²), the noise
      added after pruning (pruned positions may receive noise).

    Notes:
        One-shot mapping (notes §4.7): Outpost runs once per local SGD step with probability
        1 / (1 + β·t). A released Δ is one shot, so ``iteration`` stands for t: at the
        default t = 0 the difference is always perturbed (the first local step); for t > 0
        a coin with that probability is drawn from the defense's generator, and on failure
        Δ is released unmodified, as in the reference. The FIM uses Δ² in place of the
        per-step squared gradients (scale does not matter: only the ranking does). The
        noise std is absolute (from θo's weights), not relative to Δ.
    """

    name = "outpost"
    Config = OutpostConfig

    def defend(
        self,
        delta: dict[str, torch.Tensor],
        *,
        original: nn.Module,
        forget_x: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        config = self.config
        probability = 1.0 / (1.0 + config.beta * config.iteration)
        if config.iteration > 0:
            draw = float(torch.rand((), generator=generator, device=generator.device))
            if draw >= probability:
                return dict(delta), {"perturbed": False, "probability": probability}

        # the empirical Fisher diagonal per tensor, and one global selection threshold
        fim = {name: d.pow(2).mean(0) if d.dim() > 0 else d.pow(2) for name, d in delta.items()}
        all_fim = torch.cat([f.reshape(-1) for f in fim.values()])
        n = all_fim.numel()
        rank = percentile_rank(n, 1.0 - config.phi)
        threshold = all_fim.kthvalue(rank + 1).values if rank < n else all_fim.max()

        weights = dict(original.named_parameters())
        out, selected = {}, 0
        for name, d in delta.items():
            pruned = d * top_magnitude_mask(d, kept_count(d.numel(), config.prune_ratio))
            std = layer_risk(weights[name]) * config.noise_base
            mask = (fim[name] >= threshold).to(d.dtype)
            selected += int(mask.sum()) * (d.numel() // max(mask.numel(), 1))
            if std > 0:
                noise = torch.empty_like(d).normal_(0.0, std, generator=generator)
                out[name] = pruned + noise * mask  # mask broadcasts over dim 0
            else:
                out[name] = pruned
        total = sum(d.numel() for d in delta.values())
        return out, {
            "perturbed": True,
            "probability": probability,
            "noised_fraction": selected / total,
        }
