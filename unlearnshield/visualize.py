"""Pictures: image grids of truths and reconstructions, written atomically as PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from unlearnshield._io import atomic_path


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [0, 1] ``(N, C, H, W)`` → uint8 ``(N, H, W, 3)`` (grey becomes RGB)."""
    x = images.detach().float().clamp(0, 1).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def image_grid(
    rows: Sequence[torch.Tensor],
    *,
    row_labels: Sequence[str] | None = None,
    scale: int = 3,
    pad: int = 2,
) -> Image.Image:
    """Stack rows of images into one picture.

    Args:
        rows: each ``(N, C, H, W)`` in [0, 1]; all rows share ``C, H, W`` (``N`` may differ).
        row_labels: text drawn left of each row (e.g. "truth", "none", "shield").
        scale: nearest-neighbour upscaling factor, so 32×32 images stay visible.
        pad: pixels between images.

    Returns:
        A PIL image.
    """
    arrays = [to_uint8(r) for r in rows]
    h, w = arrays[0].shape[1] * scale, arrays[0].shape[2] * scale
    cols = max(len(a) for a in arrays)
    label_w = 0 if not row_labels else 8 + 7 * max(len(s) for s in row_labels)
    canvas = Image.new(
        "RGB", (label_w + cols * (w + pad) + pad, len(arrays) * (h + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for r, arr in enumerate(arrays):
        y = pad + r * (h + pad)
        if row_labels:
            draw.text((4, y + h // 2 - 5), row_labels[r], fill="black")
        for c, img in enumerate(arr):
            tile = Image.fromarray(img).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_w + pad + c * (w + pad), y))
    return canvas


def save_grid(
    path: str | os.PathLike[str],
    rows: Sequence[torch.Tensor],
    *,
    row_labels: Sequence[str] | None = None,
    scale: int = 3,
) -> Path:
    """Write :func:`image_grid` as a PNG, atomically; returns the path."""
    picture = image_grid(rows, row_labels=row_labels, scale=scale)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return Path(path)
