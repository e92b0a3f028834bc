"""Soteria: prune the classifier's input features that reveal the most about the input."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from typing import Any

import torch
from torch import nn

from unlearnshield.defenses.base import (
    DEFENSES,
    DefenseError,
    DifferenceDefense,
    check_config,
    kept_count,
    require,
    require_fraction,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SoteriaConfig:
    """Options of ``soteria``.

    Attributes:
        ratio: the fraction of the classifier's input features whose weight columns are
            zeroed in Δ, in [0, 1); default 0.6, the official code's demo setting
            (``GS_attack/reconstruct_image.py --pruning_rate=60``, the inverting-gradients
            setting closest to the unlearning-inversion attack; the reference values range
            from 1% to 80%, notes-defenses §3.3).
        eps: ε added to |r_f| in the score ``‖∂r_f/∂x‖ / (|r_f| + ε)``; default 0.1, the
            official GS script's value (ReLU features can be 0).
        chunk_size: features whose input gradients are computed in one batched backward pass;
            default 64 (memory grows with it: ``chunk_size × k × C × H × W`` floats).
    """

    ratio: float = 0.6
    eps: float = 0.1
    chunk_size: int = 64

    def __post_init__(self) -> None:
        check_config(self)
        require_fraction("ratio", self.ratio)
        require(math.isfinite(self.eps) and self.eps > 0, f"eps must be > 0, got {self.eps}")
        require(self.chunk_size >= 1, f"chunk_size must be ≥ 1, got {self.chunk_size}")


def classifier_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The name and module of the model's last ``nn.Linear`` in ``named_modules`` order.

    Raises:
        DefenseError: the model has no ``nn.Linear``.
    """
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise DefenseError("Soteria needs a classifier whose last layer is an nn.Linear")
    return found[-1]


def feature_scores(
    model: nn.Module, x: torch.Tensor, *, eps: float, chunk_size: int
) -> torch.Tensor:
    """Soteria's per-feature score ``s_f = Σ_b ‖∂r_{b,f}/∂x_b‖₂ / (|r_{b,f}| + ε)``.

    ``r`` is the input of the model's last ``nn.Linear`` (the representation). One backward
    pass per feature ``f``, batched ``chunk_size`` features at a time with
    ``torch.autograd.grad(..., is_grads_batched=True)``; the cotangent of feature ``f`` is 1
    on that feature for every sample at once, which separates the samples because the model
    is in eval mode (no cross-sample BatchNorm).

    Args:
        model: the classifier, in eval mode; not modified (a private copy is hooked).
        x: images ``(k, C, H, W)`` in [0, 1].
        eps: ε.
        chunk_size: features per batched backward pass.

    Returns:
        Scores ``(d,)``, ``d`` the head's input features.
    """
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    _, head = classifier_head(work)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        work(x)
        handle.remove()
        r = captured[0].reshape(x.shape[0], -1)
        k, d = r.shape
        scores = torch.zeros(d, dtype=r.dtype, device=r.device)
        for start in range(0, d, chunk_size):
            features = torch.arange(start, min(start + chunk_size, d), device=r.device)
            cotangents = torch.zeros(len(features), k, d, dtype=r.dtype, device=r.device)
            cotangents[torch.arange(len(features)), :, features] = 1
            try:
                (gx,) = torch.autograd.grad(
                    r, x, grad_outputs=cotangents, retain_graph=True, is_grads_batched=True
                )
            except RuntimeError as err:  # an operation without a batching rule
                logger.debug("batched backward failed (%s); one feature at a time", err)
                gx = torch.stack(
                    [
                        torch.autograd.grad(r, x, grad_outputs=c, retain_graph=True)[0]
                        for c in cotangents
                    ]
                )
            norms = torch.linalg.vector_norm(gx.reshape(len(features), k, -1), dim=2)
            scores[features] = (norms / (r[:, features].detach().abs().T + eps)).sum(1)
    return scores


@DEFENSES.register("soteria")
class Soteria(DifferenceDefense):
    """Zero the columns of Δ[last linear weight] for the features most revealing of x.

    Reference: Sun et al., "Soteria: provable defense against privacy leakage in federated
    learning from representation perspective" (CVPR'21), official code jeremy313/Soteria
    (notes-defenses §3). The score of each input feature ``f`` of the classifier's last
    ``nn.Linear`` is ``Σ_b ‖∂r_f/∂x_b‖ / (|r_f| + ε)`` over the forget samples; the ``ratio``
    of features with the smallest scores (the largest ``r_f / ‖∂r_f/∂x‖``) are pruned, i.e.
    their whole columns of Δ[head.weight] are set to zero. The head's bias and every other
    layer are released as in θu.

    Model state: the scores are computed at θo, the state at which the gradient that Δ
    carries was taken (Δ = η ∇θ L(x) at θo for one-step unlearning), as Soteria computes them
    at the model whose gradient it shares.

    Notes:
        One-shot simplification: Soteria perturbs each shared gradient; here the final Δ is
        masked once. ``|r_f|`` replaces the reference's signed ``r_f`` (identical for ReLU
        features, sensible for signed ones). The cost is one backward pass through the
        network per feature (512 for ResNet18), batched ``chunk_size`` at a time. The pruned
        count follows the reference's percentile rule (``defenses.base.kept_count``).
    """

    name = "soteria"
    Config = SoteriaConfig

    def defend(
        self,
        delta: dict[str, torch.Tensor],
        *,
        original: nn.Module,
        forget_x: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        head_name, head = classifier_head(original)
        key = f"{head_name}.weight" if head_name else "weight"
        if key not in delta:
            raise DefenseError(f"the classifier head's weight {key!r} is not a parameter")
        scores = feature_scores(
            original, forget_x, eps=self.config.eps, chunk_size=self.config.chunk_size
        )
        d = scores.numel()
        if d != head.in_features:
            raise DefenseError(
                f"the head's input has {d} features per sample but the head takes "
                f"{head.in_features}"
            )
        pruned = d - kept_count(d, self.config.ratio)
        index = scores.topk(pruned, largest=False, sorted=False).indices
        keep = torch.ones(d, dtype=delta[key].dtype, device=delta[key].device)
        keep[index] = 0
        out = dict(delta)
        out[key] = delta[key] * keep  # broadcast over the output rows: whole columns
        return out, {"head": key, "pruned_features": sorted(index.tolist())}
