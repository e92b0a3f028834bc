"""The in-memory form of every dataset: uint8 image tensors, int64 labels, class names."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

IndexLike = Sequence[int] | torch.Tensor


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on disk in any accepted layout and could not be downloaded.

    The message is one paragraph: the paths tried, the layouts accepted, why no download
    happened, and how to get the data.
    """


def not_found_message(what: str, root: Path, tried: list[str], accepted: str, remedy: str) -> str:
    """One paragraph for :class:`DatasetNotFoundError`.

    Args:
        what: the dataset's display name ("CIFAR-10").
        root: the data root given.
        tried: each place looked at.
        accepted: the layouts the loader reads.
        remedy: how to get the data, and why no download happened.
    """
    places = "; ".join(tried) if tried else str(root)
    missing = "" if root.exists() else ", which does not exist"
    return (
        f"{what} was not found at {root}{missing}. Looked for: {places}. "
        f"Accepted layouts: {accepted}. {remedy}"
    )


def _as_index(indices: IndexLike, n: int) -> torch.Tensor:
    """``indices`` as a 1-D int64 tensor, each in ``[0, n)``; a ``ValueError`` otherwise."""
    index = torch.as_tensor(indices)
    if index.numel() == 0:
        index = index.reshape(0).to(torch.int64)
    if index.dim() != 1:
        raise ValueError(f"indices must be one-dimensional, got shape {tuple(index.shape)}")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise ValueError(f"indices must be integers, got dtype {index.dtype}")
    index = index.to(torch.int64)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
        raise ValueError(
            f"indices must lie in [0, {n}), got range [{int(index.min())}, {int(index.max())}]"
        )
    return index


@dataclass(frozen=True, eq=False)
class ImageSplit:
    """One split of an image dataset, kept as uint8 so 60,000 CIFAR images take 184 MB.

    Args:
        images: uint8 pixels, shape (N, C, H, W), values 0-255.
        labels: int64 class indices, shape (N,).

    Notes:
        Equality is identity (``eq=False``): comparing two splits element-wise is a tensor
        operation, ``torch.equal(a.images, b.images)``, not ``a == b``.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or not isinstance(self.labels, torch.Tensor):
            raise TypeError("images and labels must be torch tensors")
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                "images must be a uint8 tensor of shape (N, C, H, W), got "
                f"{self.images.dtype} of shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(
                "labels must be an int64 tensor of shape (N,), got "
                f"{self.labels.dtype} of shape {tuple(self.labels.shape)}"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"{self.images.shape[0]} images but {self.labels.shape[0]} labels; they must match"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: IndexLike) -> ImageSplit:
        """The images and labels at ``indices``, in the order given.

        Args:
            indices: integer positions in ``[0, len(self))``, a sequence or 1-D tensor.

        Returns:
            A new :class:`ImageSplit` holding copies of the selected rows.
        """
        index = _as_index(indices, len(self))
        return ImageSplit(images=self.images[index], labels=self.labels[index])

    def float_images(self, indices: IndexLike | None = None) -> torch.Tensor:
        """The images (all, or those at ``indices``) as float32 in [0, 1].

        Args:
            indices: integer positions to select; default None, all images.

        Returns:
            float32 tensor of shape (n, C, H, W), pixel value / 255.
        """
        images = self.images if indices is None else self.images[_as_index(indices, len(self))]
        return images.to(torch.float32).div_(255.0)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image dataset with a train and a test split.

    Args:
        name: the registry name it was loaded under ("cifar10", "stl10", "digits", ...).
        train: the training split.
        test: the test split; same (C, H, W) as ``train``.
        classes: class names; label ``k`` is ``classes[k]``.
        mean: per-channel mean of the [0, 1] images used to normalise inputs, length C.
        std: per-channel standard deviation matching ``mean``, length C, all positive.
        source: where the data came from, for logs and result records.
    """

    name: str
    train: ImageSplit
    test: ImageSplit
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError(f"dataset {self.name!r} has no classes")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"dataset {self.name!r} has duplicate class names: {self.classes}")
        if self.train.images.shape[1:] != self.test.images.shape[1:]:
            raise ValueError(
                f"dataset {self.name!r}: train images have shape "
                f"{tuple(self.train.images.shape[1:])} but test images "
                f"{tuple(self.test.images.shape[1:])}; both splits need one (C, H, W)"
            )
        channels = int(self.train.images.shape[1])
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"dataset {self.name!r}: mean and std need {channels} values (one per channel), "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ValueError(f"dataset {self.name!r}: std must be positive, got {self.std}")
        for split_name, split in (("train", self.train), ("test", self.test)):
            if len(split) and (
                int(split.labels.min()) < 0 or int(split.labels.max()) >= len(self.classes)
            ):
                raise ValueError(
                    f"dataset {self.name!r}: {split_name} labels span "
                    f"[{int(split.labels.min())}, {int(split.labels.max())}] but there are "
                    f"{len(self.classes)} classes"
                )

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(classes)``."""
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image, (C, H, W)."""
        channels, height, width = self.train.images.shape[1:]
        return int(channels), int(height), int(width)


def subset_indices(n_total: int, n: int | None, *, seed: int) -> torch.Tensor:
    """Sorted positions of a random subset of ``n`` out of ``n_total`` items, without replacement.

    Args:
        n_total: number of items to choose from, >= 0.
        n: subset size, >= 0; None (or any ``n >= n_total``) selects every index.
        seed: seed of the torch generator; the same seed gives the same subset.

    Returns:
        int64 tensor of shape (min(n, n_total),), increasing.
    """
    if n_total < 0:
        raise ValueError(f"n_total must be >= 0, got {n_total}")
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")
    if n is None or n >= n_total:
        return torch.arange(n_total, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n_total, generator=generator)[:n]
    return torch.sort(chosen).values.to(torch.int64)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of uint8 images, in [0, 1] units.

    Computed exactly from per-channel histograms of the 256 pixel values, so it needs no float
    copy of the images.

    Args:
        images: uint8 tensor of shape (N, C, H, W) with N >= 1.

    Returns:
        ``(mean, std)``, each a tuple of C floats.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError("channel_stats needs a non-empty uint8 tensor of shape (N, C, H, W)")
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].reshape(-1), minlength=256).to(torch.float64)
        total = counts.sum()
        mean = (counts * values).sum() / total
        variance = (counts * (values - mean) ** 2).sum() / total
        means.append(float(mean))
        stds.append(float(variance.sqrt()))
    return tuple(means), tuple(stds)
