"""Executors: how the units of a sweep are run (in this process, a process pool, or Ray).

Every executor runs the same :class:`~unlearnshield.bench.spec.Unit` objects through
:func:`~unlearnshield.bench.runner.run_unit`, and each unit writes its own records into the
run folder, so the records do not depend on the executor (bitwise on the CPU, at a fixed
``runtime.threads``). A unit that fails is reported and leaves its cells unfinished; the
next run retries them.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from tqdm.auto import tqdm

from unlearnshield._registry import Registry
from unlearnshield.bench.runner import Runtime, UnitResult, run_unit
from unlearnshield.bench.spec import Unit

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExecutorOptions:
    """Options of the executors.

    Attributes:
        workers: worker processes of the ``process`` executor; for ``ray``, the CPUs of a
            local Ray instance started here (ignored with an ``address``). Default 1.
        address: address of a running Ray cluster (``ray`` only); default None starts a
            local instance and shuts it down afterwards.
        progress: show a tqdm bar over the units; default None (only on a terminal).
    """

    workers: int = 1
    address: str | None = None
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")


@dataclasses.dataclass
class SweepSummary:
    """What an executor did.

    Attributes:
        executor: its name.
        units: units handed to it.
        written: cells finished by this run.
        skipped: cells already finished before.
        failed: ``(unit key, error text)`` of the units that raised.
        seconds: wall time.
    """

    executor: str
    units: int
    written: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def add(self, result: UnitResult) -> None:
        """Count one unit's result."""
        self.written += len(result.written)
        self.skipped += len(result.skipped)


Executor = Callable[[Sequence[Unit], Runtime, ExecutorOptions], SweepSummary]
"""``executor(units, runtime, options) -> SweepSummary``."""

EXECUTORS: Registry[Executor] = Registry("executor")


def _failure(unit: Unit, error: BaseException) -> tuple[str, str]:
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    logger.error("unit %s (%d cells) failed: %s", unit.key, len(unit.cells), error)
    logger.debug("%s", text)
    return unit.key, f"{type(error).__name__}: {error}"


def _bar(total: int, options: ExecutorOptions, desc: str) -> Any:
    disable = None if options.progress is None else not options.progress
    return tqdm(total=total, desc=desc, unit="unit", disable=disable)


@EXECUTORS.register("local")
def run_local(units: Sequence[Unit], runtime: Runtime, options: ExecutorOptions) -> SweepSummary:
    """Run the units one after another in this process (shared models stay in memory)."""
    start = time.perf_counter()
    summary = SweepSummary("local", len(units))
    with _bar(len(units), options, "bench") as bar:
        for unit in units:
            try:
                summary.add(run_unit(unit, runtime))
            except Exception as error:  # one failed unit must not stop the sweep
                summary.failed.append(_failure(unit, error))
            bar.update(1)
    summary.seconds = time.perf_counter() - start
    return summary


ORPHAN_POLL_S = 1.0
"""How often a pool worker checks that the process that started it is still alive."""


def _exit_when_orphaned(parent: int) -> None:
    """End this worker (``os._exit``) once ``parent`` is gone.

    A pool worker holds units the parent submitted ahead; if the parent is killed, the
    worker would otherwise keep computing them and writing records into a run folder that
    nobody watches (and that a user may be about to delete or restart into). Exiting loses
    only the cells in flight, which a rerun recomputes.
    """
    while True:
        time.sleep(ORPHAN_POLL_S)
        if os.getppid() != parent:
            logging.getLogger(__name__).warning(
                "bench worker %d: the parent process %d is gone; exiting", os.getpid(), parent
            )
            os._exit(1)


def _worker_init(level: int, parent: int) -> None:
    """Set up a spawned worker: the parent's logging level, to stderr, and a watch that ends
    the worker when the parent process dies."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s [%(process)d] %(message)s")
    logging.getLogger("unlearnshield").setLevel(level)
    threading.Thread(
        target=_exit_when_orphaned, args=(parent,), name="orphan-watch", daemon=True
    ).start()


@EXECUTORS.register("process")
def run_processes(
    units: Sequence[Unit], runtime: Runtime, options: ExecutorOptions
) -> SweepSummary:
    """Run the units on a pool of ``workers`` spawned processes (CUDA-safe start method)."""
    start = time.perf_counter()
    summary = SweepSummary("process", len(units))
    context = multiprocessing.get_context("spawn")
    level = logging.getLogger("unlearnshield").getEffectiveLevel()
    with (
        ProcessPoolExecutor(
            max_workers=options.workers,
            mp_context=context,
            initializer=_worker_init,
            initargs=(level, os.getpid()),
        ) as pool,
        _bar(len(units), options, f"bench ×{options.workers}") as bar,
    ):
        futures = {pool.submit(run_unit, unit, runtime): unit for unit in units}
        for future in as_completed(futures):
            try:
                summary.add(future.result())
            except Exception as error:
                summary.failed.append(_failure(futures[future], error))
            bar.update(1)
    summary.seconds = time.perf_counter() - start
    return summary


def gpus_per_task(runtime: Runtime, cluster_gpus: float | None = None) -> float:
    """GPUs a Ray task requests: ``runtime.gpus_per_task`` where GPUs exist, else 0.

    Args:
        runtime: the run's settings (``device = "cpu"`` never asks for a GPU).
        cluster_gpus: GPUs the Ray cluster reports (its workers may have GPUs the driver
            lacks); default None, whether CUDA is available in this process.
    """
    if runtime.device == "cpu":
        return 0.0
    if cluster_gpus is None:
        import torch

        cluster_gpus = float(torch.cuda.device_count())
    return runtime.gpus_per_task if cluster_gpus > 0 else 0.0


@EXECUTORS.register("ray")
def run_ray(units: Sequence[Unit], runtime: Runtime, options: ExecutorOptions) -> SweepSummary:
    """Run one Ray task per unit (one per cell at ``attack.batch = 1``).

    Without ``options.address`` a local Ray instance with ``options.workers`` CPUs is
    started and shut down afterwards; with it, the tasks go to that cluster, whose workers
    must see the run folder at the same path (a shared file system) and have this package
    installed. Each task asks for one CPU and, when CUDA is present, ``gpus_per_task`` GPUs.

    Raises:
        ImportError: Ray is not installed (``pip install 'unlearnshield[ray]'``).
    """
    try:
        import ray
    except ImportError as err:
        raise ImportError(
            "the ray executor needs Ray: pip install 'unlearnshield[ray]' (or ray>=2.9)"
        ) from err

    start = time.perf_counter()
    summary = SweepSummary("ray", len(units))
    started_here = not ray.is_initialized()
    if started_here:
        if options.address:
            ray.init(address=options.address, log_to_driver=False)
        else:
            ray.init(
                num_cpus=options.workers,
                include_dashboard=False,
                log_to_driver=False,
            )
    try:
        gpus = gpus_per_task(runtime, float(ray.cluster_resources().get("GPU", 0)))
        task = ray.remote(num_cpus=1, num_gpus=gpus)(run_unit)
        pending = {task.remote(unit, runtime): unit for unit in units}
        with _bar(len(units), options, "bench (ray)") as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    unit = pending.pop(ref)
                    try:
                        summary.add(ray.get(ref))
                    except Exception as error:
                        summary.failed.append(_failure(unit, error))
                    bar.update(1)
    finally:
        if started_here:
            ray.shutdown()
    summary.seconds = time.perf_counter() - start
    return summary
