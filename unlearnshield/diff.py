"""Parameter differences Δ = θu − θo between two models, as named tensors or one flat vector.

Only parameters count (weights, biases, BatchNorm affine γ/β), never buffers such as
BatchNorm running statistics: that is what the attack matches and the defenses perturb.
The flat order is ``model.named_parameters()`` order, the same for both models.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class DifferenceError(ValueError):
    """Two models cannot be compared parameter by parameter (message says why)."""


def named_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters by name, detached, in registration order."""
    return {name: p.detach() for name, p in model.named_parameters()}


def check_compatible(original: nn.Module, released: nn.Module) -> None:
    """Raise :class:`DifferenceError` unless both models have the same parameter names/shapes."""
    a, b = named_parameters(original), named_parameters(released)
    if list(a) != list(b):
        only_a = [n for n in a if n not in b]
        only_b = [n for n in b if n not in a]
        raise DifferenceError(
            "the models have different parameters: "
            f"only in the first {only_a[:5]}, only in the second {only_b[:5]}"
            if only_a or only_b
            else "the models list the same parameters in a different order"
        )
    wrong = [
        f"{n} {tuple(a[n].shape)} vs {tuple(b[n].shape)}" for n in a if a[n].shape != b[n].shape
    ]
    if wrong:
        raise DifferenceError(f"the models' parameter shapes differ: {wrong[:5]}")


def parameter_difference(original: nn.Module, released: nn.Module) -> dict[str, torch.Tensor]:
    """Δ = θ_released − θ_original per parameter tensor.

    Raises:
        DifferenceError: different architectures, or non-finite parameters.
    """
    check_compatible(original, released)
    a, b = named_parameters(original), named_parameters(released)
    delta = {n: b[n] - a[n] for n in a}
    bad = [n for n, d in delta.items() if not torch.isfinite(d).all()]
    if bad:
        raise DifferenceError(f"non-finite parameters in {bad[:5]}")
    return delta


def flatten(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors (in mapping order) into one flat vector of shape ``(P,)``."""
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflatten(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split a flat vector ``(P,)`` back into tensors shaped as ``like``."""
    out, offset = {}, 0
    for name, ref in like.items():
        n = ref.numel()
        out[name] = flat[offset : offset + n].view_as(ref)
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} entries, the shapes need {offset}")
    return out


def flat_difference(original: nn.Module, released: nn.Module) -> torch.Tensor:
    """Δ as one flat vector ``(P,)`` in ``named_parameters`` order."""
    return flatten(parameter_difference(original, released))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two flat vectors (0 when either is zero)."""
    denom = a.norm() * b.norm()
    return float(a @ b / denom) if denom > 0 else 0.0


def with_parameters(model: nn.Module, flat: torch.Tensor) -> nn.Module:
    """Write a flat parameter vector ``(P,)`` into ``model``'s parameters in place; returns it."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in unflatten(flat, {n: p.detach() for n, p in params.items()}).items():
            params[name].copy_(value)
    return model
