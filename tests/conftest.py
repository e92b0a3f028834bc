"""Locations shared by the tests: the offline data and weights in ../shared."""

import os
from pathlib import Path

import pytest
import torch

# The test models are tiny: a second intra-op thread buys nothing there, and on a busy
# two-core machine OpenMP's spinning threads slow such runs down tenfold.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def shared_root() -> Path:
    """``$UNLEARNSHIELD_SHARED`` or the ``shared`` folder beside the checkout."""
    return Path(os.environ.get("UNLEARNSHIELD_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (skips the test when it is absent)."""
    root = shared_root()
    data = root / "data" if (root / "data").is_dir() else root
    if not (data / "cifar10-jpeg.tar.gz").exists():
        pytest.skip(f"no offline CIFAR-10 copy under {data}")
    return data


@pytest.fixture(scope="session")
def lpips_backbone() -> Path:
    """The offline LPIPS AlexNet backbone (skips the test when it is absent)."""
    path = shared_root() / "weights" / "lpips-alexnet-features.pth"
    if not path.exists():
        pytest.skip(f"no LPIPS backbone at {path}")
    return path


@pytest.fixture(scope="session")
def cifar_cpu_model(shared_data):
    """θo of the ``cpu`` recipe on CIFAR-10 (JPEG copy), trained once per session (~2 min)."""
    from unlearnshield.data import load_dataset, subset_indices
    from unlearnshield.models import build_model
    from unlearnshield.training import RECIPES, seed_everything, train_model

    data = load_dataset("cifar10", shared_data, download=False)
    recipe = RECIPES.get("cpu")
    indices = subset_indices(len(data.train), recipe.subset, seed=0)
    seed_everything(0)
    model = build_model("convnet", 10, mean=data.mean, std=data.std, width=16, stem_stride=2)
    report = train_model(
        model, data.train.subset(indices), recipe=recipe, seed=0, test=data.test, progress=False
    )
    return model, data, indices, report
