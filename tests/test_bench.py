"""The benchmark harness: specs and keys, resumable runs, executors, presets, report, CLI."""

import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from unlearnshield.bench import (
    ExecutorOptions,
    SpecError,
    apply_overrides,
    deterministic_view,
    iter_records,
    load_preset,
    parse_shard,
    plan_cells,
    plan_units,
    preset_names,
    read_record,
    record_path,
    run_sweep,
    run_unit,
    select_shard,
)
from unlearnshield.bench.report import LAYOUTS, write_report
from unlearnshield.bench.runner import Runtime
from unlearnshield.checkpoints import load_checkpoint
from unlearnshield.cli import main
from unlearnshield.data import load_dataset
from unlearnshield.defenses import protect
from unlearnshield.diff import cosine, flat_difference
from unlearnshield.metrics import classification_accuracy

from .conftest import REPO, shared_root

BACKBONE = shared_root() / "weights" / "lpips-alexnet-features.pth"

TINY = {
    "data.datasets": ["digits"],
    "data.train_subset": 200,
    "data.forget_samples": 2,
    "model.name": "convnet",
    "model.options": {"width": 4, "stem_stride": 2},
    "training.options": {"epochs": 1, "batch_size": 64},
    "attack.options": {"iterations": 2, "restarts": 1, "log_every": 0},
    "attack.batch": 2,
    "metrics.mia_shadow_size": 50,
    "runtime.lpips_backbone": str(BACKBONE) if BACKBONE.exists() else "",
}
"""Overrides that shrink any preset to seconds: digits, a width-4 ConvNet, 2 attack steps."""


def tiny(preset: str = "quick", **extra) -> dict:
    return apply_overrides(load_preset(preset), {**TINY, **extra})


def views(run_dir) -> dict:
    return {r["key"]: deterministic_view(r) for r in iter_records(run_dir)}


def differences(a: dict, b: dict, path: str = "") -> list[str]:
    """Paths where two nested JSON values differ (for a readable assertion message)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += differences(a.get(key), b.get(key), f"{path}.{key}")
        return out
    return [] if a == b else [f"{path}: {a!r} != {b!r}"[:300]]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The tiny quick sweep (2 defenses × 2 samples, 2 units), run in this process."""
    run_dir = tmp_path_factory.mktemp("local")
    summary = run_sweep(tiny(), run_dir)
    assert summary.written == 4 and not summary.failed
    return run_dir


# ---------------------------------------------------------------------------------------------
# Specs, keys, units, shards


def test_keys_are_stable_and_follow_the_settings():
    cells = plan_cells(tiny())
    assert [c.key for c in cells] == [c.key for c in plan_cells(tiny())]
    assert [c.index for c in cells] == list(range(len(cells)))
    assert len({c.key for c in cells}) == len(cells) == 4
    relabelled = plan_cells(tiny(**{"defenses.1.label": "renamed"}))
    assert {c.key for c in relabelled} == {c.key for c in cells}  # labels are cosmetic
    changed = plan_cells(tiny(**{"defenses.1.options": {"lambda_acc": 0.25}}))
    assert len({c.key for c in changed} & {c.key for c in cells}) == 2  # only shield's moved
    longer = plan_cells(tiny(**{"attack.options": {"iterations": 3, "restarts": 1}}))
    assert not {c.key for c in longer} & {c.key for c in cells}
    # an option added later keeps older keys while it is inactive, and moves them when set
    options = tiny()["attack"].get("options") or {}
    inactive = plan_cells(tiny(**{"attack.options": {**options, "average_tail": 0.0}}))
    assert [c.key for c in inactive] == [c.key for c in cells]
    assert "average_tail" not in cells[0].config["attack"]["config"]
    active = plan_cells(tiny(**{"attack.options": {**options, "average_tail": 0.25}}))
    assert not {c.key for c in active} & {c.key for c in cells}


def test_a_name_is_resolved_to_its_settings_in_the_cell():
    cell = plan_cells(tiny())[0]
    assert cell.config["attack"]["config"]["iterations"] == 2
    assert cell.config["training"]["hyperparameters"]["epochs"] == 1
    assert "step_size" in cell.config["unlearning"]["hyperparameters"]
    json.dumps(cell.config)  # JSON-serialisable


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"attack.bogus": 1}, "no setting 'bogus'"),
        ({"defenses.7.name": "none"}, "index 7"),
        ({"defenses": "none,bogus"}, "unknown defense 'bogus'"),
        ({"defenses.1.options": {"lambda_acc": -1}}, "lambda_acc"),
        ({"attack.budget": "huge"}, "unknown attack budget"),
        ({"data.datasets": "mnist"}, "unknown dataset"),
        ({"attack.attackers": "standard", "attack.attacker_options": {"standard": {"x": 1}}}, "x"),
        ({"attack.only_against": {"defense-aware": ["shield"]}}, "not in attack.attackers"),
        ({"attack.only_against": {"standard": ["soteria"]}}, "not among the sweep's defenses"),
    ],
)
def test_bad_settings_fail_before_anything_runs(overrides, message):
    with pytest.raises(SpecError, match=message):
        plan_cells(apply_overrides(load_preset("quick"), overrides))


def test_only_against_pairs_an_attacker_with_the_named_defenses_only():
    both = {"attack.attackers": ["standard", "defense-aware"]}
    everything = plan_cells(tiny(**both))
    pairs = {(c.config["attack"]["attacker"], c.config["defense"]["name"]) for c in everything}
    assert ("defense-aware", "none") in pairs and len(everything) == 8
    restricted = plan_cells(tiny(**both, **{"attack.only_against": {"defense-aware": "shield"}}))
    pairs = {(c.config["attack"]["attacker"], c.config["defense"]["name"]) for c in restricted}
    assert pairs == {("standard", "none"), ("standard", "shield"), ("defense-aware", "shield")}
    # a filter is not a setting of the cells it keeps: their keys do not move
    assert {c.key for c in restricted} < {c.key for c in everything}


def test_units_batch_samples_of_one_setting_and_shards_partition_them():
    cells = plan_cells(tiny(**{"data.forget_samples": 5, "attack.batch": 2}))
    units = plan_units(cells)
    assert [len(u.cells) for u in units] == [2, 2, 1, 2, 2, 1]
    for unit in units:
        assert len({c.group_key for c in unit.cells}) == 1
    shards = [select_shard(units, (i, 3)) for i in range(3)]
    assert sorted(u.key for s in shards for u in s) == sorted(u.key for u in units)
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "a/b", "1"):
        with pytest.raises(SpecError):
            parse_shard(bad)


# ---------------------------------------------------------------------------------------------
# Records


def test_records_hold_real_measurements(local_run):
    records = list(iter_records(local_run))
    assert len(records) == 4
    data = load_dataset("digits")
    for record in records:
        m = record["metrics"]
        assert -1 <= m["ssim"] <= 1 and m["psnr"] > 0 and 0 <= m["test_accuracy"] <= 1
        assert (m["lpips"] is None) == (not BACKBONE.exists())
        assert 0 <= m["mia_efficacy"] <= 1 and 0 <= m["mia_auc"] <= 1
        folder = record_path(local_run, record["key"]).parent
        assert (folder / record["files"]["reconstruction"]).read_bytes()[:4] == b"\x89PNG"
        assert record["details"]["unlearning"]["forget_index"] == record["forget"]["index"]
        assert set(record["calibration"]) == {"random_init", "mean_colour", "block_mean_4x4"}
        assert record["versions"]["torch"] == torch.__version__
        assert record["times"]["attack_batch"] == 2

    # recompute one release from the cached models: the record's numbers are its numbers
    shield = next(r for r in records if r["config"]["defense.name"] == "shield")
    cache = local_run / "cache"
    (original,) = [load_checkpoint(p).model for p in (cache / "original").glob("*.safetensors")]
    index = shield["forget"]["index"]
    (unlearned,) = [
        ckpt.model
        for p in (cache / "unlearned").glob("*.safetensors")
        if (ckpt := load_checkpoint(p)).metadata["unlearning"]["forget_index"] == index
    ]
    x, y = data.train.float_images([index]), data.train.labels[[index]]
    options = {
        k.split(".")[-1]: v
        for k, v in shield["config"].items()
        if k.startswith("defense.hyperparameters.")
    }
    released, _ = protect(original, unlearned, x, y, "shield", seed=shield["seed"], **options)
    delta = flat_difference(original, unlearned)
    assert shield["metrics"]["cos_delta"] == pytest.approx(
        cosine(delta, flat_difference(original, released)), abs=1e-6
    )
    assert shield["metrics"]["test_accuracy"] == classification_accuracy(released, data.test)
    members = set(load_checkpoint(next((cache / "original").glob("*"))).metadata["train_indices"])
    assert index in members  # forget samples are training members


def test_a_rerun_skips_finished_cells_and_recomputes_a_missing_one_bitwise(local_run, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(local_run, run_dir)
    before = views(run_dir)
    again = run_sweep(tiny(), run_dir)
    assert (again.written, again.skipped) == (0, 4)
    victim = sorted(before)[0]
    record_path(run_dir, victim).unlink()
    redo = run_sweep(tiny(), run_dir)
    assert (redo.written, redo.skipped) == (1, 3)
    assert views(run_dir) == before


def test_reuse_copies_matching_records_and_computes_only_the_new_cells(local_run, tmp_path):
    spec = tiny(**{"sweep.name": "wider", "runtime.reuse": [str(local_run)]})
    spec = apply_overrides(spec, {"defenses": "none,shield,noise"})
    run_dir = tmp_path / "wider"
    summary = run_sweep(spec, run_dir)
    assert summary.written == 6 and not summary.failed
    ours = {r["key"]: r for r in iter_records(run_dir)}
    theirs = {r["key"]: r for r in iter_records(local_run)}
    shared = set(ours) & set(theirs)
    assert len(shared) == 4  # none and shield: same settings, same keys
    for key in shared:
        assert ours[key]["reused_from"] == str(local_run)
        assert ours[key]["display"]["sweep"] == "wider"  # this sweep's labels
        same = {k: v for k, v in deterministic_view(ours[key]).items() if k != "display"}
        same.pop("reused_from")
        assert same == {k: v for k, v in deterministic_view(theirs[key]).items() if k != "display"}
        assert (record_path(run_dir, key).with_suffix(".png")).is_file()
    new = [r for k, r in ours.items() if k not in shared]
    assert {r["config"]["defense.name"] for r in new} == {"noise"}
    assert all("reused_from" not in r for r in new)
    # θo came from the other folder's cache rather than being trained again
    assert not any(r["times"]["original_trained_here"] for r in new)


def test_kill_9_mid_sweep_loses_only_the_cells_in_flight(tmp_path):
    spec = tiny(**{"attack.batch": 1, "data.forget_samples": 3, "defenses": "none"})
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    run_dir = tmp_path / "run"
    script = (
        "import json, sys; from unlearnshield.bench import run_sweep; "
        f"run_sweep(json.load(open({str(spec_file)!r})), {str(run_dir)!r})"
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    deadline = time.monotonic() + 240
    while not list(run_dir.glob("cells/*/*.json")) and time.monotonic() < deadline:
        assert child.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    finished = [p for p in run_dir.glob("cells/*/*.json")]
    assert 1 <= len(finished) < 3
    assert all(read_record(run_dir, p.stem) is not None for p in finished)
    summary = run_sweep(spec, run_dir)
    assert summary.skipped == len(finished) and summary.written == 3 - len(finished)
    assert len(list(iter_records(run_dir))) == 3


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_pool_workers_exit_when_the_sweep_process_is_killed(tmp_path):
    spec = tiny(**{"attack.batch": 1, "data.forget_samples": 6, "defenses": "none"})
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    script = (
        "import json; from unlearnshield.bench import ExecutorOptions, run_sweep; "
        f"run_sweep(json.load(open({str(spec_file)!r})), {str(tmp_path / 'run')!r}, "
        "executor='process', options=ExecutorOptions(workers=2, progress=False))"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while len(workers) < 2 and time.monotonic() < deadline:
        assert parent.poll() is None, "the sweep ended before it could be killed"
        workers = [c for c in _children(parent.pid) if "spawn_main" in _cmdline(c)]
        time.sleep(0.1)
    assert len(workers) == 2
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "orphaned pool workers kept running"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_the_process_pool_writes_the_same_records(local_run, tmp_path):
    summary = run_sweep(
        tiny(), tmp_path, executor="process", options=ExecutorOptions(workers=2, progress=False)
    )
    assert summary.written == 4 and not summary.failed
    assert not differences(views(tmp_path), views(local_run))


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_ray_writes_the_same_records(local_run, tmp_path):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_sweep(tiny(), tmp_path, executor="ray", options=ExecutorOptions(workers=2))
    finally:
        ray.shutdown()
    assert summary.written == 4 and not summary.failed
    # bitwise on the CPU: the same metrics to the last digit
    assert not differences(views(tmp_path), views(local_run))
    assert {r["environment"]["pid"] for r in iter_records(tmp_path)} != {
        r["environment"]["pid"] for r in iter_records(local_run)
    }


def test_a_failing_unit_is_reported_and_left_unfinished(tmp_path):
    spec = tiny(**{"data.datasets": "cifar10"})
    spec["runtime"]["data_roots"] = {"cifar10": str(tmp_path / "nowhere")}
    summary = run_sweep(spec, tmp_path / "run")
    assert summary.written == 0 and len(summary.failed) == 2
    assert "nowhere" in summary.failed[0][1]
    assert not list((tmp_path / "run").glob("cells/*/*.json"))


# ---------------------------------------------------------------------------------------------
# Presets


@pytest.fixture(scope="module")
def preset_run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("presets")


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_plans_and_runs_one_cell_with_tiny_overrides(name, preset_run_dir):
    spec = load_preset(name)
    full = plan_cells(spec)
    assert full and spec["sweep"]["layout"] in LAYOUTS
    if not name.endswith("-cpu") and name != "quick":
        assert spec["data"]["forget_samples"] == 100  # the paper's sample count
        assert spec["attack"]["budget"] in ("paper", "off")
    small = tiny(name, **{"data.forget_samples": 1})
    unit = plan_units(plan_cells(small))[0]
    result = run_unit(unit, Runtime.from_spec(small, preset_run_dir))
    # presets whose tiny versions coincide share cells (same settings, same key)
    assert result.written + result.skipped == [unit.cells[0].key]
    record = read_record(preset_run_dir, unit.cells[0].key)
    assert 0 <= record["metrics"]["test_accuracy"] <= 1
    assert ("ssim" in record["metrics"]) == (spec["attack"]["budget"] != "off")


def test_defenses_cpu_shares_its_standard_attacker_cells_with_table1_cpu():
    table1 = {c.key for c in plan_cells(load_preset("table1-cpu"))}
    evidence = plan_cells(load_preset("defenses-cpu"))
    shared = [c for c in evidence if c.key in table1]
    assert len(shared) == len(table1)  # so --reuse runs/table1-cpu skips all of them
    assert {c.config["attack"]["attacker"] for c in shared} == {"standard"}
    aware = {
        c.config["defense"]["name"] for c in evidence if "aware" in c.config["attack"]["attacker"]
    }
    assert aware == {"shield"}


def test_table1_cpu_has_the_seven_defenses():
    spec = load_preset("table1-cpu")
    names = [d["name"] for d in spec["defenses"]]
    assert names == ["none", "dgp", "noise", "outpost", "pruning", "soteria", "shield"]
    assert len(plan_cells(spec)) == 7 * 8


# ---------------------------------------------------------------------------------------------
# Report and CLI


def test_the_report_rebuilds_from_the_records_alone(local_run, tmp_path):
    report = write_report(local_run)
    text = report.path.read_text()
    assert "Baseline" in text and "Ours" in text and "calibration rows" in text.lower()
    assert len(report.jsonl.read_text().splitlines()) == 4
    grid = [p for p in report.figures if p.name.startswith("grid-")]
    assert grid and grid[0].read_bytes()[:4] == b"\x89PNG"

    # only the cells folder travels: the same report comes out
    moved = tmp_path / local_run.name
    shutil.copytree(local_run / "cells", moved / "cells")
    assert write_report(moved).path.read_text() == text


def test_paper_numbers_stand_beside_ours_for_paper_presets(local_run, tmp_path):
    records = list(iter_records(local_run))
    for record in records:
        record["display"] = {**record["display"], "paper": "table1", "layout": "table1"}
        record["config"] = {**record["config"], "dataset": "cifar10"}
    shutil.copytree(local_run / "cells", tmp_path / "cells")
    text = write_report(tmp_path, records=records).path.read_text()
    assert "0.7530" in text and "0.2882" in text  # the paper's SSIM, Baseline and Ours


def test_lambda_plot_is_drawn_for_a_lambda_grid(tmp_path):
    spec = tiny(
        "fig4-cpu",
        **{
            "data.forget_samples": 1,
            "defenses.0.grid": {"lambda_acc": [0.1, 1.0], "lambda_forget": [0.5]},
        },
    )
    assert run_sweep(spec, tmp_path).written == 2
    report = write_report(tmp_path)
    assert any(p.name.startswith("lambda-") for p in report.figures)


def test_cli_bench_and_report(tmp_path, capsys):
    args = ["bench", "--preset", "quick", "--out", str(tmp_path)]
    for key, value in TINY.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    assert main([*args, "--set", "defenses=shield", "--set", "data.forget_samples=1"]) == 0
    assert "1 cells written" in capsys.readouterr().out
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| shield |" in out and (tmp_path / "report.md").exists()
    assert main(["bench", "--preset", "quick", "--out", str(tmp_path), "--shard", "2/2"]) == 2
    assert main(["bench", "--preset", "nope", "--out", str(tmp_path)]) == 2
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_demo_writes_its_three_files(tmp_path, capsys):
    out = tmp_path / "demo"
    sets = {k: v for k, v in TINY.items() if not k.startswith("data.datasets")}
    args = ["demo", "--out", str(out), "--samples", "1"]
    for key, value in sets.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Baseline" in printed and "Ours" in printed
    for name in ("report.md", "grid.png", "records.jsonl"):
        assert (out / name).exists()
