"""The report of a run folder, rebuilt from its records alone: tables, grids and plots.

``write_report(run_dir)`` reads every finished record and writes

* ``report.md``: the sweep's table in the layout of the paper's table (``sweep.layout``:
  Table 1 puts defenses in columns, the others put settings in rows), mean ± std over the
  forget samples (sample standard deviation), with the paper's numbers beside ours for
  paper presets; the calibration rows; the cost table;
* ``figures/grid-*.png``: truth and reconstructions per defense (the paper's Figs. 2, 3, 5);
* ``figures/lambda-*.png``: the λ1/λ2 trade-off (Fig. 4), where a block sweeps them;
* ``records.jsonl``: one flat row per record (dotted keys), for pandas and friends.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from unlearnshield._io import atomic_path, atomic_write_text
from unlearnshield._registry import Registry
from unlearnshield.bench.paper import paper_value
from unlearnshield.bench.runner import flatten_config, iter_records, record_path
from unlearnshield.metrics import CALIBRATION_ROWS
from unlearnshield.visualize import save_grid

logger = logging.getLogger(__name__)

DEFENSE_ORDER = ("none", "dgp", "noise", "outpost", "pruning", "soteria", "shield")
"""Column order of the defenses: the paper's Table 1 order."""

GRID_SAMPLES = 8
"""Forget samples shown per grid."""


@dataclasses.dataclass(frozen=True)
class Metric:
    """One column (or row) of a table.

    Attributes:
        name: where the value is: a key of ``record["metrics"]``, or ``times.<key>``.
        title: the header, with the direction that is better for a defense.
        scale: multiplier for display (100 for accuracies in %).
        digits: decimals shown.
    """

    name: str
    title: str
    scale: float = 1.0
    digits: int = 4


METRICS = {
    m.name: m
    for m in (
        Metric("ssim", "SSIM ↓"),
        Metric("lpips", "LPIPS ↑"),
        Metric("psnr", "PSNR (dB) ↓", digits=2),
        Metric("test_accuracy", "Acc. (%) ↑", scale=100, digits=2),
        Metric("outdiff", "OutDiff ↓"),
        Metric("cos_delta", "cos(Δ, Δ*)"),
        Metric("attack_cosine", "attack cos"),
        Metric("mia_efficacy", "MIA-efficacy (SVC)"),
        Metric("mia_auc", "MIA AUC (p_y, held-out)"),
        Metric("mia_tpr_at_fpr", "TPR @ 1% FPR"),
        Metric("times.protect_recorded_s", "defense (s)", digits=4),
        Metric("times.attack_s", "attack per cell (s)", digits=1),
        Metric("times.unlearn_recorded_s", "unlearning (s)", digits=3),
    )
}


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a sweep's records become the paper's table.

    Attributes:
        title: the table's caption.
        metrics: the metrics shown, in order.
        rows: the settings that make a row (``"defense"``, ``"unlearning"``,
            ``"attacker"``); empty for Table 1, whose columns are the defenses and whose
            rows are the metrics.
    """

    title: str
    metrics: tuple[str, ...]
    rows: tuple[str, ...] = ()


LAYOUTS: Registry[Layout] = Registry("report layout")
LAYOUTS.register("table1")(
    Layout(
        "Table 1: defenses against UIA",
        ("ssim", "lpips", "psnr", "test_accuracy", "outdiff", "cos_delta", "mia_efficacy"),
    )
)
LAYOUTS.register("table2")(
    Layout("Table 2: ablation of AIM", ("ssim", "lpips", "outdiff", "test_accuracy"), ("defense",))
)
LAYOUTS.register("table3")(
    Layout(
        "Table 3: unlearning methods",
        ("ssim", "lpips", "test_accuracy", "outdiff"),
        ("unlearning", "defense"),
    )
)
LAYOUTS.register("table4")(
    Layout("Table 4: ConvNet", ("ssim", "lpips", "test_accuracy", "outdiff"), ("defense",))
)
LAYOUTS.register("fig4")(
    Layout(
        "Fig. 4: λ1 (L_acc) and λ2 (L_forget)",
        ("ssim", "lpips", "test_accuracy", "outdiff", "cos_delta"),
        ("defense",),
    )
)
LAYOUTS.register("mia")(
    Layout(
        "Membership inference on the forget samples (§4.4)",
        ("mia_efficacy", "mia_auc", "mia_tpr_at_fpr", "test_accuracy", "outdiff"),
        ("defense",),
    )
)
LAYOUTS.register("adaptive")(
    Layout(
        "Adaptive (defense-aware) UIA (§4.4, Fig. 5)",
        ("ssim", "lpips", "psnr", "attack_cosine"),
        ("attacker", "defense"),
    )
)
LAYOUTS.register("defenses")(
    Layout(
        "Every defense against every attacker",
        ("ssim", "lpips", "test_accuracy", "outdiff", "cos_delta", "attack_cosine"),
        ("attacker", "defense"),
    )
)
LAYOUTS.register("cost")(
    Layout(
        "Computation cost of the defense (§4.4)",
        ("times.protect_recorded_s", "outdiff", "cos_delta"),
        ("defense",),
    )
)


# ---------------------------------------------------------------------------------------------
# Reading records


def value_of(record: Mapping[str, Any], metric: str) -> float | None:
    """A metric of a record (``times.<key>`` reads the wall times); None when absent."""
    if metric.startswith("times."):
        value = record.get("times", {}).get(metric[len("times.") :])
    else:
        value = record.get("metrics", {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def setting(record: Mapping[str, Any], what: str) -> str:
    """The display label of one setting of a record: defense, unlearning, attacker, ..."""
    config = record["config"]
    display = record.get("display", {})
    if what == "defense":
        return str(display.get("defense_label") or config["defense.name"])
    if what == "unlearning":
        return str(display.get("unlearning_label") or config["unlearning.method"])
    if what == "attacker":
        return str(config["attack.attacker"])
    if what == "dataset":
        return str(config["dataset"])
    if what == "model":
        options = {k.split(".")[-1]: v for k, v in config.items() if k.startswith("model.options.")}
        extra = ", ".join(f"{k} {v}" for k, v in sorted(options.items()))
        return f"{config['model.name']}" + (f" ({extra})" if extra else "")
    raise KeyError(what)


def _defense_rank(record: Mapping[str, Any]) -> tuple[int, str]:
    name = record["config"]["defense.name"]
    order = DEFENSE_ORDER.index(name) if name in DEFENSE_ORDER else len(DEFENSE_ORDER)
    return order, setting(record, "defense")


def _group(
    records: Iterable[Mapping[str, Any]], key: Callable[[Mapping[str, Any]], Any]
) -> dict[Any, list[Mapping[str, Any]]]:
    groups: dict[Any, list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault(key(record), []).append(record)
    return groups


def mean_std(values: Sequence[float]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (0 for one value); None for no values."""
    if not values:
        return None
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def _format(metric: Metric, values: Sequence[float]) -> str:
    stats = mean_std(values)
    if stats is None:
        return "n/a"
    mean, std = stats
    d = metric.digits
    return f"{mean * metric.scale:.{d}f} ± {std * metric.scale:.{d}f}"


def _format_paper(metric: Metric, value: float | None) -> str:
    return "" if value is None else f"{value * metric.scale:.{metric.digits}f}"


def _block_dims(layout: Layout) -> tuple[str, ...]:
    dims = ("dataset", "model", "unlearning", "attacker")
    return tuple(d for d in dims if d not in layout.rows)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80] or "block"


# ---------------------------------------------------------------------------------------------
# Tables


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _n_samples(records: Sequence[Mapping[str, Any]]) -> int:
    return len({(r["config"]["dataset"], r["forget"]["index"], r["seed"]) for r in records})


def layout_tables(
    records: Sequence[Mapping[str, Any]], layout_name: str, paper: str = ""
) -> list[tuple[str, str]]:
    """The sweep's main tables as ``(title, markdown)`` pairs, one per block of settings.

    Args:
        records: finished records (any order).
        layout_name: a name of :data:`LAYOUTS`.
        paper: a key of :data:`~unlearnshield.bench.paper.PAPER_RESULTS` to print the
            paper's numbers beside ours; default "" (none).
    """
    layout = LAYOUTS.get(layout_name)
    metrics = [METRICS[m] for m in layout.metrics]
    out = []
    blocks = _group(records, lambda r: tuple(setting(r, d) for d in _block_dims(layout)))
    for block, members in sorted(blocks.items()):
        dataset = str(block[0])
        title = " · ".join(block) + f" (n = {_n_samples(members)} forget samples)"
        if not layout.rows:
            out.append((title, _columns_table(members, metrics, paper, layout_name, dataset)))
        else:
            out.append((title, _rows_table(members, metrics, layout, paper, layout_name, dataset)))
    return out


def _columns_table(
    records: Sequence[Mapping[str, Any]],
    metrics: Sequence[Metric],
    paper: str,
    layout_name: str,
    dataset: str,
) -> str:
    columns = _group(sorted(records, key=_defense_rank), lambda r: setting(r, "defense"))
    labels = list(columns)
    rows = []
    for metric in metrics:
        values = [
            [v for r in columns[c] if (v := value_of(r, metric.name)) is not None] for c in labels
        ]
        rows.append([metric.title] + [_format(metric, v) for v in values])
        if paper:
            numbers = [paper_value(paper, dataset, c, metric.name) for c in labels]
            if any(n is not None for n in numbers):
                rows.append(["  paper"] + [_format_paper(metric, n) for n in numbers])
    return _table(["Metric", *labels], rows)


def _rows_table(
    records: Sequence[Mapping[str, Any]],
    metrics: Sequence[Metric],
    layout: Layout,
    paper: str,
    layout_name: str,
    dataset: str,
) -> str:
    ordered = sorted(
        records, key=lambda r: (setting(r, "unlearning"), setting(r, "attacker"), _defense_rank(r))
    )
    groups = _group(ordered, lambda r: " / ".join(setting(r, d) for d in layout.rows))
    rows = []
    for label, members in groups.items():
        values = [[v for r in members if (v := value_of(r, m.name)) is not None] for m in metrics]
        rows.append([label] + [_format(m, v) for m, v in zip(metrics, values, strict=True)])
        if paper:
            numbers = [paper_value(paper, dataset, label, m.name) for m in metrics]
            if any(n is not None for n in numbers):
                rows.append(
                    [f"{label} (paper)"]
                    + [_format_paper(m, n) for m, n in zip(metrics, numbers, strict=True)]
                )
    return _table(["Setting", *(m.title for m in metrics)], rows)


def calibration_table(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Per dataset: the calibration rows (random init, mean colour, 4×4 block mean) scored
    like reconstructions, over the distinct forget samples."""
    out = []
    for dataset, members in sorted(_group(records, lambda r: r["config"]["dataset"]).items()):
        unique = {(r["forget"]["index"], r["seed"]): r for r in members if r.get("calibration")}
        rows = []
        for name in CALIBRATION_ROWS:
            cells = [r["calibration"].get(name, {}) for r in unique.values()]
            row = [name]
            for metric in ("ssim", "lpips", "psnr"):
                values = [c[metric] for c in cells if isinstance(c.get(metric), int | float)]
                row.append(_format(METRICS[metric], values))
            rows.append(row)
        title = f"{dataset}: calibration rows (n = {len(unique)} forget samples)"
        out.append((title, _table(["Row", "SSIM", "LPIPS", "PSNR (dB)"], rows)))
    return out


def cost_table(records: Sequence[Mapping[str, Any]]) -> str:
    """Wall times per defense: the defense itself, the attack per cell, the unlearning."""
    groups = _group(
        sorted(records, key=_defense_rank),
        lambda r: (setting(r, "dataset"), setting(r, "model"), setting(r, "defense")),
    )
    metrics = [
        METRICS[m]
        for m in ("times.protect_recorded_s", "times.attack_s", "times.unlearn_recorded_s")
    ]
    rows = []
    for (dataset, model, defense), members in groups.items():
        devices = sorted({str(r.get("environment", {}).get("device", "?")) for r in members})
        values = [[v for r in members if (v := value_of(r, m.name)) is not None] for m in metrics]
        rows.append(
            [dataset, model, defense, ", ".join(devices)]
            + [_format(m, v) for m, v in zip(metrics, values, strict=True)]
        )
    return _table(["Dataset", "Model", "Defense", "Device", *(m.title for m in metrics)], rows)


# ---------------------------------------------------------------------------------------------
# Figures


def _read_png(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        array = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
    return array.permute(2, 0, 1).float() / 255.0


def write_grids(records: Sequence[Mapping[str, Any]], run_dir: Path, folder: Path) -> list[Path]:
    """One PNG per block of settings: a truth row, then one row of reconstructions per
    defense, the same forget samples in every column (up to :data:`GRID_SAMPLES`)."""
    out = []
    dims = ("dataset", "model", "unlearning", "attacker")
    for block, members in sorted(
        _group(records, lambda r: tuple(setting(r, d) for d in dims)).items()
    ):
        with_images = [r for r in members if r.get("files", {}).get("reconstruction")]
        if not with_images:
            continue
        samples = sorted({(r["forget"]["rank"], r["forget"]["index"]) for r in with_images})[
            :GRID_SAMPLES
        ]
        wanted = [s[1] for s in samples]
        rows, labels = [], []
        by_defense = _group(sorted(with_images, key=_defense_rank), lambda r: setting(r, "defense"))
        truth_row: dict[int, torch.Tensor] = {}
        for label, recs in by_defense.items():
            images = {}
            for r in recs:
                index = r["forget"]["index"]
                if index not in wanted or r["seed"] != recs[0]["seed"]:
                    continue
                folder_of = record_path(run_dir, r["key"]).parent
                recon, truth = (folder_of / r["files"][k] for k in ("reconstruction", "truth"))
                if not (recon.exists() and truth.exists()):
                    logger.warning("cell %s: image files missing; left out of the grid", r["key"])
                    continue
                images[index] = _read_png(recon)
                truth_row.setdefault(index, _read_png(truth))
            if images:
                blank = torch.ones_like(next(iter(images.values())))
                rows.append(torch.stack([images.get(i, blank) for i in wanted]))
                labels.append(label)
        if not rows:
            continue
        blank = torch.ones_like(rows[0][0])
        rows.insert(0, torch.stack([truth_row.get(i, blank) for i in wanted]))
        labels.insert(0, "truth")
        path = folder / f"grid-{_slug('-'.join(block))}.png"
        save_grid(path, rows, row_labels=labels, scale=3 if rows[0].shape[-1] <= 48 else 1)
        out.append(path)
    return out


def _lambdas(record: Mapping[str, Any]) -> tuple[float, float]:
    config = record["config"]
    return (
        config["defense.hyperparameters.lambda_acc"],
        config["defense.hyperparameters.lambda_forget"],
    )


def write_lambda_plots(records: Sequence[Mapping[str, Any]], folder: Path) -> list[Path]:
    """Fig. 4: privacy (SSIM, LPIPS) and usability (Acc., OutDiff) against λ1, one line per
    λ2, for every block whose shield cells sweep λ1 or λ2."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    out = []
    shield = [r for r in records if r["config"]["defense.name"] == "shield"]
    dims = ("dataset", "model", "unlearning", "attacker")
    for block, members in sorted(
        _group(shield, lambda r: tuple(setting(r, d) for d in dims)).items()
    ):
        points = _group(members, _lambdas)
        if len(points) < 2:
            continue
        names = ("ssim", "lpips", "test_accuracy", "outdiff")
        figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2))
        lambda_forget = sorted({p[1] for p in points})
        for axis, name in zip(axes, names, strict=True):
            metric = METRICS[name]
            for l2 in lambda_forget:
                xs = sorted(p[0] for p in points if p[1] == l2)
                means, stds = [], []
                for l1 in xs:
                    stats = mean_std(
                        [v for r in points[(l1, l2)] if (v := value_of(r, name)) is not None]
                    )
                    means.append(stats[0] * metric.scale if stats else math.nan)
                    stds.append(stats[1] * metric.scale if stats else math.nan)
                axis.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=f"λ2 = {l2:g}")
            axis.set_xlabel("λ1")
            axis.set_title(metric.title)
            axis.grid(alpha=0.3)
        axes[0].legend(fontsize="small")
        figure.suptitle(" · ".join(block))
        figure.tight_layout()
        path = folder / f"lambda-{_slug('-'.join(block))}.png"
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=110)
        plt.close(figure)
        out.append(path)
    return out


# ---------------------------------------------------------------------------------------------
# The report


def flat_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """One record as a single level of dotted keys (``metrics.ssim``, ``config.dataset``)."""
    row: dict[str, Any] = {"key": record["key"], "seed": record["seed"]}
    for section in ("display", "forget", "metrics", "times", "environment", "files"):
        for name, value in flatten_config(record.get(section) or {}).items():
            row[f"{section}.{name}"] = value
    for name, value in record["config"].items():
        row[f"config.{name}"] = value
    return row


@dataclasses.dataclass
class Report:
    """What :func:`write_report` wrote.

    Attributes:
        path: the markdown report.
        records: how many records it covers.
        main: the main tables as markdown (what the CLI prints).
        figures: the figures written.
        jsonl: the flat records file.
    """

    path: Path
    records: int
    main: str
    figures: list[Path]
    jsonl: Path


def write_report(
    run_dir: str | Path, *, records: Sequence[Mapping[str, Any]] | None = None
) -> Report:
    """Write ``report.md``, its figures and ``records.jsonl`` into ``run_dir``.

    Args:
        run_dir: a run folder of :func:`~unlearnshield.bench.run_sweep`.
        records: the records to report; default None reads every finished one.

    Returns:
        A :class:`Report`.

    Raises:
        ValueError: the folder holds no finished record.
    """
    run_dir = Path(run_dir)
    records = list(records if records is not None else iter_records(run_dir))
    if not records:
        raise ValueError(f"{run_dir} holds no finished cell record (cells/*/*.json)")
    folder = run_dir / "figures"

    sections = _group(
        records,
        lambda r: (
            r["display"].get("sweep", ""),
            r["display"].get("layout", "table1"),
            r["display"].get("paper", ""),
        ),
    )
    main_parts, text = [], [f"# Benchmark report: {run_dir.name}", ""]
    text.append(
        f"{len(records)} cell records. Values are mean ± sample std over the forget samples; "
        "arrows say which direction is better for the defense. Rebuilt from the records in "
        "`cells/` by `unlearnshield report`."
    )
    for (sweep, layout_name, paper), members in sorted(sections.items()):
        layout = LAYOUTS.get(layout_name) if layout_name in LAYOUTS else LAYOUTS.get("table1")
        text += ["", f"## {sweep}: {layout.title}", ""]
        description = members[0]["display"].get("description")
        if description:
            text += [str(description), ""]
        if paper:
            text.append(
                f"Rows marked *paper* are the paper's own numbers ({paper}); ours ran on the "
                "data, models and budgets recorded in each cell."
            )
            text.append("")
        for title, table in layout_tables(
            members, layout_name if layout_name in LAYOUTS else "table1", paper
        ):
            part = f"### {title}\n\n{table}"
            text += [part, ""]
            main_parts.append(part)

    text += [
        "## Calibration rows",
        "",
        "Trivial reconstructions scored like the attack's: an attack is informative only "
        "where it beats them.",
        "",
    ]
    for title, table in calibration_table(records):
        text += [f"### {title}", "", table, ""]
    text += [
        "## Cost",
        "",
        "Wall times as recorded (device and threads in each record).",
        "",
        cost_table(records),
        "",
    ]

    figures = write_grids(records, run_dir, folder) + write_lambda_plots(records, folder)
    if figures:
        text += ["## Figures", ""]
        text += [f"![{p.stem}](figures/{p.name})" for p in figures]
        text.append("")
    implementations = records[0].get("implementations", {})
    text += [
        "## Metric implementations",
        "",
        "```",
        json.dumps(implementations, indent=2),
        "```",
        "",
    ]

    jsonl = run_dir / "records.jsonl"
    atomic_write_text(
        jsonl, "".join(json.dumps(flat_row(r), sort_keys=True) + "\n" for r in records)
    )
    path = atomic_write_text(run_dir / "report.md", "\n".join(text))
    logger.info("wrote %s (%d records, %d figures)", path, len(records), len(figures))
    return Report(path, len(records), "\n\n".join(main_parts), figures, jsonl)
