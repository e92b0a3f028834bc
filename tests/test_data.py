"""Tests of unlearnshield.data on small files written in each real on-disk format."""

from __future__ import annotations

import logging
import os
import pickle
import socket
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unlearnshield.data import (
    DATASETS,
    Dataset,
    DatasetNotFoundError,
    ImageSplit,
    channel_stats,
    is_embedded,
    load_dataset,
    subset_indices,
)
from unlearnshield.data import cache as cache_module
from unlearnshield.data import digits as digits_module
from unlearnshield.data import download as download_module
from unlearnshield.data import imagefolder as imagefolder_module
from unlearnshield.data.cifar10 import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD
from unlearnshield.data.stl10 import STL10_CLASSES, STL10_MEAN

# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep every cache write inside tmp_path: HOME is moved there and the env vars unset."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(cache_module.CACHE_ENV, raising=False)
    monkeypatch.delenv("UNLEARNSHIELD_DATA", raising=False)
    return home


def write_cifar_pickles(
    folder: Path, *, per_batch: int = 3, n_test: int = 4, seed: int = 0, protocol: int = 2
) -> dict[str, np.ndarray]:
    """Write torchvision's cifar-10-batches-py layout; return the rows and labels written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train_rows, train_labels = [], []
    for k in range(1, 6):
        rows = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        batch = {
            b"batch_label": f"training batch {k} of 5".encode(),
            b"labels": labels,
            b"data": rows,
            b"filenames": [f"img_{k}_{i}.png".encode() for i in range(per_batch)],
        }
        (folder / f"data_batch_{k}").write_bytes(pickle.dumps(batch, protocol=protocol))
        train_rows.append(rows)
        train_labels += labels
    test_rows = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    test_labels = rng.integers(0, 10, size=n_test).tolist()
    test_batch = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": test_labels,
        b"data": test_rows,
    }
    (folder / "test_batch").write_bytes(pickle.dumps(test_batch, protocol=protocol))
    meta = {b"label_names": [name.encode() for name in CIFAR10_CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return {
        "train_rows": np.concatenate(train_rows),
        "train_labels": np.array(train_labels),
        "test_rows": test_rows,
        "test_labels": np.array(test_labels),
    }


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """A uint8 (H, W, 3) image of gentle gradients, which JPEG keeps within a few levels."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0.0, 1.0, height)[:, None, None]
    cols = np.linspace(0.0, 1.0, width)[None, :, None]
    base = rng.uniform(40, 140, size=3)
    slope_rows, slope_cols = rng.uniform(-60, 60, size=3), rng.uniform(-60, 60, size=3)
    return np.clip(base + slope_rows * rows + slope_cols * cols, 0, 255).round().astype(np.uint8)


def write_imagefolder(
    root: Path,
    layout: dict[str, dict[str, int]],
    *,
    suffix: str = ".png",
    height: int = 6,
    width: int = 8,
    seed: int = 0,
) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Write ``root/<split>/<class>/<k>.<suffix>``; return per split (class, pixels) rows in
    the documented order: sorted by class name, then file name."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[tuple[str, str, np.ndarray]]] = {}
    for split, counts in layout.items():
        written[split] = []
        for class_name, count in counts.items():
            (root / split / class_name).mkdir(parents=True, exist_ok=True)
            for k in range(count):
                if suffix == ".png":
                    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(root / split / class_name / f"{k:04d}.png")
                else:
                    pixels = smooth_image(height, width, seed=int(rng.integers(1 << 30)))
                    path = root / split / class_name / f"{k:04d}{suffix}"
                    Image.fromarray(pixels).save(path, quality=95)
                written[split].append((class_name, f"{k:04d}", pixels))
    return {
        split: [(c, p) for c, _, p in sorted(rows, key=lambda r: (r[0], r[1]))]
        for split, rows in written.items()
    }


def make_tar(source_dir: Path, archive: Path, arcname: str) -> Path:
    """Pack ``source_dir`` into a .tar.gz whose members start with ``arcname/``."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source_dir, arcname=arcname)
    return archive


def expected_split(rows: list[tuple[str, np.ndarray]], classes: list[str]) -> ImageSplit:
    images = torch.from_numpy(np.stack([p for _, p in rows])).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([classes.index(c) for c, _ in rows], dtype=torch.int64)
    return ImageSplit(images=images, labels=labels)


def forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the images were decoded again instead of read from the cache")

    monkeypatch.setattr(imagefolder_module, "decode_imagefolder", refuse)


def count_decoding(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = imagefolder_module.decode_imagefolder

    def counting(source, files=None):
        calls.append(source.path)
        return real(source, files)

    monkeypatch.setattr(imagefolder_module, "decode_imagefolder", counting)
    return calls


PNG_LAYOUT = {
    "train": {"dog": 3, "cat": 2, "frog": 1},
    "test": {"cat": 1, "dog": 2},
}


@pytest.fixture
def png_archive(tmp_path: Path) -> tuple[Path, dict[str, list[tuple[str, np.ndarray]]]]:
    """A folder holding one ImageFolder .tar.gz of PNGs (prefix ``mydata/``)."""
    written = write_imagefolder(tmp_path / "tree", PNG_LAYOUT)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    make_tar(tmp_path / "tree", data_dir / "mydata.tar.gz", "mydata")
    return data_dir, written


# --------------------------------------------------------------------------- core types


def test_image_split_subset_and_float_images() -> None:
    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.int64).reshape(5, 3, 2, 2).to(torch.uint8)
    split = ImageSplit(images=images, labels=torch.tensor([4, 3, 2, 1, 0]))
    picked = split.subset([3, 0])
    assert len(picked) == 2
    assert torch.equal(picked.images[0], images[3]) and torch.equal(picked.images[1], images[0])
    assert picked.labels.tolist() == [1, 4]

    floats = split.float_images(torch.tensor([1]))
    assert floats.dtype == torch.float32 and floats.shape == (1, 3, 2, 2)
    assert torch.allclose(floats * 255.0, images[1:2].float())
    assert float(split.float_images().max()) <= 1.0

    with pytest.raises(ValueError, match="indices must lie in"):
        split.subset([5])
    with pytest.raises(ValueError, match="uint8"):
        ImageSplit(images=images.float(), labels=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="must match"):
        ImageSplit(images=images, labels=torch.zeros(4, dtype=torch.int64))


def test_dataset_validates_labels_and_shapes() -> None:
    split = ImageSplit(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 2]))
    fields = {"name": "x", "mean": (0.5,) * 3, "std": (0.2,) * 3, "source": "test"}
    with pytest.raises(ValueError, match="labels span"):
        Dataset(train=split, test=split, classes=("a", "b"), **fields)
    other = ImageSplit(torch.zeros(1, 3, 5, 4, dtype=torch.uint8), torch.tensor([0]))
    with pytest.raises(ValueError, match="both splits need one"):
        Dataset(train=split, test=other, classes=("a", "b", "c"), **fields)
    dataset = Dataset(train=split, test=split, classes=("a", "b", "c"), **fields)
    assert dataset.num_classes == 3 and dataset.input_shape == (3, 4, 4)


def test_subset_indices_is_a_deterministic_sorted_sample() -> None:
    first = subset_indices(1000, 50, seed=3)
    assert first.dtype == torch.int64 and first.shape == (50,)
    assert torch.equal(first, subset_indices(1000, 50, seed=3))
    assert not torch.equal(first, subset_indices(1000, 50, seed=4))
    assert torch.all(first[1:] > first[:-1])  # sorted and without repeats
    assert int(first.min()) >= 0 and int(first.max()) < 1000
    assert torch.equal(subset_indices(7, None, seed=0), torch.arange(7))
    assert torch.equal(subset_indices(7, 9, seed=0), torch.arange(7))
    assert subset_indices(7, 0, seed=0).numel() == 0
    with pytest.raises(ValueError):
        subset_indices(7, -1, seed=0)


def test_channel_stats_match_a_float64_computation() -> None:
    images = torch.randint(0, 256, (17, 3, 5, 6), dtype=torch.uint8, generator=torch.Generator())
    images[:, 2] //= 4  # make the channels differ
    mean, std = channel_stats(images)
    floats = images.double() / 255.0
    assert np.allclose(mean, floats.mean(dim=(0, 2, 3)).numpy(), atol=1e-12)
    assert np.allclose(std, floats.std(dim=(0, 2, 3), unbiased=False).numpy(), atol=1e-12)


def test_registry_lists_the_datasets() -> None:
    assert {"cifar10", "stl10", "digits", "imagefolder"} <= set(DATASETS.names())
    assert is_embedded("digits") and not is_embedded("cifar10")
    with pytest.raises(KeyError, match="choose one of"):
        load_dataset("mnist")


# --------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_pickles_load_pixel_exact(tmp_path: Path, protocol: int) -> None:
    written = write_cifar_pickles(tmp_path / "cifar-10-batches-py", protocol=protocol)
    dataset = load_dataset("cifar10", tmp_path, download=False)

    assert dataset.name == "cifar10" and dataset.classes == CIFAR10_CLASSES
    assert dataset.mean == CIFAR10_MEAN and dataset.std == CIFAR10_STD
    assert dataset.train.images.shape == (15, 3, 32, 32) and len(dataset.test) == 4
    assert dataset.train.labels.tolist() == written["train_labels"].tolist()
    assert dataset.test.labels.tolist() == written["test_labels"].tolist()
    # a row is 1024 red, then 1024 green, then 1024 blue bytes, each row-major over 32x32
    rows = written["train_rows"]
    for n, c, h, w in [(0, 0, 0, 0), (4, 1, 3, 30), (14, 2, 31, 31), (7, 2, 0, 5)]:
        assert int(dataset.train.images[n, c, h, w]) == int(rows[n, c * 1024 + h * 32 + w])
    assert torch.equal(dataset.train.images.reshape(15, -1), torch.from_numpy(rows))
    assert torch.equal(dataset.test.images.reshape(4, -1), torch.from_numpy(written["test_rows"]))

    # the batches folder itself is accepted as root, too
    again = load_dataset("cifar10", tmp_path / "cifar-10-batches-py", download=False)
    assert torch.equal(again.train.images, dataset.train.images)


def test_cifar10_pickles_corrupt_files_are_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_pickles(folder)
    short = {b"data": np.zeros((2, 3071), dtype=np.uint8), b"labels": [0, 1]}
    (folder / "data_batch_2").write_bytes(pickle.dumps(short, protocol=2))
    with pytest.raises(ValueError, match="3072 bytes"):
        load_dataset("cifar10", tmp_path, download=False)

    write_cifar_pickles(folder)
    bad_labels = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 10]}
    (folder / "test_batch").write_bytes(pickle.dumps(bad_labels, protocol=2))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
        load_dataset("cifar10", tmp_path, download=False)


class _MakesFolder:
    """Unpickling this calls os.mkdir: a stand-in for a malicious pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def test_cifar10_pickles_refuse_code_execution(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_pickles(folder)
    marker = tmp_path / "pwned"
    payload = {b"data": _MakesFolder(marker), b"labels": []}
    (folder / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ValueError, match="not allowed"):
        load_dataset("cifar10", tmp_path, download=False)
    assert not marker.exists()


def test_cifar10_from_imagefolder_archive_in_root(tmp_path: Path) -> None:
    layout = {
        "train": dict.fromkeys(CIFAR10_CLASSES, 2),
        "test": dict.fromkeys(CIFAR10_CLASSES, 1),
    }
    written = write_imagefolder(tmp_path / "tree", layout, height=32, width=32)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive = make_tar(tmp_path / "tree", data_dir / "cifar10-jpeg.tar.gz", "cifar10")
    (data_dir / "unrelated.tar.gz").write_bytes(b"not a dataset")  # ignored: wrong name

    dataset = load_dataset("cifar10", data_dir, download=False, cache_dir=tmp_path / "cache")
    classes = list(CIFAR10_CLASSES)
    for split_name in ("train", "test"):
        expected = expected_split(written[split_name], classes)
        split = getattr(dataset, split_name)
        assert torch.equal(split.images, expected.images)
        assert torch.equal(split.labels, expected.labels)
    assert dataset.mean == CIFAR10_MEAN and dataset.std == CIFAR10_STD
    assert str(archive) in dataset.source and ".png" in dataset.source

    # the archive itself, and an extracted cifar10/ folder, are accepted as root
    direct = load_dataset("cifar10", archive, download=False, cache_dir=tmp_path / "cache")
    assert torch.equal(direct.train.images, dataset.train.images)
    extracted = tmp_path / "extracted"
    with tarfile.open(archive) as tar:
        tar.extractall(extracted, filter="data")
    from_folder = load_dataset("cifar10", extracted, download=False, cache_dir=tmp_path / "c2")
    assert torch.equal(from_folder.test.images, dataset.test.images)
    assert torch.equal(from_folder.test.labels, dataset.test.labels)


def test_cifar10_imagefolder_with_other_classes_is_refused(tmp_path: Path) -> None:
    write_imagefolder(tmp_path / "cifar10", PNG_LAYOUT, height=32, width=32)
    with pytest.raises(ValueError, match="'imagefolder' dataset instead"):
        load_dataset("cifar10", tmp_path, download=False, cache_dir=tmp_path / "cache")


def test_missing_cifar10_error_names_the_paths_tried(tmp_path: Path) -> None:
    root = tmp_path / "no-data-here"
    root.mkdir()
    started = time.perf_counter()
    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset("cifar10", root, download=False)
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    assert f"{root}/cifar-10-batches-py" in message
    assert f"{root}/{{train,test}}" in message
    assert "download=False" in message and "download=True" in message
    assert "\n" not in message  # one paragraph
    assert time.perf_counter() - started < 2.0


def test_default_root_is_the_env_var_else_under_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_environment: Path
) -> None:
    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset("cifar10", download=False)
    assert str(isolated_environment / ".cache" / "unlearnshield" / "datasets") in str(caught.value)

    write_cifar_pickles(tmp_path / "env-root" / "cifar-10-batches-py")
    monkeypatch.setenv("UNLEARNSHIELD_DATA", str(tmp_path / "env-root"))
    assert len(load_dataset("cifar10", download=False).train) == 15


def test_cifar10_partial_pickles_are_reported(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_pickles(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3 missing"):
        load_dataset("cifar10", tmp_path, download=False)


def test_cifar10_unreachable_server_fails_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    def never_called(*args: object, **kwargs: object) -> None:
        raise AssertionError("torchvision's downloader ran although the server is unreachable")

    never_called.url = torchvision.datasets.CIFAR10.url  # type: ignore[attr-defined]
    never_called.filename = torchvision.datasets.CIFAR10.filename  # type: ignore[attr-defined]
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", never_called)
    monkeypatch.setattr(download_module, "probe_host", lambda url, **kw: "no route (test)")
    with pytest.raises(DatasetNotFoundError, match=r"the download failed: .*no route \(test\)"):
        load_dataset("cifar10", tmp_path / "root", download=True)


def test_cifar10_download_runs_torchvision_then_reads_its_pickles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    calls = []
    written: dict[str, np.ndarray] = {}

    class FakeCIFAR10:
        url = torchvision.datasets.CIFAR10.url
        filename = torchvision.datasets.CIFAR10.filename

        def __init__(self, root: str, download: bool, **kwargs: object) -> None:
            calls.append((root, download))
            written.update(write_cifar_pickles(Path(root) / "cifar-10-batches-py", seed=5))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    monkeypatch.setattr(download_module, "probe_host", lambda url, **kw: None)
    dataset = load_dataset("cifar10", tmp_path / "root", download=True)
    assert calls == [(str(tmp_path / "root"), True)]
    assert dataset.test.labels.tolist() == written["test_labels"].tolist()


def test_probe_host_sees_a_listening_and_a_closed_port() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert download_module.probe_host(f"http://127.0.0.1:{port}/x", timeout_s=2.0) is None
    reason = download_module.probe_host(f"http://127.0.0.1:{port}/x", timeout_s=2.0)
    assert reason is not None and f"127.0.0.1:{port}" in reason


# --------------------------------------------------------------------------- ImageFolder


def test_imagefolder_png_archive_loads_pixel_exact(png_archive) -> None:
    data_dir, written = png_archive
    dataset = load_dataset("imagefolder", data_dir)

    assert dataset.classes == ("cat", "dog", "frog")  # sorted folder names of train/
    assert dataset.input_shape == (3, 6, 8)  # (C, H, W) of 8-wide, 6-high images
    for split_name in ("train", "test"):
        expected = expected_split(written[split_name], list(dataset.classes))
        split = getattr(dataset, split_name)
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert torch.equal(split.images, expected.images)
        assert torch.equal(split.labels, expected.labels)
    floats = expected_split(written["train"], list(dataset.classes)).float_images().double()
    assert np.allclose(dataset.mean, floats.mean(dim=(0, 2, 3)).numpy())
    assert np.allclose(dataset.std, floats.std(dim=(0, 2, 3), unbiased=False).numpy())


def test_imagefolder_order_does_not_depend_on_the_archive_order(png_archive, tmp_path) -> None:
    data_dir, _ = png_archive
    in_order = load_dataset("imagefolder", data_dir, cache_dir=tmp_path / "cache")
    files = sorted(p for p in (tmp_path / "tree").rglob("*.png"))
    assert len(files) == len(in_order.train) + len(in_order.test)
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    with tarfile.open(shuffled / "mydata.tar.gz", "w:gz") as tar:
        for k in np.random.default_rng(0).permutation(len(files)):
            tar.add(files[k], arcname=f"x/{files[k].relative_to(tmp_path / 'tree')}")
    reordered = load_dataset("imagefolder", shuffled, cache_dir=tmp_path / "cache")
    for split_name in ("train", "test"):
        expected, got = getattr(in_order, split_name), getattr(reordered, split_name)
        assert torch.equal(expected.images, got.images)
        assert torch.equal(expected.labels, got.labels)


def test_imagefolder_jpeg_folder_loads_within_jpeg_error(tmp_path: Path) -> None:
    written = write_imagefolder(tmp_path / "tree", PNG_LAYOUT, suffix=".jpg", height=16, width=24)
    dataset = load_dataset("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "cache")
    for split_name in ("train", "test"):
        expected = expected_split(written[split_name], list(dataset.classes))
        split = getattr(dataset, split_name)
        assert torch.equal(split.labels, expected.labels)
        error = (split.images.int() - expected.images.int()).abs().float()
        assert float(error.mean()) < 2.0 and float(error.max()) <= 16


def test_imagefolder_greyscale_is_replicated_and_stray_files_ignored(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    for split in ("train", "test"):
        (tree / split / "only").mkdir(parents=True)
        Image.fromarray(grey, mode="L").save(tree / split / "only" / "a.png")
        (tree / split / "only" / "notes.txt").write_text("not an image")
    (tree / "train" / "only" / "nested").mkdir()
    Image.fromarray(grey, mode="L").save(tree / "train" / "only" / "nested" / "b.png")

    with pytest.warns(UserWarning, match="1 image files .* were left out"):
        dataset = load_dataset("imagefolder", tree, cache_dir=tmp_path / "cache")
    assert len(dataset.train) == 1 and len(dataset.test) == 1
    for channel in range(3):
        assert torch.equal(dataset.train.images[0, channel], torch.from_numpy(grey))


def test_imagefolder_mixed_sizes_name_the_files(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    write_imagefolder(tree, {"train": {"a": 1}, "test": {"a": 1}}, height=6, width=8)
    Image.fromarray(np.zeros((7, 8, 3), dtype=np.uint8)).save(tree / "train" / "a" / "zz.png")
    with pytest.raises(ValueError, match=r"one size.*0000\.png is 8x6 and .*zz\.png is 8x7"):
        load_dataset("imagefolder", tree, cache_dir=tmp_path / "cache")


def test_imagefolder_structural_errors(tmp_path: Path) -> None:
    only_train = tmp_path / "only-train"
    write_imagefolder(only_train, {"train": {"a": 1}})
    (only_train / "test").mkdir()
    with pytest.raises(ValueError, match="holds no test images"):
        load_dataset("imagefolder", only_train, cache_dir=tmp_path / "cache")

    unknown_class = tmp_path / "unknown-class"
    write_imagefolder(unknown_class, {"train": {"a": 1}, "test": {"b": 1}})
    with pytest.raises(ValueError, match=r"test classes \['b'\]"):
        load_dataset("imagefolder", unknown_class, cache_dir=tmp_path / "cache")

    two = tmp_path / "two"
    two.mkdir()
    for name in ("x.tar.gz", "y.tgz"):
        make_tar(unknown_class, two / name, "tree")
    with pytest.raises(ValueError, match="several ImageFolder candidates"):
        load_dataset("imagefolder", two)

    with pytest.raises(DatasetNotFoundError, match="has no downloader"):
        load_dataset("imagefolder", tmp_path / "missing")

    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(ValueError, match="not a readable tar archive"):
        load_dataset("imagefolder", broken, cache_dir=tmp_path / "cache")


# --------------------------------------------------------------------------- cache


def test_cache_second_load_reads_the_cache(
    png_archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir, _ = png_archive
    cache_dir = tmp_path / "cache"
    decoded = count_decoding(monkeypatch)
    first = load_dataset("imagefolder", data_dir, cache_dir=cache_dir)
    assert len(decoded) == 1
    entries = list(cache_dir.iterdir())
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()

    forbid_decoding(monkeypatch)
    caplog.set_level(logging.INFO, logger="unlearnshield.data")
    second = load_dataset("imagefolder", data_dir, cache_dir=cache_dir)
    assert "from the cache" in caplog.text
    for split_name in ("train", "test"):
        assert torch.equal(getattr(first, split_name).images, getattr(second, split_name).images)
        assert torch.equal(getattr(first, split_name).labels, getattr(second, split_name).labels)
    assert (first.classes, first.mean, first.std) == (second.classes, second.mean, second.std)


def test_cache_is_rebuilt_when_the_source_changes(
    png_archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir, _ = png_archive
    decoded = count_decoding(monkeypatch)
    load_dataset("imagefolder", data_dir, cache_dir=tmp_path / "cache")
    archive = data_dir / "mydata.tar.gz"
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_dataset("imagefolder", data_dir, cache_dir=tmp_path / "cache")
    assert len(decoded) == 2
    load_dataset("imagefolder", data_dir, cache_dir=tmp_path / "cache")
    assert len(decoded) == 2


def test_cache_with_damaged_array_is_rebuilt(
    png_archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir, _ = png_archive
    first = load_dataset("imagefolder", data_dir, cache_dir=tmp_path / "cache")
    (entry,) = (tmp_path / "cache").iterdir()
    (entry / "train_images.npy").write_bytes(b"truncated")
    decoded = count_decoding(monkeypatch)
    second = load_dataset("imagefolder", data_dir, cache_dir=tmp_path / "cache")
    assert len(decoded) == 1
    assert torch.equal(first.train.images, second.train.images)


def test_cache_defaults_to_beside_the_data_then_env(
    png_archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir, _ = png_archive
    load_dataset("imagefolder", data_dir)
    assert len(list((data_dir / cache_module.BESIDE_DATA_FOLDER).iterdir())) == 1

    env_cache = tmp_path / "env-cache"
    monkeypatch.setenv(cache_module.CACHE_ENV, str(env_cache))
    load_dataset("imagefolder", data_dir)
    assert len(list(env_cache.iterdir())) == 1


def test_cache_falls_back_to_home_when_the_data_folder_is_read_only(
    png_archive, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_environment: Path
) -> None:
    data_dir, _ = png_archive
    data_dir.chmod(0o555)
    try:
        if os.access(data_dir, os.W_OK):
            # running as root, which ignores permission bits: treat the folder as a read-only
            # mount does (os.access reports it unwritable)
            real = cache_module._is_writable_dir
            monkeypatch.setattr(
                cache_module, "_is_writable_dir", lambda p: p != data_dir and real(p)
            )
        first = load_dataset("imagefolder", data_dir)
        assert not (data_dir / cache_module.BESIDE_DATA_FOLDER).exists()
        home_cache = isolated_environment / ".cache" / "unlearnshield"
        assert len(list(home_cache.iterdir())) == 1

        forbid_decoding(monkeypatch)
        second = load_dataset("imagefolder", data_dir)
        assert torch.equal(first.train.images, second.train.images)
    finally:
        data_dir.chmod(0o755)


# --------------------------------------------------------------------------- STL-10


def write_stl10(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write one split as the official files: each channel column-major, labels 1-10."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{split}_X.bin", "wb") as handle:
        for image in images:
            for channel in image:
                handle.write(channel.tobytes(order="F"))
    (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())


def test_stl10_binary_loads_pixel_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, size=(3, 3, 96, 96), dtype=np.uint8)
    test = rng.integers(0, 256, size=(2, 3, 96, 96), dtype=np.uint8)
    train_labels, test_labels = np.array([0, 9, 4]), np.array([9, 0])
    folder = tmp_path / "stl10_binary"
    write_stl10(folder, "train", train, train_labels)
    write_stl10(folder, "test", test, test_labels)

    dataset = load_dataset("stl10", tmp_path, download=False)
    assert dataset.classes == STL10_CLASSES and dataset.mean == STL10_MEAN
    assert torch.equal(dataset.train.images, torch.from_numpy(train))
    assert torch.equal(dataset.test.images, torch.from_numpy(test))
    assert dataset.train.labels.tolist() == [0, 9, 4] and dataset.test.labels.tolist() == [9, 0]

    names = [f"class {k}" for k in range(10)]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    assert load_dataset("stl10", folder, download=False).classes == tuple(names)


def test_stl10_files_store_columns_first(tmp_path: Path) -> None:
    # bytes 0, 96, 192, ... of each channel are its top row when stored column-major
    raw = np.zeros(3 * 96 * 96, dtype=np.uint8)
    raw[0 : 96 * 96 : 96] = 255
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}_X.bin").write_bytes(raw.tobytes())
        (folder / f"{split}_y.bin").write_bytes(bytes([1]))
    image = load_dataset("stl10", tmp_path, download=False).train.images[0]
    assert torch.all(image[0, 0, :] == 255)
    assert int(image[0].sum()) == 255 * 96 and int(image[1:].sum()) == 0


def test_stl10_corrupt_and_missing_files(tmp_path: Path) -> None:
    folder = tmp_path / "stl10_binary"
    images = np.zeros((2, 3, 96, 96), dtype=np.uint8)
    write_stl10(folder, "train", images, np.array([0, 1]))
    write_stl10(folder, "test", images, np.array([0, 1]))
    with open(folder / "test_X.bin", "ab") as handle:
        handle.write(b"\x00")
    with pytest.raises(ValueError, match="not a positive multiple of 27648"):
        load_dataset("stl10", tmp_path, download=False)

    write_stl10(folder, "test", images, np.array([0, 1]))
    (folder / "train_y.bin").write_bytes(bytes([0, 3]))
    with pytest.raises(ValueError, match=r"labels must lie in \[1, 10\]"):
        load_dataset("stl10", tmp_path, download=False)

    (folder / "train_y.bin").write_bytes(bytes([1]))
    with pytest.raises(ValueError, match="2 images but"):
        load_dataset("stl10", tmp_path, download=False)

    (folder / "train_y.bin").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"train_y\.bin missing.*download=False"):
        load_dataset("stl10", tmp_path, download=False)


# --------------------------------------------------------------------------- digits


def test_digits_are_upsampled_rgb_with_a_stratified_split() -> None:
    from sklearn.datasets import load_digits

    dataset = load_dataset("digits")
    assert dataset.input_shape == (3, 32, 32) and dataset.classes == tuple("0123456789")
    assert dataset.train.images.dtype == torch.uint8
    assert int(dataset.train.images.max()) == 255 and int(dataset.train.images.min()) == 0
    assert torch.equal(dataset.train.images[:, 0], dataset.train.images[:, 2])

    bunch = load_digits()
    assert len(dataset.train) + len(dataset.test) == len(bunch.target)
    class_sizes = np.bincount(bunch.target)
    test_sizes = torch.bincount(dataset.test.labels, minlength=10).numpy()
    assert np.all(np.abs(test_sizes - 0.2 * class_sizes) <= 0.5)

    # bilinear upsampling, pixel centres at (i + 0.5) / 4 - 0.5 in the 8x8 grid; checked on
    # interior pixels, where no edge clamping happens
    train_index, _ = digits_module.stratified_split(
        torch.from_numpy(bunch.target),
        test_fraction=digits_module.DIGITS_TEST_FRACTION,
        seed=digits_module.DIGITS_SPLIT_SEED,
    )
    small = bunch.images[train_index.numpy()] / 16.0
    coords = (np.arange(2, 30) + 0.5) / 4 - 0.5
    low, frac = np.floor(coords).astype(int), coords - np.floor(coords)
    rows = small[:, low] * (1 - frac)[None, :, None] + small[:, low + 1] * frac[None, :, None]
    expected = rows[:, :, low] * (1 - frac) + rows[:, :, low + 1] * frac
    got = dataset.train.images[:, 1, 2:30, 2:30].numpy().astype(float)
    assert np.abs(got - expected * 255).max() <= 0.51
    assert dataset.train.labels.tolist() == bunch.target[train_index.numpy()].tolist()

    floats = dataset.train.float_images().double()
    assert np.allclose(dataset.mean, floats.mean(dim=(0, 2, 3)).numpy())
    again = load_dataset("digits")
    assert torch.equal(again.test.images, dataset.test.images)
    assert torch.equal(again.test.labels, dataset.test.labels)


def test_stratified_split_partitions_each_class() -> None:
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 7)
    train, test = digits_module.stratified_split(labels, test_fraction=0.2, seed=0)
    assert sorted(train.tolist() + test.tolist()) == list(range(22))
    assert torch.bincount(labels[test], minlength=3).tolist() == [2, 1, 1]
    again_train, again_test = digits_module.stratified_split(labels, test_fraction=0.2, seed=0)
    assert torch.equal(train, again_train) and torch.equal(test, again_test)
    other = [digits_module.stratified_split(labels, test_fraction=0.2, seed=s)[1] for s in (1, 2)]
    assert any(not torch.equal(test, split) for split in other)


# --------------------------------------------------------------------------- real data


def _shared_cifar_archive() -> Path | None:
    shared = os.environ.get("UNLEARNSHIELD_SHARED")
    folders = [Path(shared), Path(shared) / "data"] if shared else []
    folders.append(Path(__file__).resolve().parents[1].parent / "shared" / "data")
    for folder in folders:
        if (folder / "cifar10-jpeg.tar.gz").is_file():
            return folder / "cifar10-jpeg.tar.gz"
    return None


@pytest.mark.slow
def test_real_cifar10_jpeg_copy_loads_and_caches(tmp_path: Path) -> None:
    archive = _shared_cifar_archive()
    if archive is None:
        pytest.skip("the shared cifar10-jpeg.tar.gz is not available")

    dataset = load_dataset("cifar10", archive.parent, download=False, cache_dir=tmp_path)
    assert (len(dataset.train), len(dataset.test)) == (50_000, 10_000)
    assert dataset.num_classes == 10 and dataset.input_shape == (3, 32, 32)
    assert torch.bincount(dataset.train.labels).tolist() == [5_000] * 10
    assert torch.bincount(dataset.test.labels).tolist() == [1_000] * 10
    # channel means of the real data are the published constants (JPEG keeps them)
    mean, _ = channel_stats(dataset.train.images)
    assert np.allclose(mean, CIFAR10_MEAN, atol=0.005)
    # labels follow the images: ships are bluer than frogs
    blue_minus_red = dataset.train.float_images(torch.arange(0, 50_000, 5))
    blue_minus_red = (blue_minus_red[:, 2] - blue_minus_red[:, 0]).mean(dim=(1, 2))
    labels = dataset.train.labels[::5]
    ship, frog = CIFAR10_CLASSES.index("ship"), CIFAR10_CLASSES.index("frog")
    assert blue_minus_red[labels == ship].mean() > blue_minus_red[labels == frog].mean() + 0.05

    started = time.perf_counter()
    cached = load_dataset("cifar10", archive.parent, download=False, cache_dir=tmp_path)
    assert time.perf_counter() - started < 2.0
    assert torch.equal(cached.train.images, dataset.train.images)
    assert torch.equal(cached.test.labels, dataset.test.labels)
