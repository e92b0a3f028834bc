"""The attack's optimisation settings and the named budgets ``paper`` and ``cpu``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from unlearnshield._registry import Registry

KEYLESS_AT_DEFAULT = "keyless_at_default"
"""Field metadata of options added after benchmark run folders existed: records leave such a
field out of their settings (and keys) while it holds its default, which does nothing, so
older run folders keep their keys (see :func:`unlearnshield.bench.spec.plan_cells`)."""


@dataclass(frozen=True)
class AttackConfig:
    """How the inversion optimises its dummy images.

    The defaults are the reference attack's (the ``paper`` budget): 10,000 signed AdamW steps
    at lr 0.04, weight decay 0.01, lr ×0.5 at 3/8, 5/8 and 7/8 of the run, five restarts,
    TV weight 1e-2, N(0, 1) initialisation, images clamped to [0, 1] before every step.

    Attributes:
        iterations: optimisation steps per restart.
        restarts: independent initialisations per reconstruction; the one whose final
            images best match the target (attacker's cosine cost, without TV) is kept.
        lr: AdamW learning rate, in pixel units per step (signed gradients make the step
            size about ``lr`` per pixel).
        weight_decay: AdamW's decoupled weight decay on the image.
        tv_weight: weight of the total-variation prior (mean absolute neighbour
            differences, pixel space).
        lr_decay_at: fractions of ``iterations`` at which the lr is multiplied by
            ``lr_decay_factor``.
        lr_decay_factor: the decay factor.
        signed: replace the image gradient by its sign before the AdamW step.
        init_std: standard deviation of the initialisation noise (pixel space).
        init_mean: mean of the initialisation: 0 is the reference's N(0, 1), which the first
            clamp turns into about half black pixels; 0.5 starts from mid-grey.
        tv_final: when set, the TV weight decays geometrically from ``tv_weight`` at the
            first step to ``tv_final`` at the last (a strong prior early against noise, a
            weak one late for sharpness); ``None`` keeps it constant (the reference).
        tv_chroma: when set, the TV prior takes its differences in an orthonormal opponent
            colour space (luminance, red–green, yellow–blue), the two chroma channels weighted
            by this factor relative to luminance; ``None`` (the reference) takes them in R, G
            and B. Natural images carry little fine detail in chroma, so a weight above 1
            removes the coloured speckle the attack otherwise leaves and spares luminance
            edges. Needs RGB images.
        average_tail: return the mean of the (clamped) iterates of this final fraction of
            the steps instead of the last iterate; 0 (the reference) returns the last. Signed
            steps leave each pixel oscillating by about the final lr; averaging the tail
            removes that part of the noise, as Polyak averaging does. (On the ``cpu``
            setting it changed mean SSIM by less than 0.003: the speckle there is not that
            oscillation.)
        log_every: log one fixed-format line every this many steps (0 = never).
    """

    iterations: int = 10_000
    restarts: int = 5
    lr: float = 0.04
    weight_decay: float = 0.01
    tv_weight: float = 1e-2
    lr_decay_at: tuple[float, ...] = (0.375, 0.625, 0.875)
    lr_decay_factor: float = 0.5
    signed: bool = True
    init_std: float = 1.0
    init_mean: float = 0.0
    tv_final: float | None = None
    average_tail: float = dataclasses.field(default=0.0, metadata={KEYLESS_AT_DEFAULT: True})
    tv_chroma: float | None = dataclasses.field(default=None, metadata={KEYLESS_AT_DEFAULT: True})
    log_every: int = 500

    def __post_init__(self) -> None:
        self._check_types()
        if self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")
        if self.restarts < 1:
            raise ValueError(f"restarts must be at least 1, got {self.restarts}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.tv_weight < 0 or self.weight_decay < 0:
            raise ValueError("tv_weight and weight_decay must be non-negative")
        if not all(0 < f < 1 for f in self.lr_decay_at):
            raise ValueError(f"lr_decay_at must be fractions in (0, 1), got {self.lr_decay_at}")
        if self.init_std <= 0:
            raise ValueError(f"init_std must be positive, got {self.init_std}")
        if not 0 <= self.average_tail < 1:
            raise ValueError(f"average_tail must lie in [0, 1), got {self.average_tail}")
        if self.tv_final is not None and (self.tv_final <= 0 or self.tv_weight <= 0):
            raise ValueError("a TV schedule needs positive tv_weight and tv_final")
        if self.tv_chroma is not None and self.tv_chroma <= 0:
            raise ValueError(f"tv_chroma must be positive or None, got {self.tv_chroma}")

    def _check_types(self) -> None:
        """A clear error for a value of the wrong type (``--set tv_chroma=none`` is a string;
        JSON's ``null`` is None)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"{f.name} must be true or false, got {value!r}")
            if f.type in ("int", "float", "float | None"):
                if value is None and f.type == "float | None":
                    continue
                kinds = int if f.type == "int" else (int, float)
                if isinstance(value, bool) or not isinstance(value, kinds):
                    what = "an integer" if f.type == "int" else "a number"
                    what += " or null" if f.type == "float | None" else ""
                    raise ValueError(f"{f.name} must be {what}, got {value!r}")

    @property
    def milestones(self) -> tuple[int, ...]:
        """The steps at which the lr decays."""
        return tuple(int(self.iterations * f) for f in self.lr_decay_at)

    @property
    def average_from(self) -> int:
        """The first step whose result enters the returned average (``iterations`` - the
        tail's length; the last step alone when ``average_tail`` is 0)."""
        return self.iterations - max(1, round(self.iterations * self.average_tail))

    def lr_at(self, step: int) -> float:
        """The learning rate in force at ``step`` (0-based)."""
        passed = sum(step >= m for m in self.milestones)
        return self.lr * self.lr_decay_factor**passed

    def tv_at(self, step: int) -> float:
        """The TV weight in force at ``step`` (0-based)."""
        if self.tv_final is None or self.iterations == 1:
            return self.tv_weight
        frac = step / (self.iterations - 1)
        return self.tv_weight * (self.tv_final / self.tv_weight) ** frac

    def replace(self, **changes: object) -> AttackConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


BUDGETS: Registry[AttackConfig] = Registry("attack budget")
BUDGETS.register("paper")(AttackConfig())
# Measured on CIFAR-10 (JPEG copy) with the cpu original model and one-step GA (η = 1e-3),
# 8 random training members (benchmarks/attack_cpu_budget.py, README): mean SSIM 0.78 ± 0.21,
# LPIPS 0.033 (the truth averaged over 4×4 blocks: 0.49, 0.092), in 259 s on two cores
# (48,000 image-steps, layer-wise batched engine). Plain (unsigned) Adam steps, a TV prior in
# opponent colours that weighs chroma 3× and four restarts each lift it over the signed,
# RGB-TV setting below; the reference's TV weight 1e-2 is far too weak for this small model.
BUDGETS.register("cpu")(
    AttackConfig(
        iterations=1_500,
        restarts=4,
        lr=0.08,
        tv_weight=0.1,
        signed=False,
        tv_chroma=3.0,
        log_every=500,
    )
)
# The cpu budget until 2026-12-04 (mean SSIM 0.62 ± 0.13, LPIPS 0.107, 225 s on the same
# samples): the CPU tables in docs/results were made with it, under the name "cpu".
BUDGETS.register("cpu-v1")(AttackConfig(iterations=3_000, restarts=1, tv_weight=0.2, log_every=500))


def resolve_budget(budget: str | int | AttackConfig) -> AttackConfig:
    """A budget name, an iteration count (the ``cpu`` budget at that length) or a config."""
    if isinstance(budget, AttackConfig):
        return budget
    if isinstance(budget, int) or (isinstance(budget, str) and budget.isdigit()):
        return BUDGETS.get("cpu").replace(iterations=int(budget))
    return BUDGETS.get(budget)
