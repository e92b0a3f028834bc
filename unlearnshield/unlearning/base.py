"""The unlearner contract, its registry, and the pieces every method shares.

An unlearning method is a class registered in :data:`UNLEARNERS`. It owns a frozen config
dataclass (validated when the unlearner is built) and a table of named presets, and it is
called as ``unlearner(model, forget_x, forget_y, retain)``: the model is deep-copied, the copy
is unlearned, and a JSON-serialisable record of what was done comes back with it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
import types
import typing
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from unlearnshield._registry import Registry
from unlearnshield.data import ImageSplit
from unlearnshield.training import augment

logger = logging.getLogger(__name__)

BN_MODES = ("auto", "train", "eval")
"""How BatchNorm layers behave while an iterative method trains (see :func:`set_bn_mode`)."""

BN_MIN_BATCH = 32
"""Default smallest batch that ``bn_mode="auto"`` runs through train-mode BatchNorm."""


def check_config(config: Any) -> None:
    """Check the types of a config dataclass's fields, converting ints given for floats.

    Values come from Python callers and from ``--set key=value`` (parsed as JSON), so a
    string where a number belongs must fail here with a message naming the option.

    Args:
        config: a dataclass instance whose annotations are ``int``, ``float``, ``bool``,
            ``str``, or one of those ``| None``.

    Raises:
        ValueError: a field holds a value of the wrong type.
    """
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        allowed = _allowed_types(hints[field.name])
        if value is None and type(None) in allowed:
            continue
        if float in allowed and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(config, field.name, float(value))
            continue
        if isinstance(value, bool) and bool not in allowed:
            raise ValueError(f"option {field.name} must be a number, got {value!r}")
        if not isinstance(value, tuple(t for t in allowed if t is not type(None))):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
            raise ValueError(f"option {field.name} must be {names}, got {value!r}")


def _allowed_types(hint: Any) -> tuple[type, ...]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(typing.get_args(hint))
    return (hint,)


def require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``: one rule, one message."""
    if not condition:
        raise ValueError(message)


def set_bn_mode(model: nn.Module, *, bn_mode: str, batch_size: int, bn_min_batch: int) -> str:
    """Put ``model`` in train mode with its BatchNorm layers in the mode ``bn_mode`` asks for.

    Args:
        model: the network being unlearned.
        bn_mode: ``"train"`` (batch statistics, running statistics updated, as in the
            OPTML reference code), ``"eval"`` (running statistics used and left unchanged,
            as in the attack paper) or ``"auto"`` (``"train"`` for batches of at least
            ``bn_min_batch`` images, ``"eval"`` for smaller ones).
        batch_size: number of images in the batch about to be processed.
        bn_min_batch: the smallest batch ``"auto"`` runs in train mode (images).

    Returns:
        The mode applied to the BatchNorm layers, ``"train"`` or ``"eval"``.

    Notes:
        Train-mode BatchNorm on a few images normalises every feature map by those images'
        own statistics and moves the running statistics (momentum 0.1 per step) towards
        them, which changes the model independently of the gradient. On the CIFAR-10 cpu
        ConvNet, 5 GA steps on 16 forget images in train mode cost 0.8 points of test
        accuracy at lr 2e-4 while raising the forget loss less than eval mode did (which
        kept the accuracy); a batch of one is the extreme case. ``"auto"`` avoids both.
    """
    mode = bn_mode
    if bn_mode == "auto":
        mode = "eval" if batch_size < bn_min_batch else "train"
    model.train()
    if mode == "eval":
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.eval()
    elif batch_size == 1:
        warnings.warn(
            "a batch of one image goes through train-mode BatchNorm: the batch statistics "
            "are that image's own and the running statistics move towards them; "
            "bn_mode='auto' keeps BatchNorm in eval mode for small batches",
            stacklevel=3,
        )
    return mode


@torch.no_grad()
def forget_loss(model: nn.Module, forget_x: torch.Tensor, forget_y: torch.Tensor) -> float:
    """Mean cross-entropy of ``model`` (eval mode) on the forget samples.

    Args:
        model: the classifier; its train/eval state is restored afterwards.
        forget_x: float images in [0, 1], shape ``(k, C, H, W)``.
        forget_y: int64 labels, shape ``(k,)``.

    Returns:
        The mean loss in nats.
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    loss = F.cross_entropy(model(forget_x.to(device)), forget_y.to(device))
    model.train(was_training)
    return float(loss)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an unlearning method updates: every one that requires a gradient."""
    return [p for p in model.parameters() if p.requires_grad]


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of one shuffled pass over ``n`` items; the last one may be smaller."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches in one pass over ``n`` items, the incomplete last one included."""
    return math.ceil(n / batch_size) if n > 0 else 0


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
    """The augmentation applied to every training batch of an iterative method.

    Attributes:
        crop_padding: random-crop padding in pixels; 0 disables cropping.
        flip: random horizontal flips.
    """

    crop_padding: int
    flip: bool

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor:
        """Augment float images ``(n, C, H, W)`` in [0, 1] on the CPU (where ``generator``
        lives) and move them to ``device``."""
        if self.crop_padding > 0 or self.flip:
            images = augment(
                images.cpu(), crop_padding=self.crop_padding, flip=self.flip, generator=generator
            )
        return images.to(device)


class Unlearner(ABC):
    """Base class of the unlearning methods.

    Subclasses set :attr:`name`, :attr:`Config` (a frozen dataclass whose ``__post_init__``
    validates it), :attr:`presets` (preset name → option values) and :attr:`needs_retain`,
    and implement :meth:`_unlearn`, which modifies the copy it is given in place.

    Args:
        config: the method's config; default: the config's defaults.
        preset: name of the preset the config came from, for the record; default None.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    needs_retain: ClassVar[bool] = False

    def __init__(self, config: Any = None, *, preset: str | None = None) -> None:
        if config is None:
            config = self.Config()
        if not isinstance(config, self.Config):
            raise TypeError(f"{self.name} needs a {self.Config.__name__}, got {type(config)}")
        self.config = config
        self.preset = preset

    @classmethod
    def from_options(cls, preset: str | None = None, **options: Any) -> Unlearner:
        """Build the unlearner from a preset and option overrides, validating them once.

        Args:
            preset: a name of :attr:`presets`, or None for the config's defaults.
            **options: config fields to override (they win over the preset's values).

        Raises:
            ValueError: unknown preset, unknown option, or an option that breaks a rule.
        """
        values: dict[str, Any] = {}
        if preset is not None:
            if preset not in cls.presets:
                valid = ", ".join(sorted(cls.presets)) or "(none)"
                raise ValueError(f"method {cls.name!r} has no preset {preset!r}; choose: {valid}")
            values.update(cls.presets[preset])
        known = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} for method {cls.name!r}; "
                f"valid options: {', '.join(sorted(known))}"
            )
        values.update(options)
        return cls(cls.Config(**values), preset=preset)

    def __call__(
        self,
        model: nn.Module,
        forget_x: torch.Tensor,
        forget_y: torch.Tensor,
        retain: ImageSplit | None = None,
        *,
        seed: int = 0,
        progress: bool | None = None,
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Unlearn the forget samples from a copy of ``model``.

        Args:
            model: the original classifier θo (images in [0, 1]); never modified.
            forget_x: float images in [0, 1], shape ``(k, C, H, W)``, k ≥ 1.
            forget_y: int64 labels, shape ``(k,)``.
            retain: the retain data, required when :attr:`needs_retain`; ignored otherwise.
            seed: seeds every random draw of the method (shuffling, augmentation, random
                labels, retain subsampling); the global torch generator is not touched.
            progress: show a tqdm bar; None shows it only on a terminal.

        Returns:
            ``(unlearned_model, record)``: the unlearned copy in eval mode, and a
            JSON-serialisable dict with the method, preset, every hyper-parameter used, the
            seed, the forget and retain sizes, the forget loss before and after, the
            method's own measurements, and the wall time in seconds.
        """
        _check_forget(model, forget_x, forget_y)
        if self.needs_retain:
            if retain is None:
                raise ValueError(
                    f"method {self.name!r} fine-tunes on retain data: pass retain= an "
                    f"ImageSplit of the training data without the forget samples"
                )
            if not isinstance(retain, ImageSplit):
                raise TypeError(f"retain must be an ImageSplit, got {type(retain).__name__}")
            if tuple(retain.images.shape[1:]) != tuple(forget_x.shape[1:]):
                raise ValueError(
                    f"retain images have shape {tuple(retain.images.shape[1:])} but forget "
                    f"images {tuple(forget_x.shape[1:])}"
                )
            if len(retain) == 0:
                raise ValueError(f"method {self.name!r} needs retain data, got an empty split")
        elif retain is not None:
            logger.debug("method %s does not use retain data; ignoring it", self.name)
            retain = None

        started = time.perf_counter()
        unlearned = copy.deepcopy(model)
        device = _device_of(unlearned)
        forget_x = forget_x.detach().to(device, torch.float32)
        forget_y = forget_y.detach().to(device)
        loss_before = forget_loss(unlearned, forget_x, forget_y)
        generator = torch.Generator().manual_seed(seed)
        details = self._unlearn(unlearned, forget_x, forget_y, retain, generator, progress)
        unlearned.eval()
        loss_after = forget_loss(unlearned, forget_x, forget_y)
        seconds = time.perf_counter() - started
        record: dict[str, Any] = {
            "method": self.name,
            "preset": self.preset,
            "hyperparameters": dataclasses.asdict(self.config),
            "seed": seed,
            "num_forget": int(forget_x.shape[0]),
            "retain_size": int(details.pop("retain_size", 0)),
            "forget_loss_before": loss_before,
            "forget_loss_after": loss_after,
            **details,
            "seconds": seconds,
        }
        logger.info(
            "%s unlearned %d sample(s) in %.1f s: forget loss %.4f -> %.4f",
            self.name,
            forget_x.shape[0],
            seconds,
            loss_before,
            loss_after,
        )
        return unlearned, record

    @abstractmethod
    def _unlearn(
        self,
        model: nn.Module,
        forget_x: torch.Tensor,
        forget_y: torch.Tensor,
        retain: ImageSplit | None,
        generator: torch.Generator,
        progress: bool | None,
    ) -> dict[str, Any]:
        """Modify ``model`` (a private copy, on its device) in place; return extra record
        entries (JSON-serialisable). ``forget_x``/``forget_y`` are already on the device."""


def _check_forget(model: nn.Module, forget_x: torch.Tensor, forget_y: torch.Tensor) -> None:
    if not isinstance(forget_x, torch.Tensor) or not forget_x.is_floating_point():
        raise ValueError("forget_x must be a float tensor of images in [0, 1]")
    if forget_x.dim() != 4:
        raise ValueError(f"forget_x must have shape (k, C, H, W), got {tuple(forget_x.shape)}")
    if forget_x.shape[0] == 0:
        raise ValueError("the forget set is empty: give at least one sample")
    if float(forget_x.min()) < 0.0 or float(forget_x.max()) > 1.0:
        raise ValueError(
            f"forget_x must hold images in [0, 1] (the model normalises internally), got "
            f"values in [{float(forget_x.min()):.3g}, {float(forget_x.max()):.3g}]"
        )
    if not isinstance(forget_y, torch.Tensor) or forget_y.dtype != torch.int64:
        raise ValueError("forget_y must be an int64 tensor of class indices")
    if forget_y.shape != (forget_x.shape[0],):
        raise ValueError(
            f"forget_y must have shape ({forget_x.shape[0]},), got {tuple(forget_y.shape)}"
        )
    spec = getattr(model, "spec", None)
    if spec is not None:
        if tuple(forget_x.shape[1:]) != tuple(spec.input_shape):
            raise ValueError(
                f"forget_x images have shape {tuple(forget_x.shape[1:])} but the model takes "
                f"{tuple(spec.input_shape)}"
            )
        if int(forget_y.min()) < 0 or int(forget_y.max()) >= spec.num_classes:
            raise ValueError(
                f"forget_y must lie in [0, {spec.num_classes}), got "
                f"[{int(forget_y.min())}, {int(forget_y.max())}]"
            )


def subsample_retain(
    retain: ImageSplit, retain_size: int | None, generator: torch.Generator
) -> ImageSplit:
    """A random subset of ``retain_size`` retain images (all of them when None or larger)."""
    if retain_size is None or retain_size >= len(retain):
        return retain
    chosen = torch.randperm(len(retain), generator=generator)[:retain_size]
    return retain.subset(torch.sort(chosen).values)


UNLEARNERS: Registry[type[Unlearner]] = Registry("unlearning method")
"""Method name → :class:`Unlearner` subclass: ``ga-step``, ``ga``, ``l1-sparse``, ``salun``."""
