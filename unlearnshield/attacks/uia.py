"""The unlearning-inversion attack (UIA): reconstruct forgotten images from θo and θu'.

The attacker sees the original model θo, the released model θu', the input shape and —
where the threat model grants it — the labels of the forgotten samples. Its target is the
released parameter difference Δ' = θu' − θo. For gradient-ascent unlearning Δ = +η ∇θ L(x)
points along the forgotten sample's gradient, so the attacker optimises dummy images whose
gradient at θo has the highest cosine with Δ' (Hu et al., S&P 2024, feature recovery).

Attackers differ only in how they score a cosine (and, for the defense-aware one, in what
they do to their own simulated difference first); they share the engines of
:mod:`unlearnshield.attacks.engines`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from unlearnshield._registry import Registry
from unlearnshield.attacks.config import AttackConfig, resolve_budget
from unlearnshield.attacks.engines import ENGINES, InversionResult, OffsetFn
from unlearnshield.diff import DifferenceError, flat_difference

logger = logging.getLogger(__name__)


class AttackError(ValueError):
    """The attack cannot run on these inputs (message says why)."""


class Attacker:
    """How an attacker scores the match between its simulated difference and the release.

    Subclasses override :meth:`similarity_cost` and, if they simulate a defense,
    :meth:`offset`. Instances are cheap and stateless apart from their settings.
    """

    name = "base"

    def similarity_cost(self, cos: torch.Tensor) -> torch.Tensor:
        """The cost of a cosine (lower is a better match)."""
        raise NotImplementedError

    def offset(
        self, original: nn.Module, targets: torch.Tensor, *, seed: int
    ) -> tuple[OffsetFn | None, int]:
        """A defense simulation to add to the dummy gradient, and its refresh period."""
        return None, 1

    def describe(self) -> dict[str, Any]:
        """The attacker's settings, for records."""
        return {"attacker": self.name}


ATTACKERS: Registry[type[Attacker]] = Registry("attacker")


@ATTACKERS.register("standard")
class StandardAttacker(Attacker):
    """Matches the released difference as it is: cost ``1 − cos`` (the reference attack)."""

    name = "standard"

    def similarity_cost(self, cos: torch.Tensor) -> torch.Tensor:
        return 1 - cos


@ATTACKERS.register("sign-agnostic")
class SignAgnosticAttacker(Attacker):
    """Suspects the direction was flipped: cost ``1 − |cos|``.

    A defense that anti-aligns the release (cos(Δ, Δ*) → −1) leaves the line through Δ
    intact; this attacker recovers from either direction on that line.
    """

    name = "sign-agnostic"

    def similarity_cost(self, cos: torch.Tensor) -> torch.Tensor:
        return 1 - cos.abs()


@dataclass
class Reconstruction:
    """What an attack returns.

    Attributes:
        images: reconstructions in [0, 1], ``(B, k, C, H, W)``: ``B`` released models,
            ``k`` forgotten images each.
        labels: the labels used, ``(B, k)``.
        labels_inferred: whether the labels were inferred from the difference.
        cosine: final cosine of each kept reconstruction with its target, ``(B,)``.
        cost: the attacker's final matching cost, ``(B,)``.
        restart_costs: the matching cost of every restart, ``(B, restarts)``.
        config: the optimisation settings.
        attacker: the attacker's settings.
        engine: which engine ran.
        per_sample: how its per-sample gradients were computed (``"loop"``, ``"layers"`` or
            ``"vmap"``).
        seconds: wall time of the optimisation.
        trace: the logged steps of the run.
    """

    images: torch.Tensor
    labels: torch.Tensor
    labels_inferred: bool
    cosine: torch.Tensor
    cost: torch.Tensor
    restart_costs: torch.Tensor
    config: AttackConfig
    attacker: dict[str, Any]
    engine: str
    seconds: float
    trace: list[dict[str, float]] = field(default_factory=list)
    per_sample: str = "loop"

    def summary(self) -> dict[str, Any]:
        """A JSON-serialisable record of the run (no images)."""
        return {
            **self.attacker,
            "engine": self.engine,
            "per_sample": self.per_sample,
            "labels": self.labels.tolist(),
            "labels_inferred": self.labels_inferred,
            "cosine": self.cosine.tolist(),
            "cost": self.cost.tolist(),
            "restart_costs": self.restart_costs.tolist(),
            "config": {k: v for k, v in vars(self.config).items()},
            "seconds": self.seconds,
            "trace": self.trace,
        }


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The name and module of the model's last ``nn.Linear`` (its classifier head)."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise AttackError("the model has no nn.Linear layer to read labels from")
    return found[-1]


def infer_labels(original: nn.Module, released: nn.Module, num_images: int = 1) -> torch.Tensor:
    """Infer the forgotten labels from the classifier head of the parameter difference.

    For cross-entropy, the head's bias gradient is ``softmax(z) − onehot(y)``: the true
    class's entry is ``p_y − 1`` and the others ``p_c``, which sum to ``1 − p_y``. So the
    true class carries the largest magnitude, whatever the sign of the update. The rule is
    therefore the ``k`` entries of largest ``|Δ bias|`` (or of the head weight's row sums
    when there is no bias). It assumes distinct labels among the ``k`` samples; how well it
    works on a given defense is measured, not assumed.

    Returns:
        Labels ``(k,)``, int64.
    """
    name, head = last_linear(original)
    _, head_released = last_linear(released)
    if head.bias is not None:
        d = (head_released.bias - head.bias).detach()
    else:
        d = (head_released.weight - head.weight).detach().sum(1)
    if num_images > d.numel():
        raise AttackError(f"cannot infer {num_images} labels from {d.numel()} classes")
    logger.debug("label inference from %s: |Δ| per class %s", name, d.abs().tolist())
    return d.abs().topk(num_images).indices


def reconstruct(
    original: nn.Module,
    released: nn.Module | Sequence[nn.Module],
    *,
    input_shape: Sequence[int],
    labels: torch.Tensor | Sequence[int] | None = None,
    num_images: int = 1,
    attacker: str | Attacker = "standard",
    budget: str | int | AttackConfig = "cpu",
    engine: str = "batched",
    seed: int = 0,
    progress: bool | None = None,
    chunk_size: int | None = None,
    per_sample: str = "auto",
) -> Reconstruction:
    """Reconstruct the forgotten images of one or several released models.

    This is the attacker's whole view: the original model, the released model(s), the
    input shape and, optionally, the labels. Several released models of the same original
    (one per deletion request) are attacked in one batched run.

    Args:
        original: θo, an ``nn.Module`` taking images in [0, 1].
        released: θu' (or a list of them), same architecture as ``original``.
        input_shape: ``(C, H, W)`` of one image.
        labels: the forgotten labels: ``(k,)`` for one released model, ``(B, k)`` for
            ``B``; ``None`` infers them with :func:`infer_labels`.
        num_images: ``k``, the number of forgotten images per release (used when labels
            are inferred).
        attacker: a name of :data:`ATTACKERS` or an :class:`Attacker` instance.
        budget: ``"paper"``, ``"cpu"``, an iteration count, or an :class:`AttackConfig`.
        engine: ``"batched"`` (default) or ``"loop"``.
        seed: seeds the random initialisation (and any defense simulation).
        progress: tqdm bar; ``None`` shows it only on a terminal.
        chunk_size: ``vmap`` chunk size for the batched engine.
        per_sample: the batched engine's per-sample gradients, ``"auto"`` (default),
            ``"layers"`` or ``"vmap"`` (see
            :data:`~unlearnshield.attacks.engines.PER_SAMPLE_METHODS`).

    Returns:
        A :class:`Reconstruction`.

    Raises:
        AttackError: identical models (Δ = 0), incompatible architectures, bad labels.
    """
    releases = [released] if isinstance(released, nn.Module) else list(released)
    config = resolve_budget(budget)
    if isinstance(attacker, str):
        attacker = ATTACKERS.get(attacker)()
    run = ENGINES.get(engine)
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3:
        raise AttackError(f"input_shape must be (C, H, W), got {shape}")

    # The attacker's model: a private copy in eval mode whose parameters take gradients.
    model = copy.deepcopy(original).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    dtype = next(model.parameters()).dtype

    # Targets: the released differences, one flat vector per release.
    targets = []
    for i, rel in enumerate(releases):
        try:
            delta = flat_difference(original, rel)
        except DifferenceError as err:
            raise AttackError(f"release {i}: {err}") from None
        if not torch.any(delta != 0):
            raise AttackError(
                f"release {i} is identical to the original model (Δ = 0): nothing was unlearned, "
                f"so there is nothing to invert"
            )
        targets.append(delta.to(dtype))
    target = torch.stack(targets)

    # Labels: given by the threat model, or inferred from the difference.
    inferred = labels is None
    if labels is None:
        label_rows = torch.stack([infer_labels(original, rel, num_images) for rel in releases])
    else:
        label_rows = torch.as_tensor(labels, dtype=torch.long)
        if label_rows.dim() == 1:
            label_rows = (
                label_rows.expand(len(releases), -1) if len(releases) > 1 else label_rows[None]
            )
        if label_rows.shape[0] != len(releases):
            raise AttackError(
                f"labels {tuple(label_rows.shape)} do not match {len(releases)} releases"
            )
    k = label_rows.shape[1]
    n_classes = last_linear(model)[1].out_features
    if label_rows.min() < 0 or label_rows.max() >= n_classes:
        raise AttackError(f"labels must lie in [0, {n_classes}), got {label_rows.tolist()}")

    # Restarts are extra rows of the batch, selected afterwards by matching cost.
    r = config.restarts
    # drawn on the CPU, so that a seed gives the same start on every device
    device = target.device
    generator = torch.Generator().manual_seed(seed)
    init = torch.randn((len(releases) * r, k, *shape), generator=generator, dtype=dtype)
    init = (init * config.init_std + config.init_mean).to(device)
    rows_target = target.repeat_interleave(r, dim=0)
    rows_labels = label_rows.to(device).repeat_interleave(r, dim=0)
    offset, refresh = attacker.offset(model, rows_target, seed=seed)
    kwargs: dict[str, Any] = (
        {"chunk_size": chunk_size, "per_sample": per_sample} if engine == "batched" else {}
    )
    result: InversionResult = run(
        model,
        rows_target,
        rows_labels,
        init,
        config=config,
        similarity_cost=attacker.similarity_cost,
        offset=offset,
        refresh_every=refresh,
        progress=progress,
        **kwargs,
    )

    costs = result.cost.view(len(releases), r)
    best = costs.argmin(dim=1)
    pick = torch.arange(len(releases), device=best.device) * r + best
    return Reconstruction(
        images=result.images[pick],
        labels=label_rows,
        labels_inferred=inferred,
        cosine=result.cosine[pick],
        cost=result.cost[pick],
        restart_costs=costs,
        config=config,
        attacker=attacker.describe(),
        engine=engine,
        seconds=result.seconds,
        trace=result.trace,
        per_sample=result.per_sample,
    )
