"""The forgetting metric OutDiff: how far a perturbed release moved the forget samples' outputs.

UnlearnShield's forgetting module (paper §3.3, Eq. 7) keeps the released model's outputs on the
forget samples close to the unlearned model's, and the paper scores a release by the same
quantity, OutDiff(x) = ‖f_θu(x) − f_θu'(x)‖₂ (smaller is better, 0 for an unchanged release).

**Output space: softmax probabilities.** f is the softmax of the logits, not the logits: a
probability vector is bounded (two one-hot outputs are √2 apart), does not depend on the
arbitrary additive offset of the logits, and a prediction that flips between two confident
classes costs about √2, the order of the paper's OutDiff for its broken releases (Table 1,
Noise: 1.72; Table 2, without AIM: 1.42). The defenses' L_forget (Eq. 7) and this metric both
call :func:`output_distance`, so they can never disagree about the space.

Beside it, the other two usability measures of a release: test accuracy
(:func:`classification_accuracy`) and membership inference on the forget samples
(:func:`membership_inference`): SalUn's SVC "MIA-efficacy" rate, which is what the paper's
§4.4 "AUC" values of 0.12–0.16 look like, and a proper AUC with the TPR at 1% FPR against
held-out non-members.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from unlearnshield.data import ImageSplit

OUTPUT_SPACE = "softmax"
"""The output space of OutDiff and of UnlearnShield's L_forget, for result records."""


def output_distance(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 distance between the softmax outputs of two sets of logits.

    Paper Eq. 7 (L_forget) and the OutDiff metric of §3.3, in the softmax space (see the
    module docstring for why).

    Args:
        logits_a: logits ``(k, num_classes)``.
        logits_b: logits of the same shape.

    Returns:
        ``(k,)``: ``‖softmax(a_i) − softmax(b_i)‖₂`` for each sample ``i``. Differentiable
        (the gradient at a zero distance is 0).
    """
    if logits_a.shape != logits_b.shape or logits_a.dim() != 2:
        raise ValueError(
            f"logits must both be (k, num_classes), got {tuple(logits_a.shape)} and "
            f"{tuple(logits_b.shape)}"
        )
    diff = torch.softmax(logits_a, dim=1) - torch.softmax(logits_b, dim=1)
    return torch.linalg.vector_norm(diff, dim=1)


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule of ``model`` in eval mode, and restore each one's own flag after.

    Restoring module by module (not ``model.train(was_training)``) keeps a model whose parts
    were in different modes exactly as it was.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


@torch.no_grad()
def outdiff(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """OutDiff(x) = ‖f_a(x) − f_b(x)‖₂ per sample, f the softmax output (paper §3.3).

    Typically ``model_a`` is the unlearned model θu and ``model_b`` the released θu'.

    Args:
        model_a: a classifier taking images in [0, 1]; evaluated in eval mode (BatchNorm with
            running statistics), its modes are restored afterwards.
        model_b: a classifier with the same number of outputs.
        x: float images in [0, 1], ``(k, C, H, W)``, on the models' device.

    Returns:
        ``(k,)`` distances, each in [0, √2].
    """
    with evaluation_mode(model_a), evaluation_mode(model_b):
        return output_distance(model_a(x), model_b(x))


# ---------------------------------------------------------------------------------------------
# Test accuracy and membership inference on the forget samples

MIA_STATISTIC = "softmax confidence of the true label, p_y"
"""The per-sample membership statistic of :func:`membership_inference`, for result records."""


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: ImageSplit | torch.Tensor, *, batch_size: int = 500
) -> torch.Tensor:
    """The model's logits on a split or a batch of images, in eval mode, on the CPU.

    Args:
        model: a classifier taking float images in [0, 1]; its modes are restored afterwards.
        images: an :class:`~unlearnshield.data.ImageSplit` (uint8, converted batch by batch)
            or float images in [0, 1] ``(N, C, H, W)``.
        batch_size: images per forward pass; default 500.

    Returns:
        float32 logits ``(N, num_classes)`` on the CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    n = len(images) if isinstance(images, ImageSplit) else int(images.shape[0])
    chunks = []
    with evaluation_mode(model):
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if isinstance(images, ImageSplit):
                batch = images.float_images(torch.arange(start, stop))
            else:
                batch = images[start:stop]
            chunks.append(model(batch.to(device)).float().cpu())
    if not chunks:
        raise ValueError("no images to predict")
    return torch.cat(chunks)


def accuracy_of(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1] of logits ``(N, num_classes)`` against int labels ``(N,)``."""
    if logits.dim() != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"logits must be (N, classes) and labels (N,), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError("accuracy of no samples is undefined")
    return float((logits.argmax(1) == labels.to(logits.device)).double().mean())


def classification_accuracy(model: nn.Module, split: ImageSplit, *, batch_size: int = 500) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (eval mode) on a split, e.g. the test split.

    Args:
        model: a classifier taking float images in [0, 1].
        split: the images and labels to score.
        batch_size: images per forward pass; default 500.
    """
    return accuracy_of(predict_logits(model, split, batch_size=batch_size), split.labels)


def true_label_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """p_y = softmax(logits)[y] per sample: the membership statistic of SalUn's MIA.

    Args:
        logits: ``(N, num_classes)``.
        labels: int64 ``(N,)``.

    Returns:
        ``(N,)`` float64 confidences in [0, 1].
    """
    probabilities = torch.softmax(logits.double(), dim=1)
    return probabilities.gather(1, labels.to(logits.device).long().view(-1, 1)).view(-1)


def svc_mia_efficacy(
    target: torch.Tensor, shadow_members: torch.Tensor, shadow_nonmembers: torch.Tensor
) -> float:
    """SalUn's MIA-efficacy: the fraction of target samples an SVC calls non-members.

    Fan et al., SalUn (ICLR'24), ``evaluation/SVC_MIA.py``, "confidence" attacker: an
    ``sklearn.svm.SVC(C=3, kernel="rbf", gamma="auto")`` is fitted on the 1-D statistic of
    shadow members (label 1) and shadow non-members (label 0), without scaling, and scores
    ``1 − mean(predict(target))``. SalUn reports it ×100 as "MIA-efficacy".

    Args:
        target: the statistic of the forget samples ``(k,)``.
        shadow_members: the statistic of training members (retain samples) ``(m,)``.
        shadow_nonmembers: the statistic of non-members (test samples) ``(n,)``.

    Returns:
        The rate in [0, 1]; higher means more forget samples look unseen. It is a detection
        rate, not an AUC, and takes only the values ``j/k``: 0 or 1 for a single sample.
    """
    from sklearn.svm import SVC

    if shadow_members.numel() == 0 or shadow_nonmembers.numel() == 0 or target.numel() == 0:
        raise ValueError("the SVC MIA needs shadow members, shadow non-members and targets")
    features = torch.cat([shadow_members, shadow_nonmembers]).double().view(-1, 1).numpy()
    classes = np.concatenate(
        [
            np.ones(shadow_members.numel(), dtype=np.int64),
            np.zeros(shadow_nonmembers.numel(), dtype=np.int64),
        ]
    )
    classifier = SVC(C=3, kernel="rbf", gamma="auto")
    classifier.fit(features, classes)
    predicted = classifier.predict(target.double().view(-1, 1).numpy())
    return float(1.0 - predicted.mean())


def membership_auc(
    target: torch.Tensor, nonmembers: torch.Tensor, *, fpr: float = 0.01
) -> tuple[float, float]:
    """AUC and TPR at a fixed FPR of a membership statistic: targets against non-members.

    The targets (forget samples) are the positives, the non-members the negatives, and a
    larger statistic means "member". The AUC is the Mann–Whitney probability that a target
    scores above a non-member (ties count 1/2). The TPR at ``fpr`` is the fraction of
    targets scoring strictly above ``t``, the smallest threshold with at most
    ``⌊fpr · n⌋`` of the ``n`` non-members above it.

    Args:
        target: the statistic of the positives ``(k,)``, k ≥ 1.
        nonmembers: the statistic of the negatives ``(n,)``, n ≥ 1.
        fpr: the false-positive rate of the operating point, in [0, 1); default 0.01.

    Returns:
        ``(auc, tpr)``, both in [0, 1]. AUC 0.5: the targets are indistinguishable from
        non-members (what unlearning aims at); 1: every target looks like a member.
    """
    if not 0 <= fpr < 1:
        raise ValueError(f"fpr must lie in [0, 1), got {fpr}")
    if target.numel() == 0 or nonmembers.numel() == 0:
        raise ValueError("membership_auc needs at least one target and one non-member")
    pos, neg = target.double().view(-1, 1), nonmembers.double().view(1, -1)
    auc = float(((pos > neg).double() + 0.5 * (pos == neg).double()).mean())
    ranked = torch.sort(nonmembers.double().view(-1), descending=True).values
    allowed = math.floor(fpr * ranked.numel())
    threshold = ranked[allowed] if allowed < ranked.numel() else ranked[-1]
    tpr = float((target.double() > threshold).double().mean())
    return auc, tpr


@dataclass(frozen=True)
class MembershipReport:
    """Membership inference on the forget samples of one model.

    Attributes:
        efficacy: SalUn's MIA-efficacy, the fraction of forget samples the SVC calls
            non-members (:func:`svc_mia_efficacy`).
        auc: AUC of p_y, forget samples against the held-out non-members
            (:func:`membership_auc`).
        tpr_at_fpr: TPR of p_y at ``fpr`` on the same sets.
        fpr: the operating point of ``tpr_at_fpr``.
        num_forget: forget samples scored.
        num_shadow_members: retain samples the SVC was fitted on (label 1).
        num_shadow_nonmembers: test samples the SVC was fitted on (label 0).
        num_holdout: test samples held out from the SVC, the negatives of the AUC.
        forget_confidence: p_y of each forget sample.
    """

    efficacy: float
    auc: float
    tpr_at_fpr: float
    fpr: float
    num_forget: int
    num_shadow_members: int
    num_shadow_nonmembers: int
    num_holdout: int
    forget_confidence: tuple[float, ...]

    def as_record(self) -> dict[str, Any]:
        """Flat, JSON-serialisable entries prefixed ``mia_``."""
        return {
            "mia_efficacy": self.efficacy,
            "mia_auc": self.auc,
            "mia_tpr_at_fpr": self.tpr_at_fpr,
            "mia_fpr": self.fpr,
            "mia_num_forget": self.num_forget,
            "mia_num_shadow_members": self.num_shadow_members,
            "mia_num_shadow_nonmembers": self.num_shadow_nonmembers,
            "mia_num_holdout": self.num_holdout,
            "mia_forget_confidence": list(self.forget_confidence),
            "mia_statistic": MIA_STATISTIC,
        }


def membership_inference(
    model: nn.Module,
    forget_x: torch.Tensor,
    forget_y: torch.Tensor,
    retain: ImageSplit,
    test: ImageSplit,
    *,
    shadow_size: int | None = None,
    holdout_fraction: float = 0.5,
    fpr: float = 0.01,
    seed: int = 0,
    batch_size: int = 500,
    test_logits: torch.Tensor | None = None,
) -> MembershipReport:
    """How much the forget samples still look like training members of ``model``.

    Paper §4.4 ("Membership inference", after SalUn). The statistic is p_y, the softmax
    confidence of the true label. The test split is shuffled with ``seed`` and cut in two:
    the first ``1 − holdout_fraction`` are the SVC's shadow non-members, the rest are held
    out. The shadow members are ``shadow_size`` retain samples drawn with ``seed``. Two
    scores come back:

    * ``efficacy``: SalUn's SVC rate (:func:`svc_mia_efficacy`) with those shadow sets;
    * ``auc`` and ``tpr_at_fpr``: p_y of the forget samples (positives) against the held-out
      test samples (negatives), which no part of the attack was fitted on
      (:func:`membership_auc`).

    Args:
        model: the released classifier, taking float images in [0, 1].
        forget_x: the forget images, float in [0, 1] ``(k, C, H, W)``.
        forget_y: their labels, int64 ``(k,)``.
        retain: the training members without the forget samples.
        test: the test split (never trained on).
        shadow_size: shadow members drawn from ``retain``; default None, as many as there
            are shadow non-members (SalUn's balance), capped at ``len(retain)``.
        holdout_fraction: share of the test split held out from the SVC, in (0, 1);
            default 0.5.
        fpr: operating point of the TPR; default 0.01.
        seed: seeds the two random draws; default 0.
        batch_size: images per forward pass; default 500.
        test_logits: the model's logits on ``test`` if already computed (they are reused,
            e.g. from the test-accuracy pass); default None, computed here.

    Returns:
        A :class:`MembershipReport`.

    Notes:
        Departures from SalUn's code, stated: SalUn fits the SVC on all 10,000 test images
        and the *first* 10,000 retain images in dataset order; here both sets are random
        draws (a class-sorted ImageFolder split would otherwise give one-class shadow sets)
        and half the test split is held out for the AUC. With one forget sample per cell
        the efficacy is 0 or 1 and the AUC is the sample's rank among the held-out
        non-members; their means over cells are the sweep-level numbers.
    """
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must lie in (0, 1), got {holdout_fraction}")
    if len(test) < 2:
        raise ValueError("membership inference needs at least two test samples")
    if shadow_size is not None and shadow_size < 1:
        raise ValueError(f"shadow_size must be at least 1 (or None), got {shadow_size}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(test), generator=generator)
    n_shadow = min(len(test) - 1, max(1, round((1 - holdout_fraction) * len(test))))
    shadow_test, holdout = order[:n_shadow], order[n_shadow:]
    n_members = min(len(retain), n_shadow if shadow_size is None else shadow_size)
    members = torch.randperm(len(retain), generator=generator)[:n_members].sort().values

    if test_logits is None:
        test_logits = predict_logits(model, test, batch_size=batch_size)
    test_conf = true_label_confidence(test_logits, test.labels)
    member_logits = predict_logits(model, retain.subset(members), batch_size=batch_size)
    member_conf = true_label_confidence(member_logits, retain.labels[members])
    forget_conf = true_label_confidence(
        predict_logits(model, forget_x, batch_size=batch_size), forget_y
    )

    efficacy = svc_mia_efficacy(forget_conf, member_conf, test_conf[shadow_test])
    auc, tpr = membership_auc(forget_conf, test_conf[holdout], fpr=fpr)
    return MembershipReport(
        efficacy=efficacy,
        auc=auc,
        tpr_at_fpr=tpr,
        fpr=fpr,
        num_forget=int(forget_conf.numel()),
        num_shadow_members=int(n_members),
        num_shadow_nonmembers=int(shadow_test.numel()),
        num_holdout=int(holdout.numel()),
        forget_confidence=tuple(float(v) for v in forget_conf),
    )
