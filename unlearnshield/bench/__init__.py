"""Benchmarks: resumable sweeps of cells, executors, presets, and the paper's tables.

A sweep is the sorted list of cells of a specification (dataset × model × unlearning
method × defense and its settings × attacker × forget sample × seed); each finished cell is
one JSON record in the run folder, and :mod:`unlearnshield.bench.report` rebuilds every
table and figure from those records alone::

    spec = load_preset("quick")
    summary = run_sweep(spec, "runs/quick")
    write_report("runs/quick")
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from unlearnshield._io import atomic_write_json
from unlearnshield.bench.executors import (
    EXECUTORS,
    ExecutorOptions,
    SweepSummary,
    gpus_per_task,
    run_local,
    run_processes,
    run_ray,
)
from unlearnshield.bench.report import LAYOUTS, Report, write_report
from unlearnshield.bench.runner import (
    Runtime,
    UnitResult,
    deterministic_view,
    forget_index,
    is_done,
    iter_records,
    read_record,
    record_path,
    run_unit,
)
from unlearnshield.bench.spec import (
    SPEC_DEFAULTS,
    Cell,
    SpecError,
    Unit,
    apply_overrides,
    load_preset,
    merge_spec,
    parse_shard,
    plan_cells,
    plan_units,
    preset_names,
    select_shard,
    stable_key,
)

logger = logging.getLogger(__name__)


def run_sweep(
    spec: Mapping[str, Any],
    run_dir: str | Path,
    *,
    executor: str = "local",
    options: ExecutorOptions | None = None,
    shard: tuple[int, int] | None = None,
) -> SweepSummary:
    """Run the unfinished cells of a sweep into ``run_dir``.

    Args:
        spec: a specification (:func:`load_preset`, then :func:`apply_overrides`).
        run_dir: the run folder; created if needed, reused to resume.
        executor: a name of :data:`EXECUTORS`: ``"local"`` (default), ``"process"`` or
            ``"ray"``.
        options: the executor's options (workers, Ray address, progress bar); default
            :class:`ExecutorOptions` ().
        shard: ``(i, n)`` runs only the units whose index ``% n == i``; default None, all.

    Returns:
        A :class:`SweepSummary`; ``skipped`` counts the cells of this shard that were
        finished before the call.

    Raises:
        SpecError: an invalid setting (before anything runs).
        KeyError: an unknown executor.
    """
    run = EXECUTORS.get(executor)
    options = options or ExecutorOptions()
    cells = plan_cells(spec)
    units = select_shard(plan_units(cells), shard)
    runtime = Runtime.from_spec(spec, run_dir)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        Path(run_dir) / "sweep.json",
        {"spec": dict(spec), "cells": len(cells), "keys": [c.key for c in cells]},
    )
    todo = [u for u in units if not all(is_done(run_dir, c.key) for c in u.cells)]
    finished = sum(len(u.cells) for u in units) - sum(len(u.cells) for u in todo)
    logger.info(
        "sweep %s: %d cells in %d units%s; %d units to run, %d cells already finished",
        spec["sweep"]["name"],
        sum(len(u.cells) for u in units),
        len(units),
        f" (shard {shard[0]}/{shard[1]})" if shard else "",
        len(todo),
        finished,
    )
    summary = run(todo, runtime, options)
    summary.units = len(units)
    summary.skipped += finished
    return summary


__all__ = [
    "EXECUTORS",
    "LAYOUTS",
    "SPEC_DEFAULTS",
    "Cell",
    "ExecutorOptions",
    "Report",
    "Runtime",
    "SpecError",
    "SweepSummary",
    "Unit",
    "UnitResult",
    "apply_overrides",
    "deterministic_view",
    "forget_index",
    "gpus_per_task",
    "is_done",
    "iter_records",
    "load_preset",
    "merge_spec",
    "parse_shard",
    "plan_cells",
    "plan_units",
    "preset_names",
    "read_record",
    "record_path",
    "run_local",
    "run_processes",
    "run_ray",
    "run_sweep",
    "run_unit",
    "select_shard",
    "stable_key",
    "write_report",
]
