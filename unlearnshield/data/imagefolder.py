"""ImageFolder trees (``train/<class>/<image>``, ``test/<class>/<image>``), plain or archived.

The layout is torchvision's ``ImageFolder`` with one tree per split: sorted class folder
names of ``train/`` give the label indices. The tree may be a folder or packed in a tar
archive (``.tar.gz``, ``.tgz``, ``.tar``, ``.tar.bz2``, ``.tar.xz``) under any one prefix,
for example ``cifar10/train/airplane/0000.jpg``. Decoded arrays are cached (see
:mod:`unlearnshield.data.cache`), so only the first load pays for decoding.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
import warnings
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from unlearnshield.data.cache import cache_roots, read_entry, write_entry
from unlearnshield.data.core import (
    Dataset,
    DatasetNotFoundError,
    ImageSplit,
    channel_stats,
    not_found_message,
)
from unlearnshield.data.registry import register_dataset

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp"}
)
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")

# (split, class name, member name, encoded bytes) of one image file
_Item = tuple[str, str, str, bytes]


@dataclass(frozen=True)
class ImageFolderSource:
    """Where an ImageFolder tree lies.

    Args:
        path: the archive, or the folder holding ``train/`` and ``test/``.
        is_archive: True for a tar archive, False for a plain folder.
    """

    path: Path
    is_archive: bool

    @property
    def kind(self) -> str:
        """Either ``"ImageFolder archive"`` or ``"ImageFolder tree"``."""
        return "ImageFolder archive" if self.is_archive else "ImageFolder tree"

    def describe(self) -> str:
        """``path`` plus what kind of source it is, for messages."""
        return f"{self.path} ({self.kind})"


@dataclass(frozen=True, eq=False)
class ImageFolderData:
    """A decoded ImageFolder tree.

    Args:
        source: where it was read from.
        classes: sorted class folder names of ``train/``; label k is ``classes[k]``.
        train: training images, uint8 (N, 3, H, W), and labels.
        test: test images and labels, same (3, H, W).
        train_mean: per-channel mean of the training images in [0, 1], length 3.
        train_std: per-channel standard deviation of the training images, length 3.
        file_types: the image file suffixes found, e.g. ``(".jpg",)``.
        ignored_files: image files outside ``<split>/<class>/`` that were left out.
    """

    source: ImageFolderSource
    classes: tuple[str, ...]
    train: ImageSplit
    test: ImageSplit
    train_mean: tuple[float, ...]
    train_std: tuple[float, ...]
    file_types: tuple[str, ...]
    ignored_files: int = 0

    def describe(self) -> str:
        """The source and its image types, e.g. ``"x.tar.gz (ImageFolder archive, .jpg)"``."""
        return f"{self.source.path} ({self.source.kind}, {'/'.join(self.file_types)})"


def is_archive(path: Path) -> bool:
    """True when ``path`` is a file whose name ends in a tar archive suffix."""
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def has_split_folders(path: Path) -> bool:
    """True when ``path`` holds both ``train/`` and ``test/`` folders."""
    return all((path / split).is_dir() for split in SPLITS)


def find_imagefolder(
    root: Path, *, prefixes: tuple[str, ...] = (), skip_names: tuple[str, ...] = ()
) -> tuple[ImageFolderSource | None, list[str]]:
    """Locate an ImageFolder tree at or directly below ``root``.

    Looked for, in order: ``root`` itself as an archive; ``root/train`` and ``root/test``;
    a folder ``root/<name>`` holding both; an archive ``root/<name>.tar.gz`` (or another
    archive suffix). Folders are preferred to archives.

    Args:
        root: a folder or an archive.
        prefixes: accept only folders and archives in ``root`` whose name starts with one of
            these (case-insensitive); default (), any name.
        skip_names: names in ``root`` never to accept (e.g. an archive in another format).

    Returns:
        ``(source, tried)``: the source, or None when there is none; and a description of
        each place looked at, for an error message.

    Raises:
        ValueError: ``root`` holds several candidates, so which one is meant is unclear.
    """
    if root.is_file():
        if is_archive(root):
            return ImageFolderSource(root, is_archive=True), []
        return None, [f"{root} (a file, but not a tar archive)"]
    if has_split_folders(root):
        return ImageFolderSource(root, is_archive=False), []

    wanted = tuple(prefix.lower() for prefix in prefixes)
    pattern = "{" + ",".join(prefixes) + "}*" if prefixes else "*"
    tried = [
        f"{root}/{{train,test}}/<class>/<image>",
        f"{root}/{pattern}/{{train,test}}/<class>/<image>",
        f"{root}/{pattern}.tar.gz (or .tgz, .tar) holding such a tree",
    ]
    if not root.is_dir():
        return None, tried

    def acceptable(name: str) -> bool:
        if name.startswith(".") or name in skip_names:
            return False
        return not wanted or name.lower().startswith(wanted)

    folders, archives = [], []
    for child in sorted(root.iterdir()):
        if not acceptable(child.name):
            continue
        if child.is_dir() and has_split_folders(child):
            folders.append(child)
        elif is_archive(child):
            archives.append(child)
    for found, archived in ((folders, False), (archives, True)):
        if len(found) > 1:
            listing = ", ".join(str(path) for path in found)
            raise ValueError(
                f"{root} holds several ImageFolder candidates ({listing}); pass the one you "
                "mean as the data root"
            )
        if found:
            return ImageFolderSource(found[0], is_archive=archived), tried
    return None, tried


def _suffix(name: str) -> str:
    """The lower-case file suffix of a path or member name, ``".jpg"``; ``""`` if none."""
    return os.path.splitext(name)[1].lower()


def _decode_image(data: bytes, member: str, where: str) -> np.ndarray:
    """Decode one encoded image to uint8 RGB of shape (H, W, 3)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode the image {member} in {where}: {exc}") from exc


_Listing = tuple[list[tuple[str, str, Path]], int]


def _list_folder(root: Path) -> _Listing:
    """The image files ``(split, class, path)`` at ``root/<split>/<class>/<file>``, sorted, and
    the number of image files in deeper folders, which are ignored."""
    files: list[tuple[str, str, Path]] = []
    ignored = 0
    for split in SPLITS:
        for class_dir in sorted((root / split).iterdir()):
            if class_dir.name.startswith(".") or not class_dir.is_dir():
                continue
            for path in sorted(class_dir.iterdir()):
                if path.name.startswith("."):
                    continue
                if path.is_dir():
                    ignored += sum(1 for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
                elif path.suffix.lower() in IMAGE_SUFFIXES:
                    files.append((split, class_dir.name, path))
    return files, ignored


def _iter_folder(root: Path, files: list[tuple[str, str, Path]]) -> Iterator[_Item]:
    for split, class_name, path in files:
        yield split, class_name, path.relative_to(root).as_posix(), path.read_bytes()


def _iter_archive(path: Path, ignored: list[str]) -> Iterator[_Item]:
    """Stream the image members of a tar archive, in archive order, in one pass.

    Image members outside ``<prefix>/<split>/<class>/`` are appended to ``ignored``.
    """
    prefix: tuple[str, ...] | None = None
    total = path.stat().st_size
    try:
        with (
            open(path, "rb") as raw,
            tarfile.open(fileobj=raw, mode="r|*") as archive,
            tqdm(
                total=total, desc=f"reading {path.name}", unit="B", unit_scale=True, disable=None
            ) as bar,
        ):
            for member in archive:
                bar.update(raw.tell() - bar.n)
                if not member.isfile():
                    continue
                parts = tuple(part for part in member.name.split("/") if part not in ("", "."))
                if any(part.startswith(".") or part == "__MACOSX" for part in parts):
                    continue
                if _suffix(member.name) not in IMAGE_SUFFIXES:
                    continue
                if len(parts) < 3 or parts[-3] not in SPLITS:
                    ignored.append(member.name)
                    continue
                if prefix is None:
                    prefix = parts[:-3]
                elif parts[:-3] != prefix:
                    raise ValueError(
                        f"{path} holds more than one ImageFolder tree: "
                        f"{'/'.join((*prefix, parts[-3]))}/ and {'/'.join(parts[:-2])}/"
                    )
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                yield parts[-3], parts[-2], member.name, handle.read()
            bar.update(total - bar.n)
    # TypeError: tarfile's gzip header parser fails that way on a truncated header
    except (tarfile.TarError, EOFError, zlib.error, TypeError) as exc:
        raise ValueError(f"{path} is not a readable tar archive: {exc}") from exc


def _decode_split(split: str, rows: list[tuple[str, bytes]], where: str) -> np.ndarray:
    """Decode the ``(member, bytes)`` rows of one split into uint8 (N, 3, H, W), in order."""
    images = np.empty(0, dtype=np.uint8)
    for position, (member, data) in enumerate(
        tqdm(rows, desc=f"decoding {split}", unit="img", disable=None)
    ):
        pixels = _decode_image(data, member, where).transpose(2, 0, 1)
        if position == 0:
            images = np.empty((len(rows), *pixels.shape), dtype=np.uint8)
        elif pixels.shape != images.shape[1:]:
            _, height, width = images.shape[1:]
            raise ValueError(
                f"all {split} images in {where} must have one size, but {rows[0][0]} is "
                f"{width}x{height} and {member} is {pixels.shape[2]}x{pixels.shape[1]} "
                "(width x height); resize them first"
            )
        images[position] = pixels
    return images


def _assemble(
    items: Iterable[_Item], where: str
) -> tuple[tuple[str, ...], ImageSplit, ImageSplit, tuple[str, ...]]:
    """Decode ``items`` into sorted train/test splits; labels index the train class names.

    Returns:
        ``(classes, train, test, suffixes)``, suffixes being the image file types seen.
    """
    # collect the encoded files first: sorting them fixes the order whatever the archive's
    rows: dict[str, list[tuple[str, str, bytes]]] = {split: [] for split in SPLITS}
    for split, class_name, member, data in items:
        rows[split].append((class_name, member, data))
    for split in SPLITS:
        if not rows[split]:
            raise ValueError(
                f"{where} holds no {split} images; expected {split}/<class>/<image> files with "
                f"one of the suffixes {', '.join(sorted(IMAGE_SUFFIXES))}"
            )
        rows[split].sort(key=lambda row: (row[0], row[1]))

    classes = tuple(sorted({class_name for class_name, _, _ in rows["train"]}))
    unknown = sorted({class_name for class_name, _, _ in rows["test"]} - set(classes))
    if unknown:
        raise ValueError(
            f"test classes {unknown} in {where} have no train/ folder; every test class must "
            "also be a train class"
        )

    suffixes = sorted({_suffix(member) for split in SPLITS for _, member, _ in rows[split]})
    label_of = {class_name: label for label, class_name in enumerate(classes)}
    splits = []
    for split in SPLITS:
        images = _decode_split(split, [(member, data) for _, member, data in rows[split]], where)
        labels = np.array([label_of[class_name] for class_name, _, _ in rows[split]], np.int64)
        splits.append(ImageSplit(images=torch.from_numpy(images), labels=torch.from_numpy(labels)))
        if splits[0].images.shape[1:] != images.shape[1:]:
            raise ValueError(
                f"train and test images in {where} differ in size: {rows['train'][0][1]} is "
                f"{tuple(splits[0].images.shape[2:])} and {rows[split][0][1]} is "
                f"{images.shape[2:]} (H, W)"
            )
        rows[split] = []  # free the encoded bytes
    return classes, splits[0], splits[1], tuple(suffixes)


def _identity(source: ImageFolderSource) -> tuple[dict[str, Any], _Listing | None]:
    """The cache identity of ``source``, and for a folder its listing of image files."""
    absolute = str(source.path.resolve())
    if source.is_archive:
        stat = source.path.stat()
        identity = {
            "kind": "archive",
            "path": absolute,
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
        }
        return identity, None
    files, ignored = _list_folder(source.path)
    digest = hashlib.sha256()
    total_size = 0
    for _, _, path in files:
        stat = path.stat()
        total_size += stat.st_size
        line = f"{path.relative_to(source.path).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n"
        digest.update(line.encode("utf-8"))
    identity = {
        "kind": "folder",
        "path": absolute,
        "files": len(files),
        "size": total_size,
        "listing_sha256": digest.hexdigest(),
    }
    return identity, (files, ignored)


def decode_imagefolder(
    source: ImageFolderSource, listing: _Listing | None = None
) -> ImageFolderData:
    """Decode every image of an ImageFolder source, without the cache.

    Args:
        source: the archive or folder.
        listing: for a folder, its files from a previous scan; default None, scan it.

    Returns:
        The decoded :class:`ImageFolderData`.

    Raises:
        ValueError: undecodable images, images of different sizes, a missing split, test
            classes without a train folder, or an unreadable archive.
    """
    where = source.describe()
    logger.info("decoding the images of %s (done once, then cached)", where)
    if source.is_archive:
        ignored_members: list[str] = []
        classes, train, test, suffixes = _assemble(
            _iter_archive(source.path, ignored_members), where
        )
        ignored = len(ignored_members)
    else:
        files, ignored = listing if listing is not None else _list_folder(source.path)
        classes, train, test, suffixes = _assemble(_iter_folder(source.path, files), where)
    mean, std = channel_stats(train.images)
    return ImageFolderData(
        source=source,
        classes=classes,
        train=train,
        test=test,
        train_mean=mean,
        train_std=std,
        file_types=suffixes,
        ignored_files=ignored,
    )


def read_imagefolder(
    source: ImageFolderSource, *, cache_dir: Path | None = None
) -> ImageFolderData:
    """The decoded images of ``source``, from the cache when it holds them, else decoded.

    Args:
        source: the archive or folder.
        cache_dir: cache folder; default None (see :mod:`unlearnshield.data.cache` for the
            fallbacks).

    Returns:
        The decoded :class:`ImageFolderData`; after decoding it is written to the cache.
    """
    identity, listing = _identity(source)
    read_roots, write_roots = cache_roots(source.path, cache_dir)
    cached = read_entry(source.path, identity, read_roots)
    data = None
    if cached is not None:
        arrays, extra = cached
        try:
            data = ImageFolderData(
                source=source,
                classes=tuple(extra["classes"]),
                train=ImageSplit(
                    images=torch.from_numpy(arrays["train_images"]),
                    labels=torch.from_numpy(arrays["train_labels"]),
                ),
                test=ImageSplit(
                    images=torch.from_numpy(arrays["test_images"]),
                    labels=torch.from_numpy(arrays["test_labels"]),
                ),
                train_mean=tuple(extra["train_mean"]),
                train_std=tuple(extra["train_std"]),
                file_types=tuple(extra["file_types"]),
                ignored_files=int(extra["ignored_files"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            logger.warning("ignoring an inconsistent cache entry for %s: %s", source.path, exc)
    if data is None:
        data = decode_imagefolder(source, listing)
        _write_cache(data, identity, write_roots)

    if data.ignored_files:
        warnings.warn(
            f"{data.ignored_files} image files in {source.describe()} are not at "
            f"<split>/<class>/<image> (split one of {', '.join(SPLITS)}) and were left out",
            stacklevel=3,
        )
    return data


def _write_cache(data: ImageFolderData, identity: dict[str, Any], roots: list[Path]) -> None:
    write_entry(
        data.source.path,
        identity,
        {
            "train_images": data.train.images.numpy(),
            "train_labels": data.train.labels.numpy(),
            "test_images": data.test.images.numpy(),
            "test_labels": data.test.labels.numpy(),
        },
        roots,
        extra={
            "classes": list(data.classes),
            "train_mean": list(data.train_mean),
            "train_std": list(data.train_std),
            "file_types": list(data.file_types),
            "ignored_files": data.ignored_files,
        },
    )


@register_dataset("imagefolder")
def load_imagefolder(root: Path | None, *, download: bool, cache_dir: Path | None) -> Dataset:
    """Any RGB image dataset in the ImageFolder layout, from a folder or a tar archive.

    ``root`` may be the archive, the folder holding ``train/`` and ``test/``, or a folder
    holding exactly one such folder or archive. Classes are the sorted folder names under
    ``train/``; mean and std are computed from the training images.

    Args:
        root: the data root (see above).
        download: ignored; there is nothing to download.
        cache_dir: cache folder for decoded arrays; default None (see
            :mod:`unlearnshield.data.cache`).

    Returns:
        A :class:`Dataset` named "imagefolder", images uint8 (N, 3, H, W).

    Notes:
        Every image is converted to RGB: greyscale is replicated into three channels and an
        alpha channel is dropped (not composited). All images must share one size; nothing
        is resized.
    """
    if root is None:
        raise ValueError("the imagefolder dataset needs a root: an archive or a folder")
    source, tried = find_imagefolder(root)
    if source is None:
        raise DatasetNotFoundError(
            not_found_message(
                "An ImageFolder dataset",
                root,
                tried,
                "a folder with train/<class>/<image> and test/<class>/<image>, or a "
                ".tar.gz/.tgz/.tar archive holding one under any single prefix",
                "This dataset has no downloader; point root at such a folder or archive.",
            )
        )
    data = read_imagefolder(source, cache_dir=cache_dir)
    return Dataset(
        name="imagefolder",
        train=data.train,
        test=data.test,
        classes=data.classes,
        mean=data.train_mean,
        std=data.train_std,
        source=data.describe(),
    )
