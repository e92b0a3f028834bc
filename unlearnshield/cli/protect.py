"""``unlearnshield protect``: release a protected copy θu' of an unlearned model θu.

The forget samples F come as

* one image file (PNG or JPEG; ``--label`` gives its label),
* a folder of image files, read in sorted name order (``--label`` lists one label per file),
* an ``.npz`` with ``images`` (N×C×H×W floats in [0, 1], or N×H×W×C uint8) and ``labels``
  (N integers; ``--label`` only when the file has no labels), or
* ``--forget-index I[,J…]``: samples of the train split of θo's recorded dataset.

Images are not resampled: one whose size differs from the model's input shape (from the
checkpoint metadata, or ``--input-shape`` for a plain state dict) is refused with the expected
shape, because the defense must see the very pixels that were unlearned. Colour images are
converted to the model's channel count only between grayscale and RGB (PIL ``convert``);
an alpha channel is dropped.

The release keeps θu's key names and, by ``-o``'s suffix, its format: ``.safetensors`` (with
θu's metadata plus a ``protection`` record when θu is one of ours) or ``.pt``/``.pth`` (a
plain state dict, with θu's key prefix and wrapper). Every check runs before anything is
written; a refused input exits with status 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from unlearnshield._io import atomic_write_json
from unlearnshield.checkpoints import (
    SAFETENSORS_SUFFIXES,
    TORCH_SUFFIXES,
    Checkpoint,
    load_checkpoint,
    save_state_dict_like,
)
from unlearnshield.cli._common import (
    UsageError,
    check_output_path,
    parse_assignments,
    user_errors,
)
from unlearnshield.data import is_embedded, load_dataset
from unlearnshield.defenses import DEFENSES, Defense, DefenseError, build_defense

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
"""Image files read as forget samples (case-insensitive)."""

_EVAL_BATCH = 500


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "protect",
        help="perturb an unlearned model so that unlearning inversion fails",
        description=(
            "Release a protected copy θu' of the unlearned model θu: the defense (UnlearnShield "
            "by default) perturbs θu's parameters so that the difference to the original θo "
            "no longer points at the forgotten samples, while keeping θu's outputs on them. "
            "The forget samples F are an image file (with --label), a folder of images (with "
            "--label listing one label per file in sorted name order), an .npz with 'images' "
            "(N×C×H×W floats in [0, 1] or N×H×W×C uint8) and 'labels', or --forget-index into "
            "θo's recorded training data. Images must already have the model's input size. "
            "Defenses: " + ", ".join(DEFENSES.names()) + "."
        ),
    )
    p.add_argument("--original", type=Path, required=True, help="θo checkpoint")
    p.add_argument("--unlearned", type=Path, required=True, help="θu checkpoint")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--forget", type=Path, help="forget samples: a PNG/JPEG, a folder of them, or an .npz"
    )
    source.add_argument(
        "--forget-index",
        metavar="I[,J...]",
        help="indices into the train split of θo's recorded dataset",
    )
    p.add_argument("--label", default=None, help="label(s) of --forget images, comma-separated")
    p.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="where θo's dataset lies, for --forget-index and --eval-data (not for digits)",
    )
    p.add_argument("--no-download", action="store_true", help="never download a dataset")
    p.add_argument("--defense", choices=DEFENSES.names(), default="shield", help="the defense")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a defense option, e.g. --set lambda_acc=0.5 --set iterations=10 (repeatable)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the defense's random draws")
    p.add_argument(
        "--arch",
        default=None,
        help="architecture of plain state dicts (resnet18, convnet, package.module:factory)",
    )
    p.add_argument(
        "--arch-arg",
        action="append",
        metavar="KEY=VALUE",
        help="an argument of --arch, e.g. --arch-arg width=16 (repeatable)",
    )
    p.add_argument(
        "--input-shape",
        default=None,
        metavar="C,H,W",
        help="input shape of plain state dicts (default 3,32,32)",
    )
    p.add_argument("--mean", default=None, help="per-channel input mean of plain state dicts")
    p.add_argument("--std", default=None, help="per-channel input std of plain state dicts")
    p.add_argument(
        "--eval-data",
        default=None,
        metavar="DATASET|FILE.npz",
        help="also measure test accuracy of θu and θu' on a dataset's test split or an .npz",
    )
    p.add_argument(
        "-o", "--output", type=Path, required=True, help="θu' (.safetensors, .pt or .pth)"
    )
    p.add_argument("--report", type=Path, default=None, help="write a JSON report here")
    p.set_defaults(run=run)


# ---------------------------------------------------------------------------------------------
# Parsing small values


def _int_list(text: str, option: str) -> list[int]:
    values = []
    for part in text.split(","):
        try:
            values.append(int(part.strip()))
        except ValueError:
            raise UsageError(f"{option} expects integers like 3 or 3,7, got {part!r}") from None
    return values


def _float_list(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{option} expects comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise UsageError(f"{option} must be finite numbers, got {text!r}")
    return values


def _input_shape(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    shape = _int_list(text, "--input-shape")
    if len(shape) != 3 or min(shape) < 1:
        raise UsageError(f"--input-shape expects C,H,W with positive sizes, got {text!r}")
    return shape[0], shape[1], shape[2]


# ---------------------------------------------------------------------------------------------
# Forget samples


def _read_image(path: Path, channels: int) -> torch.Tensor:
    """One image file as float ``(C, H, W)`` in [0, 1]."""
    if channels not in (1, 3):
        raise UsageError(
            f"image files can only feed 1- or 3-channel models; this one takes {channels} "
            f"channels: give an .npz instead"
        )
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise UsageError(f"cannot read image {path}: {err}") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255)


def _check_shape(images: torch.Tensor, shape: tuple[int, int, int], where: str) -> None:
    if tuple(images.shape[1:]) != tuple(shape):
        c, h, w = images.shape[1:]
        raise UsageError(
            f"{where} holds images of {c}×{h}×{w}, but the model takes {shape[0]}×{shape[1]}×"
            f"{shape[2]} inputs; resize them first (protect does not resample: the defense "
            f"must see the pixels that were unlearned)"
        )


def _read_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``images`` as float ``(N, C, H, W)`` in [0, 1] and ``labels`` (or None) of an .npz."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {path} as an .npz file: {err}") from None
    if "images" not in arrays:
        raise UsageError(f"{path} has no 'images' array (it has {sorted(arrays)})")
    images = arrays["images"]
    if images.dtype == np.uint8 and images.ndim == 4:
        x = torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float().div_(255)
    elif np.issubdtype(images.dtype, np.floating) and images.ndim == 4:
        x = torch.from_numpy(images.astype(np.float32))
        if not torch.isfinite(x).all() or float(x.min()) < 0 or float(x.max()) > 1:
            raise UsageError(f"{path}: float images must be finite and lie in [0, 1]")
    else:
        raise UsageError(
            f"{path}: 'images' must be N×C×H×W floats in [0, 1] or N×H×W×C uint8, got "
            f"{images.dtype} of shape {images.shape}"
        )
    labels = None
    if "labels" in arrays:
        raw = arrays["labels"]
        if not np.issubdtype(raw.dtype, np.integer) or raw.shape != (x.shape[0],):
            raise UsageError(
                f"{path}: 'labels' must be {x.shape[0]} integers, got {raw.dtype} of shape "
                f"{raw.shape}"
            )
        labels = torch.from_numpy(raw.astype(np.int64))
    return x, labels


def load_forget_files(
    path: Path, labels: list[int] | None, input_shape: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forget samples of ``--forget`` (see the module docstring).

    Returns:
        ``(images (k, C, H, W) float in [0, 1], labels (k,) int64)``.

    Raises:
        UsageError: a missing file, an unreadable or wrongly shaped image, missing labels or
            a label count that does not match the images.
    """
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UsageError(f"folder {path} holds no {'/'.join(IMAGE_SUFFIXES)} images")
        if labels is None:
            raise UsageError(
                f"folder {path} holds {len(files)} images: give their labels with --label, "
                f"one per file in sorted name order"
            )
        x = torch.stack([_read_image(f, input_shape[0]) for f in files])
        where = f"folder {path}"
    elif not path.exists():
        raise UsageError(f"forget samples {path} do not exist")
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        if labels is None:
            raise UsageError(f"give the label of {path.name} with --label")
        x = _read_image(path, input_shape[0])[None]
        where = str(path)
    elif path.suffix.lower() == ".npz":
        x, stored = _read_npz(path)
        if stored is not None and labels is not None:
            raise UsageError(f"{path} has its own labels; drop --label")
        if stored is None and labels is None:
            raise UsageError(f"{path} has no 'labels' array; give them with --label")
        labels = stored.tolist() if stored is not None else labels
        where = str(path)
    else:
        raise UsageError(
            f"--forget {path}: expected a PNG/JPEG image, a folder of them, or an .npz file"
        )
    _check_shape(x, input_shape, where)
    assert labels is not None
    if len(labels) != x.shape[0]:
        raise UsageError(f"{where} holds {x.shape[0]} images but {len(labels)} labels were given")
    return x, torch.tensor(labels, dtype=torch.int64)


def load_forget_indices(
    args: argparse.Namespace, original: Checkpoint, input_shape: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The forget samples of ``--forget-index``, from θo's recorded training data."""
    if args.label is not None:
        raise UsageError("--forget-index takes the labels from the dataset; drop --label")
    indices = _int_list(args.forget_index, "--forget-index")
    if min(indices) < 0 or len(set(indices)) != len(indices):
        raise UsageError(f"--forget-index needs distinct non-negative indices, got {indices}")
    name = (original.metadata.get("dataset") or {}).get("name")
    members = original.train_indices
    if name is None or members is None:
        raise UsageError(
            f"{args.original} records no training data (dataset and indices), so "
            f"--forget-index has nothing to index; give the samples with --forget"
        )
    try:
        embedded = is_embedded(name)
    except KeyError as err:
        raise UsageError(f"{args.original} was trained on {err.args[0]}") from None
    if args.data_root is None and not embedded:
        raise UsageError(f"{args.original} was trained on {name}: give its --data-root")
    with user_errors():
        dataset = load_dataset(name, args.data_root, download=not args.no_download)
    outsiders = sorted(set(indices) - set(members.tolist()))
    if outsiders:
        raise UsageError(
            f"forget index {outsiders[0]} is not a training member of {args.original}; only "
            f"samples the model was trained on can have been unlearned"
        )
    if max(indices) >= len(dataset.train):
        raise UsageError(f"the {name} train split has only {len(dataset.train)} images")
    index = torch.tensor(indices, dtype=torch.long)
    x = dataset.train.float_images(index)
    _check_shape(x, input_shape, f"the {name} train split")
    return x, dataset.train.labels[index], {"dataset": name, "forget_indices": indices}


# ---------------------------------------------------------------------------------------------
# Evaluation data


def load_eval_data(
    args: argparse.Namespace, input_shape: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Test images (float, [0, 1]) and labels of ``--eval-data``, and a description."""
    text = args.eval_data
    if text.lower().endswith(".npz"):
        x, y = _read_npz(Path(text))
        if y is None:
            raise UsageError(f"--eval-data {text} has no 'labels' array")
        _check_shape(x, input_shape, text)
        return x, y, text
    try:
        embedded = is_embedded(text)
    except KeyError as err:
        raise UsageError(f"--eval-data: {err.args[0]}, or an .npz file") from None
    if args.data_root is None and not embedded:
        raise UsageError(f"--eval-data {text} needs --data-root")
    with user_errors():
        dataset = load_dataset(text, args.data_root, download=not args.no_download)
    x = dataset.test.float_images()
    _check_shape(x, input_shape, f"the {text} test split")
    return x, dataset.test.labels, f"{text} test split"


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(x), _EVAL_BATCH):
        logits = model(x[start : start + _EVAL_BATCH])
        correct += int((logits.argmax(1) == y[start : start + _EVAL_BATCH]).sum())
    return correct / max(len(x), 1)


# ---------------------------------------------------------------------------------------------
# The command


def _load_models(args: argparse.Namespace) -> tuple[Checkpoint, Checkpoint]:
    kwargs: dict[str, Any] = {
        "arch": args.arch,
        "arch_kwargs": parse_assignments(args.arch_arg, "--arch-arg") if args.arch_arg else None,
        "input_shape": _input_shape(args.input_shape),
        "mean": _float_list(args.mean, "--mean"),
        "std": _float_list(args.std, "--std"),
    }
    with user_errors():
        original = load_checkpoint(args.original, **kwargs)
        unlearned = load_checkpoint(args.unlearned, **kwargs)
    spec_o, spec_u = original.model.spec, unlearned.model.spec
    if spec_o is not None and spec_u is not None and spec_o != spec_u:
        raise UsageError(
            f"{args.original} and {args.unlearned} are different architectures "
            f"({spec_o.name} {spec_o.kwargs}, {spec_o.num_classes} classes, input "
            f"{spec_o.input_shape} vs {spec_u.name} {spec_u.kwargs}, {spec_u.num_classes} "
            f"classes, input {spec_u.input_shape}); the unlearned model must come from the "
            f"original"
        )
    return original, unlearned


def _defense(args: argparse.Namespace) -> Defense:
    try:
        return build_defense(args.defense, **parse_assignments(args.set))
    except (TypeError, ValueError) as err:
        raise UsageError(f"bad option for defense {args.defense}: {err}") from err


def run(args: argparse.Namespace) -> int:
    suffix = args.output.suffix
    if suffix not in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
        raise UsageError(
            f"output must end in .safetensors, .pt or .pth (the release's format), got "
            f"{args.output.name}"
        )
    inputs = [args.original, args.unlearned, args.forget]
    if args.eval_data is not None and args.eval_data.lower().endswith(".npz"):
        inputs.append(Path(args.eval_data))
    check_output_path(args.output, *inputs)
    if args.report is not None:
        check_output_path(args.report, *inputs, args.output)
    if args.seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, got {args.seed}")
    defense = _defense(args)
    original, unlearned = _load_models(args)
    spec = unlearned.model.spec
    input_shape: tuple[int, int, int] = spec.input_shape if spec is not None else (3, 32, 32)

    # the forget samples
    labels = _int_list(args.label, "--label") if args.label is not None else None
    source: dict[str, Any]
    if args.forget is not None:
        forget_x, forget_y = load_forget_files(args.forget, labels, input_shape)
        source = {"forget": str(args.forget)}
    else:
        forget_x, forget_y, source = load_forget_indices(args, original, input_shape)
    classes = spec.num_classes if spec is not None and spec.num_classes else None
    if classes is not None and (int(forget_y.min()) < 0 or int(forget_y.max()) >= classes):
        raise UsageError(
            f"label(s) {forget_y.tolist()} out of range: {args.unlearned} has {classes} classes "
            f"(labels 0…{classes - 1})"
        )
    evaluation = load_eval_data(args, input_shape) if args.eval_data else None

    logger.info(
        "protecting %s with %s (%d forget sample(s), seed %d)",
        args.unlearned,
        defense.name,
        len(forget_x),
        args.seed,
    )
    try:
        released, report = defense.protect(
            original.model, unlearned.model, forget_x, forget_y, seed=args.seed
        )
    except DefenseError as err:
        raise UsageError(f"{args.original} → {args.unlearned}: {err}") from err

    if evaluation is not None:
        x, y, name = evaluation
        report["accuracy"] = {
            "eval_data": name,
            "num_images": len(x),
            "unlearned": _accuracy(unlearned.model, x, y),
            "released": _accuracy(released, x, y),
        }
    record = {
        "original": str(args.original),
        "unlearned": str(args.unlearned),
        "output": str(args.output),
        **source,
        "forget_labels": forget_y.tolist(),
        **report,
    }

    # write: the release (in θu's layout), then the report
    ours = unlearned.metadata.get("source") != "external"
    metadata = None
    if ours:
        metadata = {**unlearned.metadata, "protection": record}
    save_state_dict_like(released, args.output, unlearned.layout, metadata, unlearned.extra)
    if args.report is not None:
        atomic_write_json(args.report, record)

    accuracy = ""
    if "accuracy" in report:
        acc = report["accuracy"]
        accuracy = f", test accuracy {100 * acc['unlearned']:.2f}% → {100 * acc['released']:.2f}%"
    print(
        f"protected with {defense.name} in {report['seconds']:.2f} s: cos(Δ, Δ*) "
        f"{report['cosine']:+.4f}, ‖δ‖ {report['perturbation_norm']:.3g} (‖Δ‖ "
        f"{report['delta_norm']:.3g}), OutDiff {report['outdiff']:.4f}{accuracy}; "
        f"wrote {args.output}"
    )
    return 0
