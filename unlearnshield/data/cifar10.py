"""CIFAR-10 (Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images").

Two on-disk forms are read: torchvision's ``cifar-10-batches-py`` pickles, and an
ImageFolder tree (for example the JPEG copy ``cifar10-jpeg.tar.gz``). Both give the same
labels: the ImageFolder class folders sort into CIFAR-10's label order.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unlearnshield.data.core import Dataset, DatasetNotFoundError, ImageSplit, not_found_message
from unlearnshield.data.download import DownloadError, torchvision_download
from unlearnshield.data.imagefolder import find_imagefolder, read_imagefolder
from unlearnshield.data.registry import register_dataset

logger = logging.getLogger(__name__)

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_SHAPE = (3, 32, 32)

PICKLE_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{k}" for k in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
PICKLE_FILES = (*TRAIN_BATCHES, TEST_BATCH, META_FILE)
TORCHVISION_ARCHIVE = "cifar-10-python.tar.gz"

_ROW_BYTES = CIFAR10_SHAPE[0] * CIFAR10_SHAPE[1] * CIFAR10_SHAPE[2]

# The only globals a CIFAR-10 batch (a dict of a numpy array, a list of ints and bytes)
# needs; anything else in a pickle could run arbitrary code, so it is refused.
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain containers, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"{module}.{name} is not allowed in a CIFAR-10 batch (refused for safety)"
            )
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core") :]
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    """Load one batch file as a dict with ``str`` keys."""
    try:
        with open(path, "rb") as handle:
            content = _BatchUnpickler(handle, encoding="bytes").load()
    except OSError:
        raise
    except Exception as exc:
        raise ValueError(f"{path} is not a readable CIFAR-10 pickle: {exc}") from exc
    if not isinstance(content, dict):
        raise ValueError(f"{path} holds a {type(content).__name__}, not a CIFAR-10 batch dict")
    return {key.decode() if isinstance(key, bytes) else str(key): v for key, v in content.items()}


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images, uint8 (n, 3, 32, 32), and labels, int64 (n,), of one batch file."""
    batch = _unpickle(path)
    if "data" not in batch or "labels" not in batch:
        raise ValueError(
            f"{path} has keys {sorted(batch)}; a CIFAR-10 batch needs 'data' and 'labels'"
        )
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        kind = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data)
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (n, 3072), got {kind}")
    if data.shape[1] != _ROW_BYTES:
        raise ValueError(
            f"{path}: each image row must hold {_ROW_BYTES} bytes (3x32x32), got {data.shape[1]}"
        )
    try:
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: 'labels' is not a list of integers: {exc}") from exc
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise ValueError(f"{path}: labels must lie in [0, 9], got [{labels.min()}, {labels.max()}]")
    return data.reshape(-1, *CIFAR10_SHAPE), labels


def _read_class_names(path: Path) -> tuple[str, ...]:
    names = _unpickle(path).get("label_names")
    if not isinstance(names, list) or len(names) != len(CIFAR10_CLASSES):
        raise ValueError(f"{path}: 'label_names' must be a list of 10 class names, got {names!r}")
    return tuple(name.decode() if isinstance(name, bytes) else str(name) for name in names)


def read_cifar10_pickles(folder: Path) -> Dataset:
    """CIFAR-10 from torchvision's pickles in ``folder`` (``data_batch_1`` .. ``batches.meta``).

    Args:
        folder: the ``cifar-10-batches-py`` folder.

    Returns:
        The :class:`Dataset`; train is batches 1-5 in order, test is ``test_batch``.

    Raises:
        ValueError: a file is not a CIFAR-10 batch (wrong keys, byte count, labels).
    """
    logger.info("reading CIFAR-10 pickles from %s", folder)
    train = [_read_batch(folder / name) for name in TRAIN_BATCHES]
    test_images, test_labels = _read_batch(folder / TEST_BATCH)
    return Dataset(
        name="cifar10",
        train=ImageSplit(
            images=torch.from_numpy(np.concatenate([images for images, _ in train])),
            labels=torch.from_numpy(np.concatenate([labels for _, labels in train])),
        ),
        test=ImageSplit(images=torch.from_numpy(test_images), labels=torch.from_numpy(test_labels)),
        classes=_read_class_names(folder / META_FILE),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        source=f"{folder} (torchvision CIFAR-10 pickles)",
    )


def _find_pickles(root: Path) -> tuple[Path | None, list[str]]:
    """The folder holding all CIFAR-10 pickles (``root`` or ``root/cifar-10-batches-py``)."""
    tried = []
    for folder in (root, root / PICKLE_FOLDER):
        present = [name for name in PICKLE_FILES if (folder / name).is_file()]
        if len(present) == len(PICKLE_FILES):
            return folder, []
        if present:
            missing = ", ".join(name for name in PICKLE_FILES if name not in present)
            tried.append(f"{folder} (CIFAR-10 pickles, but {missing} missing)")
    if not tried:
        tried.append(f"{root}/{PICKLE_FOLDER}/ and {root}/ (pickles)")
    return None, tried


@register_dataset("cifar10")
def load_cifar10(root: Path | None, *, download: bool, cache_dir: Path | None) -> Dataset:
    """CIFAR-10: 50,000 train and 10,000 test RGB images of 32x32 pixels in 10 classes.

    Looked for, in order, under ``root``:

    1. torchvision's pickles (``data_batch_1`` .. ``data_batch_5``, ``test_batch``,
       ``batches.meta``; each row 3072 bytes in CHW order) in ``root`` or
       ``root/cifar-10-batches-py``;
    2. an ImageFolder tree with ``train/`` and ``test/`` splits: ``root`` itself as a folder
       or archive, ``root/cifar10/`` (or ``cifar-10*``), or ``root/cifar10*.tar.gz``;
    3. with ``download``, torchvision's downloader into ``root``, then the pickles.

    Args:
        root: the data root (see above); default chosen by :func:`load_dataset`.
        download: try torchvision's downloader when nothing is found; offline this fails
            within seconds.
        cache_dir: cache folder for decoded ImageFolder arrays; default None (see
            :mod:`unlearnshield.data.cache`).

    Returns:
        A :class:`Dataset` named "cifar10", images uint8 (N, 3, 32, 32), with the usual
        normalisation mean (0.4914, 0.4822, 0.4465) and std (0.2470, 0.2435, 0.2616).

    Raises:
        DatasetNotFoundError: nothing found and no download possible.
        ValueError: corrupt files, or an ImageFolder tree whose classes are not CIFAR-10's.

    Notes:
        A JPEG copy's pixels differ slightly from the original data; ``Dataset.source``
        names the file type, and results made on it should say "CIFAR-10 (JPEG copy)".
    """
    if root is None:
        raise ValueError("cifar10 needs a data root")
    tried: list[str] = []
    if not root.is_file():
        folder, tried = _find_pickles(root)
        if folder is not None:
            return read_cifar10_pickles(folder)

    source, more_tried = find_imagefolder(
        root, prefixes=("cifar10", "cifar-10"), skip_names=(TORCHVISION_ARCHIVE,)
    )
    tried += more_tried
    if source is not None:
        data = read_imagefolder(source, cache_dir=cache_dir)
        if data.classes != CIFAR10_CLASSES:
            raise ValueError(
                f"{source.describe()} has classes {list(data.classes)}, not CIFAR-10's "
                f"{list(CIFAR10_CLASSES)}; load it as the 'imagefolder' dataset instead"
            )
        if tuple(data.train.images.shape[1:]) != CIFAR10_SHAPE:
            raise ValueError(
                f"{source.describe()} holds images of shape {tuple(data.train.images.shape[1:])}"
                f", not CIFAR-10's {CIFAR10_SHAPE}"
            )
        return Dataset(
            name="cifar10",
            train=data.train,
            test=data.test,
            classes=data.classes,
            mean=CIFAR10_MEAN,
            std=CIFAR10_STD,
            source=data.describe(),
        )

    if not download:
        remedy = "download=False, so no download was tried"
    elif root.is_file():
        remedy = "root is a file, so nothing was downloaded into it"
    else:
        try:
            torchvision_download("CIFAR10", root, train=True)
            return read_cifar10_pickles(root / PICKLE_FOLDER)
        except DownloadError as exc:
            remedy = f"the download failed: {exc}"
    raise DatasetNotFoundError(
        not_found_message(
            "CIFAR-10",
            root,
            tried,
            "torchvision's cifar-10-batches-py pickles (data_batch_1..5, test_batch, "
            "batches.meta), or an ImageFolder tree train/<class>/<image> and "
            "test/<class>/<image>, as a folder or a .tar.gz archive",
            f"No data could be fetched ({remedy}). To get it, load with download=True on a "
            "machine with internet access (torchvision fetches it into root), or point root "
            "at a copy in one of these layouts.",
        )
    )
