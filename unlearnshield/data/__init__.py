"""Datasets: CIFAR-10, STL-10, scikit-learn's digits and any ImageFolder tree, one API.

Every loader returns a :class:`Dataset` whose splits hold uint8 images of shape
(N, C, H, W) and int64 labels; ``float_images()`` gives float32 in [0, 1] and ``mean``/``std``
the normalisation constants for those. Loaders are looked up by name in :data:`DATASETS`::

    dataset = load_dataset("cifar10", "/data", download=False)
    x = dataset.train.float_images(subset_indices(len(dataset.train), 1000, seed=0))
"""

# Importing the loader modules registers them in DATASETS.
from unlearnshield.data import cifar10, digits, imagefolder, stl10  # noqa: F401
from unlearnshield.data.core import (
    Dataset,
    DatasetNotFoundError,
    ImageSplit,
    channel_stats,
    subset_indices,
)
from unlearnshield.data.registry import DATASETS, is_embedded, load_dataset, register_dataset

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetNotFoundError",
    "ImageSplit",
    "channel_stats",
    "is_embedded",
    "load_dataset",
    "register_dataset",
    "subset_indices",
]
