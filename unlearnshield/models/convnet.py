"""Geiping et al.'s ConvNet ("ConvNet64" at width 64), the attack papers' small model."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class ConvNet(nn.Module):
    """Eight 3×3 conv+BN+ReLU layers, two 3×3 max-pools and a linear head.

    Channels are ``w, 2w, 2w, 4w, 4w, 4w | pool | 4w, 4w | pool`` for width ``w``; at width 64
    and 32×32 inputs this is the reference network (2,904,970 parameters for 10 classes: the
    reference source lists ``conv6`` twice, which collapses to eight convolutions).

    Two documented departures make it usable beyond the reference setting:

    * ``stem_stride`` sets the first convolution's stride. 1 is the reference; 2 makes the
      network about four times cheaper and is the CPU setting of this package.
    * The linear layer's input size is computed from ``input_size`` instead of being fixed
      to ``36·w``, so 96×96 STL-10 images work (the map before the head is then 10×10 at
      stride 1). At 32×32 with stride 1 it is exactly the reference's ``36·w``.

    Args:
        width: base channel count ``w``.
        num_classes: number of output logits.
        in_channels: image channels.
        input_size: ``(H, W)`` of the inputs, needed to size the linear layer.
        stem_stride: stride of the first convolution (1 or 2).
    """

    def __init__(
        self,
        width: int = 64,
        num_classes: int = 10,
        in_channels: int = 3,
        input_size: tuple[int, int] = (32, 32),
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        w = width
        channels = [(in_channels, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w)]
        channels += [(4 * w, 4 * w)] * 4
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, (c_in, c_out) in enumerate(channels):
            stride = stem_stride if i == 0 else 1
            layers[f"conv{i}"] = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1)
            layers[f"bn{i}"] = nn.BatchNorm2d(c_out)
            layers[f"relu{i}"] = nn.ReLU()
            if i == 5:
                layers["pool0"] = nn.MaxPool2d(3)
        layers["pool1"] = nn.MaxPool2d(3)
        layers["flatten"] = nn.Flatten()
        self.model = nn.Sequential(layers)
        features = self._feature_size(in_channels, input_size)
        if features == 0:
            raise ValueError(f"input size {input_size} is too small for ConvNet")
        self.linear = nn.Linear(features, num_classes)

    @torch.no_grad()
    def _feature_size(self, in_channels: int, input_size: tuple[int, int]) -> int:
        probe = torch.zeros(1, in_channels, *input_size)
        try:
            return int(self.model.eval()(probe).shape[1])
        except RuntimeError:
            return 0
        finally:
            self.model.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.model(x))
