"""``unlearnshield demo``: the whole pipeline end to end, offline, in a few minutes."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

from unlearnshield.bench import ExecutorOptions, SpecError, apply_overrides, load_preset, run_sweep
from unlearnshield.bench.report import write_report
from unlearnshield.cli._common import UsageError, parse_assignments

logger = logging.getLogger(__name__)

DEMO_PRESET = "quick"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train, unlearn, attack and protect on the embedded digits (offline, minutes)",
        description=(
            "Runs the 'quick' benchmark preset: trains a small ConvNet on scikit-learn's "
            "embedded digits, unlearns a few training samples one at a time with one-step "
            "gradient ascent, attacks the unprotected and the UnlearnShield-protected "
            "releases with the unlearning-inversion attack, and prints the table. Writes "
            "report.md, grid.png (truth vs reconstructions) and records.jsonl into --out. "
            "With --dataset cifar10 --data-root P it runs the same on CIFAR-10 (the cpu "
            "training recipe: 15,000 images, 4 epochs). A second run with the same --out "
            "reuses the finished cells."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    p.add_argument("--dataset", choices=("digits", "cifar10"), default="digits")
    p.add_argument("--data-root", default=None, help="where CIFAR-10 lies (not for digits)")
    p.add_argument("--samples", type=int, default=None, help="forget samples (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the unlearning, defense, attack")
    p.add_argument("--lpips-backbone", default=None, help="AlexNet backbone file for LPIPS")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a setting of the quick preset (see 'unlearnshield bench')",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    overrides = {
        "data.datasets": [args.dataset],
        "sweep.seeds": [args.seed],
        "runtime.threads": 1,
        "runtime.progress": "auto",
    }
    if args.dataset == "digits" and args.data_root is not None:
        raise UsageError("the digits ship with scikit-learn; --data-root is for cifar10")
    if args.dataset != "digits":
        overrides.update({"data.train_subset": "recipe", "training.options": {}})
        if args.data_root is not None:
            overrides["runtime.data_root"] = str(args.data_root)
    if args.samples is not None:
        overrides["data.forget_samples"] = args.samples
    if args.lpips_backbone is not None:
        overrides["runtime.lpips_backbone"] = str(args.lpips_backbone)
    overrides.update(parse_assignments(args.set))
    try:
        spec = apply_overrides(load_preset(DEMO_PRESET), overrides)
    except SpecError as err:
        raise UsageError(str(err)) from err

    print(
        f"demo: {spec['data']['forget_samples']} forget samples of {args.dataset}, "
        f"defenses {', '.join(d['name'] for d in spec['defenses'])}, "
        f"attack {spec['attack']['budget']} budget with {spec['attack']['options']}"
    )
    # the two defenses' units run side by side, one single-threaded process each: on two
    # cores that beats two threads per process, which contend for the cores when shared
    workers = max(1, min(2, os.cpu_count() or 1))
    executor = "process" if workers > 1 else "local"
    try:
        summary = run_sweep(
            spec, args.out, executor=executor, options=ExecutorOptions(workers=workers)
        )
    except SpecError as err:
        raise UsageError(str(err)) from err
    if summary.failed:
        for unit, error in summary.failed:
            print(f"demo: unit {unit} failed: {error}")
        return 1
    report = write_report(args.out)
    grids = [p for p in report.figures if p.name.startswith("grid-")]
    if grids:
        shutil.copyfile(grids[0], args.out / "grid.png")
    print(report.main)
    unavailable = _lpips_unavailable(args.out)
    if unavailable:
        print(f"\nLPIPS was not computed: {unavailable.rstrip('.')}. (demo: --lpips-backbone FILE)")
    print(
        f"\ndemo: {summary.written} cells run, {summary.skipped} reused, in "
        f"{summary.seconds:.0f} s; wrote {report.path}, {args.out / 'grid.png'} and "
        f"{report.jsonl}"
    )
    return 0


def _lpips_unavailable(run_dir: Path) -> str | None:
    """Why the records of ``run_dir`` have no LPIPS, or None when they have it."""
    from unlearnshield.bench import iter_records

    for record in iter_records(run_dir):
        return record.get("implementations", {}).get("lpips", {}).get("unavailable")
    return None
