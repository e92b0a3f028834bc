"""Image classifiers used by the attack, the unlearning methods and the defenses.

Every model is an :class:`ImageClassifier`: a backbone (``net``) behind a fixed per-channel
normalisation, so that every other component of the package works on images in [0, 1].

    >>> from unlearnshield.models import build_model
    >>> model = build_model("convnet", num_classes=10, width=16, stem_stride=2)
    >>> sum(p.numel() for p in model.parameters())
    181994
"""

from unlearnshield.models.classifier import ImageClassifier, ModelSpec
from unlearnshield.models.convnet import ConvNet
from unlearnshield.models.registry import MODELS, build_backbone, build_model
from unlearnshield.models.resnet import resnet18_cifar

__all__ = [
    "MODELS",
    "ConvNet",
    "ImageClassifier",
    "ModelSpec",
    "build_backbone",
    "build_model",
    "resnet18_cifar",
]
