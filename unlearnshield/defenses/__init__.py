"""Defenses of an unlearning release against unlearning inversion (verb: :func:`protect`).

One verb, :func:`protect`, and one registry, :data:`DEFENSES`:

===========  ========================================================================  =========
defense      what it releases (Δ = θu − θo)                                           source
===========  ========================================================================  =========
``shield``   θu + δ, δ from AIM + 10 Adam steps on L_privacy + λ1 L_acc + λ2 L_forget  paper §3
``none``     θu as it is                                                               Table 1
``noise``    θo + Δ + N(0, 0.1²)                                                       §4.1
``pruning``  θo + Δ with the 90% smallest |Δ| of each tensor zeroed                    §4.1
``soteria``  θo + Δ with the head's most revealing input-feature columns zeroed        Sun'21
``outpost``  θo + prune80(Δ) + risk-scaled noise on Fisher-selected entries            Wang'23
``dgp``      θo + Δ keeping only the 75th–95th percentile |Δ| band of each tensor      Xue'24
===========  ========================================================================  =========

    >>> released, report = protect(theta_o, theta_u, x_f, y_f)                 # doctest: +SKIP
    >>> released, report = protect(theta_o, theta_u, x_f, y_f, defense="pruning", ratio=0.9)
    ... # doctest: +SKIP
    >>> report["cosine"], report["outdiff"]                                     # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from unlearnshield.defenses.base import (
    DEFENSES,
    Defense,
    DefenseError,
    DifferenceDefense,
    ParameterLayout,
    ProtectionProblem,
    prepare_problem,
)
from unlearnshield.defenses.magnitude import (
    DGPConfig,
    DualGradientPruning,
    GradientPruning,
    PruningConfig,
    band_mask,
)
from unlearnshield.defenses.noise import GaussianNoise, NoDefense, NoiseConfig
from unlearnshield.defenses.outpost import Outpost, OutpostConfig
from unlearnshield.defenses.shield import (
    PRIVACY_OBJECTIVES,
    ShieldConfig,
    UnlearnShield,
    aim_sigma,
    initial_perturbation,
    shield_perturbation,
)
from unlearnshield.defenses.soteria import Soteria, SoteriaConfig, classifier_head, feature_scores


def build_defense(defense: str | Defense = "shield", **options: Any) -> Defense:
    """A defense by registry name with its options validated, or an instance as given.

    Raises:
        KeyError: unknown defense name (the message lists the valid ones).
        ValueError: unknown option, or an option that breaks a rule.
    """
    if isinstance(defense, Defense):
        if options:
            raise TypeError("options go to the defense's constructor, not with an instance")
        return defense
    return DEFENSES.get(defense)(**options)


def protect(
    original: nn.Module,
    unlearned: nn.Module,
    forget_x: torch.Tensor,
    forget_y: torch.Tensor,
    defense: str | Defense = "shield",
    *,
    seed: int = 0,
    **options: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Protect an unlearning release: θu → θu' (the defender's whole view).

    Args:
        original: θo, an ``nn.Module`` classifier taking images in [0, 1]; not modified.
        unlearned: θu, the same architecture; not modified.
        forget_x: the forgotten images, float in [0, 1], ``(k, C, H, W)``.
        forget_y: their labels, int ``(k,)``.
        defense: a name of :data:`DEFENSES` (default ``"shield"``, UnlearnShield) or a
            :class:`Defense` instance.
        seed: seeds the defense's random draws; default 0.
        **options: the defense's options, e.g. ``lambda_acc=0.5, lambda_forget=0.5,
            lr=1e-5, iterations=10`` for ``shield`` (see each ``*Config``).

    Returns:
        ``(released, report)``: the release (a new module in eval mode, θu's buffers) and a
        JSON-serialisable report (see :meth:`Defense.protect`).

    Raises:
        KeyError: unknown defense.
        ValueError: bad options; :class:`DefenseError` (a ``ValueError``) for inputs the
            defense cannot work on, such as Δ = 0.
    """
    return build_defense(defense, **options).protect(
        original, unlearned, forget_x, forget_y, seed=seed
    )


__all__ = [
    "DEFENSES",
    "PRIVACY_OBJECTIVES",
    "DGPConfig",
    "Defense",
    "DefenseError",
    "DifferenceDefense",
    "DualGradientPruning",
    "GaussianNoise",
    "GradientPruning",
    "NoDefense",
    "NoiseConfig",
    "Outpost",
    "OutpostConfig",
    "ParameterLayout",
    "ProtectionProblem",
    "PruningConfig",
    "ShieldConfig",
    "Soteria",
    "SoteriaConfig",
    "UnlearnShield",
    "aim_sigma",
    "band_mask",
    "build_defense",
    "classifier_head",
    "feature_scores",
    "initial_perturbation",
    "prepare_problem",
    "protect",
    "shield_perturbation",
]
