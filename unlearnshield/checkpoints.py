"""Safe checkpoint loading and saving: safetensors with JSON metadata, never pickled code.

Our own checkpoints are safetensors files whose tensors are the backbone's state dict
(standard key names, e.g. torchvision's ``resnet18`` keys) and whose header carries one JSON
document under the key ``"unlearnshield"``: architecture and arguments, number of classes,
input shape, dataset, normalisation, the training indices, seed and package version.

Users' own checkpoints load too: a plain state dict saved with ``torch.save`` (``.pt`` /
``.pth``, read strictly with ``torch.load(..., weights_only=True)``) or a safetensors file
without our metadata, given the architecture by registry name or as
``package.module:factory``. ``module.`` prefixes (DataParallel) and ``{"state_dict": ...}``
wrappers are recognised and remembered in :class:`CheckpointLayout`, so a released model can
be written back in the layout the user's pipeline expects (:func:`save_state_dict_like`).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from unlearnshield import __version__
from unlearnshield._io import atomic_path
from unlearnshield.models import ImageClassifier, ModelSpec
from unlearnshield.models.registry import build_backbone

logger = logging.getLogger(__name__)

METADATA_KEY = "unlearnshield"
FORMAT_VERSION = 1
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the requested model (message says why)."""


@dataclass(frozen=True)
class CheckpointLayout:
    """How the tensors sat in the file, so the release can be written back the same way.

    Attributes:
        format: ``"safetensors"`` or ``"torch"``.
        wrapper: the dict key the state dict was wrapped in (``"state_dict"``), or ``None``.
        prefix: the key prefix that was stripped (``"module."``), or ``""``.
    """

    format: str
    wrapper: str | None = None
    prefix: str = ""


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        model: the classifier, in eval mode, on the CPU.
        metadata: our metadata (architecture, dataset, training indices, ...); for a user's
            plain state dict, what was given plus ``"source": "external"``.
        layout: how the tensors were stored in the file.
        path: where it was read from.
    """

    model: ImageClassifier
    metadata: dict[str, Any]
    layout: CheckpointLayout
    path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def train_indices(self) -> torch.Tensor | None:
        """Indices into the dataset's train split that the model was trained on, if recorded."""
        indices = self.metadata.get("train_indices")
        return None if indices is None else torch.as_tensor(indices, dtype=torch.long)


def _format_of(path: Path) -> str:
    with path.open("rb") as fh:
        head = fh.read(8)
    if path.suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if path.suffix in TORCH_SUFFIXES or head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch"
    if len(head) == 8 and int.from_bytes(head, "little") < os.path.getsize(path):
        return "safetensors"
    raise CheckpointError(
        f"{path} is not a checkpoint: expected a .safetensors file or a torch state dict "
        f"(.pt/.pth), found neither"
    )


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    try:
        tensors = load_file(str(path))
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
    except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, OverflowError) as err:
        raise CheckpointError(
            f"{path} is truncated or not a safetensors file ({err}); re-save or re-download it"
        ) from None
    raw = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if raw is None:
        return tensors, None
    try:
        return tensors, json.loads(raw)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} has corrupt UnlearnShield metadata: {err}") from None


def _read_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refused to load {path}: it pickles Python objects beyond tensors and plain "
            f"containers, and unpickling them could execute code. Re-save only the state dict "
            f"(torch.save(model.state_dict(), path)) or convert it to safetensors. "
            f"(torch said: {str(err).splitlines()[0]})"
        ) from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path} is truncated or not a torch checkpoint ({err})") from None


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], str | None, dict[str, Any]]:
    """Find the state dict in a loaded torch object; returns (tensors, wrapper key, rest)."""
    wrapper = None
    rest: dict[str, Any] = {}
    if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping) and _is_tensor_dict(obj[key]):
                wrapper = key
                rest = {k: v for k, v in obj.items() if k != key}
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not _is_tensor_dict(obj):
        raise CheckpointError(
            f"{path} holds no state dict (a mapping from parameter names to tensors, possibly "
            f"wrapped as {{'state_dict': ...}}); found {type(obj).__name__}"
        )
    return dict(obj), wrapper, rest


def _is_tensor_dict(obj: Mapping[Any, Any]) -> bool:
    return len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _strip_prefix(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in tensors):
            return {k[len(prefix) :]: v for k, v in tensors.items()}, prefix
    return tensors, ""


def _check_finite(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"{path} has non-finite weights (NaN or inf) in {len(bad)} tensor(s): "
            f"{_some(bad)}; the model that produced it diverged"
        )


def _some(names: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _load_into(net: nn.Module, tensors: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    expected = net.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_some(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_some(unexpected)}")
        raise CheckpointError(
            f"{path} does not fit architecture {arch!r}: {'; '.join(parts)}. Is the "
            f"architecture (or its arguments) right?"
        )
    wrong = [
        f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)} expected"
        for k, v in expected.items()
        if tensors[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointError(
            f"{path} does not fit architecture {arch!r}: shape mismatch in {_some(wrong, 3)}"
        )
    net.load_state_dict(tensors, strict=True)


HEAD_KEYS = ("fc.weight", "linear.weight", "classifier.weight", "head.weight")
"""Where a plain state dict's classifier head is looked for, to count its classes."""


def _infer_num_classes(tensors: Mapping[str, torch.Tensor]) -> int | None:
    for key in HEAD_KEYS:
        if key in tensors and tensors[key].dim() == 2:
            return int(tensors[key].shape[0])
    return None


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    arch: str | nn.Module | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Checkpoint:
    """Load a checkpoint into an :class:`ImageClassifier` without executing any code.

    Args:
        path: a ``.safetensors`` file, or a ``.pt``/``.pth`` torch state dict (possibly
            wrapped in ``{"state_dict": ...}`` or prefixed with ``module.``).
        arch: the architecture, required when the file has no UnlearnShield metadata: a
            registry name (``"resnet18"``), ``"package.module:factory"``, or an ``nn.Module``
            instance to load the weights into. When the file has metadata, a given ``arch``
            must agree with it.
        arch_kwargs: the architecture's arguments (``{"width": 16}``) for a named ``arch``.
        num_classes: classes of a plain state dict; inferred from ``fc``/``linear`` weights
            when omitted.
        input_shape: ``(C, H, W)`` of a plain state dict's inputs; default ``(3, 32, 32)``.
        mean: per-channel input normalisation of a plain state dict (images in [0, 1]);
            default none (0), with a warning logged.
        std: per-channel std matching ``mean``; default 1.

    Returns:
        A :class:`Checkpoint` with the model in eval mode.

    Raises:
        CheckpointError: missing or truncated file, not a checkpoint, pickled code, missing
            or unexpected keys, shape mismatches, an architecture that differs from the
            metadata, or non-finite weights.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the save was interrupted")

    fmt = _format_of(path)
    wrapper: str | None = None
    extra: dict[str, Any] = {}
    if fmt == "safetensors":
        tensors, metadata = _read_safetensors(path)
    else:
        tensors, wrapper, extra = _unwrap(_read_torch(path), path)
        metadata = None
        raw = extra.pop(METADATA_KEY, None)
        if isinstance(raw, str):
            metadata = json.loads(raw)
    tensors, prefix = _strip_prefix(tensors)
    _check_finite(tensors, path)
    layout = CheckpointLayout(format=fmt, wrapper=wrapper, prefix=prefix)

    if metadata is not None:
        spec = ModelSpec.from_dict(metadata["architecture"])
        if arch is not None and not isinstance(arch, nn.Module):
            given = (arch, dict(arch_kwargs if arch_kwargs is not None else spec.kwargs))
            if given != (spec.name, spec.kwargs):
                raise CheckpointError(
                    f"{path} was saved as architecture {spec.name!r} {spec.kwargs}, but "
                    f"{given[0]!r} {given[1]} was given; drop --arch or fix it"
                )
        norm = metadata.get("normalization", {})
        net = build_backbone(spec)
        _load_into(net, tensors, path, spec.name)
        model = ImageClassifier(
            net,
            norm.get("mean", [0.0] * spec.input_shape[0]),
            norm.get("std", [1.0] * spec.input_shape[0]),
            spec,
        )
        return Checkpoint(model.eval(), metadata, layout, path, extra)

    if arch is None:
        raise CheckpointError(
            f"{path} has no UnlearnShield metadata, so its architecture is unknown: give it "
            f"(--arch resnet18, --arch convnet --arch-arg width=64, or "
            f"--arch package.module:factory for your own model)"
        )
    shape = tuple(int(v) for v in (input_shape or (3, 32, 32)))
    if isinstance(arch, nn.Module):
        net, name = arch, f"{type(arch).__module__}:{type(arch).__qualname__}"
        classes = num_classes or _infer_num_classes(tensors) or 0
        spec = ModelSpec(name, classes, shape, {})  # type: ignore[arg-type]
    else:
        classes = num_classes or _infer_num_classes(tensors)
        if classes is None:
            heads = ", ".join(HEAD_KEYS)
            hint = (
                " (its keys start with 'net.': that is the state_dict() of an UnlearnShield "
                "ImageClassifier; save model.net.state_dict(), whose keys are the backbone's, "
                "or the checkpoint itself)"
                if tensors and all(k.startswith("net.") for k in tensors)
                else ""
            )
            raise CheckpointError(
                f"cannot infer the number of classes of {path}: it has no 2-D {heads}{hint}"
            )
        spec = ModelSpec(arch, classes, shape, dict(arch_kwargs or {}))  # type: ignore[arg-type]
        try:
            net = build_backbone(spec)
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"cannot build architecture {arch!r}: {err}") from None
        name = arch
    _load_into(net, tensors, path, name)
    if mean is None:
        logger.warning(
            "%s: no input normalisation given; the model will see images in [0, 1] as they are",
            path,
        )
    channels = shape[0]
    model = ImageClassifier(net, mean or [0.0] * channels, std or [1.0] * channels, spec)
    metadata = {
        "source": "external",
        "architecture": spec.to_dict(),
        "normalization": model.normalization,
    }
    return Checkpoint(model.eval(), metadata, layout, path, extra)


def build_metadata(
    model: ImageClassifier,
    *,
    dataset: Mapping[str, Any] | None = None,
    train_indices: torch.Tensor | Sequence[int] | None = None,
    seed: int | None = None,
    **records: Any,
) -> dict[str, Any]:
    """The metadata document saved with a model.

    Args:
        model: the classifier; must carry a :class:`ModelSpec`.
        dataset: ``{"name": ..., "source": ...}`` of the data the model was trained on.
        train_indices: indices into the dataset's train split actually trained on.
        seed: the seed that produced the model.
        **records: further JSON-serialisable records (``training=...``, ``unlearning=...``).
    """
    if model.spec is None:
        raise ValueError("the model has no ModelSpec; build it with build_model()")
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "architecture": model.spec.to_dict(),
        "num_classes": model.spec.num_classes,
        "input_shape": list(model.spec.input_shape),
        "normalization": model.normalization,
        "dataset": dict(dataset) if dataset is not None else None,
        "train_indices": None if train_indices is None else [int(i) for i in train_indices],
        "seed": seed,
    }
    meta.update(records)
    return meta


def save_checkpoint(
    model: ImageClassifier, path: str | os.PathLike[str], metadata: Mapping[str, Any]
) -> Path:
    """Save ``model``'s backbone weights and ``metadata`` as safetensors, atomically.

    Args:
        model: the classifier to save.
        path: destination, ending in ``.safetensors``.
        metadata: the document from :func:`build_metadata` (JSON-serialisable).

    Returns:
        ``path``. An interrupted save leaves no file under this name.
    """
    path = Path(path)
    if path.suffix not in SAFETENSORS_SUFFIXES:
        raise ValueError(f"our checkpoints are .safetensors files, got {path.name}")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    _check_finite(tensors, path)
    header = {METADATA_KEY: json.dumps(dict(metadata), sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    logger.info("saved %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def save_state_dict_like(
    model: ImageClassifier,
    path: str | os.PathLike[str],
    layout: CheckpointLayout,
    metadata: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``model`` in the layout a user's checkpoint came in, chosen by ``path``'s suffix.

    ``.safetensors`` writes a safetensors file (with our metadata when given); ``.pt`` /
    ``.pth`` writes a torch state dict with the original key prefix and wrapper key, so the
    file drops into the user's pipeline where the input checkpoint was. ``extra`` holds the
    other entries of a wrapped checkpoint (``Checkpoint.extra``: epoch, optimiser state...),
    which are written back beside the weights unchanged. Atomic.
    """
    path = Path(path)
    if path.suffix in SAFETENSORS_SUFFIXES:
        if metadata is not None and "architecture" in metadata:
            return save_checkpoint(model, path, metadata)
        tensors = {
            layout.prefix + k: v.detach().contiguous() for k, v in model.net.state_dict().items()
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
        return path
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"unknown checkpoint suffix {path.suffix!r}: use .safetensors or .pth")
    state = {layout.prefix + k: v.detach().clone() for k, v in model.net.state_dict().items()}
    obj: Any = {**(extra or {}), layout.wrapper: state} if layout.wrapper else state
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path
