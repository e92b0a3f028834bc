"""Defenses: UnlearnShield's invariants and its autograd oracle, the baselines' defining
properties, the registry, OutDiff, and the defense-aware attacker."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import unlearnshield
from unlearnshield._memory import WORK_BUFFERS
from unlearnshield.attacks import ATTACKERS, AttackConfig, DefenseAwareAttacker, reconstruct
from unlearnshield.defenses import (
    DEFENSES,
    DefenseError,
    ParameterLayout,
    ShieldConfig,
    build_defense,
    classifier_head,
    feature_scores,
    initial_perturbation,
    protect,
)
from unlearnshield.defenses.base import kept_count
from unlearnshield.defenses.shield import PARALLEL_DRAW_CHUNKS, PARALLEL_DRAW_MIN, gaussian_fill
from unlearnshield.metrics import outdiff, output_distance
from unlearnshield.models import build_model

from ._fixtures import digits, one_step_release, tiny_digits_model

FAST_OPTIONS = {"soteria": {"chunk_size": 128}}
"""Options that keep a defense fast on the tiny model (the defaults otherwise)."""


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def perturbed_copy(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """θo + scale·N(0, 1) on every parameter: a difference without ties or zeros."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


@pytest.fixture(scope="module")
def setup():
    """θo (tiny digits ConvNet), forget sample 1, θu one GA step away (η = 1e-3)."""
    model = tiny_digits_model()
    data = digits()
    x, y = data.train.float_images([1]), data.train.labels[[1]]
    return model, x, y, one_step_release(model, x, y)


# ---------------------------------------------------------------------------------------------
# OutDiff


def test_outdiff_is_the_softmax_distance_and_zero_for_identical_models(setup):
    model, *_ = setup
    other = perturbed_copy(model, 0.05, seed=1)
    xs = digits().train.float_images([0, 1, 2])
    torch.testing.assert_close(outdiff(model, copy.deepcopy(model), xs), torch.zeros(3))
    with torch.no_grad():
        manual = (model(xs).softmax(1) - other(xs).softmax(1)).pow(2).sum(1).sqrt()
    got = outdiff(model, other, xs)
    torch.testing.assert_close(got, manual)
    assert got.min() > 0 and got.max() <= math.sqrt(2)


def test_outdiff_restores_each_module_mode(setup):
    model, x, *_ = setup
    other = copy.deepcopy(model).train()
    other.net.model.bn0.eval()
    outdiff(model, other, x)
    assert other.training and not other.net.model.bn0.training and other.net.model.bn1.training


# ---------------------------------------------------------------------------------------------
# UnlearnShield


def test_shield_turns_the_released_difference_away_from_delta(setup):
    model, x, y, unlearned = setup
    released, report = protect(model, unlearned, x, y)
    curve = report["loss_curve"]
    assert len(curve) == 10
    assert report["cosine"] < curve[0]["cosine"] < 1
    assert curve[-1]["cosine"] < curve[0]["cosine"]
    for row in curve:
        assert row["L_privacy"] == pytest.approx(1 + row["cosine"])
        assert row["L_total"] == pytest.approx(
            row["L_privacy"] + 0.5 * row["L_acc"] + 0.5 * row["L_forget"]
        )
    # the report's cosine is the released model's, measured independently
    delta, released_delta = flat(unlearned) - flat(model), flat(released) - flat(model)
    assert report["cosine"] == pytest.approx(
        float(F.cosine_similarity(delta, released_delta, 0)), abs=1e-5
    )
    assert report["perturbation_norm"] == pytest.approx(
        float((flat(released) - flat(unlearned)).norm()), rel=1e-4
    )
    assert report["outdiff"] == pytest.approx(float(outdiff(unlearned, released, x)[0]), abs=1e-6)


def test_aim_initialisation_draws_from_n_0_sigma_with_sigma_mean_abs_delta(setup):
    model, x, y, unlearned = setup
    delta = (flat(unlearned) - flat(model)).double()
    generator = torch.Generator().manual_seed(0)
    init, sigma, std = initial_perturbation(delta, ShieldConfig(), generator)
    assert sigma == pytest.approx(float(delta.abs().mean()), rel=1e-9)
    assert std == sigma
    assert float(init.std()) == pytest.approx(sigma, rel=0.02)  # 46,074 draws
    assert abs(float(init.mean())) < 0.02 * sigma
    # the release starts there: with a vanishing step size, θu' − θu is the initialisation
    released, report = protect(model, unlearned, x, y, lr=1e-20, iterations=1)
    assert (
        report["sigma"] == pytest.approx(sigma, rel=1e-5) and report["init_std"] == report["sigma"]
    )
    assert float((flat(released) - flat(unlearned)).std()) == pytest.approx(sigma, rel=0.03)


def test_without_aim_the_initialisation_has_std_0_01(setup):
    model, x, y, unlearned = setup
    released, report = protect(model, unlearned, x, y, aim=False, lr=1e-20, iterations=1)
    assert report["init_std"] == 0.01
    assert float((flat(released) - flat(unlearned)).std()) == pytest.approx(0.01, rel=0.03)


def test_same_seed_gives_the_same_bits_and_another_seed_another_release(setup):
    model, x, y, unlearned = setup
    a, report_a = protect(model, unlearned, x, y, seed=5)
    b, report_b = protect(model, unlearned, x, y, seed=5)
    c, _ = protect(model, unlearned, x, y, seed=6)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(flat(a), flat(c))
    assert report_a["loss_curve"] == report_b["loss_curve"]


@pytest.fixture(scope="module")
def uncertain():
    """θo, the digits sample among the first ten whose one-step Δ is largest (the least
    confidently fitted: its outputs move most under a perturbation), and its θu."""
    model, data = tiny_digits_model(), digits()
    candidates = []
    for i in range(10):
        x, y = data.train.float_images([i]), data.train.labels[[i]]
        unlearned = one_step_release(model, x, y)
        candidates.append((float((flat(unlearned) - flat(model)).norm()), i, x, y, unlearned))
    _, _, x, y, unlearned = max(candidates, key=lambda c: c[0])
    return model, x, y, unlearned


def test_reused_work_buffers_with_stale_contents_change_nothing(setup):
    model, x, y, unlearned = setup
    WORK_BUFFERS.clear()
    first, _ = protect(model, unlearned, x, y, seed=2)
    assert WORK_BUFFERS._idle  # protect gave its buffers back for the next call
    for buffer in WORK_BUFFERS._idle:
        buffer.fill_(float("nan"))  # whatever a previous user left
    second, _ = protect(model, unlearned, x, y, seed=2)
    assert torch.equal(flat(first), flat(second))
    WORK_BUFFERS.clear()


def test_large_gaussian_draws_do_not_depend_on_the_thread_count():
    threads = torch.get_num_threads()
    draws = []
    try:
        for n in (1, 2, 4):
            torch.set_num_threads(n)
            out = torch.empty(PARALLEL_DRAW_MIN)
            draws.append(gaussian_fill(out, 0.5, torch.Generator().manual_seed(9)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])
    assert float(draws[0].std()) == pytest.approx(0.5, rel=0.01)
    pieces = draws[0].chunk(PARALLEL_DRAW_CHUNKS)
    assert abs(float(torch.corrcoef(torch.stack([pieces[0], pieces[1]]))[0, 1])) < 0.01
    small = gaussian_fill(torch.empty(1000), 0.5, torch.Generator().manual_seed(9))
    expected = torch.empty(1000).normal_(0.0, 0.5, generator=torch.Generator().manual_seed(9))
    assert torch.equal(small, expected)  # below the threshold: one plain normal_ call


@pytest.mark.parametrize("scale_free", [False, True])
def test_a_larger_lambda_acc_gives_a_smaller_perturbation(setup, scale_free):
    model, x, y, unlearned = setup
    _, loose = protect(model, unlearned, x, y, lambda_acc=0.0, scale_free=scale_free)
    # a λ1 at which the unconstrained δ would pay L_acc = 10 (L_privacy is at most 2)
    unit = 1.0 if not scale_free else loose["delta_norm"] ** 2
    large = 10 * unit / loose["perturbation_norm"] ** 2
    _, tight = protect(model, unlearned, x, y, lambda_acc=large, scale_free=scale_free)
    assert tight["perturbation_norm"] < 0.5 * loose["perturbation_norm"]
    assert tight["loss_curve"][-1]["L_acc"] < loose["loss_curve"][-1]["L_acc"]


@pytest.mark.parametrize("scale_free", [False, True])
def test_a_larger_lambda_forget_keeps_the_forget_outputs_closer(uncertain, scale_free):
    model, x, y, unlearned = uncertain
    _, loose = protect(model, unlearned, x, y, lambda_forget=0.0, scale_free=scale_free)
    _, tight = protect(model, unlearned, x, y, lambda_forget=100.0, scale_free=scale_free)
    assert loose["outdiff"] > 0.01
    assert tight["outdiff"] < 0.5 * loose["outdiff"]


def test_scale_free_shield_does_the_same_at_any_unlearning_step(setup):
    model, x, y, _ = setup
    model = copy.deepcopy(model).double()  # float64: Δ = θu − θo keeps its digits at η = 1e-5
    x = x.double()
    runs = {}
    for step in (1e-5, 1e-3):
        unlearned = one_step_release(model, x, y, step_size=step)
        for scale_free in (True, False):
            options = {"scale_free": scale_free, "lambda_forget": 0.0}
            runs[step, scale_free] = protect(model, unlearned, x, y, **options)[1]["cosine"]
    # without L_forget the scale-free problem is scale-invariant: the same cosine at any η
    assert runs[1e-5, True] == pytest.approx(runs[1e-3, True], abs=1e-4)
    assert runs[1e-3, True] < 0.5
    # the paper's absolute version is not
    assert abs(runs[1e-5, False] - runs[1e-3, False]) > 0.1


def test_orthogonal_objective_is_cos_squared(setup):
    model, x, y, unlearned = setup
    _, report = protect(model, unlearned, x, y, objective="orthogonal", scale_free=True)
    for row in report["loss_curve"]:
        assert row["L_privacy"] == pytest.approx(row["cosine"] ** 2)
    assert abs(report["cosine"]) < report["loss_curve"][0]["cosine"]


def slow_shield(original, unlearned, x, config: ShieldConfig, seed: int):
    """UnlearnShield written the straightforward way: autograd through a flat δ,
    F.cosine_similarity, torch.optim.Adam (single-tensor loop)."""
    layout = ParameterLayout.of(unlearned)
    theta_o, theta_u = flat(original), flat(unlearned)
    delta = theta_u - theta_o
    sigma = float(delta.abs().mean())
    generator = torch.Generator().manual_seed(seed)
    std = sigma if config.aim else config.init_std
    perturbation = torch.empty_like(delta).normal_(0.0, std, generator=generator)
    perturbation.requires_grad_(True)
    lr = config.relative_lr * sigma if config.scale_free else config.lr
    acc_scale = 1 / float(delta @ delta) if config.scale_free else 1.0
    optimizer = torch.optim.Adam([perturbation], lr=lr, foreach=False)
    model = copy.deepcopy(unlearned).eval()
    with torch.no_grad():
        reference = model(x).softmax(1)
    curve = []
    for _ in range(config.iterations):
        cos = F.cosine_similarity(delta, delta + perturbation, dim=0, eps=1e-300)
        l_privacy = 1 + cos if config.objective == "anti-align" else cos**2
        l_acc = acc_scale * perturbation.pow(2).sum()
        logits = functional_call(model, layout.as_dict(theta_u + perturbation), (x,))
        l_forget = (logits.softmax(1) - reference).pow(2).sum(1).sqrt().mean()
        loss = l_privacy + config.lambda_acc * l_acc + config.lambda_forget * l_forget
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append([float(v.detach()) for v in (l_privacy, l_acc, l_forget, loss, cos)])
    return (theta_u + perturbation).detach(), curve


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"scale_free": True},
        {"objective": "orthogonal", "scale_free": True, "lambda_acc": 2.0},
        {"aim": False, "lambda_forget": 3.0},
        {"lambda_forget": 0.0, "iterations": 4},
    ],
    ids=["paper", "scale-free", "orthogonal", "no-aim", "no-forget"],
)
def test_fast_shield_equals_the_straightforward_autograd_version_in_float64(options):
    model = copy.deepcopy(tiny_digits_model()).double()
    data = digits()
    x, y = data.train.float_images([0, 1]).double(), data.train.labels[[0, 1]]
    unlearned = one_step_release(model, x, y)
    config = ShieldConfig(**options)
    released, report = protect(model, unlearned, x, y, seed=3, **options)
    expected, curve = slow_shield(model, unlearned, x, config, seed=3)
    moved = (expected - flat(unlearned)).abs().max()
    assert moved > config.lr or config.scale_free  # the optimisation did move δ
    # equal to rounding: 1e-9 of the largest move (a wrong gradient term is off by ~lr)
    torch.testing.assert_close(flat(released), expected, rtol=0, atol=1e-9 * float(moved))
    keys = ("L_privacy", "L_acc", "L_forget", "L_total", "cosine")
    got = [[row[k] for k in keys] for row in report["loss_curve"]]
    np.testing.assert_allclose(got, curve, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Every defense


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_releases_a_new_model_and_leaves_its_inputs_alone(setup, name):
    model, x, y, unlearned = setup
    before_o, before_u, before_x = snapshot(model), snapshot(unlearned), x.clone()
    modes = [m.training for m in unlearned.modules()]
    released, report = protect(model, unlearned, x, y, name, **FAST_OPTIONS.get(name, {}))

    # inputs untouched
    for key, value in model.state_dict().items():
        assert torch.equal(value, before_o[key]), key
    for key, value in unlearned.state_dict().items():
        assert torch.equal(value, before_u[key]), key
    assert torch.equal(x, before_x) and modes == [m.training for m in unlearned.modules()]

    # a new model: own storage, θu's buffers, perturbed parameters only
    assert released is not unlearned and not released.training
    ptrs = {p.data_ptr() for p in unlearned.parameters()}
    assert not any(p.data_ptr() in ptrs for p in released.parameters())
    for (key, buf), ref in zip(released.named_buffers(), unlearned.buffers(), strict=True):
        assert torch.equal(buf, ref), key
    assert [p.shape for p in released.parameters()] == [p.shape for p in unlearned.parameters()]
    assert torch.isfinite(flat(released)).all()

    # the report: one flat JSON record with the common measurements
    json.dumps(report)
    for key in ("cosine", "delta_norm", "perturbation_norm", "outdiff", "seconds", "seed"):
        assert math.isfinite(report[key]), key
    assert (
        report["defense"] == name
        and report["hyperparameters"]
        == build_defense(name, **FAST_OPTIONS.get(name, {})).describe()
    )
    delta, released_delta = flat(unlearned) - flat(model), flat(released) - flat(model)
    assert report["cosine"] == pytest.approx(
        float(F.cosine_similarity(delta, released_delta, 0)), abs=1e-5
    )


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_simulates_on_a_batch_of_differences(setup, name):
    model, x, _, unlearned = setup
    defense = build_defense(name, **FAST_OPTIONS.get(name, {}))
    delta = flat(unlearned) - flat(model)
    deltas = torch.stack([delta, 2 * delta])
    images = torch.stack([x, digits().train.float_images([2])])
    out = defense.simulate(model.eval(), deltas, images, None, torch.Generator().manual_seed(0))
    assert out.shape == deltas.shape and torch.isfinite(out).all()
    if name == "none":
        assert torch.equal(out, deltas)
    else:
        assert not torch.equal(out, deltas)


def test_none_releases_theta_u_bit_for_bit(setup):
    model, x, y, unlearned = setup
    released, report = protect(model, unlearned, x, y, "none")
    assert torch.equal(flat(released), flat(unlearned))
    assert report["cosine"] == pytest.approx(1.0) and report["perturbation_norm"] == 0
    assert report["outdiff"] == 0


def test_noise_adds_gaussian_noise_of_std_0_1_to_the_parameters_only(setup):
    model, x, y, unlearned = setup
    released, _ = protect(model, unlearned, x, y, "noise")
    noise = flat(released) - flat(unlearned)
    assert float(noise.std()) == pytest.approx(0.1, rel=0.02)
    assert abs(float(noise.mean())) < 0.002
    _, quiet = protect(model, unlearned, x, y, "noise", std=0.0)
    assert quiet["perturbation_norm"] < 1e-6


def test_pruning_keeps_the_top_tenth_of_every_tensor_as_the_percentile_rule(setup):
    model, x, y, _ = setup
    unlearned = perturbed_copy(model, 1e-3, seed=2)
    released, report = protect(model, unlearned, x, y, "pruning")
    kept_total = 0
    for (name, p_o), p_u, p_r in zip(
        model.named_parameters(), unlearned.parameters(), released.parameters(), strict=True
    ):
        delta = (p_u - p_o).detach().numpy()
        threshold = np.percentile(np.abs(delta), 90)
        expected = np.abs(delta) >= threshold
        kept = (p_r - p_o).detach().numpy() != 0
        np.testing.assert_array_equal(kept, expected, err_msg=name)
        assert kept.sum() == kept_count(delta.size, 0.9)
        torch.testing.assert_close(p_r[torch.from_numpy(kept)], p_u[torch.from_numpy(kept)])
        assert torch.equal(p_r[~torch.from_numpy(kept)], p_o[~torch.from_numpy(kept)])
        kept_total += int(kept.sum())
    assert report["kept_fraction"] == pytest.approx(kept_total / flat(model).numel())
    assert 0.1 <= report["kept_fraction"] < 0.11


@pytest.mark.parametrize("size", [1, 7, 10, 100, 216, 1000, 64 * 32 * 3 * 3])
@pytest.mark.parametrize("ratio", [0.0, 0.6, 0.8, 0.9])
def test_kept_count_is_numpys_percentile_rule(size, ratio):
    values = np.random.default_rng(size).standard_normal(size)
    expected = int((np.abs(values) >= np.percentile(np.abs(values), 100 * ratio)).sum())
    assert kept_count(size, ratio) == expected
    if size % 10 == 0 and ratio == 0.9:
        assert kept_count(size, ratio) in (size // 10, size // 10 + 1)  # 10%, to one entry


def test_dgp_keeps_the_75th_to_95th_percentile_band_of_every_tensor(setup):
    model, x, y, _ = setup
    unlearned = perturbed_copy(model, 1e-3, seed=3)
    released, report = protect(model, unlearned, x, y, "dgp")
    for (name, p_o), p_u, p_r in zip(
        model.named_parameters(), unlearned.parameters(), released.parameters(), strict=True
    ):
        magnitude = (p_u - p_o).abs().detach().numpy()
        low, high = np.percentile(magnitude, 75), np.percentile(magnitude, 95)
        expected = (magnitude >= low) & (magnitude <= high)
        kept = (p_r - p_o).detach().numpy() != 0
        np.testing.assert_array_equal(kept, expected, err_msg=name)
    assert report["kept_fraction"] == pytest.approx(0.2, abs=0.01)


def test_soteria_zeroes_whole_columns_of_the_last_linear_weight_only(setup):
    model, x, y, unlearned = setup
    released, report = protect(model, unlearned, x, y, "soteria")
    head_name, head = classifier_head(model)
    key = f"{head_name}.weight"
    assert report["head"] == key
    d = head.in_features
    pruned = report["pruned_features"]
    assert len(pruned) == d - kept_count(d, 0.6)
    params_o, params_u = dict(model.named_parameters()), dict(unlearned.named_parameters())
    for name, p in released.named_parameters():
        if name != key:
            assert torch.equal(p, params_u[name]), name  # released as θu's own values
    delta = (params_u[key] - params_o[key]).detach()
    released_delta = (dict(released.named_parameters())[key] - params_o[key]).detach()
    assert torch.all(released_delta[:, pruned] == 0)
    rest = [f for f in range(d) if f not in set(pruned)]
    torch.testing.assert_close(released_delta[:, rest], delta[:, rest])
    # the pruned features are the lowest-scoring ones
    scores = feature_scores(model, x, eps=0.1, chunk_size=64)
    assert scores[pruned].max() <= scores[rest].min()


def test_soteria_scores_match_one_backward_pass_per_feature(setup):
    model, *_ = setup
    xs = digits().train.float_images([0, 1])
    scores = feature_scores(model, xs, eps=0.1, chunk_size=7)
    _, head = classifier_head(model)
    captured = []
    handle = head.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
    xg = xs.clone().requires_grad_(True)
    model.eval()(xg)
    handle.remove()
    r = captured[0]
    for f in (0, 5, r.shape[1] - 1):
        expected = 0.0
        for b in range(2):
            (gx,) = torch.autograd.grad(r[b, f], xg, retain_graph=True)
            expected += float(gx[b].norm() / (r[b, f].detach().abs() + 0.1))
        assert float(scores[f]) == pytest.approx(expected, rel=1e-4)


def test_outpost_without_noise_is_pruning_at_80_percent(setup):
    model, x, y, _ = setup
    unlearned = perturbed_copy(model, 1e-3, seed=4)
    outpost, _ = protect(model, unlearned, x, y, "outpost", noise_base=0.0)
    pruning, _ = protect(model, unlearned, x, y, "pruning", ratio=0.8)
    assert torch.equal(flat(outpost), flat(pruning))


def test_outpost_noise_lands_on_the_fisher_selected_positions_with_the_risk_std(setup):
    model, x, y, _ = setup
    unlearned = perturbed_copy(model, 1e-3, seed=5)
    noisy, report = protect(model, unlearned, x, y, "outpost")
    plain, _ = protect(model, unlearned, x, y, "outpost", noise_base=0.0)
    deltas = {
        n: (pu - po).detach()
        for (n, po), pu in zip(model.named_parameters(), unlearned.parameters(), strict=True)
    }
    fim = {n: d.pow(2).mean(0) for n, d in deltas.items()}
    threshold = np.percentile(torch.cat([f.reshape(-1) for f in fim.values()]).numpy(), 60)
    for (name, p_n), p_p, p_o in zip(
        noisy.named_parameters(), plain.parameters(), model.parameters(), strict=True
    ):
        noise = (p_n - p_p).detach()
        selected = (fim[name] >= threshold).expand_as(noise)
        assert torch.all(noise[~selected] == 0), name
        if selected.sum() > 2000:
            std = min(float(p_o.detach().var()), 1.0) * 0.8
            assert float(noise[selected].std()) == pytest.approx(std, rel=0.1), name
    assert report["perturbed"] and 0 < report["noised_fraction"] < 1


def test_outpost_perturbs_with_probability_one_over_one_plus_beta_t():
    original = torch.nn.Linear(30, 10)
    delta = {n: torch.randn(p.shape) for n, p in original.named_parameters()}
    outpost = build_defense("outpost", iteration=24)  # 1 / (1 + 0.125·24) = 0.25
    generator = torch.Generator().manual_seed(0)
    runs = [
        outpost.defend(delta, original=original, forget_x=torch.zeros(1), generator=generator)
        for _ in range(400)
    ]
    perturbed = [record["perturbed"] for _, record in runs]
    assert sum(perturbed) / 400 == pytest.approx(0.25, abs=0.06)
    for (out, record), flag in zip(runs, perturbed, strict=True):
        assert record["probability"] == pytest.approx(0.25)
        assert all((out[n] is d) != flag for n, d in delta.items())  # unperturbed: Δ as it is


# ---------------------------------------------------------------------------------------------
# Refusals and options


def test_identical_models_are_refused_with_nothing_was_unlearned(setup):
    model, x, y, _ = setup
    with pytest.raises(DefenseError, match="nothing was unlearned"):
        protect(model, copy.deepcopy(model), x, y)


def test_incompatible_models_and_bad_forget_sets_are_refused(setup):
    model, x, y, unlearned = setup
    narrow = build_model("convnet", 10, width=4, stem_stride=2)
    with pytest.raises(DefenseError, match="shapes differ"):
        protect(model, narrow, x, y)
    with pytest.raises(DefenseError, match=r"labels must lie in \[0, 10\)"):
        protect(model, unlearned, x, torch.tensor([10]))
    with pytest.raises(DefenseError, match=r"images in \[0, 1\]"):
        protect(model, unlearned, x * 255, y)
    with pytest.raises(DefenseError, match="forget_y must be"):
        protect(model, unlearned, x, torch.tensor([1, 2]))
    nan = copy.deepcopy(unlearned)
    with torch.no_grad():
        next(nan.parameters())[0] = float("nan")
    with pytest.raises(DefenseError, match="non-finite"):
        protect(model, nan, x, y)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("shield", {"lr": 0}, "lr must be > 0"),
        ("shield", {"lr": "fast"}, "lr must be float"),
        ("shield", {"iterations": 0}, "iterations must be ≥ 1"),
        ("shield", {"lambda_acc": -1}, "lambda_acc must be ≥ 0"),
        ("shield", {"objective": "flip"}, "objective must be one of anti-align, orthogonal"),
        ("shield", {"aim": 1}, "aim must be bool"),
        ("shield", {"lamda_acc": 0.5}, "unknown option"),
        ("noise", {"std": -0.1}, "std must be ≥ 0"),
        ("pruning", {"ratio": 1.0}, r"ratio must lie in \[0, 1\)"),
        ("dgp", {"lower": 0.9, "upper": 0.8}, "lower .* must be below upper"),
        ("soteria", {"eps": 0}, "eps must be > 0"),
        ("outpost", {"phi": 1.5}, r"phi must lie in \[0, 1\]"),
    ],
)
def test_options_are_validated_at_construction_with_one_message_per_rule(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_defense(name, **options)


def test_unknown_defense_lists_the_valid_ones():
    with pytest.raises(
        KeyError, match="choose one of: dgp, noise, none, outpost, pruning, shield, soteria"
    ):
        build_defense("blur")


def test_the_package_facade_is_the_defenses_protect(setup):
    model, x, y, unlearned = setup
    a, report_a = unlearnshield.protect(model, unlearned, x, y, "pruning")
    b, report_b = protect(model, unlearned, x, y, defense="pruning")
    assert torch.equal(flat(a), flat(b)) and report_a["cosine"] == report_b["cosine"]


def test_forget_sets_of_several_samples_average_l_forget(setup):
    model, *_ = setup
    data = digits()
    x, y = data.train.float_images([3, 4, 5]), data.train.labels[[3, 4, 5]]
    unlearned = one_step_release(model, x, y)
    released, report = protect(model, unlearned, x, y, lambda_forget=2.0)
    per_sample = outdiff(unlearned, released, x)
    assert report["num_forget"] == 3 and len(report["outdiff_per_sample"]) == 3
    assert report["outdiff"] == pytest.approx(float(per_sample.mean()), abs=1e-6)
    with torch.no_grad():
        distances = output_distance(unlearned(x), released(x))
    torch.testing.assert_close(distances, per_sample)


# ---------------------------------------------------------------------------------------------
# The defense-aware attacker


def test_defense_aware_attacker_is_registered_with_shield_by_default():
    attacker = ATTACKERS.get("defense-aware")()
    assert isinstance(attacker, DefenseAwareAttacker)
    assert attacker.describe()["defense"] == "shield"
    with pytest.raises(ValueError, match="refresh_every must be ≥ 1"):
        DefenseAwareAttacker("pruning", refresh_every=0)
    with pytest.raises(ValueError, match="unknown option"):
        DefenseAwareAttacker("pruning", defense_options={"rate": 0.5})


def test_defense_aware_offset_makes_the_dummy_gradient_the_defended_one(setup):
    model, x, _, unlearned = setup
    target = (flat(unlearned) - flat(model))[None]
    attacker = DefenseAwareAttacker("pruning", refresh_every=7)
    offset, refresh = attacker.offset(model, target, seed=0)
    assert refresh == 7
    gradient = torch.randn(1, target.shape[1], generator=torch.Generator().manual_seed(1))
    shifted = gradient + offset(0, gradient, x[None], torch.tensor([0]))
    # pruning is scale-invariant: g + δ_sim/s is g pruned tensor by tensor
    layout = ParameterLayout.of(model)
    for name, g in layout.as_dict(gradient[0]).items():
        s = layout.as_dict(shifted[0])[name]
        keep = s.abs() > 1e-5 * g.abs().max()  # pruned entries cancel to rounding level
        assert int(keep.sum()) == kept_count(g.numel(), 0.9), name
        torch.testing.assert_close(s[keep], g[keep])
        assert g[keep].abs().min() >= g[~keep].abs().max()


def test_defense_aware_shield_reproduces_the_defense_with_its_own_randomness(setup):
    model, x, y, unlearned = setup
    released, report = protect(model, unlearned, x, y, seed=0)
    delta = flat(unlearned) - flat(model)
    target = (flat(released) - flat(model))[None]
    # an attacker that knows η and has found x exactly: its Δ¹ is the true Δ
    attacker = DefenseAwareAttacker("shield", difference_scale=1.0)
    offset_a, _ = attacker.offset(model, target, seed=0)
    offset_b, _ = attacker.offset(model, target, seed=0)
    row = torch.tensor([0])
    a, b = offset_a(0, delta[None], x[None], row), offset_b(0, delta[None], x[None], row)
    assert torch.equal(a, b)  # seeded by the attack seed
    defender = flat(released) - flat(unlearned)
    assert not torch.allclose(a[0], defender)  # not the defender's draw, though both seeds are 0
    assert float(a[0].norm()) == pytest.approx(float(defender.norm()), rel=0.2)
    simulated_cos = float(F.cosine_similarity(delta, delta + a[0], 0))
    assert simulated_cos == pytest.approx(report["cosine"], abs=0.2)
    # by default the simulated difference takes the released difference's norm
    default = DefenseAwareAttacker("pruning").offset(model, target, seed=0)[0]
    pruned = delta[None] * 1e3 + default(0, delta[None] * 1e3, x[None], row)
    assert float(pruned.norm()) < float(delta.norm()) * 1e3


def test_defense_aware_attack_runs_and_returns_a_reconstruction(setup):
    model, x, y, unlearned = setup
    released, _ = protect(model, unlearned, x, y)
    config = AttackConfig(iterations=6, restarts=1, tv_weight=0.1, log_every=0)
    attacker = DefenseAwareAttacker("shield", defense_options={"iterations": 2}, refresh_every=3)
    rec = reconstruct(
        model, released, input_shape=(3, 32, 32), labels=y, attacker=attacker, budget=config
    )
    assert rec.images.shape == (1, 1, 3, 32, 32)
    assert torch.isfinite(rec.cosine).all() and rec.attacker["defense"] == "shield"
    assert float(rec.images.min()) >= 0 and float(rec.images.max()) <= 1
