"""The threat: the unlearning-inversion attack, its budgets, engines and attacker variants.

>>> from unlearnshield.attacks import reconstruct
>>> rec = reconstruct(theta_o, theta_u, input_shape=(3, 32, 32), labels=[3])  # doctest: +SKIP
>>> rec.images.shape  # doctest: +SKIP
torch.Size([1, 1, 3, 32, 32])
"""

from unlearnshield.attacks.adaptive import DefenseAwareAttacker
from unlearnshield.attacks.config import BUDGETS, AttackConfig, resolve_budget
from unlearnshield.attacks.engines import ENGINES, InversionResult, total_variation
from unlearnshield.attacks.uia import (
    ATTACKERS,
    Attacker,
    AttackError,
    Reconstruction,
    SignAgnosticAttacker,
    StandardAttacker,
    infer_labels,
    reconstruct,
)

__all__ = [
    "ATTACKERS",
    "BUDGETS",
    "ENGINES",
    "AttackConfig",
    "AttackError",
    "Attacker",
    "DefenseAwareAttacker",
    "InversionResult",
    "Reconstruction",
    "SignAgnosticAttacker",
    "StandardAttacker",
    "infer_labels",
    "reconstruct",
    "resolve_budget",
    "total_variation",
]
