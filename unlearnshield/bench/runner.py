"""Running cells: the shared steps cached on disk, one JSON record and two PNGs per cell.

Layout of a run folder::

    RUN_DIR/cells/<key[:2]>/<key>.json         the record (written last: the done marker)
    RUN_DIR/cells/<key[:2]>/<key>.png          the reconstruction
    RUN_DIR/cells/<key[:2]>/<key>.truth.png    the forget sample
    RUN_DIR/cache/original/<key>.safetensors   θo, per (dataset, model, training)
    RUN_DIR/cache/unlearned/<key>.safetensors  θu, per (θo, unlearning, forget sample, seed)
    RUN_DIR/cache/locks/<key>.lock             advisory locks around the cache writes

Every file is written to a temporary name and renamed, so a process killed at any moment
leaves either the whole file or none. A cell whose JSON exists and parses is finished and
never recomputed; a cached model is trained once even with concurrent workers (the first
takes the lock, the others wait and load its file; where locks do not work, as on some
network file systems, both compute the same bits and the last rename wins).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from unlearnshield import __version__
from unlearnshield._io import atomic_path, atomic_write_json
from unlearnshield.attacks import ATTACKERS, DefenseAwareAttacker, reconstruct
from unlearnshield.bench.spec import Cell, Unit, attack_config
from unlearnshield.checkpoints import build_metadata, load_checkpoint, save_checkpoint
from unlearnshield.data import Dataset, ImageSplit, load_dataset, subset_indices
from unlearnshield.defenses import protect
from unlearnshield.metrics import (
    MIA_STATISTIC,
    OUTPUT_SPACE,
    SSIM_IMPL,
    accuracy_of,
    calibration_images,
    membership_inference,
    outdiff,
    predict_logits,
    reconstruction_scores,
    try_lpips,
)
from unlearnshield.models import ImageClassifier, build_model
from unlearnshield.training import TrainRecipe, seed_everything, train_model
from unlearnshield.unlearning import UNLEARNERS
from unlearnshield.visualize import to_uint8

logger = logging.getLogger(__name__)

RECORD_FORMAT = 1
"""Version of the record layout."""

NONDETERMINISTIC_FIELDS = ("times", "environment")
"""Record sections that differ between two runs of the same cell (wall times, host)."""


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Where and how cells run; nothing here changes a result, so nothing enters a key.

    Attributes:
        run_dir: the run folder.
        data_root: default data root ("" = the loader's default).
        data_roots: data root per dataset name, over ``data_root``.
        lpips_backbone: AlexNet backbone file for LPIPS ("" = the environment variable,
            then torchvision's cache).
        device: "auto" (CUDA when available), "cpu" or "cuda[:N]".
        threads: torch CPU threads while a unit runs; the same count on every executor gives
            bitwise-equal records on the CPU.
        gpus_per_task: GPUs a Ray task requests when CUDA is present (fractions pack
            several tasks on one GPU).
        progress: show tqdm bars of training, unlearning and the attack: True, False, or
            None (the spec's "auto": only on a terminal).
        reuse: other run folders; a finished record or cached θo/θu there whose key a cell
            needs is copied (the record with this sweep's display labels) instead of being
            recomputed. Keys hash every setting that changes a result, so what is copied is
            what this run would compute (bitwise at equal ``threads``).
    """

    run_dir: str
    data_root: str = ""
    data_roots: Mapping[str, str] = dataclasses.field(default_factory=dict)
    lpips_backbone: str = ""
    device: str = "auto"
    threads: int = 1
    gpus_per_task: float = 1.0
    progress: bool | None = False
    reuse: tuple[str, ...] = ()

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], run_dir: str | Path) -> Runtime:
        """The ``[runtime]`` section of a specification, for ``run_dir``."""
        r = spec["runtime"]
        threads = int(r["threads"])
        if threads < 1:
            raise ValueError(f"runtime.threads must be at least 1, got {threads}")
        return cls(
            run_dir=str(run_dir),
            data_root=str(r["data_root"] or ""),
            data_roots={str(k): str(v) for k, v in dict(r["data_roots"] or {}).items()},
            lpips_backbone=str(r["lpips_backbone"] or ""),
            device=str(r["device"]),
            threads=threads,
            gpus_per_task=float(r["gpus_per_task"]),
            progress=None if r["progress"] == "auto" else bool(r["progress"]),
            reuse=tuple(str(d) for d in (r.get("reuse") or ())),
        )

    def root_of(self, dataset: str) -> str | None:
        """The data root of ``dataset`` (None: the loader's default)."""
        return self.data_roots.get(dataset) or self.data_root or None

    def torch_device(self) -> torch.device:
        """The device cells run on."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


# ---------------------------------------------------------------------------------------------
# Paths and done markers


def record_path(run_dir: str | Path, key: str) -> Path:
    """Where the record of cell ``key`` lives."""
    return Path(run_dir) / "cells" / key[:2] / f"{key}.json"


def read_record(run_dir: str | Path, key: str) -> dict[str, Any] | None:
    """The finished record of cell ``key``, or None when the cell is not finished."""
    path = record_path(run_dir, key)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def is_done(run_dir: str | Path, key: str) -> bool:
    """Whether cell ``key`` has a finished record."""
    return read_record(run_dir, key) is not None


def iter_records(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Every finished record under ``run_dir``, in key order (half-written files are skipped)."""
    for path in sorted((Path(run_dir) / "cells").glob("*/*.json")):
        record = read_record(run_dir, path.stem)
        if record is not None:
            yield record


def deterministic_view(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record without its wall times and host details: what two runs of one cell share."""
    return {k: v for k, v in record.items() if k not in NONDETERMINISTIC_FIELDS}


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (``fcntl.flock``; a no-op where unavailable).

    The kernel drops the lock when its holder dies, so ``kill -9`` never leaves a stale one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover (not POSIX)
        yield
        return
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # pragma: no cover (file systems without locks)
            logger.warning("cannot lock %s; relying on atomic renames only", path)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# Per-process state: datasets, LPIPS


_DATASETS: dict[tuple[str, str | None], Dataset] = {}
_LPIPS: dict[str, tuple[Any, str | None]] = {}


def _dataset(name: str, runtime: Runtime) -> Dataset:
    slot = (name, runtime.root_of(name))
    if slot not in _DATASETS:
        _DATASETS[slot] = load_dataset(name, slot[1], download=False)
    return _DATASETS[slot]


def _lpips(runtime: Runtime) -> tuple[Any, str | None]:
    if runtime.lpips_backbone not in _LPIPS:
        _LPIPS[runtime.lpips_backbone] = try_lpips(runtime.lpips_backbone or None)
    return _LPIPS[runtime.lpips_backbone]


def versions() -> dict[str, str]:
    """Versions of the packages a result depends on."""
    out = {"unlearnshield": __version__, "python": platform.python_version()}
    out["torch"] = torch.__version__  # with its build tag (+cpu, +cu130)
    for package in ("numpy", "scikit-learn", "lpips", "pytorch-msssim"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:  # pragma: no cover
            out[package] = "absent"
    return out


# ---------------------------------------------------------------------------------------------
# Shared steps: θo and θu, cached


def _cache_path(runtime: Runtime, kind: str, key: str) -> Path:
    return Path(runtime.run_dir) / "cache" / kind / f"{key}.safetensors"


def _adopt_cached(runtime: Runtime, kind: str, key: str) -> None:
    """Copy a cached model of ``kind`` and ``key`` from a ``runtime.reuse`` folder, if one
    has it and this run folder does not (call it under the key's lock)."""
    path = _cache_path(runtime, kind, key)
    if path.exists():
        return
    for other in runtime.reuse:
        source = Path(other) / "cache" / kind / f"{key}.safetensors"
        if source.is_file():
            with atomic_path(path) as tmp:
                shutil.copyfile(source, tmp)
            logger.info("reused cached %s %s from %s", kind, key, other)
            return


def adopt_record(cell: Cell, runtime: Runtime) -> bool:
    """Copy ``cell``'s finished record (and its PNGs) from a ``runtime.reuse`` folder, with
    this sweep's display labels; returns whether one was found."""
    for other in runtime.reuse:
        record = read_record(other, cell.key)
        if record is None:
            continue
        source = record_path(other, cell.key)
        target = record_path(runtime.run_dir, cell.key)
        for suffix in (".png", ".truth.png"):
            png = source.with_name(f"{cell.key}{suffix}")
            if png.is_file():
                with atomic_path(target.with_name(png.name)) as tmp:
                    shutil.copyfile(png, tmp)
        record["display"] = dict(cell.display)
        record["reused_from"] = str(other)
        atomic_write_json(target, record)  # last: the done marker
        return True
    return False


def _lock_path(runtime: Runtime, key: str) -> Path:
    return Path(runtime.run_dir) / "cache" / "locks" / f"{key}.lock"


def original_model(
    config: Mapping[str, Any], dataset: Dataset, runtime: Runtime, key: str
) -> tuple[ImageClassifier, torch.Tensor, dict[str, Any]]:
    """θo for a cell's settings, trained once per run folder.

    Args:
        config: the cell's resolved settings (``dataset``, ``model``, ``training``).
        dataset: the loaded dataset.
        runtime: the run folder and the device.
        key: :func:`~unlearnshield.bench.spec.original_key` of ``config``.

    Returns:
        ``(model on the runtime device, training member indices (sorted), training record)``;
        the record has ``trained_here`` True when this call trained it.
    """
    path = _cache_path(runtime, "original", key)
    trained_here = False
    with file_lock(_lock_path(runtime, key)):
        _adopt_cached(runtime, "original", key)
        if not path.exists():
            training = config["training"]
            members = subset_indices(len(dataset.train), training["subset"], seed=training["seed"])
            hyper = dict(training["hyperparameters"])
            hyper["milestones"] = tuple(hyper["milestones"])
            recipe = TrainRecipe(**hyper)
            seed_everything(training["seed"])
            model = build_model(
                config["model"]["name"],
                dataset.num_classes,
                input_shape=dataset.input_shape,
                mean=dataset.mean,
                std=dataset.std,
                **config["model"]["options"],
            ).to(runtime.torch_device())
            report = train_model(
                model,
                dataset.train.subset(members),
                recipe=recipe,
                seed=training["seed"],
                progress=runtime.progress,
            )
            accuracy = accuracy_of(predict_logits(model, dataset.test), dataset.test.labels)
            record = {
                "recipe_name": training["recipe"],
                "epochs": report.epochs,
                "test_accuracy": accuracy,
                "seconds": report.seconds,
                "bench_key": key,
            }
            meta = build_metadata(
                model,
                dataset={"name": dataset.name, "source": dataset.source},
                train_indices=members,
                seed=training["seed"],
                training=record,
            )
            save_checkpoint(model, path, meta)
            trained_here = True
            logger.info("trained θo %s: test accuracy %.4f", key, accuracy)
    checkpoint = load_checkpoint(path)
    members = checkpoint.train_indices
    assert members is not None
    record = {**checkpoint.metadata["training"], "trained_here": trained_here}
    return checkpoint.model.to(runtime.torch_device()), members, record


def forget_index(members: torch.Tensor, forget: Mapping[str, Any]) -> int:
    """The train-split index of a cell's forget sample: entry ``rank`` of a seeded
    permutation of θo's training members (so the first n draws do not depend on n)."""
    generator = torch.Generator().manual_seed(int(forget["seed"]))
    order = torch.randperm(len(members), generator=generator)
    rank = int(forget["rank"])
    if rank >= len(members):
        raise ValueError(f"forget sample {rank} requested but θo has {len(members)} members")
    return int(members[order[rank]])


def unlearned_model(
    config: Mapping[str, Any],
    original: nn.Module,
    dataset: Dataset,
    members: torch.Tensor,
    index: int,
    runtime: Runtime,
    key: str,
) -> tuple[nn.Module, dict[str, Any]]:
    """θu for a cell, unlearned once per run folder.

    Args:
        config: the cell's resolved settings (``unlearning``, ``seed``).
        original: θo, on the runtime device.
        dataset: the loaded dataset.
        members: θo's training members (train-split indices).
        index: the forget sample's train-split index.
        runtime: the run folder and the device.
        key: the cell's :attr:`~unlearnshield.bench.spec.Cell.unlearned_key`.

    Returns:
        ``(θu on the runtime device, the unlearning record with θu's test_accuracy)``.
    """
    path = _cache_path(runtime, "unlearned", key)
    device = runtime.torch_device()
    with file_lock(_lock_path(runtime, key)):
        _adopt_cached(runtime, "unlearned", key)
        if not path.exists():
            settings = config["unlearning"]
            cls = UNLEARNERS.get(settings["method"])
            unlearner = cls(cls.Config(**settings["hyperparameters"]), preset=settings["preset"])
            x = dataset.train.float_images([index]).to(device)
            y = dataset.train.labels[[index]].to(device)
            retain = _retain(dataset, members, index) if cls.needs_retain else None
            model, record = unlearner(
                original, x, y, retain, seed=config["seed"], progress=runtime.progress
            )
            record["test_accuracy"] = accuracy_of(
                predict_logits(model, dataset.test), dataset.test.labels
            )
            record["forget_index"] = index
            meta = build_metadata(
                model,
                dataset={"name": dataset.name, "source": dataset.source},
                seed=config["seed"],
                unlearning=record,
                bench_key=key,
            )
            save_checkpoint(model, path, meta)
    checkpoint = load_checkpoint(path)
    return checkpoint.model.to(device), dict(checkpoint.metadata["unlearning"])


def _retain(dataset: Dataset, members: torch.Tensor, index: int) -> ImageSplit:
    return dataset.train.subset(members[members != index])


# ---------------------------------------------------------------------------------------------
# One unit


def build_attacker(attack: Mapping[str, Any], defense: Mapping[str, Any]) -> Any:
    """The attacker a cell's settings name; the defense-aware one simulates the cell's own
    defense with its hyper-parameters."""
    options = dict(attack["attacker_options"])
    if attack["attacker"] == DefenseAwareAttacker.name:
        return DefenseAwareAttacker(
            defense["name"], defense_options=defense["hyperparameters"], **options
        )
    return ATTACKERS.get(attack["attacker"])(**options)


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings → one level of dotted keys (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, name + "."))
        else:
            out[name] = value
    return out


def _finite(obj: Any) -> Any:
    """NaN and ±inf → None, recursively (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _without_seconds(obj: Any) -> Any:
    """A copy without the ``seconds`` entries (wall times go to the record's ``times``)."""
    if isinstance(obj, dict):
        return {k: _without_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_without_seconds(v) for v in obj]
    return obj


def _write_png(path: Path, image: torch.Tensor) -> None:
    """One image ``(C, H, W)`` in [0, 1] as an RGB PNG at its own size, atomically."""
    array = to_uint8(image.unsqueeze(0))[0]
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _scores(recon: torch.Tensor, truth: torch.Tensor, lpips: Any) -> dict[str, float]:
    scores = reconstruction_scores(recon, truth, lpips=lpips)
    return {name: float(values[0]) for name, values in scores.items()}


@dataclasses.dataclass
class UnitResult:
    """What running a unit did.

    Attributes:
        unit: the unit key.
        written: keys of the cells finished by this run.
        skipped: keys that were already finished.
        seconds: wall time.
    """

    unit: str
    written: list[str]
    skipped: list[str]
    seconds: float


def run_unit(unit: Unit, runtime: Runtime) -> UnitResult:
    """Run the unfinished cells of ``unit``: shared steps from the cache, one batched attack,
    then one record per cell.

    Args:
        unit: cells sharing every setting but the forget sample.
        runtime: where the run folder and the data are, the device and the thread count.

    Returns:
        A :class:`UnitResult`.

    Notes:
        The forget samples of a unit are attacked in one batched run, so a cell's
        reconstruction depends on its unit (the batch and the cell's row in it); the unit is
        fixed by the sorted sweep and ``attack.batch``, so every executor forms the same
        units and writes the same records. If some cells of a unit are finished and others
        not (a kill between two record writes), the unit is recomputed and only the
        missing records are written.
    """
    started = time.perf_counter()
    todo = [c for c in unit.cells if not is_done(runtime.run_dir, c.key)]
    skipped = [c.key for c in unit.cells if c not in todo]
    adopted = [c.key for c in todo if runtime.reuse and adopt_record(c, runtime)]
    if adopted:
        logger.info("unit %s: %d record(s) reused from %s", unit.key, len(adopted), runtime.reuse)
        todo = [c for c in todo if c.key not in adopted]
    if not todo:
        return UnitResult(unit.key, adopted, skipped, time.perf_counter() - started)
    threads = torch.get_num_threads()
    torch.set_num_threads(runtime.threads)
    try:
        written = _run_cells(unit, todo, runtime, started)
    finally:
        torch.set_num_threads(threads)
    return UnitResult(unit.key, adopted + written, skipped, time.perf_counter() - started)


@dataclasses.dataclass
class _Sample:
    """One cell of a unit between its protection and its record."""

    cell: Cell
    index: int
    x: torch.Tensor
    y: torch.Tensor
    unlearned: nn.Module
    unlearning: dict[str, Any]
    released: nn.Module
    defense: dict[str, Any]
    times: dict[str, float]


def _run_cells(unit: Unit, todo: list[Cell], runtime: Runtime, started: float) -> list[str]:
    first = unit.cells[0]
    device = runtime.torch_device()
    dataset = _dataset(first.config["dataset"], runtime)
    t0 = time.perf_counter()
    theta_o, members, training = original_model(first.config, dataset, runtime, first.original_key)
    train_s = time.perf_counter() - t0

    # unlearn and protect every sample of the unit (all of them: the attack batch is whole)
    samples = []
    for cell in unit.cells:
        c = cell.config
        index = forget_index(members, c["forget"])
        x = dataset.train.float_images([index]).to(device)
        y = dataset.train.labels[[index]].to(device)
        t0 = time.perf_counter()
        theta_u, unlearning = unlearned_model(
            c, theta_o, dataset, members, index, runtime, cell.unlearned_key
        )
        t1 = time.perf_counter()
        released, defense = protect(
            theta_o, theta_u, x, y, c["defense"]["name"], seed=c["seed"],
            **c["defense"]["hyperparameters"],
        )  # fmt: skip
        times = {"unlearn_s": t1 - t0, "protect_s": time.perf_counter() - t1}
        samples.append(_Sample(cell, index, x, y, theta_u, unlearning, released, defense, times))
        logger.info(
            "cell %s: sample %d, %s, cos(Δ, Δ*) %+.4f",
            cell.key,
            index,
            c["defense"]["name"],
            defense["cosine"],
        )

    # one batched attack on all releases of the unit
    attack = first.config["attack"]
    budget = attack_config(attack)
    reconstruction = None
    attack_s = 0.0
    if budget is not None:
        given = attack["labels"] == "given"
        t0 = time.perf_counter()
        reconstruction = reconstruct(
            theta_o,
            [s.released for s in samples],
            input_shape=dataset.input_shape,
            labels=torch.stack([s.y.cpu() for s in samples]) if given else None,
            num_images=1,
            attacker=build_attacker(attack, first.config["defense"]),
            budget=budget,
            engine=attack["engine"],
            seed=first.config["seed"],
            progress=runtime.progress,
        )
        attack_s = time.perf_counter() - t0

    use_lpips = first.config["metrics"]["lpips"]
    lpips, lpips_reason = _lpips(runtime) if use_lpips else (None, "disabled in the sweep")
    implementations = {
        "ssim": SSIM_IMPL,
        "output_space": OUTPUT_SPACE,
        "mia_statistic": MIA_STATISTIC,
        "lpips": lpips.info if lpips is not None else {"unavailable": lpips_reason},
    }
    todo_keys = {c.key for c in todo}
    written = []
    for row, sample in enumerate(samples):
        if sample.cell.key not in todo_keys:
            continue
        t0 = time.perf_counter()
        record = _cell_record(unit, row, sample, dataset, members, reconstruction, lpips)
        record["implementations"] = implementations
        record["times"] = {
            **sample.times,
            "train_s": train_s,
            "train_recorded_s": training["seconds"],
            "original_trained_here": training["trained_here"],
            "unlearn_recorded_s": sample.unlearning.get("seconds"),
            "protect_recorded_s": sample.defense.get("seconds"),
            "attack_unit_s": attack_s,
            "attack_batch": len(samples),
            "attack_s": attack_s / len(samples),
            "metrics_s": time.perf_counter() - t0,
            "unit_elapsed_s": time.perf_counter() - started,
        }
        record["environment"] = {
            "device": str(device),
            "threads": runtime.threads,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "platform": platform.platform(),
            "argv0": Path(sys.argv[0]).name,
        }
        record = _finite(record)
        directory = record_path(runtime.run_dir, sample.cell.key).parent
        if reconstruction is not None:
            _write_png(directory / f"{sample.cell.key}.png", reconstruction.images[row, 0])
        _write_png(directory / f"{sample.cell.key}.truth.png", sample.x[0].cpu())
        atomic_write_json(record_path(runtime.run_dir, sample.cell.key), record)
        written.append(sample.cell.key)
    return written


def _cell_record(
    unit: Unit,
    row: int,
    sample: _Sample,
    dataset: Dataset,
    members: torch.Tensor,
    reconstruction: Any,
    lpips: Any,
) -> dict[str, Any]:
    """The deterministic part of a cell's record: settings, metrics, details, files."""
    cell, x, y, defense = sample.cell, sample.x, sample.y, sample.defense
    c = cell.config
    truth = x.detach().cpu()
    metrics: dict[str, Any] = {}
    attack_details: dict[str, Any] | None = None
    if reconstruction is not None:
        recon = reconstruction.images[row].cpu()
        metrics.update(_scores(recon, truth, lpips))
        metrics["attack_cosine"] = float(reconstruction.cosine[row])
        metrics["label_used"] = int(reconstruction.labels[row, 0])
        metrics["label_correct"] = bool(reconstruction.labels[row, 0] == int(y[0]))
        summary = reconstruction.summary()
        attack_details = {
            **{k: v for k, v in summary.items() if k not in ("cosine", "cost", "restart_costs")},
            "row": row,
            "labels": summary["labels"][row],
            "cosine": summary["cosine"][row],
            "cost": summary["cost"][row],
            "restart_costs": summary["restart_costs"][row],
        }
    calibration = {
        name: _scores(image, truth, lpips)
        for name, image in calibration_images(truth, seed=c["seed"]).items()
    }

    logits = predict_logits(sample.released, dataset.test)
    metrics["test_accuracy"] = accuracy_of(logits, dataset.test.labels)
    metrics["test_accuracy_unlearned"] = sample.unlearning["test_accuracy"]
    metrics["outdiff"] = float(outdiff(sample.unlearned, sample.released, x).mean())
    metrics["cos_delta"] = float(defense["cosine"])
    metrics["delta_norm"] = float(defense["delta_norm"])
    metrics["perturbation_norm"] = float(defense["perturbation_norm"])
    if c["metrics"]["mia"]:
        mia = membership_inference(
            sample.released,
            x,
            y,
            _retain(dataset, members, sample.index),
            dataset.test,
            shadow_size=c["metrics"]["mia_shadow_size"] or None,
            holdout_fraction=float(c["metrics"]["mia_holdout_fraction"]),
            seed=int(c["metrics"]["mia_seed"]),
            test_logits=logits,
        )
        metrics.update(mia.as_record())
    return {
        "format": RECORD_FORMAT,
        "key": cell.key,
        "unit": unit.key,
        "index": cell.index,
        "config": flatten_config(c),
        "display": dict(cell.display),
        "seed": c["seed"],
        "forget": {"index": sample.index, "label": int(y[0]), "rank": c["forget"]["rank"]},
        "metrics": metrics,
        "calibration": calibration,
        "details": {
            "unit_cells": [u.key for u in unit.cells],
            "unlearning": _without_seconds(sample.unlearning),
            "defense": _without_seconds(defense),
            "attack": _without_seconds(attack_details),
        },
        "versions": versions(),
        "files": {
            "reconstruction": f"{cell.key}.png" if reconstruction is not None else None,
            "truth": f"{cell.key}.truth.png",
        },
    }
