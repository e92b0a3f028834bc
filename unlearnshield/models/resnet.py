"""The CIFAR-style ResNet18 of the unlearning-inversion attack and the unlearning papers."""

from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet18 with a 3×3 stride-1 stem and no max-pool (11,173,962 parameters at 10 classes).

    The stages are torchvision's ``BasicBlock`` × [2, 2, 2, 2] at widths 64/128/256/512 with
    strides 1/2/2/2, global average pooling and a linear head, so the state-dict keys are
    torchvision's ``resnet18`` keys. Adaptive pooling makes any input size ≥ 8 px work: at
    96×96 (STL-10) the last stage sees 12×12 maps, unchanged from the reference code.

    Args:
        num_classes: number of output logits.
        in_channels: image channels.

    Returns:
        The backbone; it expects normalised inputs of shape ``(N, in_channels, H, W)``.
    """
    net = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    return net
