"""Training: it learns, it is deterministic for a seed, and the CPU recipe meets its floor."""

import pytest
import torch

from unlearnshield.models import build_model
from unlearnshield.training import (
    RECIPES,
    TrainRecipe,
    augment,
    evaluate_accuracy,
    seed_everything,
    train_model,
)

from ._fixtures import digits


def small_model(data, seed=0):
    seed_everything(seed)
    return build_model(
        "convnet",
        data.num_classes,
        input_shape=data.input_shape,
        mean=data.mean,
        std=data.std,
        width=4,
        stem_stride=2,
    )


def test_short_run_on_digits_learns_far_above_chance():
    data = digits()
    model = small_model(data)
    recipe = RECIPES.get("cpu").replace(epochs=2, batch_size=64)
    report = train_model(model, data.train, recipe=recipe, seed=0, test=data.test, progress=False)
    assert report.test_accuracy > 0.5  # chance is 0.1
    assert report.epochs[1]["loss"] < report.epochs[0]["loss"]
    assert report.test_accuracy == evaluate_accuracy(model, data.test)


def test_training_is_deterministic_for_a_seed():
    data = digits()
    split = data.train.subset(torch.arange(256))
    recipe = TrainRecipe(epochs=1, batch_size=64, crop_padding=4)
    runs = []
    for _ in range(2):
        model = small_model(data, seed=7)
        train_model(model, split, recipe=recipe, seed=7, progress=False)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    other = small_model(data, seed=8)
    train_model(other, split, recipe=recipe, seed=8, progress=False)
    assert not torch.equal(other.state_dict()["net.linear.weight"], runs[0]["net.linear.weight"])


def test_augment_crops_and_flips_like_torchvision():
    x = torch.rand(64, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    flipped = augment(x, crop_padding=0, flip=True, generator=g)
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and 10 < int(mirrored.sum()) < 54
    cropped = augment(x, crop_padding=2, flip=False, generator=g)
    assert cropped.shape == x.shape
    assert (cropped == 0).any()  # zero padding shows at some borders


def test_reference_recipe_is_the_attack_papers():
    ref = RECIPES.get("reference")
    assert (ref.lr, ref.momentum, ref.weight_decay, ref.batch_size, ref.epochs) == (
        0.1,
        0.0,
        5e-4,
        128,
        120,
    )
    assert ref.milestones == (44, 74, 105) and ref.crop_padding == 4 and ref.flip


def test_recipe_validation():
    with pytest.raises(ValueError, match="epochs"):
        TrainRecipe(epochs=0)
    with pytest.raises(ValueError, match="schedule"):
        TrainRecipe(epochs=1, schedule="cosine")


@pytest.mark.slow
def test_cpu_recipe_reaches_65_percent_on_cifar10(cifar_cpu_model):
    _, _, indices, report = cifar_cpu_model
    assert len(indices) == RECIPES.get("cpu").subset
    assert report.test_accuracy >= 0.65
