"""Shared test helpers: a tiny model trained on the embedded digits, and one-step releases."""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F

from unlearnshield.data import load_dataset
from unlearnshield.models import build_model
from unlearnshield.training import RECIPES, seed_everything, train_model


@functools.cache
def digits():
    return load_dataset("digits")


@functools.cache
def tiny_digits_model(width: int = 8, epochs: int = 2):
    """A ConvNet (stride-2 stem) trained briefly on digits; cached per test session."""
    data = digits()
    seed_everything(0)
    model = build_model(
        "convnet",
        data.num_classes,
        input_shape=data.input_shape,
        mean=data.mean,
        std=data.std,
        width=width,
        stem_stride=2,
    )
    recipe = RECIPES.get("cpu").replace(epochs=epochs, batch_size=64)
    train_model(model, data.train, recipe=recipe, seed=0, progress=False)
    return model.eval()


def one_step_release(model, x, y, step_size=1e-3):
    """θu = θo + η ∇θ CE(f(x), y), BatchNorm in eval mode (the attack paper's unlearning)."""
    released = copy.deepcopy(model).eval()
    loss = F.cross_entropy(released(x), y)
    grads = torch.autograd.grad(loss, list(released.parameters()))
    with torch.no_grad():
        for p, g in zip(released.parameters(), grads, strict=True):
            p.add_(step_size * g)
    return released
