"""Approximate unlearning: the server's step that turns θo into the released θu.

One verb, :func:`unlearn`, and one registry, :data:`UNLEARNERS`:

=============  ==================================================================  =======
method         what it does                                                        retain
=============  ==================================================================  =======
``ga-step``    θu = θo + η·∇θ CE on the forget set, one step, eval-mode BN (UIA)  no
``ga``         a few epochs of SGD on −CE over the forget set (OPTML GA)           no
``l1-sparse``  retain fine-tuning + α_t‖θ‖₁, α_t decaying linearly (Jia et al.)    yes
``salun``      saliency-masked random-label fine-tuning (Fan et al.)               yes
=============  ==================================================================  =======

    >>> theta_u, record = unlearn(theta_o, x_f, y_f, method="ga-step", step_size=1e-3)
    >>> theta_u, record = unlearn(theta_o, x_f, y_f, retain, method="salun", preset="cpu")

Every method has the presets ``reference`` (the reference code's values) and ``cpu``
(sized to run in under a minute on two CPU cores for the width-16 stride-2 ConvNet).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from unlearnshield.data import ImageSplit
from unlearnshield.unlearning.base import (
    BN_MODES,
    UNLEARNERS,
    Unlearner,
    forget_loss,
    set_bn_mode,
)
from unlearnshield.unlearning.ga import GAConfig, GradientAscent
from unlearnshield.unlearning.ga_step import GAStepConfig, GradientAscentStep
from unlearnshield.unlearning.l1_sparse import L1Sparse, L1SparseConfig
from unlearnshield.unlearning.salun import SalUn, SalUnConfig, random_labels, saliency_mask


def unlearn(
    model: nn.Module,
    forget_x: torch.Tensor,
    forget_y: torch.Tensor,
    retain: ImageSplit | None = None,
    *,
    method: str = "ga-step",
    preset: str | None = None,
    seed: int = 0,
    progress: bool | None = None,
    **options: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Unlearn the forget samples from a copy of ``model`` with a registered method.

    Args:
        model: the original classifier θo, an
            :class:`~unlearnshield.models.ImageClassifier` taking images in [0, 1]; it is
            deep-copied and never modified.
        forget_x: the forget images, float in [0, 1], shape ``(k, C, H, W)``, k ≥ 1.
        forget_y: their labels, int64, shape ``(k,)``.
        retain: the retain data (training data without the forget samples) as an
            :class:`~unlearnshield.data.ImageSplit`; required by ``l1-sparse`` and
            ``salun``, ignored by ``ga-step`` and ``ga``. Default None.
        method: a name of :data:`UNLEARNERS`; default ``"ga-step"``.
        preset: a preset of that method (``"reference"``, ``"cpu"``, ...); default None,
            the config's defaults.
        seed: seeds every random draw of the method; default 0.
        progress: show a tqdm bar; default None, only on a terminal.
        **options: config fields of the method (``step_size=``, ``lr=``, ``alpha=`` ...),
            overriding the preset; unknown names are refused.

    Returns:
        ``(unlearned_model, record)``: the unlearned copy in eval mode, and a
        JSON-serialisable dict with ``method``, ``preset``, ``hyperparameters`` (every
        option used), ``seed``, ``num_forget``, ``retain_size``, ``forget_loss_before`` and
        ``forget_loss_after`` (mean eval-mode cross-entropy on the forget set, nats), the
        method's own measurements, and ``seconds``.

    Raises:
        KeyError: unknown method.
        ValueError: unknown preset or option, an option breaking a rule, malformed forget
            data, or missing retain data for a method that needs it.
    """
    unlearner = UNLEARNERS.get(method).from_options(preset, **options)
    return unlearner(model, forget_x, forget_y, retain, seed=seed, progress=progress)


__all__ = [
    "BN_MODES",
    "UNLEARNERS",
    "GAConfig",
    "GAStepConfig",
    "GradientAscent",
    "GradientAscentStep",
    "L1Sparse",
    "L1SparseConfig",
    "SalUn",
    "SalUnConfig",
    "Unlearner",
    "forget_loss",
    "random_labels",
    "saliency_mask",
    "set_bn_mode",
    "unlearn",
]
