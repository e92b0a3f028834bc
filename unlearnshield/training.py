"""Training the original model θo, with named recipes.

Two recipes are registered in :data:`RECIPES`:

* ``reference``: the unlearning-inversion attack's pre-training recipe (SGD, lr 0.1, no
  momentum, weight decay 5e-4, batch 128, 120 epochs, lr ×0.1 at epochs 44/74/105, random
  crop with 4-pixel padding and horizontal flips, incomplete last batch dropped).
* ``cpu``: a recipe sized for two CPU cores (SGD with Nesterov momentum 0.9, one-cycle
  schedule peaking at lr 0.1, weight decay 5e-4, batch 128, flips only, 4 epochs on a
  15,000-image subset), meant for the ConvNet at width 16 with a stride-2 stem: 66.3% on the
  CIFAR-10 test split (JPEG copy, seed 0) in 141 s of training on two otherwise idle cores
  (about 210 s on one thread, as one of two bench workers).

Training is deterministic on the CPU for a given seed: the initialisation, the shuffling
and the augmentation all draw from generators seeded from it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from unlearnshield._registry import Registry
from unlearnshield.data import ImageSplit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainRecipe:
    """An optimisation recipe for the original model.

    Attributes:
        epochs: passes over the training subset.
        batch_size: images per step.
        lr: learning rate (the peak for ``onecycle``).
        momentum: SGD momentum (0 = none).
        nesterov: Nesterov momentum.
        weight_decay: L2 weight decay coefficient.
        schedule: ``"multistep"`` (×``gamma`` at ``milestones``, per epoch), ``"onecycle"``
            (per step, peak ``lr``) or ``"constant"``.
        milestones: epochs at which ``multistep`` decays.
        gamma: ``multistep`` decay factor.
        crop_padding: random-crop padding in pixels (0 = no cropping).
        flip: random horizontal flips.
        drop_last: drop the incomplete last batch of each epoch.
        subset: default number of training images (``None`` = the whole train split).
    """

    epochs: int
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "multistep"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    crop_padding: int = 0
    flip: bool = True
    drop_last: bool = False
    subset: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.schedule not in ("multistep", "onecycle", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r}")
        if self.nesterov and self.momentum <= 0:
            raise ValueError("Nesterov momentum needs momentum > 0")

    def replace(self, **changes: object) -> TrainRecipe:
        """A copy with some fields changed (``None`` values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


RECIPES: Registry[TrainRecipe] = Registry("training recipe")
RECIPES.register("reference")(
    TrainRecipe(
        epochs=120,
        milestones=(44, 74, 105),
        crop_padding=4,
        drop_last=True,
    )
)
RECIPES.register("cpu")(
    TrainRecipe(
        epochs=4,
        momentum=0.9,
        nesterov=True,
        schedule="onecycle",
        subset=15_000,
    )
)


@dataclass
class TrainReport:
    """What a training run measured.

    Attributes:
        recipe: the recipe used (as a dict).
        seed: the seed.
        epochs: per-epoch mean training loss and accuracy.
        test_accuracy: accuracy on the test split in [0, 1], if one was given.
        seconds: wall time of the optimisation.
    """

    recipe: dict[str, object]
    seed: int
    epochs: list[dict[str, float]]
    test_accuracy: float | None
    seconds: float


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch's global generator (model initialisation) and return a fresh generator."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def augment(
    images: torch.Tensor, *, crop_padding: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random crops (zero padding, as torchvision's ``RandomCrop``) and horizontal flips.

    Args:
        images: float images in [0, 1], shape ``(N, C, H, W)``.
        crop_padding: padding in pixels before cropping back to ``H×W``; 0 disables.
        flip: flip each image left-right with probability 1/2.
        generator: the random source.

    Returns:
        Augmented images of the same shape.
    """
    n, _, h, w = images.shape
    if crop_padding > 0:
        padded = F.pad(images, (crop_padding,) * 4)
        offsets = torch.randint(0, 2 * crop_padding + 1, (n, 2), generator=generator)
        images = torch.stack(
            [padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())]
        )
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        images = torch.where(mask.view(n, 1, 1, 1), images.flip(-1), images)
    return images


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, split: ImageSplit, *, batch_size: int = 500) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (eval mode) on ``split``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(split), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(split)))
        logits = model(split.float_images(idx).to(device))
        correct += int((logits.argmax(1).cpu() == split.labels[idx]).sum())
    model.train(was_training)
    return correct / max(len(split), 1)


def _scheduler(
    optimizer: torch.optim.Optimizer, recipe: TrainRecipe, steps_per_epoch: int
) -> tuple[torch.optim.lr_scheduler.LRScheduler | None, bool]:
    """The schedule and whether it steps per batch (True) or per epoch (False)."""
    if recipe.schedule == "onecycle":
        total = recipe.epochs * steps_per_epoch
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.lr, total_steps=total), True
    if recipe.schedule == "multistep":
        sched = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, list(recipe.milestones), recipe.gamma
        )
        return sched, False
    return None, False


def train_model(
    model: nn.Module,
    train: ImageSplit,
    *,
    recipe: TrainRecipe,
    seed: int,
    test: ImageSplit | None = None,
    progress: bool | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainReport:
    """Train ``model`` in place with cross-entropy on ``train``.

    Args:
        model: a classifier taking images in [0, 1] (an :class:`ImageClassifier`).
        train: the training images (already subset); uint8 ``(N, C, H, W)``.
        recipe: the optimisation recipe.
        seed: seeds shuffling and augmentation (seed the initialisation with
            :func:`seed_everything` before building the model).
        test: optional test split, evaluated at the end.
        progress: show a tqdm bar per epoch; ``None`` shows it only on a terminal.
        on_epoch: called as ``on_epoch(epoch, stats)`` after each epoch.

    Returns:
        A :class:`TrainReport`; the model is left in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)  # on the CPU, where batches are formed
    device = next(model.parameters()).device
    n = len(train)
    steps = n // recipe.batch_size if recipe.drop_last else -(-n // recipe.batch_size)
    if steps == 0:
        raise ValueError(f"{n} training images are fewer than one batch of {recipe.batch_size}")
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
        weight_decay=recipe.weight_decay,
    )
    scheduler, per_step = _scheduler(optimizer, recipe, steps)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{recipe.epochs}", disable=_off(progress))
        for step in bar:
            idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            x = augment(
                train.float_images(idx),
                crop_padding=recipe.crop_padding,
                flip=recipe.flip,
                generator=generator,
            )
            x, y = x.to(device, non_blocking=True), train.labels[idx].to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if per_step and scheduler is not None:
                scheduler.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        if not per_step and scheduler is not None:
            scheduler.step()
        stats = {"loss": loss_sum / seen, "train_accuracy": correct / seen}
        history.append(stats)
        logger.info(
            "epoch %d/%d loss %.4f train acc %.4f", epoch + 1, recipe.epochs, *stats.values()
        )
        if on_epoch is not None:
            on_epoch(epoch, stats)
    seconds = time.perf_counter() - start
    model.eval()
    test_accuracy = evaluate_accuracy(model, test) if test is not None else None
    return TrainReport(dataclasses.asdict(recipe), seed, history, test_accuracy, seconds)


def _off(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: None hides the bar when not on a terminal."""
    return None if progress is None else not progress
