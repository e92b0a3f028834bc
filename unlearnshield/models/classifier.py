"""The classifier wrapper: normalisation inside the model, images in [0, 1] outside."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a backbone: what checkpoints record as ``architecture``.

    Attributes:
        name: registry name (``"resnet18"``, ``"convnet"``) or ``"package.module:factory"``
            for a user's own architecture.
        num_classes: number of output logits.
        input_shape: ``(C, H, W)`` of one input image.
        kwargs: the architecture's own arguments (``width``, ``stem_stride``, ...).
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (tuples become lists)."""
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """The inverse of :meth:`to_dict`."""
        return cls(
            name=str(d["name"]),
            num_classes=int(d["num_classes"]),
            input_shape=tuple(int(v) for v in d["input_shape"]),  # type: ignore[arg-type]
            kwargs=dict(d.get("kwargs", {})),
        )


class ImageClassifier(nn.Module):
    """A backbone behind a fixed per-channel normalisation.

    ``forward`` takes images in [0, 1] of shape ``(N, C, H, W)`` and returns logits of shape
    ``(N, num_classes)``. The normalisation constants are non-persistent buffers: they are
    not parameters (no defense, attack or unlearning method ever touches them) and they are
    not part of the state dict (checkpoints store them in their metadata instead), so the
    saved keys are exactly the backbone's.

    Args:
        net: the backbone, which expects normalised inputs.
        mean: per-channel mean, ``C`` values, for images in [0, 1].
        std: per-channel standard deviation, ``C`` positive values.
        spec: how to rebuild ``net`` (recorded in checkpoints); optional for ad-hoc models.
    """

    def __init__(
        self,
        net: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        spec: ModelSpec | None = None,
    ) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.net = net
        self.spec = spec
        shape = (1, len(mean), 1, 1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape), False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape), False)

    @property
    def normalization(self) -> dict[str, list[float]]:
        """The normalisation constants as plain lists (what checkpoints record)."""
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    def extra_repr(self) -> str:
        return f"spec={self.spec}" if self.spec is not None else ""
