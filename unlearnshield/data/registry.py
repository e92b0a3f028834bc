"""The dataset registry and :func:`load_dataset`, the one entry point to every loader."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from unlearnshield._registry import Registry
from unlearnshield.data.core import Dataset

logger = logging.getLogger(__name__)

DATA_ROOT_ENV = "UNLEARNSHIELD_DATA"
"""Environment variable naming the default data root (used when ``root`` is None)."""


class DatasetLoader(Protocol):
    """What a registered loader is: ``loader(root, *, download, cache_dir) -> Dataset``."""

    def __call__(self, root: Path | None, *, download: bool, cache_dir: Path | None) -> Dataset: ...


DATASETS: Registry[DatasetLoader] = Registry("dataset")
_EMBEDDED: set[str] = set()


def register_dataset(
    name: str, *, embedded: bool = False
) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator registering a loader in :data:`DATASETS`.

    Args:
        name: registry name, as typed on the command line.
        embedded: True when the data ships with an installed package and needs no root;
            default False.
    """

    def decorator(loader: DatasetLoader) -> DatasetLoader:
        DATASETS.register(name)(loader)
        if embedded:
            _EMBEDDED.add(name)
        return loader

    return decorator


def is_embedded(name: str) -> bool:
    """True when dataset ``name`` needs no data root (it ships with an installed package).

    Raises:
        KeyError: ``name`` is not registered; the message lists the valid names.
    """
    DATASETS.get(name)
    return name in _EMBEDDED


def default_data_root() -> Path:
    """The data root used when none is given: ``$UNLEARNSHIELD_DATA``, else
    ``~/.cache/unlearnshield/datasets``."""
    from_env = os.environ.get(DATA_ROOT_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "unlearnshield" / "datasets"


def load_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    download: bool = True,
    cache_dir: str | Path | None = None,
) -> Dataset:
    """Load dataset ``name`` from disk, downloading it first if allowed and needed.

    Args:
        name: a name in :data:`DATASETS` ("cifar10", "stl10", "digits", "imagefolder").
        root: where the data lies; each loader's docstring lists the layouts it accepts.
            Default None: nothing for embedded datasets (``is_embedded(name)``), else
            :func:`default_data_root`.
        download: when the data is not found, try torchvision's downloader (where the
            dataset has one) into ``root``; default True. Offline, the attempt fails within
            seconds and a :class:`DatasetNotFoundError` follows.
        cache_dir: where decoded image arrays are cached; default None: ``$UNLEARNSHIELD_CACHE``,
            else next to the data if that folder is writable, else ``~/.cache/unlearnshield``.

    Returns:
        The :class:`Dataset`, images uint8 of shape (N, C, H, W), labels int64 of shape (N,).

    Raises:
        KeyError: unknown ``name``.
        DatasetNotFoundError: the data is not found and could not be downloaded.
        ValueError: the files are found but corrupt (wrong sizes, labels out of range, ...).
    """
    loader = DATASETS.get(name)
    if root is not None:
        root_path: Path | None = Path(root).expanduser()
    elif name in _EMBEDDED:
        root_path = None
    else:
        root_path = default_data_root()
    cache_path = None if cache_dir is None else Path(cache_dir).expanduser()

    started = time.perf_counter()
    dataset = loader(root_path, download=download, cache_dir=cache_path)
    logger.info(
        "loaded %s from %s: %d train / %d test images of shape %s, %d classes, in %.1f s",
        name,
        dataset.source,
        len(dataset.train),
        len(dataset.test),
        dataset.input_shape,
        dataset.num_classes,
        time.perf_counter() - started,
    )
    return dataset
