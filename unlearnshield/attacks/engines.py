"""Two engines that run the same gradient-matching inversion: a per-image loop and a batch.

Both minimise, for each reconstruction ``b`` independently,

    cost_b(x) = similarity_cost(cos(∇θ CE(f_θo(x), y_b) + offset_b, target_b)) + λ_TV · TV(x)

over dummy images ``x`` of shape ``(k, C, H, W)`` in pixel space, with the model in eval mode
(BatchNorm uses its running statistics). The cosine is one cosine over all parameters as a
single vector. Each step clamps ``x`` to [0, 1], replaces the image gradient by its sign
(when configured) and takes an AdamW step.

* :func:`invert_loop` is the reference: one reconstruction after another, with
  ``torch.autograd.grad(..., create_graph=True)``.
* :func:`invert_batched` runs all reconstructions in one call: on a CPU it amortises the
  per-operation overhead of small models over the batch; on a GPU it fills the device. Its
  per-sample gradients come either from ``torch.func`` (``functional_call``, ``grad``,
  ``vmap``; any model) or, for models made of Conv2d, Linear and eval-mode BatchNorm layers,
  from each layer's input and output gradient in one ordinary batched backward pass
  (:mod:`~unlearnshield.attacks.per_sample`), which is faster on the CPU; ``per_sample``
  chooses, and by default the layer-wise way runs wherever it applies.

They give the same images (a test checks all three in float64), so which one runs is a
question of speed only.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap
from tqdm.auto import tqdm

from unlearnshield._registry import Registry
from unlearnshield.attacks.config import AttackConfig
from unlearnshield.attacks.per_sample import LayerwiseGradients, unsupported_reason

logger = logging.getLogger(__name__)

SimilarityCost = Callable[[torch.Tensor], torch.Tensor]
"""Maps the cosine (any shape) to the attacker's matching cost, e.g. ``1 - cos``."""

OffsetFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``offset(step, gradients (n, P), images (n, k, C, H, W), rows (n,)) -> (n, P)``, added to
the dummy gradient before the cosine and treated as a constant (no gradient flows through
it); ``rows`` are the indices of those reconstructions among the ``B`` targets (all of them
in the batched engine, one at a time in the loop)."""

_EPS = 1e-12


@dataclass
class InversionResult:
    """The output of an engine.

    Attributes:
        images: final reconstructions clamped to [0, 1], ``(B, k, C, H, W)``.
        cosine: cosine between each final reconstruction's gradient (plus offset) and its
            target, ``(B,)``.
        cost: the attacker's similarity cost of the final images (no TV), ``(B,)``.
        trace: one dict per logged step (step, mean cost, mean cosine, seconds).
        seconds: wall time.
        per_sample: how per-sample gradients were computed: ``"loop"`` (one reconstruction
            at a time), ``"layers"`` or ``"vmap"`` (see :data:`PER_SAMPLE_METHODS`).
    """

    images: torch.Tensor
    cosine: torch.Tensor
    cost: torch.Tensor
    trace: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    per_sample: str = "loop"


OPPONENT_COLOURS = torch.tensor(
    [
        [3**-0.5, 3**-0.5, 3**-0.5],  # luminance
        [2**-0.5, -(2**-0.5), 0.0],  # red - green
        [6**-0.5, 6**-0.5, -2 * 6**-0.5],  # yellow - blue
    ],
    dtype=torch.float64,
)
"""The orthonormal opponent colour transform the chroma-weighted TV works in, rows applied to
(R, G, B)."""


def total_variation(x: torch.Tensor, chroma: float | None = None) -> torch.Tensor:
    """Anisotropic TV: mean |horizontal differences| + mean |vertical differences|.

    Args:
        x: images ``(..., C, H, W)``; the means run over every element.
        chroma: ``None`` takes the differences of R, G and B (the reference). A weight takes
            them in the opponent colour space of :data:`OPPONENT_COLOURS` instead, with the
            two chroma channels weighted by it relative to luminance; needs ``C = 3``.

    Returns:
        A scalar tensor.
    """
    return _tv(x, chroma, dims=None)


def _tv(x: torch.Tensor, chroma: float | None, dims: int | None) -> torch.Tensor:
    """:func:`total_variation` over everything (``dims=None``) or per leading index, over the
    last ``dims`` dimensions."""
    if chroma is not None:
        if x.shape[-3] != 3:
            raise ValueError(f"a chroma-weighted TV needs RGB images, got {x.shape[-3]} channels")
        x = torch.einsum("oc,...chw->...ohw", _weighted_opponents(chroma, x.dtype, x.device), x)
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs()
    if dims is None:
        return dx.mean() + dy.mean()
    return dx.flatten(-dims).mean(-1) + dy.flatten(-dims).mean(-1)


@functools.lru_cache(maxsize=8)
def _weighted_opponents(chroma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """:data:`OPPONENT_COLOURS` with the chroma rows scaled by ``chroma`` (built once per
    weight, dtype and device, not at every attack step)."""
    weights = torch.tensor([1.0, chroma, chroma], dtype=torch.float64)
    return (OPPONENT_COLOURS * weights[:, None]).to(dtype=dtype, device=device)


def _check_inputs(
    targets: torch.Tensor, labels: torch.Tensor, init: torch.Tensor, n_params: int
) -> None:
    if targets.dim() != 2 or targets.shape[1] != n_params:
        raise ValueError(f"targets must be (B, {n_params}), got {tuple(targets.shape)}")
    b = targets.shape[0]
    if labels.dim() != 2 or labels.shape[0] != b:
        raise ValueError(f"labels must be (B={b}, k), got {tuple(labels.shape)}")
    if init.dim() != 5 or init.shape[:2] != labels.shape:
        raise ValueError(f"init must be (B, k, C, H, W) matching labels, got {tuple(init.shape)}")
    zero = (targets.norm(dim=1) == 0).nonzero().flatten().tolist()
    if zero:
        raise ValueError(f"target(s) {zero} are zero: there is no parameter difference to invert")


class _Schedule:
    """Step bookkeeping shared by both engines: lr, logging, trace."""

    def __init__(self, config: AttackConfig, total: int, progress: bool | None, desc: str):
        self.config = config
        self.start = time.perf_counter()
        self.trace: list[dict[str, float]] = []
        disable = None if progress is None else not progress
        self.bar = tqdm(total=total, desc=desc, disable=disable, unit="step")

    def record(self, step: int, cost: torch.Tensor, cos: torch.Tensor, label: str = "") -> None:
        every = self.config.log_every
        last = step == self.config.iterations - 1
        if every and (step % every == 0 or last):
            elapsed = time.perf_counter() - self.start
            entry = {
                "step": step,
                "cost": float(cost.mean()),
                "cosine": float(cos.mean()),
                "seconds": elapsed,
            }
            self.trace.append(entry)
            logger.info(
                "uia %sstep %6d/%d cost %.5f cos %+.5f elapsed %8.1fs",
                label,
                step,
                self.config.iterations,
                entry["cost"],
                entry["cosine"],
                elapsed,
            )

    def close(self) -> float:
        self.bar.close()
        return time.perf_counter() - self.start


class _TailAverage:
    """The returned images: the mean of the clamped iterates from ``config.average_from`` on
    (the last iterate alone when ``average_tail`` is 0)."""

    def __init__(self, config: AttackConfig) -> None:
        self.start = config.average_from
        self.sum: torch.Tensor | None = None
        self.count = 0

    def add(self, step: int, x: torch.Tensor) -> None:
        if step < self.start:
            return
        clamped = x.detach().clamp(0, 1)
        self.sum = clamped if self.sum is None else self.sum.add_(clamped)
        self.count += 1

    def result(self) -> torch.Tensor:
        assert self.sum is not None, "no step was taken"
        return self.sum / self.count if self.count > 1 else self.sum


def _objective_terms(
    flat_grad: torch.Tensor,
    target: torch.Tensor,
    offset: torch.Tensor | None,
    x: torch.Tensor,
    similarity_cost: SimilarityCost,
    tv_weight: float | torch.Tensor,
    tv_chroma: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    g = flat_grad if offset is None else flat_grad + offset
    cos = (g @ target) / (g.norm() * target.norm() + _EPS)
    return similarity_cost(cos) + tv_weight * total_variation(x, tv_chroma), cos


def invert_loop(
    model: nn.Module,
    targets: torch.Tensor,
    labels: torch.Tensor,
    init: torch.Tensor,
    *,
    config: AttackConfig,
    similarity_cost: SimilarityCost,
    offset: OffsetFn | None = None,
    refresh_every: int = 1,
    progress: bool | None = None,
) -> InversionResult:
    """The reference engine: each reconstruction runs its own optimisation loop.

    Args:
        model: the model the dummy gradients are taken at (the original θo).
        targets: flat target differences ``(B, P)``, ``P`` = number of parameters.
        labels: labels of the dummy images ``(B, k)``.
        init: initial images ``(B, k, C, H, W)``.
        config: optimisation settings.
        similarity_cost: the attacker's cost of a cosine.
        offset: optional defense simulation added to the dummy gradient (see
            :data:`OffsetFn`), recomputed every ``refresh_every`` steps.
        refresh_every: steps between offset refreshes.
        progress: tqdm bar; ``None`` shows it only on a terminal.

    Returns:
        An :class:`InversionResult`.
    """
    params = [p for p in model.parameters()]
    _check_inputs(targets, labels, init, sum(p.numel() for p in params))
    was_training = model.training
    model.eval()
    n_rec = targets.shape[0]
    rows = torch.arange(n_rec, device=targets.device)
    schedule = _Schedule(config, n_rec * config.iterations, progress, "uia (loop)")
    images, cosines = [], []
    for b in range(n_rec):
        x = init[b].clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([x], lr=config.lr, weight_decay=config.weight_decay)
        tail = _TailAverage(config)
        off: torch.Tensor | None = None
        for step in range(config.iterations):
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step)
            with torch.no_grad():
                x.clamp_(0, 1)
            loss = F.cross_entropy(model(x), labels[b])
            g = torch.autograd.grad(loss, params, create_graph=True)
            flat = torch.cat([t.reshape(-1) for t in g])
            if offset is not None and step % refresh_every == 0:
                off = offset(step, flat.detach()[None], x.detach()[None], rows[b : b + 1])[0]
            cost, cos = _objective_terms(
                flat, targets[b], off, x, similarity_cost, config.tv_at(step), config.tv_chroma
            )
            optimizer.zero_grad(set_to_none=True)
            (gx,) = torch.autograd.grad(cost, [x])
            x.grad = gx.sign() if config.signed else gx
            optimizer.step()
            tail.add(step, x)
            schedule.bar.update(1)
            schedule.record(step, cost.detach(), cos.detach(), label=f"[{b}] ")
        final = tail.result()
        loss = F.cross_entropy(model(final.requires_grad_(False)), labels[b])
        g = torch.autograd.grad(loss, params)
        flat = torch.cat([t.reshape(-1) for t in g])
        if offset is not None:
            off = offset(config.iterations, flat[None], final[None], rows[b : b + 1])[0]
        _, cos = _objective_terms(flat, targets[b], off, final, similarity_cost, 0.0, None)
        images.append(final)
        cosines.append(cos.detach())
    seconds = schedule.close()
    model.train(was_training)
    cosine = torch.stack(cosines)
    return InversionResult(
        torch.stack(images), cosine, similarity_cost(cosine), schedule.trace, seconds
    )


PER_SAMPLE_METHODS = ("auto", "layers", "vmap")
"""How the batched engine computes per-sample gradients: ``"layers"`` from each layer's input
and output gradient (:mod:`unlearnshield.attacks.per_sample`; Conv2d, Linear and eval-mode
BatchNorm models), ``"vmap"`` with ``torch.func`` (any model), ``"auto"`` the first where the
model qualifies."""


def invert_batched(
    model: nn.Module,
    targets: torch.Tensor,
    labels: torch.Tensor,
    init: torch.Tensor,
    *,
    config: AttackConfig,
    similarity_cost: SimilarityCost,
    offset: OffsetFn | None = None,
    refresh_every: int = 1,
    progress: bool | None = None,
    chunk_size: int | None = None,
    per_sample: str = "auto",
) -> InversionResult:
    """All ``B`` reconstructions at once (same arguments as the loop).

    Args:
        chunk_size: ``vmap`` chunk size, to bound memory on large models (``None`` = all
            reconstructions in one chunk); applies to ``per_sample="vmap"``.
        per_sample: how per-sample gradients are computed, one of
            :data:`PER_SAMPLE_METHODS`; default ``"auto"``.

    Raises:
        ValueError: ``per_sample="layers"`` for a model it does not apply to, or an unknown
            ``per_sample``.

    Notes:
        One AdamW over the stacked images ``(B, k, C, H, W)`` is exactly ``B`` independent
        AdamW optimisers: Adam and its decoupled weight decay act element-wise; and the cost
        of reconstruction ``b`` depends on its own images only, so the gradient of the summed
        cost is each reconstruction's own.
    """
    if per_sample not in PER_SAMPLE_METHODS:
        raise ValueError(f"per_sample must be one of {PER_SAMPLE_METHODS}, got {per_sample!r}")
    _check_inputs(targets, labels, init, sum(p.numel() for p in model.parameters()))
    was_training = model.training
    model.eval()
    reason = unsupported_reason(model) if per_sample != "vmap" else "vmap was asked for"
    if per_sample == "layers" and reason is not None:
        raise ValueError(f"per_sample='layers' does not apply to this model: {reason}")
    method = "layers" if reason is None else "vmap"
    if per_sample == "auto" and reason is not None:
        logger.info("per-sample gradients by vmap: layer-wise does not apply (%s)", reason)
    if method == "layers":
        layerwise = _LayerwiseStep(model, targets, similarity_cost, config.tv_chroma)
        step_fn, grads_fn = layerwise.step, layerwise.grads
    else:
        step_fn, grads_fn = _vmap_functions(
            model, targets, similarity_cost, config.tv_chroma, chunk_size
        )
    rows = torch.arange(targets.shape[0], device=targets.device)
    x = init.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([x], lr=config.lr, weight_decay=config.weight_decay)
    schedule = _Schedule(config, config.iterations, progress, f"uia (batched B={len(x)})")
    tail = _TailAverage(config)
    off = torch.zeros_like(targets) if method == "vmap" else None
    for step in range(config.iterations):
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        with torch.no_grad():
            x.clamp_(0, 1)
        if offset is not None and step % refresh_every == 0:
            off = offset(step, grads_fn(x.detach(), labels), x.detach(), rows)
        tv = torch.tensor(config.tv_at(step), dtype=x.dtype)
        gx, cost, cos = step_fn(x.detach(), labels, off, tv)
        x.grad = gx.sign() if config.signed else gx
        optimizer.step()
        tail.add(step, x)
        schedule.bar.update(1)
        schedule.record(step, cost, cos)

    final = tail.result()
    flat = grads_fn(final, labels)
    if offset is not None:
        off = offset(config.iterations, flat, final, rows)
    g = flat if off is None else flat + off
    cosine = (g * targets).sum(1) / (g.norm(dim=1) * targets.norm(dim=1) + _EPS)
    seconds = schedule.close()
    model.train(was_training)
    return InversionResult(
        final, cosine, similarity_cost(cosine), schedule.trace, seconds, per_sample=method
    )


StepFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    tuple[torch.Tensor, torch.Tensor, torch.Tensor],
]
"""``step(x (B, k, C, H, W), labels (B, k), offset (B, P) or None, tv) -> (∂cost/∂x,
cost (B,), cos (B,))``, no graph kept."""

GradsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``grads(x, labels) -> (B, P)``: each reconstruction's flat dummy gradient, no graph."""


def _vmap_functions(
    model: nn.Module,
    targets: torch.Tensor,
    similarity_cost: SimilarityCost,
    tv_chroma: float | None,
    chunk_size: int | None,
) -> tuple[StepFn, GradsFn]:
    """The batched step with ``torch.func``: ``vmap`` over ``grad`` of ``functional_call``."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss_fn(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, (p, buffers), (x,)), y)

    param_grad = grad(loss_fn)

    def flat_grad(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = param_grad(params, x, y)
        return torch.cat([g[n].reshape(-1) for n in names])

    def objective(
        x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, off: torch.Tensor, tv: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        cost, cos = _objective_terms(flat_grad(x, y), t, off, x, similarity_cost, tv, tv_chroma)
        return cost, (cost, cos)

    batched = vmap(
        grad_and_value(objective, has_aux=True),
        in_dims=(0, 0, 0, 0, None),
        chunk_size=chunk_size,
    )

    def step(x: torch.Tensor, y: torch.Tensor, off: torch.Tensor, tv: torch.Tensor):
        gx, (_, (cost, cos)) = batched(x, y, targets, off, tv)
        return gx, cost, cos

    return step, vmap(flat_grad, chunk_size=chunk_size)


class _LayerwiseStep:
    """The layer-wise step and dummy gradients of a batch of reconstructions.

    The cosine is not differentiated by autograd. Its gradient with respect to each
    reconstruction's dummy gradient ``g`` (plus offset) has a closed form,

        ∂cos/∂g = t / (‖g‖ ‖t‖) − cos · g / ‖g‖²,

    so the step computes it without a graph, scales it by ``∂cost/∂cos``, and hands it to one
    backward pass as the cotangent of the per-sample gradients. Differentiating the per-layer
    dot products instead cost a fifth of the step on the CPU, in matrix-vector backward kernels.
    (Splitting the batch over threads, one intra-op thread each, was tried on two cores and
    was slower: 10.9 against 9.0 ms per image-iteration at B = 8.)

    Args:
        model: the attacker's model, in eval mode.
        targets: the targets ``(b, P)``.
        similarity_cost: the attacker's cost of a cosine.
        tv_chroma: the chroma weight of the TV prior (see :func:`total_variation`).
    """

    def __init__(
        self,
        model: nn.Module,
        targets: torch.Tensor,
        similarity_cost: SimilarityCost,
        tv_chroma: float | None = None,
    ) -> None:
        self.per_image = LayerwiseGradients(model)
        self.sizes = [p.numel() for p in model.parameters()]
        self.rows = targets.shape[0]
        self.target_pieces = list(targets.split(self.sizes, 1))  # per parameter, (b, n)
        self.target_norms = targets.norm(dim=1)
        self.similarity_cost = similarity_cost
        self.tv_chroma = tv_chroma

    def per_row(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Each reconstruction's gradient, per parameter ``(b, *shape)``: the mean over its
        k images, as the loss is their mean CE."""
        k = y.shape[1]
        grads = self.per_image(x.flatten(0, 1), y.flatten())
        return grads if k == 1 else [g.view(self.rows, k, *g.shape[1:]).mean(1) for g in grads]

    def grads(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The flat dummy gradients ``(b, P)``, no graph kept."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # the hooks' backward needs a graph
            grads = self.per_row(x, y)
        return torch.cat([g.detach().reshape(self.rows, -1) for g in grads], 1)

    def step(
        self, x: torch.Tensor, y: torch.Tensor, off: torch.Tensor | None, tv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """See :data:`StepFn`."""
        b = self.rows
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            grads = self.per_row(x, y)
            tv_cost = _tv(x, self.tv_chroma, dims=4)  # per reconstruction, over (k, C, H, W)
        with torch.no_grad():
            flat = [g.detach().reshape(b, -1) for g in grads]
            if off is not None:
                flat = [g + o for g, o in zip(flat, off.split(self.sizes, 1), strict=True)]
            pairs = zip(flat, self.target_pieces, strict=True)
            dot = sum(torch.linalg.vecdot(g, t) for g, t in pairs)
            norm_sq = sum(torch.linalg.vecdot(g, g) for g in flat).clamp_min(_EPS**2)
            denom = norm_sq.sqrt() * self.target_norms + _EPS
            cos = dot / denom
        cost, d_cos = _value_and_derivative(self.similarity_cost, cos)
        with torch.no_grad():
            along_t, along_g = (d_cos / denom)[:, None], (d_cos * cos / norm_sq)[:, None]
            cotangents = [
                (along_t * t - along_g * g).view_as(p)
                for g, t, p in zip(flat, self.target_pieces, grads, strict=True)
            ]
        (gx,) = torch.autograd.grad(
            [*grads, tv_cost], [x], grad_outputs=[*cotangents, tv.expand(b).to(tv_cost)]
        )
        return gx, cost + tv * tv_cost.detach(), cos


def _value_and_derivative(
    fn: SimilarityCost, cos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(cos)`` and its element-wise derivative ``fn'(cos)``, both shaped like ``cos``
    (``fn`` acts element-wise)."""
    with torch.enable_grad():
        c = cos.detach().requires_grad_(True)
        value = fn(c)
        (derivative,) = torch.autograd.grad(value.sum(), [c])
    return value.detach(), derivative


ENGINES: Registry[Callable[..., InversionResult]] = Registry("attack engine")
ENGINES.register("loop")(invert_loop)
ENGINES.register("batched")(invert_batched)
