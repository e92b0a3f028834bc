"""The paper's own numbers (UnlearnShield, Tables 1–4 and §4.4), to print beside ours.

Keys: layout → dataset → row label → metric. Accuracies are fractions here (the paper prints
percentages); OutDiff is in the softmax space as ours (the paper does not say which space;
see :mod:`unlearnshield.metrics.forgetting`). The MIA numbers are what the paper calls
"AUC"; they match SalUn's SVC MIA-efficacy rate, so they sit in our ``mia_efficacy``
column. Row labels are the labels the paper presets give their rows.
"""

from __future__ import annotations

from typing import Any

_TABLE1_CIFAR = {
    "Baseline": (0.7530, 0.0135, 86.734, 0.0000),
    "DGP": (0.6419, 0.0286, 85.411, 0.0257),
    "Noise": (0.4736, 0.0988, 10.000, 1.7159),
    "Outpost": (0.5746, 0.0341, 86.012, 0.0164),
    "Pruning": (0.5613, 0.0374, 86.212, 0.0114),
    "Soteria": (0.7516, 0.0185, 86.435, 0.0070),
    "Ours": (0.2882, 0.2180, 86.238, 0.0176),
}
_TABLE1_STL = {
    "Baseline": (0.7261, 0.0143, 62.655, 0.0000),
    "DGP": (0.5092, 0.0637, 61.575, 0.0226),
    "Noise": (0.6117, 0.0673, 9.166, 1.7346),
    "Outpost": (0.5156, 0.0581, 61.760, 0.0187),
    "Pruning": (0.5075, 0.0593, 62.520, 0.0107),
    "Soteria": (0.6901, 0.0241, 62.579, 0.0009),
    "Ours": (0.3277, 0.1873, 62.570, 0.0183),
}


def _rows(table: dict[str, tuple[float, float, float, float]]) -> dict[str, dict[str, float]]:
    """(SSIM, LPIPS, Acc %, OutDiff) tuples → metric dicts (accuracy as a fraction)."""
    return {
        label: {"ssim": s, "lpips": lp, "test_accuracy": acc / 100, "outdiff": od}
        for label, (s, lp, acc, od) in table.items()
    }


PAPER_RESULTS: dict[str, dict[str, dict[str, dict[str, float]]]] = {
    "table1": {"cifar10": _rows(_TABLE1_CIFAR), "stl10": _rows(_TABLE1_STL)},
    "table2": {
        "cifar10": _rows(
            {
                "Ours": (0.2882, 0.2180, 86.238, 0.0176),
                "Ours (w/o AIM)": (0.2798, 0.2275, 21.411, 1.4209),
            }
        ),
        "stl10": _rows(
            {
                "Ours": (0.3277, 0.1873, 62.570, 0.0183),
                "Ours (w/o AIM)": (0.2956, 0.2041, 21.352, 1.4423),
            }
        ),
    },
    "table3": {
        "cifar10": _rows(
            {
                "Sparse / Ours": (0.2544, 0.2700, 85.880, 0.0104),
                "SalUn / Ours": (0.3022, 0.1565, 86.730, 0.0130),
            }
        ),
        "stl10": _rows(
            {
                "Sparse / Ours": (0.2575, 0.2336, 62.513, 0.0188),
                "SalUn / Ours": (0.2649, 0.2116, 63.688, 0.0173),
            }
        ),
    },
    "table4": {
        "cifar10": _rows(
            {"Baseline": (0.7295, 0.0134, 92.411, 0.0000), "Ours": (0.2834, 0.2394, 92.126, 0.0117)}
        ),
        "stl10": _rows(
            {"Baseline": (0.7700, 0.0087, 63.904, 0.0000), "Ours": (0.3222, 0.2026, 63.698, 0.0182)}
        ),
    },
    "mia": {
        "cifar10": {"Baseline": {"mia_efficacy": 0.1214}, "Ours": {"mia_efficacy": 0.1226}},
        "stl10": {"Baseline": {"mia_efficacy": 0.1597}, "Ours": {"mia_efficacy": 0.1635}},
    },
    "adaptive": {
        "cifar10": {"defense-aware / Ours": {"ssim": 0.3074, "lpips": 0.1887}},
        "stl10": {"defense-aware / Ours": {"ssim": 0.3014, "lpips": 0.1631}},
    },
    "cost": {
        "cifar10": {"Ours": {"protect_seconds": 0.3898}},
        "stl10": {"Ours": {"protect_seconds": 0.4253}},
    },
}
"""The paper's numbers by layout, dataset, row label and metric."""


def paper_value(table: str, dataset: str, row: str, metric: str) -> float | None:
    """The paper's number for one entry of a table, or None where it reports none."""
    entry: Any = PAPER_RESULTS.get(table, {}).get(dataset, {}).get(row, {})
    return entry.get(metric)
