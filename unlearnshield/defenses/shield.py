"""UnlearnShield: a directional perturbation of the release in the cosine space of Δ.

Paper §3 (Eqs. 3–8). The server releases θu' = θu + δ instead of θu, with δ found by Adam on

    L_total = L_privacy + λ1·L_acc + λ2·L_forget                                    (Eq. 8)

    L_privacy = 1 + cos(Δ, Δ*),  Δ* = Δ + δ                                           (Eq. 3)
    L_acc     = ‖θu' − θu‖₂² = ‖δ‖₂²                                                  (Eq. 5)
    L_forget  = ‖f_θu(x) − f_θu'(x)‖₂   (softmax outputs, mean over the k samples)     (Eq. 7)

from the amplitude-based initialisation (AIM) δ ~ N(0, σ²), σ = mean |Δ_i| (Eq. 4).

How it runs fast. Only L_forget goes through autograd, via ``functional_call`` on the
release's own parameter tensors, rewritten in place to θu + δ before each forward. The
gradients of L_privacy and L_acc are closed-form, c₁·Δ + c₂·δ with two scalars from two dot
products (one matrix-vector product over the stacked [Δ; δ]): c₁·Δ is written into a flat
gradient buffer, the backward pass accumulates λ2·∇L_forget onto it in place (the leaves'
``.grad`` are views of it), and c₂·δ rides in the L2 term of PyTorch's fused Adam kernel,
which works on per-parameter views of flat δ and moment buffers. These buffers are allocated
once per call, huge-page backed (:func:`~unlearnshield._memory.zeroed_buffer`), so nothing of
size P is allocated inside the loop; besides the forward and backward pass an iteration
streams about 15 passes over P entries. ``benchmarks/shield_cost.py`` measures the cost
against the ten forward+backward passes the method needs anyway.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.adam import adam

from unlearnshield._memory import WORK_BUFFERS, zeroed_buffer
from unlearnshield._registry import Registry
from unlearnshield.defenses.base import (
    DEFENSES,
    Defense,
    ParameterLayout,
    ProtectionProblem,
    check_config,
    chunked_abs_sum,
    chunked_mv,
    copy_with_fresh_parameters,
    forward_with,
    parameters_of,
    require,
)
from unlearnshield.metrics.forgetting import output_distance

logger = logging.getLogger(__name__)

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
"""Adam's moment decays and ε: PyTorch's defaults (the paper names no others)."""


@dataclass(frozen=True)
class PrivacyObjective:
    """L_privacy as a function of c = cos(Δ, Δ*), with its derivative dL/dc.

    Attributes:
        formula: how it reads, for records.
        value: L_privacy(c).
        slope: dL_privacy/dc.
    """

    formula: str
    value: Callable[[float], float]
    slope: Callable[[float], float]


PRIVACY_OBJECTIVES: Registry[PrivacyObjective] = Registry("privacy objective")
PRIVACY_OBJECTIVES.register("anti-align")(
    PrivacyObjective("1 + cos(Δ, Δ*)  (paper Eq. 3)", lambda c: 1 + c, lambda c: 1.0)
)
PRIVACY_OBJECTIVES.register("orthogonal")(
    PrivacyObjective("cos²(Δ, Δ*)", lambda c: c * c, lambda c: 2 * c)
)


@dataclasses.dataclass(frozen=True)
class ShieldConfig:
    """Options of ``shield`` (defaults: the paper's §4.1).

    Attributes:
        lambda_acc: λ1, the weight of L_acc (Eq. 8); default 0.5.
        lambda_forget: λ2, the weight of L_forget (Eq. 8); default 0.5.
        lr: η, Adam's learning rate in parameter units (each entry of δ moves by about η
            per iteration); default 1e-5. Used when ``scale_free`` is False.
        iterations: Adam iterations; default 10.
        aim: initialise δ with AIM, δ ~ N(0, σ²), σ = mean|Δ| (Eq. 4); default True. False
            is the paper's ablation "w/o AIM" (Table 2): δ ~ N(0, ``init_std``²).
        init_std: the initial std of δ without AIM, in parameter units; default 0.01 (the
            paper's ablation value).
        objective: the privacy objective, a name of :data:`PRIVACY_OBJECTIVES`: default
            ``"anti-align"``, the paper's L_privacy = 1 + cos (Eq. 3), which drives Δ*
            towards −Δ; ``"orthogonal"``, L_privacy = cos², drives Δ* towards directions
            orthogonal to Δ. An anti-aligned release still lies on the line through Δ, and a
            sign-flipping attacker (``--attacker sign-agnostic``, cost 1 − |cos|) recovers
            the sample from −Δ as well as from Δ; an orthogonal one offers it neither.
        scale_free: measure the step size and L_acc relative to the size of Δ instead of in
            absolute parameter units; default False (the paper's absolute version). With
            True, Adam's learning rate is ``relative_lr · σ`` (σ = mean|Δ|, AIM's scale) and
            L_acc = ‖δ‖² / ‖Δ‖² (a perturbation as large as Δ costs 1), so the optimisation
            does the same thing whatever unlearning step size set Δ's scale. Why: the
            absolute η = 1e-5 moves each entry by ~1e-4 in 10 iterations, which is
            negligible against a large Δ and overwhelming against a small one (measured on
            a width-16 ConvNet with one-step gradient ascent: cos(Δ, Δ*) only reaches
            +0.03…+0.40 at unlearning step 1e-3 but −0.21…−0.44 at 1e-5), and L_acc = ‖δ‖²
            is negligible at small Δ. L_acc is normalised by ‖Δ‖² rather than by P·σ²:
            gradient differences are heavy-tailed (mean(Δ²)/σ² ≈ 7 on the digits ConvNet),
            and the σ² version held δ near zero at λ1 = 0.5 (cos(Δ, Δ*) stayed at 0.98),
            while with ‖Δ‖² the balance of the two gradients at λ1 = 0.5 admits full
            anti-alignment at ‖δ‖ ≈ 1.6‖Δ‖.
        relative_lr: Adam's learning rate in units of σ when ``scale_free``; default 2.0
            (four digits samples, one-step unlearning at 1e-3, 10 iterations: 1.0 reached
            cos(Δ, Δ*) of −0.05…−0.32 on three and +0.66 on one, 2.0 −0.52…−0.69 on all
            four, 5.0 oscillated). Ignored otherwise.
    """

    lambda_acc: float = 0.5
    lambda_forget: float = 0.5
    lr: float = 1e-5
    iterations: int = 10
    aim: bool = True
    init_std: float = 0.01
    objective: str = "anti-align"
    scale_free: bool = False
    relative_lr: float = 2.0

    def __post_init__(self) -> None:
        check_config(self)
        for name in ("lambda_acc", "lambda_forget"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, f"{name} must be ≥ 0, got {value}")
        require(math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(self.iterations >= 1, f"iterations must be ≥ 1, got {self.iterations}")
        require(
            math.isfinite(self.init_std) and self.init_std > 0,
            f"init_std must be > 0, got {self.init_std}",
        )
        require(
            self.objective in PRIVACY_OBJECTIVES,
            f"objective must be one of {', '.join(PRIVACY_OBJECTIVES.names())}, got "
            f"{self.objective!r}",
        )
        require(
            math.isfinite(self.relative_lr) and self.relative_lr > 0,
            f"relative_lr must be > 0, got {self.relative_lr}",
        )


def aim_sigma(delta: torch.Tensor) -> float:
    """AIM's σ = (1/n) Σ |Δ_i| (paper Eq. 4) of a flat difference ``(P,)``."""
    return chunked_abs_sum(delta) / delta.numel()


PARALLEL_DRAW_CHUNKS = 4
"""Independent Gaussian streams a large CPU draw of δ₀ is split into (fixed, so that the bits
do not depend on the thread count)."""

PARALLEL_DRAW_MIN = 2**22
"""Entries from which the CPU draw of δ₀ is split; below it, one ``normal_`` call."""


def gaussian_fill(out: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Fill ``out`` with i.i.d. N(0, std²) draws from ``generator``, in place.

    PyTorch's CPU ``normal_`` runs on one thread (56 ms for ResNet18's 11.2M entries here), so
    a large CPU tensor is split into :data:`PARALLEL_DRAW_CHUNKS` pieces, each drawn from its
    own generator seeded from ``generator``, on up to ``torch.get_num_threads()`` threads.
    The result depends only on ``generator``'s state, not on the number of threads.

    Args:
        out: the tensor to fill (contiguous).
        std: the standard deviation, in the tensor's units.
        generator: the random source (on ``out``'s device).

    Returns:
        ``out``.
    """
    if out.device.type != "cpu" or out.numel() < PARALLEL_DRAW_MIN:
        return out.normal_(0.0, std, generator=generator)
    seeds = torch.randint(0, 2**62, (PARALLEL_DRAW_CHUNKS,), generator=generator).tolist()
    pieces = out.view(-1).chunk(PARALLEL_DRAW_CHUNKS)

    def fill(i: int) -> None:
        pieces[i].normal_(0.0, std, generator=torch.Generator().manual_seed(seeds[i]))

    workers = min(PARALLEL_DRAW_CHUNKS, torch.get_num_threads())
    if workers <= 1:
        for i in range(len(pieces)):
            fill(i)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill, range(len(pieces))))
    return out


def initial_perturbation(
    delta: torch.Tensor,
    config: ShieldConfig,
    generator: torch.Generator,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float, float]:
    """δ₀: AIM's N(0, σ²) with σ = mean|Δ| (Eq. 4), or N(0, init_std²) without AIM.

    Args:
        delta: Δ, flat ``(P,)``.
        config: the shield's options (``aim``, ``init_std``).
        generator: the random source (on Δ's device).
        out: where to draw δ₀ ``(P,)``; default a new tensor.

    Returns:
        ``(δ₀ (P,), σ, std used)``.
    """
    sigma = aim_sigma(delta)
    std = sigma if config.aim else config.init_std
    out = torch.empty_like(delta) if out is None else out
    return gaussian_fill(out, std, generator), sigma, std


class _Adam:
    """Adam (PyTorch's functional kernel) on per-parameter views of flat δ, m and v buffers.

    The kernel's L2 term ``grad + wd·δ`` carries the δ-component of the analytic gradient, so
    no extra pass builds it. The fused kernel runs where the device and dtype have it, the
    multi-tensor (foreach) one elsewhere; both compute exactly Adam (``torch.optim.Adam``
    with the same betas and ε, no weight decay of its own).

    Args:
        params: views of δ, one per parameter.
        exp_avgs: views of the zero-filled first-moment buffer, shaped like ``params``.
        exp_avg_sqs: views of the zero-filled second-moment buffer.
        lr: the learning rate.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        exp_avgs: Sequence[torch.Tensor],
        exp_avg_sqs: Sequence[torch.Tensor],
        lr: float,
    ) -> None:
        self.params, self.exp_avgs, self.exp_avg_sqs = (
            list(params),
            list(exp_avgs),
            list(exp_avg_sqs),
        )
        self.lr = lr
        probe = self.params[0]
        try:  # the optimiser's own check of fused support for this device and dtype
            torch.optim.Adam([torch.zeros(1, dtype=probe.dtype, device=probe.device)], fused=True)
            self.kernel = "fused"
        except (RuntimeError, ValueError):
            self.kernel = "foreach"
        step_dtype = torch.float32 if self.kernel == "fused" else probe.dtype
        self.steps = [torch.zeros((), dtype=step_dtype, device=probe.device) for _ in self.params]

    def step(self, grads: Sequence[torch.Tensor], *, weight_decay: float) -> None:
        """One Adam step with gradient ``grads + weight_decay · δ``."""
        adam(
            self.params,
            list(grads),
            self.exp_avgs,
            self.exp_avg_sqs,
            [],
            self.steps,
            foreach=self.kernel == "foreach",
            fused=self.kernel == "fused",
            amsgrad=False,
            beta1=ADAM_BETAS[0],
            beta2=ADAM_BETAS[1],
            lr=self.lr,
            weight_decay=weight_decay,
            eps=ADAM_EPS,
            maximize=False,
        )


@dataclass
class ShieldRun:
    """The outcome of :func:`shield_perturbation`.

    Attributes:
        perturbation: the final δ, flat ``(P,)``.
        released: the final θu' = θu + δ, flat ``(P,)``.
        sigma: σ = mean|Δ|.
        init_std: the std δ was initialised with (σ with AIM).
        lr: the learning rate Adam used (``relative_lr·σ`` when scale-free).
        acc_scale: the factor in L_acc = acc_scale·‖δ‖² (1, or 1/‖Δ‖² when scale-free).
        adam: which Adam kernel ran.
        curve: per iteration, [L_privacy, L_acc, L_forget, L_total, cos(Δ, Δ*)], each at δ
            before that iteration's step.
        cosine: cos(Δ, Δ*) at the final δ.
        perturbation_norm: ‖δ‖₂ at the final δ.
        released_delta_norm: ‖Δ*‖₂ at the final δ.
    """

    perturbation: torch.Tensor
    released: torch.Tensor
    sigma: float
    init_std: float
    lr: float
    acc_scale: float
    adam: str
    curve: list[list[float]]
    cosine: float
    perturbation_norm: float
    released_delta_norm: float

    def loss_curve(self) -> list[dict[str, float]]:
        """The curve as one dict per iteration."""
        keys = ("L_privacy", "L_acc", "L_forget", "L_total", "cosine")
        return [
            {"iteration": t, **dict(zip(keys, row, strict=True))}
            for t, row in enumerate(self.curve)
        ]


WORKSPACE_ROWS = ("Δ", "δ", "m", "v", "gradient", "θu")
"""The rows of UnlearnShield's flat ``(6, P)`` workspace, in order."""


def shield_perturbation(
    model: nn.Module,
    layout: ParameterLayout,
    theta_u: Sequence[torch.Tensor],
    workspace: torch.Tensor,
    forget_x: torch.Tensor,
    reference_logits: torch.Tensor,
    config: ShieldConfig,
    generator: torch.Generator,
    release: torch.Tensor | None = None,
) -> ShieldRun:
    """Optimise UnlearnShield's δ (paper Eqs. 3–8) for θu' = θu + δ.

    Args:
        model: a module with θu's architecture and buffers, in eval mode; only used through
            ``functional_call`` (its own parameters are neither read nor written).
        layout: the parameter layout (names, shapes) of ``model``.
        theta_u: θu's parameters, in layout order (read only).
        workspace: a ``(6, P)`` buffer, rows :data:`WORKSPACE_ROWS`: row 0 holds Δ = θu − θo
            (not zero; read only); the others are overwritten: δ, Adam's two moments, the
            gradient and a flat copy of θu. Stacking Δ and δ lets one matrix-vector product
            give both Δ·δ and δ·δ.
        release: a ``(P,)`` buffer for θu' = θu + δ, whose per-parameter views the forward
            pass runs on; default None, a new one. It must not share storage with
            ``workspace``: autograd checks that what it saved is not modified before the
            backward pass, and views of one buffer share that check.
        forget_x: the forget images ``(k, C, H, W)`` in [0, 1].
        reference_logits: f_θu(forget_x), ``(k, num_classes)``.
        config: the options.
        generator: the random source of the initialisation.

    Returns:
        A :class:`ShieldRun`: ``perturbation`` is ``workspace[1]``, ``released`` is
        ``release`` holding the final θu' (flat, layout order).

    Notes:
        L_privacy's and L_acc's gradients are closed-form: with c = cos(Δ, Δ*),
        ∂c/∂δ = Δ/(‖Δ‖‖Δ*‖) − c·Δ*/‖Δ*‖² = (a − b)·Δ − b·δ with a = 1/(‖Δ‖‖Δ*‖) and
        b = c/‖Δ*‖², and ∂‖δ‖²/∂δ = 2δ; so the whole gradient is
        λ2·∇L_forget + c₁·Δ + c₂·δ with two scalars c₁, c₂. c₁·Δ is written into the
        gradient buffer, the backward pass accumulates λ2·∇L_forget onto it in place (no
        gradient tensor is allocated), and c₂·δ rides in Adam's L2 term. The losses of
        each iteration are those at δ before its step, as a plain autograd loop reports them
        (``tests/test_defenses.py`` checks this function against one in float64). The
        scalars are computed in float64 on the host (a device sync per iteration on a GPU).
    """
    objective = PRIVACY_OBJECTIVES.get(config.objective)
    lambda_acc, lambda_forget = config.lambda_acc, config.lambda_forget
    if workspace.dim() != 2 or workspace.shape[0] != len(WORKSPACE_ROWS):
        raise ValueError(
            f"workspace must be ({len(WORKSPACE_ROWS)}, P), got {tuple(workspace.shape)}"
        )
    delta, perturbation, exp_avg, exp_avg_sq, gradient, base = workspace
    if release is None:
        release = zeroed_buffer(delta.shape, dtype=delta.dtype, device=delta.device)
    pair = workspace[:2]  # Δ and δ, for both dot products in one pass
    delta_sq = float(chunked_mv(workspace[:1], delta)[0])
    delta_norm = math.sqrt(delta_sq)
    layout.flatten(theta_u, out=base)
    workspace[2:4].zero_()  # Adam's moments start at zero

    # AIM initialisation (Eq. 4), or N(0, init_std²) without it
    _, sigma, init_std = initial_perturbation(delta, config, generator, out=perturbation)

    # scale: absolute (the paper) or relative to the size of Δ
    lr = config.relative_lr * sigma if config.scale_free else config.lr
    acc_scale = 1.0 / delta_sq if config.scale_free else 1.0

    optimizer = _Adam(
        layout.split(perturbation), layout.split(exp_avg), layout.split(exp_avg_sq), lr
    )
    grads = layout.split(gradient)
    leaves = [t.detach().requires_grad_(lambda_forget > 0) for t in layout.split(release)]
    curve: list[list[float]] = []

    def cosine_terms() -> tuple[float, float, float]:
        cross, own = chunked_mv(pair, perturbation).tolist()  # Δ·δ and δ·δ
        released_sq = delta_sq + 2 * cross + own  # ‖Δ*‖²
        return (delta_sq + cross) / (delta_norm * math.sqrt(released_sq)), own, released_sq

    for _ in range(config.iterations):
        with torch.no_grad():
            # θu' = θu + δ, in place in the buffer the forward pass reads
            torch.add(base, perturbation, out=release)
            # L_privacy (Eq. 3) and L_acc (Eq. 5); their gradient is c₁·Δ + c₂·δ (the scalars
            # in float64 on the host). Done before the forward pass, so that no pass over P
            # entries runs between the forward and the backward pass and evicts from the cache
            # the weights and activations the backward pass reads again.
            cos, own, released_sq = cosine_terms()
            l_privacy, slope = objective.value(cos), objective.slope(cos)
            a = 1 / (delta_norm * math.sqrt(released_sq))
            b = cos / released_sq
            l_acc = acc_scale * own
            c1, c2 = slope * (a - b), 2 * lambda_acc * acc_scale - slope * b
            torch.mul(delta, c1, out=gradient)

        # L_forget (Eq. 7), the only term through autograd; λ2·∇L_forget is accumulated in
        # place onto c₁·Δ through the leaves' .grad (views of the gradient buffer), and c₂·δ
        # enters as Adam's L2 term
        with torch.set_grad_enabled(lambda_forget > 0):
            logits = forward_with(model, layout, leaves, forget_x)
            l_forget = output_distance(reference_logits, logits).mean()
        if lambda_forget > 0:
            for leaf, grad in zip(leaves, grads, strict=True):
                leaf.grad = grad
            (lambda_forget * l_forget).backward()
            for leaf in leaves:
                leaf.grad = None
        l_forget_value = float(l_forget.detach())
        total = l_privacy + lambda_acc * l_acc + lambda_forget * l_forget_value
        curve.append([l_privacy, l_acc, l_forget_value, total, cos])
        optimizer.step(grads, weight_decay=c2)

    with torch.no_grad():
        torch.add(base, perturbation, out=release)
        cos, own, released_sq = cosine_terms()
    return ShieldRun(
        perturbation=perturbation,
        released=release.detach(),
        sigma=sigma,
        init_std=init_std,
        lr=lr,
        acc_scale=acc_scale,
        adam=optimizer.kernel,
        curve=curve,
        cosine=cos,
        perturbation_norm=math.sqrt(own),
        released_delta_norm=math.sqrt(released_sq),
    )


@DEFENSES.register("shield")
class UnlearnShield(Defense):
    """UnlearnShield (Xue et al., paper §3): release θu' = θu + δ, δ optimised by Eq. 8.

    δ spans every parameter (not the buffers: θu's BatchNorm statistics are released as they
    are), starts from AIM (Eq. 4) and takes ``iterations`` Adam steps on
    L_privacy + λ1·L_acc + λ2·L_forget. The models run in eval mode; L_forget compares the
    softmax outputs of θu and θu' on the forget samples (mean over the k samples of the
    per-sample L2 distance, the same function as the OutDiff metric).

    Notes:
        With the paper's absolute settings (η = 1e-5, L_acc = ‖δ‖²) the outcome depends on
        the scale of Δ, i.e. on the unlearning step size; ``scale_free=True`` removes that
        dependence (see :class:`ShieldConfig`). With k > 1 forget samples the method is run
        once on the whole set (the paper evaluates single samples).
    """

    name = "shield"
    Config = ShieldConfig
    workspace_rows = len(WORKSPACE_ROWS)

    def _protect(
        self, problem: ProtectionProblem, generator: torch.Generator
    ) -> tuple[nn.Module, dict[str, Any]]:
        released = copy_with_fresh_parameters(problem.unlearned).eval()
        delta = problem.delta
        release, _ = WORK_BUFFERS.take(delta.shape, dtype=delta.dtype, device=delta.device)
        try:
            run = shield_perturbation(
                released,
                problem.layout,
                parameters_of(problem.unlearned),
                problem.workspace,
                problem.forget_x,
                problem.reference_logits,
                self.config,
                generator,
                release,
            )
            with torch.no_grad():
                for target, value in zip(
                    parameters_of(released), problem.layout.split(release), strict=True
                ):
                    target.copy_(value)
        finally:
            WORK_BUFFERS.give(release)
        run.perturbation = run.released = torch.empty(0)  # views of pooled buffers
        return released, {
            "cosine": run.cosine,
            "released_delta_norm": run.released_delta_norm,
            "perturbation_norm": run.perturbation_norm,
            "sigma": run.sigma,
            "init_std": run.init_std,
            "effective_lr": run.lr,
            "acc_scale": run.acc_scale,
            "privacy_objective": PRIVACY_OBJECTIVES.get(self.config.objective).formula,
            "adam": {"betas": list(ADAM_BETAS), "eps": ADAM_EPS, "kernel": run.adam},
            "loss_curve": run.loss_curve(),
        }

    def simulate(
        self,
        original: nn.Module,
        delta: torch.Tensor,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Run UnlearnShield on each simulated difference, with the dummy images as the
        forget set: row b is θu = θo + Δ¹_b, protected from its own AIM draw."""
        layout = ParameterLayout.of(original)
        theta_o = torch.cat([p.reshape(-1) for p in parameters_of(original)])
        rows = (len(WORKSPACE_ROWS), delta.shape[1])
        out = delta.clone()
        for b in range(delta.shape[0]):
            if not torch.any(delta[b] != 0):
                continue
            workspace = zeroed_buffer(rows, dtype=delta.dtype, device=delta.device)
            workspace[0] = delta[b]
            theta_u = layout.split(theta_o + delta[b])
            with torch.no_grad():
                reference = forward_with(original, layout, theta_u, images[b])
            run = shield_perturbation(
                original,
                layout,
                theta_u,
                workspace,
                images[b],
                reference,
                self.config,
                generator,
            )
            out[b] += run.perturbation
        return out
