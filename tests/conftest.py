"""Locations shared by the tests: the offline data and weights in ../shared."""

import os
from pathlib import Path

import pytest

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
