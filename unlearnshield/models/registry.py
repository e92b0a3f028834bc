"""The model registry: ``build_model(name, num_classes, **kwargs)``."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from unlearnshield._registry import Registry
from unlearnshield.models.classifier import ImageClassifier, ModelSpec
from unlearnshield.models.convnet import ConvNet
from unlearnshield.models.resnet import resnet18_cifar

BackboneFactory = Callable[..., nn.Module]
"""``factory(num_classes=..., input_shape=(C, H, W), **kwargs) -> nn.Module``."""

MODELS: Registry[BackboneFactory] = Registry("model")


@MODELS.register("resnet18")
def _resnet18(*, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
    return resnet18_cifar(num_classes=num_classes, in_channels=input_shape[0])


@MODELS.register("convnet")
def _convnet(
    *, num_classes: int, input_shape: tuple[int, int, int], width: int = 64, stem_stride: int = 1
) -> nn.Module:
    return ConvNet(
        width=width,
        num_classes=num_classes,
        in_channels=input_shape[0],
        input_size=(input_shape[1], input_shape[2]),
        stem_stride=stem_stride,
    )


def _import_factory(target: str) -> BackboneFactory:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"architecture {target!r} is neither registered nor 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"cannot import {module_name!r} for architecture {target!r}: {err}"
        ) from err
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(factory):
        raise ValueError(f"{target!r} is not callable")
    return factory


def build_backbone(spec: ModelSpec) -> nn.Module:
    """Build the bare backbone described by ``spec`` (it expects normalised inputs).

    A registered name gets ``num_classes`` and ``input_shape`` plus ``spec.kwargs``; a user's
    ``package.module:factory`` is called with ``spec.kwargs`` only, since its signature is
    unknown, and must return an ``nn.Module``.
    """
    if spec.name in MODELS:
        factory = MODELS.get(spec.name)
        try:
            return factory(
                num_classes=spec.num_classes, input_shape=spec.input_shape, **spec.kwargs
            )
        except TypeError as err:
            raise ValueError(
                f"bad arguments {spec.kwargs} for model {spec.name!r}: {err}"
            ) from None
    if ":" not in spec.name:
        MODELS.get(spec.name)  # raises the KeyError that lists the valid names
    net = _import_factory(spec.name)(**spec.kwargs)
    if not isinstance(net, nn.Module):
        raise ValueError(f"{spec.name!r} returned {type(net).__name__}, not an nn.Module")
    return net


def build_model(
    name: str,
    num_classes: int,
    *,
    input_shape: Sequence[int] = (3, 32, 32),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> ImageClassifier:
    """Build a registered (or user) architecture behind a normalisation.

    Args:
        name: a name of :data:`MODELS` (``"resnet18"``, ``"convnet"``) or
            ``"package.module:factory"``.
        num_classes: number of output logits.
        input_shape: ``(C, H, W)`` of the inputs; default ``(3, 32, 32)``.
        mean: per-channel mean for inputs in [0, 1]; default 0 (no shift).
        std: per-channel std; default 1 (no scaling).
        **kwargs: the architecture's arguments, e.g. ``width=16, stem_stride=2`` for the
            ConvNet.

    Returns:
        An :class:`ImageClassifier` taking images in [0, 1] of shape ``(N, *input_shape)``.
    """
    shape = tuple(int(v) for v in input_shape)
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    c, h, w = shape  # three entries, as checked: the spec's (C, H, W)
    spec = ModelSpec(name=name, num_classes=int(num_classes), input_shape=(c, h, w), kwargs=kwargs)
    return ImageClassifier(
        build_backbone(spec),
        mean=list(mean) if mean is not None else [0.0] * c,
        std=list(std) if std is not None else [1.0] * c,
        spec=spec,
    )
