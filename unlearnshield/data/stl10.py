"""STL-10 (Coates, Lee and Ng 2011), labelled splits, from the official binary files."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from unlearnshield.data.core import Dataset, DatasetNotFoundError, ImageSplit, not_found_message
from unlearnshield.data.download import DownloadError, torchvision_download
from unlearnshield.data.registry import register_dataset

logger = logging.getLogger(__name__)

STL10_CLASSES = (
    "airplane",
    "bird",
    "car",
    "cat",
    "deer",
    "dog",
    "horse",
    "monkey",
    "ship",
    "truck",
)
STL10_MEAN = (0.4467, 0.4398, 0.4066)
STL10_STD = (0.2603, 0.2566, 0.2713)
STL10_SHAPE = (3, 96, 96)

BINARY_FOLDER = "stl10_binary"
SPLIT_FILES = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin")}
CLASS_NAMES_FILE = "class_names.txt"

_IMAGE_BYTES = STL10_SHAPE[0] * STL10_SHAPE[1] * STL10_SHAPE[2]


def _read_split(folder: Path, images_file: str, labels_file: str) -> ImageSplit:
    """One labelled split; the files store each channel column-major, labels 1-10."""
    images_path, labels_path = folder / images_file, folder / labels_file
    raw = np.fromfile(images_path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _IMAGE_BYTES:
        raise ValueError(
            f"{images_path} holds {raw.size} bytes, not a positive multiple of {_IMAGE_BYTES} "
            "(one 3x96x96 image)"
        )
    labels = np.fromfile(labels_path, dtype=np.uint8)
    n_images = raw.size // _IMAGE_BYTES
    if labels.size != n_images:
        raise ValueError(f"{images_path} holds {n_images} images but {labels_path} {labels.size}")
    if labels.min() < 1 or labels.max() > len(STL10_CLASSES):
        raise ValueError(
            f"{labels_path}: labels must lie in [1, 10], got [{labels.min()}, {labels.max()}]"
        )

    # (n, C, W, H) as stored -> (n, C, H, W)
    images = np.ascontiguousarray(raw.reshape(n_images, *STL10_SHAPE).transpose(0, 1, 3, 2))
    return ImageSplit(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels.astype(np.int64) - 1),
    )


def _read_class_names(folder: Path) -> tuple[str, ...]:
    path = folder / CLASS_NAMES_FILE
    if not path.is_file():
        return STL10_CLASSES
    names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    names = tuple(name for name in names if name)
    if len(names) != len(STL10_CLASSES):
        raise ValueError(f"{path} must list {len(STL10_CLASSES)} class names, found {len(names)}")
    return names


def read_stl10_binary(folder: Path) -> Dataset:
    """STL-10's labelled train (5,000) and test (8,000) images from ``stl10_binary/``.

    Args:
        folder: the folder holding ``train_X.bin``, ``train_y.bin``, ``test_X.bin``,
            ``test_y.bin`` and optionally ``class_names.txt``.

    Returns:
        The :class:`Dataset`, images uint8 (N, 3, 96, 96), labels 0-9.

    Raises:
        ValueError: wrong byte counts, image and label counts that differ, labels outside
            1-10, or a ``class_names.txt`` without 10 names.
    """
    logger.info("reading STL-10 binaries from %s", folder)
    splits = {
        split: _read_split(folder, images_file, labels_file)
        for split, (images_file, labels_file) in SPLIT_FILES.items()
    }
    return Dataset(
        name="stl10",
        train=splits["train"],
        test=splits["test"],
        classes=_read_class_names(folder),
        mean=STL10_MEAN,
        std=STL10_STD,
        source=f"{folder} (STL-10 binary)",
    )


@register_dataset("stl10")
def load_stl10(root: Path | None, *, download: bool, cache_dir: Path | None) -> Dataset:
    """STL-10's labelled splits: 5,000 train and 8,000 test RGB images of 96x96 in 10 classes.

    Read from the official binary files in ``root/stl10_binary/`` or ``root`` itself;
    with ``download``, torchvision's downloader fetches them into ``root`` first.

    Args:
        root: the data root; default chosen by :func:`load_dataset`.
        download: try torchvision's downloader when the files are missing; offline this
            fails within seconds.
        cache_dir: unused; the binaries are read directly, which is fast.

    Returns:
        A :class:`Dataset` named "stl10", images uint8 (N, 3, 96, 96), normalisation mean
        (0.4467, 0.4398, 0.4066) and std (0.2603, 0.2566, 0.2713).

    Notes:
        The 100,000 unlabelled images and the predefined training folds are not loaded.
    """
    if root is None:
        raise ValueError("stl10 needs a data root")
    needed = [name for pair in SPLIT_FILES.values() for name in pair]
    tried = []
    for folder in (root / BINARY_FOLDER, root):
        present = [name for name in needed if (folder / name).is_file()]
        if len(present) == len(needed):
            return read_stl10_binary(folder)
        if present:
            missing = ", ".join(name for name in needed if name not in present)
            tried.append(f"{folder} (STL-10 binaries, but {missing} missing)")
        else:
            tried.append(f"{folder}/{{train_X,train_y,test_X,test_y}}.bin")

    if not download:
        remedy = "download=False, so no download was tried"
    elif root.is_file():
        remedy = "root is a file, so nothing was downloaded into it"
    else:
        try:
            torchvision_download("STL10", root, split="train")
            return read_stl10_binary(root / BINARY_FOLDER)
        except DownloadError as exc:
            remedy = f"the download failed: {exc}"
    raise DatasetNotFoundError(
        not_found_message(
            "STL-10",
            root,
            tried,
            "the official binary files stl10_binary/train_X.bin, train_y.bin, test_X.bin, "
            "test_y.bin (optionally class_names.txt)",
            f"No data could be fetched ({remedy}). To get it, load with download=True on a "
            "machine with internet access (torchvision fetches the archive into root), "
            "or unpack stl10_binary.tar.gz into root.",
        )
    )
