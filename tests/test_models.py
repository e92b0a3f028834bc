"""Architectures: parameter counts of the papers' models, shapes, normalisation, registry."""

import pytest
import torch

from unlearnshield.models import MODELS, build_model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("resnet18", {}, 11_173_962),
        ("convnet", {"width": 64}, 2_904_970),
        ("convnet", {"width": 16, "stem_stride": 2}, 181_994),
    ],
)
def test_parameter_counts_match_the_reference(name, kwargs, expected):
    assert n_params(build_model(name, 10, **kwargs)) == expected


def test_convnet_has_eight_convolutions():
    model = build_model("convnet", 10, width=8)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 8


@pytest.mark.parametrize("name", ["resnet18", "convnet"])
@pytest.mark.parametrize("size", [32, 96])
def test_models_accept_cifar_and_stl10_inputs(name, size):
    kwargs = {"width": 4, "stem_stride": 2} if name == "convnet" else {}
    model = build_model(name, 10, input_shape=(3, size, size), **kwargs).eval()
    assert model(torch.rand(2, 3, size, size)).shape == (2, 10)


def test_normalisation_is_inside_the_model_and_not_a_parameter():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    model = build_model("convnet", 10, width=4, stem_stride=2, mean=mean, std=std).eval()
    bare = build_model("convnet", 10, width=4, stem_stride=2).eval()
    bare.net.load_state_dict(model.net.state_dict())
    x = torch.rand(3, 3, 32, 32)
    normalised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), bare(normalised))
    assert all(not name.startswith(("mean", "std")) for name, _ in model.named_parameters())
    assert "mean" not in model.state_dict()


def test_registry_rejects_unknown_names_listing_valid_ones():
    with pytest.raises(KeyError, match=r"convnet.*resnet18"):
        build_model("vgg", 10)
    assert MODELS.names() == ["convnet", "resnet18"]


def test_user_factory_by_import_path():
    model = build_model("torch.nn:Flatten", 10, input_shape=(3, 4, 4))
    assert model(torch.rand(2, 3, 4, 4)).shape == (2, 48)
    with pytest.raises(ValueError, match="cannot import"):
        build_model("no_such_pkg.mod:f", 10)
