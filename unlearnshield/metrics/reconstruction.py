"""Per-image reconstruction metrics (SSIM, PSNR, MSE) and the calibration rows of a results table.

Every function takes a batch of reconstructions first and the true images second, both float
tensors of shape ``(N, C, H, W)`` with values in [0, 1], and returns one score per image as a
tensor of shape ``(N,)``. Reconstructions are clamped to [0, 1] before scoring, because attack
outputs may overshoot the valid range a little; the true images must already lie in [0, 1]
(de-normalise them first), otherwise a ``ValueError`` says so.

The SSIM is Wang et al. (2004), "Image quality assessment: from error visibility to structural
similarity", eq. (13): Gaussian window of 11 taps with sigma 1.5, population covariance,
K = (0.01, 0.03), data range 1, averaged over the valid (uncropped-window) region and then over
channels. It is computed by ``pytorch_msssim`` and agrees with scikit-image's
``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=1.0)``; the test suite checks this.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib import metadata

import pytorch_msssim
import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

DATA_RANGE = 1.0
SSIM_WINDOW_SIZE = 11
SSIM_WINDOW_SIGMA = 1.5
SSIM_K = (0.01, 0.03)
SSIM_IMPL = (
    f"pytorch_msssim=={metadata.version('pytorch-msssim')} gaussian window "
    f"{SSIM_WINDOW_SIZE}/sigma {SSIM_WINDOW_SIGMA}, valid region, K={SSIM_K}, "
    f"data range {DATA_RANGE:g}"
)
"""A one-line description of the SSIM settings, for result records."""

CALIBRATION_ROWS = ("random_init", "mean_colour", "block_mean_4x4")
"""Names of the calibration rows returned by :func:`calibration_images`, in table order."""

BLOCK_SIZE = 4

# The true images may carry float rounding from de-normalisation (x * std + mean).
_TRUTH_RANGE_TOLERANCE = 1e-4

_lpips_missing_logged = False


def _prepare_pair(recon: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    """Validate a (reconstruction, truth) pair and return both detached and clamped to [0, 1]."""
    for name, images in (("recon", recon), ("truth", truth)):
        if not isinstance(images, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor in [0, 1], got {images.dtype}")
    if recon.shape != truth.shape:
        raise ValueError(
            f"recon and truth must have the same shape, got {tuple(recon.shape)} "
            f"and {tuple(truth.shape)}"
        )
    truth = truth.detach()
    if truth.numel() and (
        truth.min() < -_TRUTH_RANGE_TOLERANCE or truth.max() > 1 + _TRUTH_RANGE_TOLERANCE
    ):
        raise ValueError(
            f"truth must lie in [0, 1] (found [{truth.min().item():.4g}, "
            f"{truth.max().item():.4g}]); de-normalise the images before scoring"
        )
    return recon.detach().clamp(0.0, 1.0), truth.clamp(0.0, 1.0)


def _result_dtype(recon: Tensor, truth: Tensor) -> torch.dtype:
    return torch.promote_types(recon.dtype, truth.dtype)


def ssim(recon: Tensor, truth: Tensor) -> Tensor:
    """Structural similarity of each reconstruction to its true image (Wang et al. 2004, eq. 13).

    Args:
        recon: reconstructions, float ``(N, C, H, W)`` in [0, 1]; clamped to [0, 1] first.
        truth: true images, float ``(N, C, H, W)`` in [0, 1].

    Returns:
        SSIM per image, shape ``(N,)``, in the promoted dtype of the inputs; 1 for identical
        images, about 0 for unrelated ones, and at most 1.

    Notes:
        Gaussian window 11 taps, sigma 1.5, K = (0.01, 0.03), data range 1 (see ``SSIM_IMPL``),
        computed in float64 by ``pytorch_msssim.ssim(..., size_average=False)`` with a float64
        window, over the valid region only (no padding), and averaged over channels. It equals
        scikit-image's Wang-mode SSIM to float64 rounding. Images must be at least
        11 × 11 pixels; at 32 × 32 the valid region is the central 22 × 22 pixels. A NaN in a
        reconstruction gives a NaN score for that image. No gradient flows through the result.
    """
    recon, truth = _prepare_pair(recon, truth)
    height, width = recon.shape[-2:]
    if min(height, width) < SSIM_WINDOW_SIZE:
        raise ValueError(
            f"SSIM needs images of at least {SSIM_WINDOW_SIZE}×{SSIM_WINDOW_SIZE} pixels "
            f"(its Gaussian window), got {height}×{width}"
        )
    dtype = _result_dtype(recon, truth)
    if recon.shape[0] == 0:
        return torch.empty(0, dtype=dtype, device=recon.device)
    scores = pytorch_msssim.ssim(
        recon.double(),
        truth.double(),
        data_range=DATA_RANGE,
        size_average=False,
        win=_gaussian_window(recon.shape[1], recon.device),
        K=SSIM_K,
    )
    return scores.to(dtype)


def _gaussian_window(channels: int, device: torch.device) -> Tensor:
    """The separable SSIM window in float64, shaped ``(C, 1, 1, 11)`` as pytorch_msssim wants.

    pytorch_msssim builds its own window in float32, which alone costs about 1e-6 of
    agreement with scikit-image; in float64 the two agree to rounding (about 1e-16).
    """
    offsets = torch.arange(SSIM_WINDOW_SIZE, dtype=torch.float64, device=device)
    offsets -= SSIM_WINDOW_SIZE // 2
    taps = torch.exp(-(offsets**2) / (2 * SSIM_WINDOW_SIGMA**2))
    taps /= taps.sum()
    return taps.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)


def mse(recon: Tensor, truth: Tensor) -> Tensor:
    """Mean squared error of each reconstruction, averaged over channels and pixels.

    Args:
        recon: reconstructions, float ``(N, C, H, W)`` in [0, 1]; clamped to [0, 1] first.
        truth: true images, float ``(N, C, H, W)`` in [0, 1].

    Returns:
        MSE per image, shape ``(N,)``, in (squared) units of the [0, 1] intensity scale.
    """
    recon, truth = _prepare_pair(recon, truth)
    errors = (recon.double() - truth.double()).pow(2).flatten(1).mean(dim=1)
    return errors.to(_result_dtype(recon, truth))


def psnr(recon: Tensor, truth: Tensor) -> Tensor:
    """Peak signal-to-noise ratio of each reconstruction, ``10 · log10(1 / MSE)``, in dB.

    Args:
        recon: reconstructions, float ``(N, C, H, W)`` in [0, 1]; clamped to [0, 1] first.
        truth: true images, float ``(N, C, H, W)`` in [0, 1].

    Returns:
        PSNR per image in decibels, shape ``(N,)``, with a peak (data range) of 1.

    Notes:
        The MSE is taken per image (over channels and pixels), not over the batch. An exact
        reconstruction has MSE 0 and therefore PSNR ``+inf``; it is returned as ``inf`` rather
        than capped, so any mean over images containing one is ``inf`` too. Use a median, or
        count exact reconstructions separately, when that can happen.
    """
    errors = mse(recon, truth)
    return 10.0 * torch.log10(DATA_RANGE**2 / errors.double()).to(errors.dtype)


def calibration_images(truth: Tensor, *, seed: int = 0) -> dict[str, Tensor]:
    """Trivial "reconstructions" that every results table scores next to the attacks.

    They anchor the metric scales: an attack is only informative where it beats them.

    Args:
        truth: true images, float ``(N, C, H, W)`` in [0, 1]; ``H`` and ``W`` must be
            multiples of 4.
        seed: seed of the ``torch.Generator`` that draws the random initialisation
            (default 0).

    Returns:
        A dict with one tensor of the truth's shape, dtype and device per row, in the order of
        ``CALIBRATION_ROWS``:

        - ``"random_init"``: the attack's starting point, standard normal noise clamped to
          [0, 1] (about half the pixels are 0 and 16 % are 1). It uses no information about
          the images.
        - ``"mean_colour"``: each image replaced by its per-channel mean colour, a flat image.
        - ``"block_mean_4x4"``: each image averaged over non-overlapping 4 × 4 pixel blocks and
          blown back up by repetition (an 8 × 8 thumbnail of a 32 × 32 image).

    Notes:
        The noise is drawn on the CPU in float32 and then moved, so it is the same on every
        device for a given seed and shape. It matches an attack's own initialisation only in
        distribution, unless the attack draws it the same way.
    """
    _, truth = _prepare_pair(truth, truth)
    height, width = truth.shape[-2:]
    if height % BLOCK_SIZE or width % BLOCK_SIZE:
        raise ValueError(
            f"block_mean_4x4 needs H and W divisible by {BLOCK_SIZE}, got {height}×{width}"
        )

    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(truth.shape, generator=generator, dtype=torch.float32)
    random_init = noise.clamp(0.0, 1.0).to(device=truth.device, dtype=truth.dtype)

    mean_colour = truth.mean(dim=(2, 3), keepdim=True).expand_as(truth).clone()

    blocks = F.avg_pool2d(truth, kernel_size=BLOCK_SIZE, stride=BLOCK_SIZE)
    block_mean = blocks.repeat_interleave(BLOCK_SIZE, dim=2).repeat_interleave(BLOCK_SIZE, dim=3)

    return {"random_init": random_init, "mean_colour": mean_colour, "block_mean_4x4": block_mean}


def reconstruction_scores(
    recon: Tensor,
    truth: Tensor,
    *,
    lpips: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """All per-image reconstruction metrics of one batch.

    Args:
        recon: reconstructions, float ``(N, C, H, W)`` in [0, 1]; clamped to [0, 1] first.
        truth: true images, float ``(N, C, H, W)`` in [0, 1].
        lpips: an LPIPS metric such as :class:`unlearnshield.metrics.LPIPSMetric`, or None
            (default) when LPIPS is unavailable; see :func:`unlearnshield.metrics.try_lpips`.

    Returns:
        ``{"ssim", "psnr", "mse", "lpips"}``, each a tensor of shape ``(N,)``. The ``"lpips"``
        key is always present; without a metric it holds NaN for every image, and a warning
        saying so is logged once per process.

    Notes:
        An LPIPS metric that fails (for instance on images smaller than 31 pixels, or because
        its backbone cannot be loaded) raises; only an absent metric yields NaN.
    """
    global _lpips_missing_logged

    scores = {"ssim": ssim(recon, truth), "psnr": psnr(recon, truth), "mse": mse(recon, truth)}
    if lpips is None:
        if not _lpips_missing_logged:
            logger.warning("LPIPS not computed (no LPIPS metric given); reporting it as NaN")
            _lpips_missing_logged = True
        scores["lpips"] = torch.full_like(scores["ssim"], float("nan"))
    else:
        scores["lpips"] = lpips(recon, truth)
    return scores
