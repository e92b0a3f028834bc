"""``unlearnshield bench``: run a sweep of a preset into a run folder, resumably."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from unlearnshield.bench import (
    EXECUTORS,
    ExecutorOptions,
    SpecError,
    apply_overrides,
    load_preset,
    parse_shard,
    plan_cells,
    plan_units,
    preset_names,
    run_sweep,
    select_shard,
)
from unlearnshield.cli._common import UsageError, parse_assignments

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark sweep (a preset) into a run folder; reruns resume",
        description=(
            "Expand a preset into its sorted cells (dataset × model × unlearning × defense × "
            "attacker × forget sample × seed) and run the unfinished ones. Each finished cell "
            "is one JSON record (plus its reconstruction as PNG) under RUN_DIR/cells, so a "
            "killed sweep resumes where it stopped; θo and θu are cached under RUN_DIR/cache. "
            "Forget samples that share every other setting are attacked in one batched run "
            "(attack.batch), and every executor forms the same batches, so at equal "
            "runtime.threads (default 1) the records are bitwise equal whichever executor "
            "ran them. Presets: " + ", ".join(preset_names()) + ". Turn the records into "
            "tables and figures with 'unlearnshield report RUN_DIR'."
        ),
    )
    p.add_argument("--preset", required=True, help="a preset name or a .toml file")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a setting by its dotted name, e.g. --set attack.budget=paper "
        "--set data.forget_samples=2 --set defenses.1.options.lr=1e-4 (repeatable)",
    )
    p.add_argument("--out", type=Path, required=True, help="the run folder")
    p.add_argument(
        "--executor",
        choices=EXECUTORS.names(),
        default=None,
        help="local (this process), process (a pool of --workers) or ray; default local, "
        "or process when --workers > 1",
    )
    p.add_argument("--workers", type=int, default=1, help="processes (or local Ray CPUs)")
    p.add_argument("--shard", default=None, help="i/n: run only the units with index %% n == i")
    p.add_argument("--address", default=None, help="address of a running Ray cluster")
    p.add_argument("--data-root", default=None, help="sets runtime.data_root")
    p.add_argument("--lpips-backbone", default=None, help="sets runtime.lpips_backbone")
    p.add_argument(
        "--reuse",
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="copy finished records and cached models with the same keys from this earlier "
        "run folder instead of recomputing them (repeatable; sets runtime.reuse)",
    )
    p.add_argument("--dry-run", action="store_true", help="list the plan and run nothing")
    p.set_defaults(run=run)


def load_spec(args: argparse.Namespace) -> dict:
    """The preset with the command line's overrides applied."""
    overrides = parse_assignments(args.set)
    if args.data_root is not None:
        overrides["runtime.data_root"] = str(args.data_root)
    if getattr(args, "lpips_backbone", None) is not None:
        overrides["runtime.lpips_backbone"] = str(args.lpips_backbone)
    if getattr(args, "reuse", None):
        missing = [d for d in args.reuse if not Path(d, "cells").is_dir()]
        if missing:
            raise UsageError(f"--reuse {missing[0]}: not a run folder (no cells/ inside)")
        overrides["runtime.reuse"] = [str(d) for d in args.reuse]
    try:
        return apply_overrides(load_preset(args.preset), overrides)
    except SpecError as err:
        raise UsageError(str(err)) from err


def run(args: argparse.Namespace) -> int:
    spec = load_spec(args)
    try:
        shard = parse_shard(args.shard)
        cells = plan_cells(spec)
        units = select_shard(plan_units(cells), shard)
        options = ExecutorOptions(workers=args.workers, address=args.address)
    except (SpecError, ValueError) as err:
        raise UsageError(str(err)) from err
    executor = args.executor or ("process" if args.workers > 1 else "local")
    n_cells = sum(len(u.cells) for u in units)
    print(
        f"bench {spec['sweep']['name']}: {len(cells)} cells in {len(plan_units(cells))} units"
        + (f"; shard {args.shard}: {n_cells} cells in {len(units)} units" if shard else "")
        + f"; executor {executor}; run folder {args.out}"
    )
    if args.dry_run:
        for unit in units:
            first = unit.cells[0]
            print(
                f"  unit {unit.key}: {first.config['dataset']} {first.config['model']['name']} "
                f"{first.config['unlearning']['method']} {first.display['defense_label']} "
                f"{first.config['attack']['attacker']} seed {first.config['seed']}, "
                f"{len(unit.cells)} sample(s)"
            )
        return 0
    try:
        summary = run_sweep(spec, args.out, executor=executor, options=options, shard=shard)
    except ImportError as err:
        raise UsageError(str(err)) from err
    print(
        f"bench {spec['sweep']['name']}: {summary.written} cells written, {summary.skipped} "
        f"already finished, {len(summary.failed)} unit(s) failed, in {summary.seconds:.0f} s"
    )
    for unit, error in summary.failed:
        print(f"  failed unit {unit}: {error}")
    return 1 if summary.failed else 0
