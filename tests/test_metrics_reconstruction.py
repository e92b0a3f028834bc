"""Reconstruction metrics against independent references, on real images where they exist."""

from __future__ import annotations

import io
import logging
import math
import os
import re
import socket
import tarfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import pytorch_msssim
import torch
from PIL import Image

import unlearnshield.metrics.lpips as lpips_module
import unlearnshield.metrics.reconstruction as reconstruction_module
from unlearnshield.metrics import (
    BACKBONE_ENV_VAR,
    CALIBRATION_ROWS,
    LPIPSMetric,
    LPIPSUnavailable,
    calibration_images,
    mse,
    psnr,
    reconstruction_scores,
    resolve_backbone,
    ssim,
    try_lpips,
)

skimage_metrics = pytest.importorskip("skimage.metrics")

SHARED = Path(
    os.environ.get("UNLEARNSHIELD_SHARED", Path(__file__).resolve().parents[1].parent / "shared")
)
BACKBONE_FILE = SHARED / "weights" / "lpips-alexnet-features.pth"
LPIPS_EXAMPLES = SHARED / "data" / "lpips-examples"
CIFAR_ARCHIVE = SHARED / "data" / "cifar10-jpeg.tar.gz"

needs_backbone = pytest.mark.skipif(
    not BACKBONE_FILE.is_file(), reason=f"offline LPIPS backbone {BACKBONE_FILE} absent"
)


def _structured(n: int, size: int, seed: int) -> torch.Tensor:
    """Smooth sinusoidal gratings with random frequencies and phases per channel, in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    coords = torch.linspace(0, 2 * math.pi, size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    freq = 1 + 6 * torch.rand(n, 3, 1, 1, generator=generator, dtype=torch.float64)
    phase = 6 * torch.rand(n, 3, 1, 1, generator=generator, dtype=torch.float64)
    return 0.5 + 0.4 * torch.sin(freq * cols + phase) * torch.cos(0.7 * freq * rows)


def _image_pair(kind: str, size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(size)
    if kind == "random":
        recon = torch.rand(4, 3, size, size, generator=generator, dtype=torch.float64)
        truth = torch.rand(4, 3, size, size, generator=generator, dtype=torch.float64)
    else:  # structured truth, noisy reconstruction of it
        truth = _structured(4, size, seed=size)
        noise = 0.1 * torch.randn(truth.shape, generator=generator, dtype=torch.float64)
        recon = (truth + noise).clamp(0, 1)
    return recon.to(dtype), truth.to(dtype)


def _skimage_ssim(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    values = [
        skimage_metrics.structural_similarity(
            r.double().numpy(),
            t.double().numpy(),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            channel_axis=0,
        )
        for r, t in zip(recon, truth, strict=True)
    ]
    return torch.tensor(values, dtype=torch.float64)


def _read_png(path: Path) -> torch.Tensor:
    pixels = np.array(Image.open(path).convert("RGB"))
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).float() / 255


# --- SSIM ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 96])
@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_ssim_matches_skimage_wang_mode(size, kind, dtype, atol):
    recon, truth = _image_pair(kind, size, dtype)
    ours = ssim(recon, truth)
    assert ours.shape == (4,)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.double(), _skimage_ssim(recon, truth), rtol=0, atol=atol)


@pytest.mark.parametrize("kind", ["random", "structured"])
def test_ssim_of_an_image_with_itself_is_one(kind):
    _, truth = _image_pair(kind, 32, torch.float64)
    torch.testing.assert_close(ssim(truth, truth), torch.ones(4, dtype=torch.float64))


def test_ssim_is_per_image_and_batch_independent():
    recon, truth = _image_pair("structured", 32, torch.float32)
    looped = torch.cat([ssim(r[None], t[None]) for r, t in zip(recon, truth, strict=True)])
    torch.testing.assert_close(ssim(recon, truth), looped)
    assert len(set(ssim(recon, truth).tolist())) == 4


def test_reconstructions_are_clamped_before_scoring():
    recon, truth = _image_pair("structured", 32, torch.float64)
    overshoot = recon * 1.3 - 0.15  # leaves [0, 1] on both sides
    assert overshoot.min() < 0 and overshoot.max() > 1
    clamped = overshoot.clamp(0, 1)
    for metric in (ssim, psnr, mse):
        torch.testing.assert_close(metric(overshoot, truth), metric(clamped, truth))
    unclamped = pytorch_msssim.ssim(overshoot, truth, data_range=1.0, size_average=False)
    assert not torch.allclose(unclamped, ssim(overshoot, truth), atol=1e-4)


def test_input_validation():
    truth = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="same shape"):
        ssim(truth[:1], truth)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        psnr(truth[0], truth[0])
    with pytest.raises(TypeError, match="floating-point"):
        mse((truth * 255).to(torch.uint8), truth)
    with pytest.raises(ValueError, match="de-normalise"):
        ssim(truth, truth * 2 - 1)  # truth still normalised to [-1, 1]
    with pytest.raises(ValueError, match="at least 11"):
        ssim(truth[..., :10, :10], truth[..., :10, :10])


# --- PSNR and MSE -------------------------------------------------------------------------------


def test_psnr_and_mse_follow_their_definitions_per_image():
    generator = torch.Generator().manual_seed(1)
    truth = 0.2 + 0.6 * torch.rand(3, 3, 32, 32, generator=generator, dtype=torch.float64)
    offsets = torch.tensor([0.01, 0.05, 0.15], dtype=torch.float64)
    signs = torch.where(torch.rand(truth.shape, generator=generator) < 0.5, -1.0, 1.0)
    recon = truth + offsets.view(3, 1, 1, 1) * signs.double()

    torch.testing.assert_close(mse(recon, truth), offsets**2)
    torch.testing.assert_close(psnr(recon, truth), -20 * torch.log10(offsets))
    expected_mse = ((recon.numpy() - truth.numpy()) ** 2).reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(mse(recon, truth).numpy(), expected_mse, rtol=1e-12)


def test_psnr_of_identical_images_is_inf():
    truth = torch.rand(2, 3, 32, 32)
    recon = truth.clone()
    recon[1] = (recon[1] + 0.1).clamp(0, 1)
    values = psnr(recon, truth)
    assert math.isinf(values[0].item()) and values[0] > 0
    assert math.isfinite(values[1].item())


# --- LPIPS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def offline_lpips() -> LPIPSMetric:
    if not BACKBONE_FILE.is_file():
        pytest.skip(f"offline LPIPS backbone {BACKBONE_FILE} absent")
    metric, reason = try_lpips(BACKBONE_FILE)
    assert reason is None and metric is not None
    return metric


@pytest.fixture(scope="module")
def examples() -> dict[str, torch.Tensor]:
    if not LPIPS_EXAMPLES.is_dir():
        pytest.skip(f"LPIPS example images {LPIPS_EXAMPLES} absent")
    return {
        name: _read_png(LPIPS_EXAMPLES / f"{name}.png") for name in ("ex_ref", "ex_p0", "ex_p1")
    }


@pytest.fixture
def no_download(monkeypatch):
    """Fail loudly if anything tries the network or torchvision's downloader."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_lpips_reproduces_the_published_example_distances(offline_lpips, examples):
    ref = examples["ex_ref"]
    assert round(offline_lpips(examples["ex_p0"], ref).item(), 3) == 0.722
    assert round(offline_lpips(examples["ex_p1"], ref).item(), 3) == 0.138
    assert offline_lpips.info["lpips_backbone_sha256"] == (
        "d6f747d1db300e743dbb5ae026b6370e1133379cdccf66231c91d0cef8c28eea"
    )


def test_lpips_basic_properties(offline_lpips, examples):
    ref = examples["ex_ref"].repeat(2, 1, 1, 1)
    other = torch.cat([examples["ex_p0"], examples["ex_p1"]])
    distances = offline_lpips(other, ref)
    assert distances.shape == (2,) and distances.dtype == torch.float32
    torch.testing.assert_close(offline_lpips(ref, ref), torch.zeros(2))
    torch.testing.assert_close(offline_lpips(ref, other), distances, rtol=0, atol=1e-6)
    looped = torch.cat([offline_lpips(o[None], r[None]) for o, r in zip(other, ref, strict=True)])
    torch.testing.assert_close(distances, looped)
    overshoot = other * 1.2 - 0.1
    torch.testing.assert_close(
        offline_lpips(overshoot, ref), offline_lpips(overshoot.clamp(0, 1), ref)
    )


def test_lpips_rejects_small_and_grey_images(offline_lpips):
    small = torch.rand(1, 3, 30, 40)
    with pytest.raises(ValueError, match="at least 31"):
        offline_lpips(small, small)
    offline_lpips(torch.rand(1, 3, 31, 31), torch.rand(1, 3, 31, 31))  # the smallest size works
    grey = torch.rand(1, 1, 32, 32)
    with pytest.raises(ValueError, match="RGB"):
        offline_lpips(grey, grey)


def test_lpips_network_is_built_once_per_process(offline_lpips, examples, monkeypatch):
    def must_not_build(*args, **kwargs):
        raise AssertionError("the LPIPS network was rebuilt")

    monkeypatch.setattr(lpips_module, "_build_network", must_not_build)
    again = LPIPSMetric(BACKBONE_FILE)
    ref = examples["ex_ref"]
    assert again(examples["ex_p1"], ref) == offline_lpips(examples["ex_p1"], ref)


@needs_backbone
def test_lpips_accepts_a_whole_torchvision_alexnet_state_dict(
    offline_lpips, examples, tmp_path, no_download
):
    features = torch.load(BACKBONE_FILE, weights_only=True)
    whole = {f"features.{key}": value for key, value in features.items()}
    whole["classifier.1.weight"] = torch.zeros(8, 8)  # ignored
    path = tmp_path / "alexnet-whole.pth"
    torch.save(whole, path)

    metric, reason = try_lpips(path)
    assert reason is None
    assert metric.info["lpips_backbone_source"] == "argument"
    ref, p0 = examples["ex_ref"], examples["ex_p0"]
    torch.testing.assert_close(metric(p0, ref), offline_lpips(p0, ref), rtol=0, atol=0)


@needs_backbone
@pytest.mark.parametrize("damage", ["wrong_shape", "missing_layer", "not_a_state_dict", "garbage"])
def test_a_broken_backbone_file_is_reported_with_its_name(damage, tmp_path, no_download):
    features = torch.load(BACKBONE_FILE, weights_only=True)
    path = tmp_path / f"{damage}.pth"
    if damage == "wrong_shape":
        features["6.weight"] = features["6.weight"][:, :, :2]
        torch.save(features, path)
    elif damage == "missing_layer":
        del features["10.bias"]
        torch.save(features, path)
    elif damage == "not_a_state_dict":
        torch.save(features["0.weight"], path)
    else:
        path.write_bytes(b"not a checkpoint")

    if damage == "garbage":
        with pytest.raises(LPIPSUnavailable, match=re.escape(str(path))):
            LPIPSMetric(path).load()
    metric, reason = try_lpips(path)
    assert metric is None and str(path) in reason


def test_missing_backbone_without_download_is_unavailable(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(BACKBONE_ENV_VAR, raising=False)
    metric, reason = try_lpips()
    assert metric is None
    assert BACKBONE_ENV_VAR in reason
    assert (
        str(tmp_path / "torch-home" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in reason
    )
    assert "allow_download=False" in reason

    missing = tmp_path / "nowhere.pth"
    monkeypatch.setenv(BACKBONE_ENV_VAR, str(missing))
    metric, reason = try_lpips()
    assert metric is None
    assert BACKBONE_ENV_VAR in reason and str(missing) in reason

    with pytest.raises(LPIPSUnavailable, match="backbone_path"):
        LPIPSMetric(tmp_path / "also-missing.pth")(
            torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
        )


def test_offline_download_attempt_fails_fast_with_a_reason(tmp_path, monkeypatch, no_download):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(BACKBONE_ENV_VAR, raising=False)
    started = time.monotonic()
    metric, reason = try_lpips(allow_download=True, download_timeout_s=2.0)
    assert time.monotonic() - started < 2.0
    assert metric is None
    assert "download.pytorch.org" in reason and "network disabled in this test" in reason


def test_download_probe_goes_through_the_configured_proxy(tmp_path, monkeypatch):
    probed = []

    def refuse(address, *args, **kwargs):
        probed.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(BACKBONE_ENV_VAR, raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("https_proxy", "http://proxy.invalid:3128")
    metric, reason = try_lpips(allow_download=True, download_timeout_s=1.0)
    assert metric is None and "proxy.invalid:3128" in reason
    assert probed == [("proxy.invalid", 3128)]


@needs_backbone
def test_backbone_resolution_order(tmp_path, monkeypatch):
    torch_home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.delenv(BACKBONE_ENV_VAR, raising=False)
    cached = torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    cached.parent.mkdir(parents=True)
    cached.symlink_to(BACKBONE_FILE)
    assert resolve_backbone().kind == "torch_hub_cache"

    monkeypatch.setenv(BACKBONE_ENV_VAR, str(BACKBONE_FILE))
    assert resolve_backbone().kind == "environment"

    monkeypatch.setenv(BACKBONE_ENV_VAR, str(tmp_path / "missing.pth"))
    with pytest.raises(LPIPSUnavailable, match=BACKBONE_ENV_VAR):
        resolve_backbone()  # a wrong explicit setting is not silently skipped
    assert resolve_backbone(BACKBONE_FILE).kind == "argument"


@needs_backbone
def test_unknown_backbone_hash_is_logged_not_fatal(tmp_path, monkeypatch, caplog, examples):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(BACKBONE_ENV_VAR, raising=False)
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(BACKBONE_FILE.read_bytes())  # right weights, not torchvision's hash

    with caplog.at_level(logging.INFO, logger="unlearnshield.metrics.lpips"):
        metric, reason = try_lpips()
    assert reason is None
    assert any(
        record.levelno == logging.WARNING and "hash prefix" in record.getMessage()
        for record in caplog.records
    )
    assert round(metric(examples["ex_p1"], examples["ex_ref"]).item(), 3) == 0.138


# --- calibration rows and the score bundle ------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_images() -> torch.Tensor:
    """Seven test images per CIFAR-10 class (70 in all), decoded from the shared JPEG archive."""
    if not CIFAR_ARCHIVE.is_file():
        pytest.skip(f"CIFAR-10 archive {CIFAR_ARCHIVE} absent")
    per_class: dict[str, list[np.ndarray]] = defaultdict(list)
    with tarfile.open(CIFAR_ARCHIVE, "r:gz") as archive:
        for member in archive:
            parts = member.name.split("/")  # cifar10/<split>/<class>/<NNNN>.jpg
            wanted = len(parts) == 4 and parts[1] == "test" and member.isfile()
            if wanted and len(per_class[parts[2]]) < 7:
                data = archive.extractfile(member).read()
                per_class[parts[2]].append(np.array(Image.open(io.BytesIO(data)).convert("RGB")))
            if len(per_class) == 10 and all(len(images) == 7 for images in per_class.values()):
                break
    stacked = np.stack([image for name in sorted(per_class) for image in per_class[name]])
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).float() / 255


def test_calibration_images_are_what_they_claim():
    truth = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    rows = calibration_images(truth, seed=5)
    assert tuple(rows) == CALIBRATION_ROWS
    for image in rows.values():
        assert image.shape == truth.shape and image.dtype == truth.dtype

    generator = torch.Generator().manual_seed(5)
    expected_init = torch.randn(truth.shape, generator=generator).clamp(0, 1).double()
    torch.testing.assert_close(rows["random_init"], expected_init)
    assert not torch.equal(calibration_images(truth, seed=6)["random_init"], rows["random_init"])

    flat = rows["mean_colour"]
    torch.testing.assert_close(flat[:, :, 7, 11], truth.mean(dim=(2, 3)))
    assert torch.all(flat.flatten(2).std(dim=2) == 0)

    block = rows["block_mean_4x4"]
    torch.testing.assert_close(block[:, :, 4, 8], truth[:, :, 4:8, 8:12].mean(dim=(2, 3)))
    torch.testing.assert_close(block[:, :, 7, 11], block[:, :, 4, 8])
    torch.testing.assert_close(block.mean(dim=(2, 3)), truth.mean(dim=(2, 3)))

    with pytest.raises(ValueError, match="divisible by 4"):
        calibration_images(truth[..., :30, :30])


def test_calibration_rows_order_sensibly_on_cifar(cifar_images):
    assert cifar_images.shape == (70, 3, 32, 32)
    rows = calibration_images(cifar_images, seed=0)
    scores = {name: reconstruction_scores(image, cifar_images) for name, image in rows.items()}
    ssim_means = {name: s["ssim"].mean().item() for name, s in scores.items()}
    psnr_means = {name: s["psnr"].mean().item() for name, s in scores.items()}
    assert ssim_means["block_mean_4x4"] > ssim_means["mean_colour"] > ssim_means["random_init"]
    assert psnr_means["block_mean_4x4"] > psnr_means["mean_colour"] > psnr_means["random_init"]
    assert abs(ssim_means["random_init"]) < 0.05  # noise carries no structure


def test_lpips_prefers_the_block_mean_to_the_flat_image_on_cifar(cifar_images, offline_lpips):
    rows = calibration_images(cifar_images, seed=0)
    lpips_block = offline_lpips(rows["block_mean_4x4"], cifar_images).mean()
    lpips_flat = offline_lpips(rows["mean_colour"], cifar_images).mean()
    assert lpips_block < lpips_flat


def test_reconstruction_scores_bundle(offline_lpips, examples, monkeypatch, caplog):
    recon = torch.cat([examples["ex_p0"], examples["ex_p1"]])
    truth = examples["ex_ref"].repeat(2, 1, 1, 1)

    scores = reconstruction_scores(recon, truth, lpips=offline_lpips)
    assert set(scores) == {"ssim", "psnr", "mse", "lpips"}
    torch.testing.assert_close(scores["ssim"], ssim(recon, truth))
    torch.testing.assert_close(scores["psnr"], psnr(recon, truth))
    torch.testing.assert_close(scores["mse"], mse(recon, truth))
    torch.testing.assert_close(scores["lpips"], offline_lpips(recon, truth))

    monkeypatch.setattr(reconstruction_module, "_lpips_missing_logged", False)
    with caplog.at_level(logging.WARNING, logger="unlearnshield.metrics.reconstruction"):
        without = reconstruction_scores(recon, truth)
    assert without["lpips"].shape == (2,) and torch.isnan(without["lpips"]).all()
    torch.testing.assert_close(without["ssim"], scores["ssim"])
    assert any("LPIPS not computed" in record.getMessage() for record in caplog.records)
