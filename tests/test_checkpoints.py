"""Checkpoints: round trips, users' own state dicts, and every bad-input case."""

import os
import pickle

import pytest
import torch

from unlearnshield import checkpoints
from unlearnshield.checkpoints import (
    CheckpointError,
    build_metadata,
    load_checkpoint,
    save_checkpoint,
    save_state_dict_like,
)
from unlearnshield.models import build_model


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model("convnet", 10, width=4, stem_stride=2, mean=(0.5,) * 3, std=(0.25,) * 3)


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_keeps_weights_and_metadata(tmp_path, model):
    meta = build_metadata(
        model, dataset={"name": "digits", "source": "sklearn"}, train_indices=[5, 2, 9], seed=3
    )
    path = save_checkpoint(model, tmp_path / "m.safetensors", meta)
    ckpt = load_checkpoint(path)
    assert same_weights(ckpt.model, model)
    assert ckpt.metadata["architecture"]["kwargs"] == {"width": 4, "stem_stride": 2}
    assert ckpt.metadata["seed"] == 3
    assert ckpt.train_indices.tolist() == [5, 2, 9]
    assert ckpt.model.normalization == model.normalization
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(ckpt.model(x), model.eval()(x))


def test_saved_keys_are_the_backbones(tmp_path, model):
    path = save_checkpoint(model, tmp_path / "m.safetensors", build_metadata(model))
    from safetensors.torch import load_file

    assert set(load_file(path)) == set(model.net.state_dict())


@pytest.mark.parametrize(
    "layout",
    [
        lambda sd: sd,
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": sd, "epoch": 3},
    ],
    ids=["plain", "dataparallel", "wrapped"],
)
def test_users_plain_state_dicts_load_with_an_architecture(tmp_path, model, layout):
    path = tmp_path / "user.pth"
    torch.save(layout(model.net.state_dict()), path)
    ckpt = load_checkpoint(path, arch="convnet", arch_kwargs={"width": 4, "stem_stride": 2})
    assert same_weights(ckpt.model.net, model.net)
    assert ckpt.metadata["source"] == "external"
    # written back in the same layout
    out = tmp_path / "released.pth"
    save_state_dict_like(ckpt.model, out, ckpt.layout, extra=ckpt.extra)
    written, given = torch.load(out, weights_only=True), torch.load(path, weights_only=True)
    assert written.keys() == given.keys()
    if "state_dict" in given:
        assert written["epoch"] == 3
        written, given = written["state_dict"], given["state_dict"]
    assert all(torch.equal(written[k], given[k]) for k in given)


def test_users_safetensors_without_metadata_and_own_module(tmp_path, model):
    from safetensors.torch import save_file

    path = tmp_path / "user.safetensors"
    save_file(model.net.state_dict(), str(path))
    with pytest.raises(CheckpointError, match="architecture is unknown"):
        load_checkpoint(path)
    target = build_model("convnet", 10, width=4, stem_stride=2).net
    ckpt = load_checkpoint(path, arch=target)
    assert same_weights(ckpt.model.net, model.net)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/unlearnshield-pwned",))


def test_pickled_code_is_refused_and_not_run(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": Evil()}, fh)
    torch.save({"weights": Evil()}, tmp_path / "evil2.pt")
    for p in (path, tmp_path / "evil2.pt"):
        with pytest.raises(CheckpointError, match=r"refused|not a torch"):
            load_checkpoint(p, arch="convnet")
    assert not os.path.exists("/tmp/unlearnshield-pwned")


def test_missing_empty_truncated_and_foreign_files(tmp_path, model):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty.safetensors")
    good = save_checkpoint(model, tmp_path / "m.safetensors", build_metadata(model))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(cut)
    torch.save(model.net.state_dict(), tmp_path / "m.pth")
    cut_pth = tmp_path / "cut.pth"
    cut_pth.write_bytes((tmp_path / "m.pth").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(cut_pth, arch="convnet")
    (tmp_path / "notes.txt").write_text("hello, not a model")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "notes.txt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="no state dict"):
        load_checkpoint(tmp_path / "list.pt", arch="convnet")


CONVNET4 = {"width": 4, "stem_stride": 2}


def test_key_and_shape_mismatches_are_named(tmp_path, model):
    sd = model.net.state_dict()
    torch.save({k: v for k, v in sd.items() if k != "linear.bias"}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys linear\.bias"):
        load_checkpoint(tmp_path / "missing.pth", arch="convnet", arch_kwargs=CONVNET4)
    torch.save({**sd, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys extra\.weight"):
        load_checkpoint(tmp_path / "extra.pth", arch="convnet", arch_kwargs=CONVNET4)
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(
            tmp_path / "m.pth", arch="convnet", arch_kwargs={"width": 8, "stem_stride": 2}
        )


def test_architecture_differing_from_metadata_is_refused(tmp_path, model):
    path = save_checkpoint(model, tmp_path / "m.safetensors", build_metadata(model))
    with pytest.raises(CheckpointError, match="saved as architecture 'convnet'"):
        load_checkpoint(path, arch="resnet18")
    assert load_checkpoint(path, arch="convnet", arch_kwargs=CONVNET4).model is not None


def test_non_finite_weights_are_refused(tmp_path, model):
    sd = model.net.state_dict()
    sd["linear.weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match="non-finite"):
        load_checkpoint(tmp_path / "nan.pth", arch="convnet", arch_kwargs=CONVNET4)


def test_interrupted_save_leaves_no_file(tmp_path, model, monkeypatch):
    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "save_file", broken_save)
    target = tmp_path / "m.safetensors"
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, target, build_metadata(model))
    assert list(tmp_path.iterdir()) == []


def test_overwrite_is_atomic_and_keeps_old_file_on_failure(tmp_path, model, monkeypatch):
    target = save_checkpoint(model, tmp_path / "m.safetensors", build_metadata(model, seed=1))
    before = target.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, target, build_metadata(model, seed=2))
    assert target.read_bytes() == before


def test_a_classifier_state_dict_is_refused_with_what_to_save_instead(model, tmp_path):
    # model.state_dict() of the wrapper has 'net.'-prefixed keys; plain files hold the
    # backbone's keys (model.net.state_dict()), which load
    wrapped, plain = tmp_path / "wrapped.pth", tmp_path / "plain.pth"
    torch.save(model.state_dict(), wrapped)
    torch.save(model.net.state_dict(), plain)
    kwargs = dict(arch="convnet", arch_kwargs={"width": 4, "stem_stride": 2})
    with pytest.raises(CheckpointError, match=r"no 2-D fc.weight.*model\.net\.state_dict\(\)"):
        load_checkpoint(wrapped, **kwargs)
    assert same_weights(load_checkpoint(plain, **kwargs).model, model)
