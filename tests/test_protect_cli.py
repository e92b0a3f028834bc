"""The ``protect`` command: forget-set formats, user checkpoints, refusals that write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from unlearnshield.checkpoints import build_metadata, load_checkpoint, save_checkpoint
from unlearnshield.cli import main
from unlearnshield.models import build_model

from ._fixtures import digits, one_step_release, tiny_digits_model

FORGET = [1, 2]
"""Digits train indices unlearned in these tests."""

FAST = ["--set", "iterations=3"]


def _metadata(model):
    data = digits()
    return build_metadata(
        model,
        dataset={"name": "digits", "source": "embedded"},
        train_indices=torch.arange(len(data.train)),
        seed=0,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """θo and θu (one GA step on FORGET) as our own checkpoints, plus the forget .npz."""
    root = tmp_path_factory.mktemp("protect")
    data = digits()
    model = tiny_digits_model()
    x, y = data.train.float_images(FORGET), data.train.labels[FORGET]
    unlearned = one_step_release(model, x, y)
    save_checkpoint(model, root / "theta_o.safetensors", _metadata(model))
    save_checkpoint(unlearned, root / "theta_u.safetensors", _metadata(unlearned))
    np.savez(root / "forget.npz", images=x.numpy(), labels=y.numpy())
    return root, model, unlearned, x, y


def run(*args: object) -> int:
    return main([str(a) for a in args])


def written(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_protect_writes_the_release_and_a_report(models, tmp_path, capsys):
    root, _, unlearned, *_ = models
    out, report = tmp_path / "released.safetensors", tmp_path / "report.json"
    code = run(
        "protect",
        "--original",
        root / "theta_o.safetensors",
        "--unlearned",
        root / "theta_u.safetensors",
        "--forget",
        root / "forget.npz",
        "--eval-data",
        "digits",
        *FAST,
        "--seed",
        4,
        "-o",
        out,
        "--report",
        report,
    )
    assert code == 0
    assert "cos(Δ, Δ*)" in capsys.readouterr().out
    released = load_checkpoint(out)
    params_u = dict(unlearned.named_parameters())
    assert any(not torch.equal(p, params_u[n]) for n, p in released.model.named_parameters())
    for (name, buf), ref in zip(released.model.named_buffers(), unlearned.buffers(), strict=True):
        assert torch.equal(buf, ref), name
    record = json.loads(report.read_text())
    assert record["defense"] == "shield" and record["seed"] == 4
    assert record["hyperparameters"]["iterations"] == 3 and len(record["loss_curve"]) == 3
    for key in ("cosine", "delta_norm", "perturbation_norm", "outdiff", "seconds"):
        assert isinstance(record[key], float), key
    assert record["cosine"] < 1
    assert 0 <= record["accuracy"]["released"] <= 1 and record["accuracy"]["num_images"] > 0
    assert record["forget_labels"] == digits().train.labels[FORGET].tolist()
    # the release keeps θu's metadata and records the protection
    assert released.metadata["protection"]["cosine"] == record["cosine"]
    assert released.metadata["train_indices"] is not None


def test_forget_index_takes_the_samples_from_the_recorded_training_data(models, tmp_path):
    root, *_ = models
    out = tmp_path / "released.safetensors"
    report = tmp_path / "r.json"
    code = run(
        "protect",
        "--original",
        root / "theta_o.safetensors",
        "--unlearned",
        root / "theta_u.safetensors",
        "--forget-index",
        ",".join(map(str, FORGET)),
        "--defense",
        "pruning",
        "-o",
        out,
        "--report",
        report,
    )
    assert code == 0
    record = json.loads(report.read_text())
    assert record["forget_indices"] == FORGET and record["defense"] == "pruning"


def _png(path: Path, image: torch.Tensor) -> Path:
    pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_png_files_and_folders_with_labels(models, tmp_path):
    root, _, _, x, y = models
    folder = tmp_path / "images"
    folder.mkdir()
    _png(folder / "a.png", x[0])
    _png(folder / "b.png", x[1])
    args = ["--original", root / "theta_o.safetensors", "--unlearned", root / "theta_u.safetensors"]
    label = str(int(y[0]))
    labels = ",".join(str(int(v)) for v in y)
    assert (
        run(
            "protect",
            *args,
            "--forget",
            folder / "a.png",
            "--label",
            label,
            *FAST,
            "-o",
            tmp_path / "one.safetensors",
        )
        == 0
    )
    assert (
        run(
            "protect",
            *args,
            "--forget",
            folder,
            "--label",
            labels,
            *FAST,
            "-o",
            tmp_path / "two.safetensors",
        )
        == 0
    )


@pytest.fixture(scope="module")
def bad_cases(models, tmp_path_factory) -> dict[str, list[object]]:
    """name → the arguments of one refused invocation (its input files built once)."""
    root, model, _, x, y = models
    tmp = tmp_path_factory.mktemp("bad-inputs")
    data = digits()
    other = build_model(
        "convnet",
        data.num_classes,
        input_shape=data.input_shape,
        mean=data.mean,
        std=data.std,
        width=4,
        stem_stride=2,
    )
    save_checkpoint(other, tmp / "narrow.safetensors", _metadata(other))
    save_checkpoint(model, tmp / "same.safetensors", _metadata(model))
    nan = {k: v.clone() for k, v in one_step_release(model, x, y).net.state_dict().items()}
    nan["linear.weight"][0, 0] = float("nan")
    header = {"unlearnshield": json.dumps(_metadata(model))}
    save_file(nan, str(tmp / "nan.safetensors"), metadata=header)
    np.savez(tmp / "small.npz", images=np.zeros((2, 3, 16, 16), np.float32), labels=y.numpy())
    np.savez(tmp / "ints.npz", images=np.zeros((2, 3, 32, 32), np.int32), labels=y.numpy())
    np.savez(tmp / "label10.npz", images=x.numpy(), labels=np.array([3, 10]))
    _png(tmp / "a.png", x[0])
    (tmp / "empty").mkdir()
    _png(tmp / "empty" / "only.png", x[0])

    o, u = root / "theta_o.safetensors", root / "theta_u.safetensors"
    npz = root / "forget.npz"
    base = ["--original", o, "--unlearned", u]
    return {
        "different architecture": [
            "--original",
            o,
            "--unlearned",
            tmp / "narrow.safetensors",
            "--forget",
            npz,
        ],
        "nothing unlearned": [
            "--original",
            o,
            "--unlearned",
            tmp / "same.safetensors",
            "--forget",
            npz,
        ],
        "non-finite": ["--original", o, "--unlearned", tmp / "nan.safetensors", "--forget", npz],
        "label out of range": [*base, "--forget", tmp / "label10.npz"],
        "png label out of range": [*base, "--forget", tmp / "a.png", "--label", "12"],
        "png without label": [*base, "--forget", tmp / "a.png"],
        "folder without labels": [*base, "--forget", tmp / "empty"],
        "folder label count": [*base, "--forget", tmp / "empty", "--label", "1,2"],
        "wrong image size": [*base, "--forget", tmp / "small.npz"],
        "integer npz images": [*base, "--forget", tmp / "ints.npz"],
        "npz with --label": [*base, "--forget", npz, "--label", "1,2"],
        "missing forget file": [*base, "--forget", tmp / "missing.npz"],
        "bad option value": [*base, "--forget", npz, "--set", "lr=-1"],
        "unknown option": [*base, "--forget", npz, "--set", "lamda_acc=1"],
        "bad seed": [*base, "--forget", npz, "--seed", "-1"],
    }


BAD = [
    "different architecture",
    "nothing unlearned",
    "non-finite",
    "label out of range",
    "png label out of range",
    "png without label",
    "folder without labels",
    "folder label count",
    "wrong image size",
    "integer npz images",
    "npz with --label",
    "missing forget file",
    "bad option value",
    "unknown option",
    "bad seed",
]

MESSAGES = {
    "different architecture": "different architectures",
    "nothing unlearned": "nothing was unlearned",
    "non-finite": "non-finite",
    "label out of range": "out of range",
    "png label out of range": "out of range",
    "png without label": "--label",
    "folder without labels": "--label",
    "folder label count": "1 images but 2 labels",
    "wrong image size": "3×16×16",
    "integer npz images": "uint8",
    "npz with --label": "drop --label",
    "missing forget file": "do not exist",
    "bad option value": "lr must be > 0",
    "unknown option": "unknown option",
    "bad seed": "seed must be a non-negative integer",
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_exit_2_and_write_nothing(bad_cases, tmp_path, capsys, case):
    args = bad_cases[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = run(
        "protect", *args, *FAST, "-o", out_dir / "r.safetensors", "--report", out_dir / "r.json"
    )
    assert code == 2
    assert MESSAGES[case] in capsys.readouterr().err
    assert written(out_dir) == set()


def test_output_equal_to_an_input_is_refused(models, tmp_path, capsys):
    root, *_ = models
    target = tmp_path / "theta_u.safetensors"
    target.write_bytes((root / "theta_u.safetensors").read_bytes())
    before = target.read_bytes()
    code = run(
        "protect",
        "--original",
        root / "theta_o.safetensors",
        "--unlearned",
        target,
        "--forget",
        root / "forget.npz",
        "-o",
        target,
    )
    assert code == 2 and "also an input" in capsys.readouterr().err
    assert target.read_bytes() == before


def test_a_users_pth_checkpoint_round_trips_with_its_key_names(models, tmp_path):
    root, model, unlearned, _, _ = models
    wrap = lambda net: {  # noqa: E731
        "state_dict": {f"module.{k}": v.clone() for k, v in net.state_dict().items()},
        "epoch": 7,
    }
    torch.save(wrap(model.net), tmp_path / "orig.pth")
    torch.save(wrap(unlearned.net), tmp_path / "unl.pth")
    data = digits()
    arch = [
        "--arch",
        "convnet",
        "--arch-arg",
        "width=8",
        "--arch-arg",
        "stem_stride=2",
        "--mean",
        ",".join(map(str, data.mean)),
        "--std",
        ",".join(map(str, data.std)),
    ]
    common = [
        "--original",
        tmp_path / "orig.pth",
        "--unlearned",
        tmp_path / "unl.pth",
        "--forget",
        root / "forget.npz",
        *arch,
        *FAST,
    ]
    assert run("protect", *common, "-o", tmp_path / "out.pth") == 0
    saved = torch.load(tmp_path / "out.pth", weights_only=True)
    original = wrap(unlearned.net)
    assert saved["epoch"] == 7 and list(saved["state_dict"]) == list(original["state_dict"])
    params = {f"module.{n}" for n, _ in unlearned.net.named_parameters()}
    changed = [
        k for k in params if not torch.equal(saved["state_dict"][k], original["state_dict"][k])
    ]
    assert changed
    for key, value in saved["state_dict"].items():
        if key not in params:
            assert torch.equal(value, original["state_dict"][key]), key  # buffers
    # the same release as from our own checkpoints with the same seed
    assert (
        run(
            "protect",
            "--original",
            root / "theta_o.safetensors",
            "--unlearned",
            root / "theta_u.safetensors",
            "--forget",
            root / "forget.npz",
            *FAST,
            "-o",
            tmp_path / "ours.safetensors",
        )
        == 0
    )
    ours = load_checkpoint(tmp_path / "ours.safetensors").model.net.state_dict()
    for key, value in ours.items():
        torch.testing.assert_close(saved["state_dict"][f"module.{key}"], value)
    # and a plain safetensors output keeps the prefix too
    assert run("protect", *common, "-o", tmp_path / "out.safetensors") == 0
    plain = load_checkpoint(
        tmp_path / "out.safetensors", arch="convnet", arch_kwargs={"width": 8, "stem_stride": 2}
    )
    assert plain.layout.prefix == "module."


def test_attack_cli_runs_the_defense_aware_attacker(models, tmp_path, capsys):
    root, *_ = models
    released = tmp_path / "released.safetensors"
    assert (
        run(
            "protect",
            "--original",
            root / "theta_o.safetensors",
            "--unlearned",
            root / "theta_u.safetensors",
            "--forget",
            root / "forget.npz",
            "--defense",
            "pruning",
            "-o",
            released,
        )
        == 0
    )
    args = [
        "attack",
        "--original",
        root / "theta_o.safetensors",
        "--released",
        released,
        "--num-images",
        2,
        "--budget",
        4,
        "--set",
        "restarts=1",
    ]
    report = tmp_path / "attack.json"
    code = run(
        *args,
        "--attacker",
        "defense-aware",
        "--defense",
        "pruning",
        "--defense-set",
        "ratio=0.9",
        "--refresh-every",
        2,
        "-o",
        tmp_path / "rec.png",
        "--report",
        report,
    )
    assert code == 0
    record = json.loads(report.read_text())
    assert record["attacker"] == "defense-aware" and record["defense"] == "pruning"
    assert run(*args, "--defense", "pruning", "-o", tmp_path / "x.png") == 2
    assert "need --attacker defense-aware" in capsys.readouterr().err
    assert run(*args, "--attacker", "defense-aware", "-o", tmp_path / "y.png") == 2
    assert "needs --defense" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()
