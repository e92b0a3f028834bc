"""scikit-learn's embedded handwritten digits (UCI optdigits test set), as 32x32 RGB images.

It ships with scikit-learn, so it needs no data root and no network: the dataset for demos
and fast tests. The 8x8 images are upsampled to 32x32 so the CIFAR-10 models, and LPIPS's
AlexNet (which needs at least 31 pixels), take them unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unlearnshield.data.core import Dataset, ImageSplit, channel_stats
from unlearnshield.data.registry import register_dataset

logger = logging.getLogger(__name__)

DIGITS_SIZE = 32
"""Side length, in pixels, of the upsampled images."""

DIGITS_TEST_FRACTION = 0.2
"""Share of each class put in the test split."""

DIGITS_SPLIT_SEED = 0
"""Seed of the torch generator that draws the test split."""

_MAX_VALUE = 16.0  # scikit-learn's digits count ink in 0..16 per 8x8 cell


def stratified_split(
    labels: torch.Tensor, *, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split positions so each class keeps ``round(test_fraction * class size)`` for test.

    Args:
        labels: int64 class labels, shape (N,).
        test_fraction: share of every class in the test split, in (0, 1).
        seed: seed of the torch generator; the same seed gives the same split.

    Returns:
        ``(train_indices, test_indices)``: increasing int64 positions, disjoint, covering
        ``range(N)``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    generator = torch.Generator().manual_seed(seed)
    test_parts = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        n_test = round(test_fraction * members.numel())
        test_parts.append(members[torch.randperm(members.numel(), generator=generator)[:n_test]])
    is_test = torch.zeros(labels.numel(), dtype=torch.bool)
    is_test[torch.cat(test_parts)] = True
    return torch.nonzero(~is_test).flatten(), torch.nonzero(is_test).flatten()


@register_dataset("digits", embedded=True)
def load_digits(root: Path | None, *, download: bool, cache_dir: Path | None) -> Dataset:
    """The 1,797 handwritten digits of scikit-learn, as 32x32 RGB images in 10 classes.

    Each 8x8 image (ink counts 0-16) is scaled to [0, 1], upsampled bilinearly to 32x32
    (``align_corners=False``), rounded to uint8 and copied into three identical channels:
    bright strokes on a black background. The split is stratified: from every class,
    ``round(0.2 * class size)`` images drawn with a torch generator seeded
    :data:`DIGITS_SPLIT_SEED` (0) form the test split, 359 images; the other 1,438 are the
    train split. Both splits keep scikit-learn's order. mean and std come from the train split.

    Args:
        root: ignored; the data ships with scikit-learn.
        download: ignored.
        cache_dir: ignored; building the dataset takes well under a second.

    Returns:
        A :class:`Dataset` named "digits", images uint8 (N, 3, 32, 32), classes "0" to "9".

    Notes:
        Upsampled 8x8 images are smooth and carry little texture, so image metrics and
        attacks behave differently than on natural images; use it for demos and tests, not
        for reported numbers.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    small = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)) / _MAX_VALUE
    large = F.interpolate(
        small.unsqueeze(1), size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False
    )
    grey = (large * 255.0).round().clamp(0, 255).to(torch.uint8)
    images = grey.expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))

    train_index, test_index = stratified_split(
        labels, test_fraction=DIGITS_TEST_FRACTION, seed=DIGITS_SPLIT_SEED
    )
    train = ImageSplit(images=images[train_index], labels=labels[train_index])
    test = ImageSplit(images=images[test_index], labels=labels[test_index])
    mean, std = channel_stats(train.images)
    return Dataset(
        name="digits",
        train=train,
        test=test,
        classes=tuple(str(name) for name in bunch.target_names),
        mean=mean,
        std=std,
        source="scikit-learn load_digits (embedded 8x8 digits, upsampled to 32x32 RGB)",
    )
