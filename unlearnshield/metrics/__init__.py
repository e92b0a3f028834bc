"""Metrics that score reconstructions against the true images."""

from unlearnshield.metrics.lpips import (
    BACKBONE_ENV_VAR,
    MIN_IMAGE_SIZE,
    BackboneSource,
    LPIPSMetric,
    LPIPSUnavailable,
    clear_lpips_cache,
    resolve_backbone,
    torchvision_cache_path,
    try_lpips,
)
from unlearnshield.metrics.reconstruction import (
    CALIBRATION_ROWS,
    SSIM_IMPL,
    calibration_images,
    mse,
    psnr,
    reconstruction_scores,
    ssim,
)

__all__ = [
    "BACKBONE_ENV_VAR",
    "CALIBRATION_ROWS",
    "MIN_IMAGE_SIZE",
    "SSIM_IMPL",
    "BackboneSource",
    "LPIPSMetric",
    "LPIPSUnavailable",
    "calibration_images",
    "clear_lpips_cache",
    "mse",
    "psnr",
    "reconstruction_scores",
    "resolve_backbone",
    "ssim",
    "torchvision_cache_path",
    "try_lpips",
]
