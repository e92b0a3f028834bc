"""``unlearnshield report``: tables and figures of a run folder, from its records alone."""

from __future__ import annotations

import argparse
from pathlib import Path

from unlearnshield.bench.report import write_report
from unlearnshield.cli._common import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write RUN_DIR/report.md and its figures from the finished cell records",
        description=(
            "Read every finished cell record of a run folder and write report.md (the "
            "sweep's table in the paper's layout, mean ± std over forget samples, the "
            "paper's numbers beside ours for paper presets, calibration rows, a cost "
            "table), figures/ (truth vs reconstruction grids per defense, the λ1/λ2 plot) "
            "and records.jsonl. Nothing but the records is read, so a report can be rebuilt "
            "at any time, also while a sweep is still running."
        ),
    )
    p.add_argument("run_dir", type=Path, help="the run folder of 'unlearnshield bench'")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not args.run_dir.is_dir():
        raise UsageError(f"{args.run_dir} is not a folder")
    try:
        report = write_report(args.run_dir)
    except ValueError as err:
        raise UsageError(str(err)) from err
    print(report.main)
    print(
        f"\nwrote {report.path} ({report.records} records), {len(report.figures)} figure(s) "
        f"and {report.jsonl}"
    )
    return 0
