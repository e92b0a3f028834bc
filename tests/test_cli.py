"""The command line as a user runs it: train, attack, and the error paths (exit 2)."""

import json

import pytest

from unlearnshield.checkpoints import load_checkpoint
from unlearnshield.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "theta_o.safetensors"
    argv = ["train", "--dataset", "digits", "--width", "4", "--epochs", "1", "--subset", "300"]
    assert main([*argv, "-o", str(out)]) == 0
    return out


def test_train_writes_a_checkpoint_with_its_training_indices(trained, capsys):
    ckpt = load_checkpoint(trained)
    meta = ckpt.metadata
    assert meta["dataset"]["name"] == "digits"
    assert len(meta["train_indices"]) == 300 == len(set(meta["train_indices"]))
    assert meta["training"]["recipe_name"] == "cpu"
    assert meta["architecture"]["kwargs"] == {"width": 4, "stem_stride": 2}


def test_train_refuses_bad_options_with_exit_2(tmp_path, capsys):
    assert main(["train", "--dataset", "digits", "-o", str(tmp_path / "m.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    code = main(
        [
            "train",
            "--dataset",
            "digits",
            "--set",
            "batch_size",
            "-o",
            str(tmp_path / "m.safetensors"),
        ]
    )
    assert code == 2
    assert list(tmp_path.iterdir()) == []


def test_train_reports_a_missing_dataset_in_one_paragraph(tmp_path, capsys):
    code = main(
        ["train", "--dataset", "cifar10", "--data-root", str(tmp_path / "nowhere"),
         "--no-download", "-o", str(tmp_path / "m.safetensors")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "nowhere" in err and "cifar-10-batches-py" in err
    assert not (tmp_path / "m.safetensors").exists()


def test_attack_on_identical_models_fails_clearly(trained, tmp_path, capsys):
    out = tmp_path / "r.png"
    code = main(["attack", "--original", str(trained), "--released", str(trained), "-o", str(out)])
    assert code == 2
    assert "nothing was unlearned" in capsys.readouterr().err
    assert not out.exists()


def test_attack_refuses_to_overwrite_an_input(trained, capsys):
    code = main(
        ["attack", "--original", str(trained), "--released", str(trained), "-o", str(trained)]
    )
    assert code == 2 and "also an input" in capsys.readouterr().err


def test_attack_end_to_end_writes_png_and_report(trained, tmp_path):
    released = tmp_path / "theta_u.safetensors"
    assert main(["unlearn", "--model", str(trained), "--forget-index",
                 str(load_checkpoint(trained).metadata["train_indices"][0]),
                 "-o", str(released)]) == 0  # fmt: skip
    png, report = tmp_path / "r.png", tmp_path / "r.json"
    argv = ["attack", "--original", str(trained), "--released", str(released), "--budget", "5"]
    assert main([*argv, "-o", str(png), "--report", str(report)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(report.read_text())
    assert summary["labels_inferred"] is True
    assert summary["config"]["iterations"] == 5
    assert -1 <= summary["cosine"][0] <= 1
    assert summary["engine"] == "batched" and summary["per_sample"] == "layers"
    # the same run through vmap gives the same reconstruction
    vmap_report = tmp_path / "v.json"
    out = ["-o", str(tmp_path / "v.png"), "--report", str(vmap_report), "--per-sample", "vmap"]
    assert main([*argv, *out]) == 0
    through_vmap = json.loads(vmap_report.read_text())
    assert through_vmap["per_sample"] == "vmap"
    assert through_vmap["cosine"][0] == pytest.approx(summary["cosine"][0], abs=1e-4)
