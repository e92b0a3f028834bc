"""Magnitude masks on Δ, tensor by tensor: gradient pruning and dual gradient pruning (DGP)."""

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
class PruningConfig:
    """Options of ``pruning``.

    Attributes:
        ratio: p, the fraction of each tensor's entries set to zero (those of smallest
            |Δ|), in [0, 1); default 0.9 (the paper's §4.1 "prune 90% of gradient entries").
    """

    ratio: float = 0.9

    def __post_init__(self) -> None:
        check_config(self)
        require_fraction("ratio", self.ratio)


def band_mask(values: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """Mask of the entries with ``percentile(|v|, 100·lower) ≤ |v| ≤ percentile(|v|, 100·upper)``.

    Computed from ranks with ``torch.topk``, not from interpolated thresholds: of ``n``
    entries sorted by magnitude, ascending ranks ``⌈(n − 1)·lower⌉ … ⌊(n − 1)·upper⌋`` are
    kept, which is ``numpy.percentile``'s rule for distinct magnitudes (notes-defenses §5.1).

    Args:
        values: any tensor.
        lower: the band's lower quantile, in [0, 1).
        upper: the band's upper quantile, in (lower, 1].

    Returns:
        A boolean mask shaped like ``values``.
    """
    flat = values.reshape(-1).abs()
    n = flat.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if n == 0:
        return mask.view(values.shape)
    low = percentile_rank(n, lower)
    high = min(n - 1, math.floor((n - 1) * upper + 1e-9))
    if high >= low:
        # descending ranks n−1−high … n−1−low are the band
        index = flat.topk(n - low, sorted=True).indices
        mask[index[n - 1 - high :]] = True
    return mask.view(values.shape)


@DEFENSES.register("pruning")
class GradientPruning(DifferenceDefense):
    """Zero the fraction p of smallest-|Δ| entries of every parameter tensor.

    Reference: magnitude gradient pruning (Zhu et al., DLG, NeurIPS'19 §5) as the paper runs
    it (§4.1, 90%). Per tensor, the convention of every reference implementation (Soteria's
    ``--defense prune``, GGL ``gradient_compression``, GradAttack ``GradPruneDefense``; notes
    §2): each tensor keeps its own ``n − ⌈(n − 1)·p⌉`` largest entries (the count the
    references' ``|g| ≥ percentile(|g|, 100·p)`` keeps for distinct magnitudes; 10.00% of a
    64×32×3×3 tensor), chosen with ``torch.topk``: an exact count, ties broken by topk, and
    no size limit (``torch.quantile`` refuses tensors above 2^24 entries).

    Notes:
        One-shot simplification: the references prune each step's gradient; here the final
        Δ is pruned once. Pruned entries are released as θo's values exactly.
    """

    name = "pruning"
    Config = PruningConfig

    def defend(
        self,
        delta: dict[str, torch.Tensor],
        *,
        original: nn.Module,
        forget_x: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        out, kept = {}, 0
        for name, d in delta.items():
            mask = top_magnitude_mask(d, kept_count(d.numel(), self.config.ratio))
            out[name] = d * mask
            kept += int(mask.sum())
        total = sum(d.numel() for d in delta.values())
        return out, {"kept_fraction": kept / total}


@dataclasses.dataclass(frozen=True)
class DGPConfig:
    """Options of ``dgp``.

    Attributes:
        lower: the band's lower quantile of |Δ| per tensor; entries below it are zeroed;
            default 0.75 (the reference code's ``dgp(input_gradient, k=75)``).
        upper: the band's upper quantile; the largest entries above it are zeroed too;
            default 0.95 (fixed in the reference code).
    """

    lower: float = 0.75
    upper: float = 0.95

    def __post_init__(self) -> None:
        check_config(self)
        require_fraction("lower", self.lower)
        require_fraction("upper", self.upper, closed=True)
        require(self.lower < self.upper, f"lower ({self.lower}) must be below upper ({self.upper})")


@DEFENSES.register("dgp")
class DualGradientPruning(DifferenceDefense):
    """Keep only the band of |Δ| between the 75th and 95th percentile of every tensor.

    Reference: Xue et al., "Revisiting gradient pruning: a dual realization for defending
    against gradient attacks" (AAAI'24), privacy-evaluation variant
    ``privacy/defense.py::dgp`` of xl061644-collab/dual-gradient-pruning (notes §5.1): drop
    the smallest 75% and the largest 5% of each tensor, keep ≈ 20%.

    Notes:
        One-shot simplification: DGP's error feedback (the residual Δ − DGP(Δ) carried into
        the next round) has no next round here and is discarded (notes §5.4). The band is
        cut by ranks (:func:`band_mask`), not interpolated thresholds.
    """

    name = "dgp"
    Config = DGPConfig

    def defend(
        self,
        delta: dict[str, torch.Tensor],
        *,
        original: nn.Module,
        forget_x: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        out, kept = {}, 0
        for name, d in delta.items():
            mask = band_mask(d, self.config.lower, self.config.upper)
            out[name] = d * mask
            kept += int(mask.sum())
        total = sum(d.numel() for d in delta.values())
        return out, {"kept_fraction": kept / total}
