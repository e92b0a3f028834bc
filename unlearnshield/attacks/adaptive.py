"""The defense-aware (adaptive) unlearning-inversion attacker.

Paper §4.4, "Adaptive UIA": the attacker knows the defense and its hyper-parameters. It
applies the same defense to its own simulated difference, with its own randomness, and
matches that defended simulation to the released difference. Here it is one
:class:`~unlearnshield.attacks.uia.Attacker` whose :meth:`offset` hook supplies, every
``refresh_every`` steps,

    δ_sim = defense(Δ¹) − Δ¹,   Δ¹ = s · g(x')

for the current dummy images x' (g their gradient at θo, the engines' dummy gradient), and
the engines add δ_sim / s to g before the cosine. The offset is a constant between refreshes
(straight-through): the gradient with respect to the dummy images flows through the identity
part g only, not through the defense, which is the way the gradient-leakage literature
attacks non-differentiable or randomised defenses (BPDA-style).

Scale s. Defenses with absolute units (UnlearnShield's learning rate and L_acc, the noise
std, Outpost's noise) act differently on differences of different sizes, so the simulated
difference must have the release's scale. The attacker does not know the unlearning step η,
but it sees the released difference; by default it scales each dummy gradient to the norm of
the released difference it targets, s = ‖Δ'‖ / ‖g‖. Where the attacker knows η (e.g. the
server publishes its unlearning method), ``difference_scale=η`` uses s = η instead. The
cosine is scale-invariant, so dividing the offset by s leaves the match unchanged.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from unlearnshield.attacks.engines import OffsetFn
from unlearnshield.attacks.uia import ATTACKERS, StandardAttacker
from unlearnshield.defenses import Defense, build_defense

logger = logging.getLogger(__name__)

ATTACKER_SEED_OFFSET = 2**32
"""Added to the attack seed to seed the attacker's own defense simulation, so that an attack
seed never replays the defender's stream of the same number (defender seeds below 2**32)."""


@ATTACKERS.register("defense-aware")
class DefenseAwareAttacker(StandardAttacker):
    """Matches ``defense(Δ¹)``, not Δ¹, against the release: cost ``1 − cos``.

    Args:
        defense: the defense the attacker assumes, a name of
            :data:`~unlearnshield.defenses.DEFENSES` (default ``"shield"``) or an instance.
        defense_options: that defense's hyper-parameters (the attacker knows them); default
            the defense's defaults.
        refresh_every: attack steps between two simulations of the defense (each one runs
            the defense once per reconstruction: ten forward+backward passes for
            ``shield``); default 50.
        difference_scale: the attacker's knowledge of the unlearning step: None (default)
            scales each simulated difference to the released difference's norm; a positive
            number η uses Δ¹ = η·g.
    """

    name = "defense-aware"

    def __init__(
        self,
        defense: Any = "shield",
        *,
        defense_options: Mapping[str, Any] | None = None,
        refresh_every: int = 50,
        difference_scale: float | None = None,
    ) -> None:
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int):
            raise ValueError(f"refresh_every must be an integer, got {refresh_every!r}")
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be ≥ 1, got {refresh_every}")
        if difference_scale is not None and not (
            math.isfinite(difference_scale) and difference_scale > 0
        ):
            raise ValueError(f"difference_scale must be > 0 or None, got {difference_scale}")
        options = dict(defense_options or {})
        if isinstance(defense, Defense) and options:
            raise ValueError("give defense_options with a defense name, not with an instance")
        self.defense = build_defense(defense, **options)
        self.refresh_every = refresh_every
        self.difference_scale = difference_scale

    def offset(
        self, original: nn.Module, targets: torch.Tensor, *, seed: int
    ) -> tuple[OffsetFn | None, int]:
        """The defense simulation δ_sim / s for the engines, refreshed every
        ``refresh_every`` steps.

        Args:
            original: the attacker's θo (not modified: the simulation uses a private copy).
            targets: the released differences ``(B, P)``.
            seed: the attack seed; the simulation draws from a generator seeded with
                ``seed + ATTACKER_SEED_OFFSET``.

        Returns:
            ``(offset, refresh_every)``.
        """
        model = copy.deepcopy(original).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        generator = torch.Generator(device=targets.device).manual_seed(seed + ATTACKER_SEED_OFFSET)
        target_norms = torch.linalg.vector_norm(targets, dim=1, keepdim=True)
        defense, fixed = self.defense, self.difference_scale

        def simulate(
            step: int, gradients: torch.Tensor, images: torch.Tensor, rows: torch.Tensor
        ) -> torch.Tensor:
            with torch.no_grad():
                wanted = target_norms[rows]  # the released norms of these reconstructions
                if fixed is not None:
                    scale = torch.full_like(wanted, fixed)
                else:
                    norms = torch.linalg.vector_norm(gradients, dim=1, keepdim=True)
                    scale = torch.where(norms > 0, wanted / norms.clamp_min(1e-30), 1.0)
                simulated = gradients * scale
            defended = defense.simulate(model, simulated, images, None, generator)
            with torch.no_grad():
                offset = (defended - simulated) / scale
            logger.debug(
                "defense-aware step %d: ‖δ_sim‖/‖Δ¹‖ %.3g",
                step,
                float(offset.norm() / gradients.norm().clamp_min(1e-30)),
            )
            return offset

        return simulate, self.refresh_every

    def describe(self) -> dict[str, Any]:
        return {
            "attacker": self.name,
            "defense": self.defense.name,
            "defense_options": self.defense.describe(),
            "refresh_every": self.refresh_every,
            "difference_scale": self.difference_scale,
        }
