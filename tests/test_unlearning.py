"""Unlearning methods and the ``unlearn`` command, on a tiny ConvNet trained on digits."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from unlearnshield.checkpoints import build_metadata, load_checkpoint, save_checkpoint
from unlearnshield.cli import main
from unlearnshield.data import load_dataset, subset_indices
from unlearnshield.models import build_model
from unlearnshield.training import TrainRecipe, seed_everything, train_model
from unlearnshield.unlearning import UNLEARNERS, forget_loss, random_labels, saliency_mask, unlearn

N_TRAIN = 800
"""Digits training images θo is trained on; the other training images are non-members."""

FAST = {
    "ga-step": {},
    "ga": {"epochs": 2},
    "l1-sparse": {"epochs": 2, "retain_size": 96, "batch_size": 32},
    "salun": {"epochs": 2, "retain_size": 96, "batch_size": 32},
}
"""Overrides of the cpu presets that keep each method to a fraction of a second here."""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; with two, OpenMP threads spin against other
    processes on a shared two-core machine and a one-second fixture takes minutes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits, one_thread):
    """(θo, its training indices): ConvNet width 4, stride-2 stem, 3 epochs on 800 digits."""
    indices = subset_indices(len(digits.train), N_TRAIN, seed=0)
    seed_everything(0)
    model = build_model(
        "convnet",
        digits.num_classes,
        input_shape=digits.input_shape,
        mean=digits.mean,
        std=digits.std,
        width=4,
        stem_stride=2,
    )
    recipe = TrainRecipe(epochs=3, batch_size=32, lr=0.1, momentum=0.9, schedule="onecycle")
    train_model(model, digits.train.subset(indices), recipe=recipe, seed=0, progress=False)
    return model.eval(), indices


@pytest.fixture(scope="module")
def theta_o(trained):
    return trained[0]


@pytest.fixture(scope="module")
def checkpoint(trained, digits, tmp_path_factory):
    model, indices = trained
    path = tmp_path_factory.mktemp("ckpt") / "theta_o.safetensors"
    metadata = build_metadata(
        model,
        dataset={"name": digits.name, "source": digits.source},
        train_indices=indices,
        seed=0,
        training={"note": "test fixture"},
    )
    save_checkpoint(model, path, metadata)
    return path


def forget_set(digits, trained, k):
    """k training members of θo drawn at random (seeded): indices, images, labels."""
    indices = trained[1]
    chosen = indices[torch.randperm(len(indices), generator=torch.Generator().manual_seed(k))[:k]]
    return chosen, digits.train.float_images(chosen), digits.train.labels[chosen]


def retain_split(digits, trained, forget_idx):
    indices = trained[1]
    return digits.train.subset(indices[~torch.isin(indices, forget_idx)])


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def bn_buffers(model):
    return {
        f"{name}.{b}": getattr(m, b).clone()
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm)
        for b in ("running_mean", "running_var", "num_batches_tracked")
    }


# ---------------------------------------------------------------------------- ga-step


@pytest.mark.parametrize("k", [1, 5])
def test_ga_step_is_one_exact_gradient_ascent_step(digits, trained, theta_o, k):
    _, x, y = forget_set(digits, trained, k)
    step_size = 1e-2
    reference = copy.deepcopy(theta_o).eval()
    params = [p for p in reference.parameters() if p.requires_grad]
    grads = torch.autograd.grad(F.cross_entropy(reference(x), y), params)

    theta_u, record = unlearn(theta_o, x, y, method="ga-step", step_size=step_size)

    names = [n for n, p in theta_o.named_parameters() if p.requires_grad]
    updated = dict(theta_u.named_parameters())
    for name, p, g in zip(names, params, grads, strict=True):
        assert torch.equal(updated[name].detach(), p.detach().add(g, alpha=step_size)), name
        delta = updated[name].detach() - p.detach()
        torch.testing.assert_close(delta, step_size * g, rtol=1e-4, atol=1e-7)
    before, after = bn_buffers(theta_o), bn_buffers(theta_u)
    assert before.keys() == after.keys() and before
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert forget_loss(theta_u, x, y) > forget_loss(theta_o, x, y)
    assert record["hyperparameters"]["step_size"] == step_size
    assert record["update_norm"] == pytest.approx(
        step_size * torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    )


def test_ga_step_chunked_gradient_matches_one_batch(digits, trained, theta_o):
    _, x, y = forget_set(digits, trained, 7)
    whole, _ = unlearn(theta_o, x, y, method="ga-step", step_size=0.1)
    chunked, record = unlearn(theta_o, x, y, method="ga-step", step_size=0.1, batch_size=3)
    assert record["hyperparameters"]["batch_size"] == 3
    for (name, a), b in zip(whole.named_parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------- every method


@pytest.mark.parametrize("method", UNLEARNERS.names())
def test_every_method_changes_a_copy_and_records_what_it_used(digits, trained, theta_o, method):
    forget_idx, x, y = forget_set(digits, trained, 3)
    retain = retain_split(digits, trained, forget_idx)
    untouched = state(theta_o)
    theta_u, record = unlearn(
        theta_o, x, y, retain, method=method, preset="cpu", seed=1, **FAST[method]
    )

    assert theta_u is not theta_o
    after = state(theta_o)
    assert all(torch.equal(untouched[k], after[k]) for k in untouched), "input model changed"
    changed = [n for n, p in theta_u.named_parameters() if not torch.equal(p, untouched[n])]
    assert changed, f"{method} changed no parameter"
    assert not theta_u.training

    config = UNLEARNERS.get(method).from_options("cpu", **FAST[method]).config
    assert record["method"] == method and record["preset"] == "cpu" and record["seed"] == 1
    assert record["hyperparameters"] == dataclasses.asdict(config)
    assert record["num_forget"] == 3
    expected_retain = (
        FAST[method].get("retain_size", 0) if UNLEARNERS.get(method).needs_retain else 0
    )
    assert record["retain_size"] == expected_retain
    assert record["seconds"] > 0
    assert record["forget_loss_before"] == pytest.approx(forget_loss(theta_o, x, y))
    assert record["forget_loss_after"] == pytest.approx(forget_loss(theta_u, x, y))
    assert json.loads(json.dumps(record, allow_nan=False)) == record


@pytest.mark.parametrize("method", UNLEARNERS.names())
def test_every_method_has_cpu_and_reference_presets_that_validate(method):
    cls = UNLEARNERS.get(method)
    for preset in ("cpu", "reference"):
        assert isinstance(cls.from_options(preset).config, cls.Config)


@pytest.mark.parametrize("method", UNLEARNERS.names())
def test_same_seed_same_model(digits, trained, theta_o, method):
    forget_idx, x, y = forget_set(digits, trained, 2)
    retain = retain_split(digits, trained, forget_idx)
    runs = [
        unlearn(theta_o, x, y, retain, method=method, preset="cpu", seed=3, **FAST[method])[0]
        for _ in range(2)
    ]
    for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["l1-sparse", "salun"])
def test_the_seed_drives_the_retain_draws(digits, trained, theta_o, method):
    forget_idx, x, y = forget_set(digits, trained, 2)
    retain = retain_split(digits, trained, forget_idx)
    a, b = (
        unlearn(theta_o, x, y, retain, method=method, preset="cpu", seed=s, **FAST[method])[0]
        for s in (3, 4)
    )
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


# ------------------------------------------------------------------------------- ga


@pytest.mark.parametrize("k", [1, 8])
def test_ga_raises_the_forget_loss(digits, trained, theta_o, k):
    _, x, y = forget_set(digits, trained, k)
    theta_u, record = unlearn(theta_o, x, y, method="ga", preset="cpu", epochs=3)
    assert forget_loss(theta_u, x, y) > forget_loss(theta_o, x, y)
    assert record["forget_loss_after"] > record["forget_loss_before"]


def test_ga_single_sample_keeps_batchnorm_statistics_in_auto_mode(digits, trained, theta_o):
    _, x, y = forget_set(digits, trained, 1)
    theta_u, record = unlearn(theta_o, x, y, method="ga", preset="cpu")
    assert record["bn_modes_used"] == ["eval"]
    before, after = bn_buffers(theta_o), bn_buffers(theta_u)
    assert all(torch.equal(before[key], after[key]) for key in before)

    with pytest.warns(UserWarning, match="batch of one image"):
        theta_t, record = unlearn(theta_o, x, y, method="ga", preset="cpu", bn_mode="train")
    assert record["bn_modes_used"] == ["train"]
    moved = bn_buffers(theta_t)
    assert any(not torch.equal(before[key], moved[key]) for key in before if "running" in key)


def test_ga_auto_batchnorm_trains_only_batches_of_bn_min_batch(digits, trained, theta_o):
    _, x, y = forget_set(digits, trained, 4)
    before = bn_buffers(theta_o)
    small_u, small = unlearn(theta_o, x, y, method="ga", preset="cpu", epochs=1)
    assert small["bn_modes_used"] == ["eval"]
    assert all(torch.equal(before[key], value) for key, value in bn_buffers(small_u).items())

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theta_u, record = unlearn(theta_o, x, y, method="ga", preset="cpu", bn_min_batch=4)
    assert record["bn_modes_used"] == ["train"]
    after = bn_buffers(theta_u)
    assert any(not torch.equal(before[key], after[key]) for key in before if "running" in key)


# ------------------------------------------------------------------------ l1-sparse


def test_l1_sparse_decays_alpha_linearly_and_shrinks_the_l1_norm(digits, trained, theta_o):
    forget_idx, x, y = forget_set(digits, trained, 1)
    retain = retain_split(digits, trained, forget_idx)
    options = {"epochs": 4, "retain_size": 128, "batch_size": 32, "lr": 0.01}
    sparse_u, sparse = unlearn(
        theta_o, x, y, retain, method="l1-sparse", preset="cpu", alpha=5e-3, **options
    )
    _, plain = unlearn(
        theta_o, x, y, retain, method="l1-sparse", preset="cpu", alpha=0.0, **options
    )
    assert sparse["alpha_schedule"] == pytest.approx([5e-3 * (1 - t / 4) for t in range(4)])
    assert plain["alpha_schedule"] == [0.0] * 4
    assert sparse["l1_norm_before"] == pytest.approx(
        sum(float(p.detach().abs().sum()) for p in theta_o.parameters()), rel=1e-5
    )
    assert sparse["l1_norm_after"] < plain["l1_norm_after"]
    assert sparse["l1_norm_after"] == pytest.approx(
        sum(float(p.detach().abs().sum()) for p in sparse_u.parameters()), rel=1e-5
    )


def test_l1_sparse_needs_retain_data(digits, trained, theta_o):
    _, x, y = forget_set(digits, trained, 1)
    with pytest.raises(ValueError, match="retain"):
        unlearn(theta_o, x, y, None, method="l1-sparse", preset="cpu")


# ---------------------------------------------------------------------------- salun


def test_saliency_mask_keeps_the_largest_gradients(digits, trained, theta_o):
    _, x, y = forget_set(digits, trained, 6)
    masks = saliency_mask(theta_o, x, y, mask_ratio=0.3, batch_size=4)
    model = copy.deepcopy(theta_o).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(F.cross_entropy(model(x[:4]), y[:4]), params)
    g2 = torch.autograd.grad(F.cross_entropy(model(x[4:]), y[4:]), params)
    saliency = torch.cat([(a + b).abs().flatten() for a, b in zip(g1, g2, strict=True)])
    flat = torch.cat([m.flatten() for m in masks])
    assert int(flat.sum()) == int(0.3 * saliency.numel())
    assert float(saliency[flat].min()) >= float(saliency[~flat].max()) * (1 - 1e-5)
    assert [m.shape for m in masks] == [p.shape for p in params]


def test_salun_freezes_the_masked_out_entries_exactly(digits, trained, theta_o):
    forget_idx, x, y = forget_set(digits, trained, 2)
    retain = retain_split(digits, trained, forget_idx)
    ratio = 0.4
    masks = saliency_mask(theta_o, x, y, mask_ratio=ratio, batch_size=32)
    theta_u, record = unlearn(
        theta_o, x, y, retain, method="salun", preset="cpu", mask_ratio=ratio, **FAST["salun"]
    )
    assert record["mask_fraction"] == pytest.approx(ratio, abs=1e-4)
    moved_inside = 0
    for p0, p1, m in zip(theta_o.parameters(), theta_u.parameters(), masks, strict=True):
        assert torch.equal(p0[~m], p1[~m])
        moved_inside += int((p0[m] != p1[m]).sum())
    assert moved_inside > 0.5 * sum(int(m.sum()) for m in masks)


def test_random_labels_exclude_the_true_label_when_asked():
    labels = torch.randint(0, 10, (2000,), generator=torch.Generator().manual_seed(0))
    other = random_labels(labels, 10, exclude_true=True, generator=torch.Generator())
    assert not bool((other == labels).any())
    assert set(other.tolist()) == set(range(10))
    anyone = random_labels(labels, 10, exclude_true=False, generator=torch.Generator())
    hits = float((anyone == labels).float().mean())
    assert 0.05 < hits < 0.15


# ------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("ga-step", {"step_size": -1.0}, "step_size"),
        ("ga-step", {"stepsize": 1e-3}, "unknown option"),
        ("ga", {"lr": "fast"}, "lr must be"),
        ("ga", {"bn_mode": "frozen"}, "bn_mode"),
        ("ga", {"epochs": 0}, "epochs"),
        ("l1-sparse", {"no_l1_epochs": 10, "epochs": 10}, "no_l1_epochs"),
        ("salun", {"mask_ratio": 0.0}, "mask_ratio"),
        ("salun", {"retain_size": 0}, "retain_size"),
    ],
)
def test_bad_options_are_refused_at_construction(method, options, message):
    with pytest.raises(ValueError, match=message):
        UNLEARNERS.get(method).from_options(None, **options)


def test_unknown_preset_and_bad_forget_data_are_refused(digits, trained, theta_o):
    _, x, y = forget_set(digits, trained, 2)
    with pytest.raises(ValueError, match="no preset"):
        unlearn(theta_o, x, y, method="ga", preset="gpu")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        unlearn(theta_o, x * 255, y)
    with pytest.raises(ValueError, match="int64"):
        unlearn(theta_o, x, y.int())
    with pytest.raises(ValueError, match="empty"):
        unlearn(theta_o, x[:0], y[:0])


# -------------------------------------------------------------------------------- CLI


def test_cli_refuses_a_non_member_and_writes_nothing(checkpoint, trained, tmp_path, capsys):
    members = set(trained[1].tolist())
    outsider = next(i for i in range(10_000) if i not in members)
    member = min(members)
    out = tmp_path / "theta_u.safetensors"
    status = main(
        [
            "unlearn",
            "--model",
            str(checkpoint),
            "--forget-index",
            f"{member},{outsider}",
            "-o",
            str(out),
        ]
    )
    assert status == 2
    assert not out.exists() and not list(tmp_path.iterdir())
    assert f"forget index {outsider} is not a training member" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "nonsense=1"], "unknown option(s) nonsense"),
        (["--preset", "recovery"], "no preset 'recovery'"),
        (["--set", "lr=-1"], "lr must be positive"),
        (["--set", "lr=fast"], "lr must be"),
    ],
)
def test_cli_refuses_bad_options_and_writes_nothing(
    checkpoint, trained, tmp_path, capsys, extra, message
):
    out = tmp_path / "theta_u.safetensors"
    member = str(int(trained[1][0]))
    argv = ["unlearn", "--model", str(checkpoint), "--method", "ga", "--forget-index", member]
    assert main([*argv, *extra, "-o", str(out)]) == 2
    assert not out.exists()
    assert message in capsys.readouterr().err


def test_cli_round_trip_records_the_unlearning(checkpoint, digits, trained, theta_o, tmp_path):
    forget = [int(i) for i in trained[1][[3, 10]]]
    out = tmp_path / "theta_u.safetensors"
    argv = [
        "unlearn",
        "--model",
        str(checkpoint),
        "--method",
        "ga-step",
        "--preset",
        "cpu",
        "--forget-index",
        ",".join(map(str, forget)),
        "--set",
        "step_size=0.01",
        "--seed",
        "5",
        "-o",
        str(out),
    ]
    assert main(argv) == 0

    released = load_checkpoint(out)
    original = load_checkpoint(checkpoint)
    record = released.metadata["unlearning"]
    assert record["method"] == "ga-step" and record["preset"] == "cpu" and record["seed"] == 5
    assert record["hyperparameters"] == {"step_size": 0.01, "batch_size": None}
    assert record["forget_indices"] == forget
    assert record["forget_labels"] == digits.train.labels[forget].tolist()
    assert Path(record["original_checkpoint"]) == checkpoint.resolve()
    assert record["seconds"] > 0
    assert released.metadata["train_indices"] == original.metadata["train_indices"]
    assert released.metadata["training"] == {"note": "test fixture"}
    assert released.metadata["dataset"] == original.metadata["dataset"]

    expected, _ = unlearn(
        theta_o,
        digits.train.float_images(forget),
        digits.train.labels[forget],
        method="ga-step",
        step_size=0.01,
    )
    for a, b in zip(
        released.model.state_dict().values(), expected.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_cli_retain_methods_train_on_members_without_the_forget_samples(
    checkpoint, trained, tmp_path
):
    forget = int(trained[1][0])
    out = tmp_path / "theta_u.safetensors"
    argv = ["unlearn", "--model", str(checkpoint), "--method", "l1-sparse", "--preset", "cpu"]
    argv += ["--forget-index", str(forget), "--set", "epochs=1", "-o", str(out)]
    assert main(argv) == 0
    record = load_checkpoint(out).metadata["unlearning"]
    assert record["retain_size"] == min(2000, N_TRAIN - 1)
    assert record["hyperparameters"]["epochs"] == 1
