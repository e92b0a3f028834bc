"""``unlearnshield unlearn``: unlearn training samples from θo and save θu with the record."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from unlearnshield.checkpoints import build_metadata, load_checkpoint, save_checkpoint
from unlearnshield.cli._common import (
    UsageError,
    check_output_path,
    parse_assignments,
    user_errors,
)
from unlearnshield.data import is_embedded, load_dataset
from unlearnshield.unlearning import UNLEARNERS

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``unlearn`` and its options; the methods and presets come from the registry."""
    presets = sorted({name for m in UNLEARNERS.names() for name in UNLEARNERS.get(m).presets})
    p = sub.add_parser(
        "unlearn",
        help="unlearn training samples from an original model",
        description=(
            "Unlearn one or more training samples from the original model θo with an "
            "approximate unlearning method and save the unlearned model θu. The dataset is "
            "the one recorded in θo's metadata; the forget indices index its train split "
            "and must be among θo's training indices. The retain data is θo's training "
            "data minus the forget samples. The output keeps θo's metadata and adds an "
            "'unlearning' record (method, hyper-parameters, forget indices and labels)."
        ),
    )
    p.add_argument("--model", type=Path, required=True, help="θo, a .safetensors checkpoint")
    p.add_argument(
        "--method", choices=UNLEARNERS.names(), default="ga-step", help="unlearning method"
    )
    p.add_argument(
        "--forget-index",
        required=True,
        metavar="I[,J...]",
        help="comma-separated indices into the dataset's train split to forget",
    )
    p.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="where θo's dataset lies (not needed for embedded datasets such as digits)",
    )
    p.add_argument(
        "--no-download", action="store_true", help="never try to download a missing dataset"
    )
    p.add_argument(
        "--preset",
        choices=presets,
        default=None,
        help="the method's preset (default: the method's defaults, see its docs)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a hyper-parameter, e.g. --set step_size=1e-2 (repeatable)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the method's random draws")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .safetensors")
    p.set_defaults(run=run)


def parse_indices(text: str) -> list[int]:
    """``"3,17,42"`` → ``[3, 17, 42]``; refuses empty, negative, non-integer and repeated."""
    indices: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise UsageError(
                f"--forget-index expects integers like 3,17,42, got {part!r}"
            ) from None
        if value < 0:
            raise UsageError(f"--forget-index {value} is negative")
        if value in indices:
            raise UsageError(f"--forget-index {value} is given twice")
        indices.append(value)
    return indices


def run(args: argparse.Namespace) -> int:
    """Check the request, unlearn, save θu; raises :class:`UsageError` before writing anything."""
    if args.output.suffix != ".safetensors":
        raise UsageError(f"output must end in .safetensors, got {args.output.name}")
    check_output_path(args.output, args.model)
    forget = parse_indices(args.forget_index)
    method_cls = UNLEARNERS.get(args.method)
    if args.preset is not None and args.preset not in method_cls.presets:
        raise UsageError(
            f"method {args.method} has no preset {args.preset!r}; choose one of: "
            f"{', '.join(sorted(method_cls.presets))}"
        )
    try:
        unlearner = method_cls.from_options(args.preset, **parse_assignments(args.set))
    except ValueError as err:
        raise UsageError(str(err)) from err

    with user_errors():
        original = load_checkpoint(args.model)
    meta = original.metadata
    dataset_name = (meta.get("dataset") or {}).get("name")
    if dataset_name is None:
        raise UsageError(
            f"{args.model} records no dataset, so its training data is unknown; unlearning "
            f"needs a model saved by 'unlearnshield train'"
        )
    if original.train_indices is None:
        raise UsageError(
            f"{args.model} records no training indices, so membership of the forget samples "
            f"cannot be checked; unlearning needs a model saved by 'unlearnshield train'"
        )
    members = set(original.train_indices.tolist())
    outsiders = [i for i in forget if i not in members]
    if outsiders:
        raise UsageError(
            f"forget index {outsiders[0]} is not a training member of {args.model}"
            + (f" (nor are {outsiders[1:]})" if len(outsiders) > 1 else "")
            + "; only samples the model was trained on can be unlearned"
        )

    try:
        embedded = is_embedded(dataset_name)
    except KeyError as err:
        raise UsageError(f"{args.model} was trained on {err.args[0]}") from None
    if args.data_root is None and not embedded:
        raise UsageError(f"{args.model} was trained on {dataset_name}: give its --data-root")
    with user_errors():
        dataset = load_dataset(dataset_name, args.data_root, download=not args.no_download)
    spec = original.model.spec
    if spec is not None and (
        tuple(dataset.input_shape) != tuple(spec.input_shape)
        or dataset.num_classes != spec.num_classes
    ):
        raise UsageError(
            f"the {dataset_name} data at {args.data_root} has images {dataset.input_shape} and "
            f"{dataset.num_classes} classes, but {args.model} takes {tuple(spec.input_shape)} "
            f"and has {spec.num_classes} classes"
        )
    largest = int(original.train_indices.max())
    if largest >= len(dataset.train):
        raise UsageError(
            f"{args.model} was trained on train index {largest}, but the {dataset_name} train "
            f"split at {args.data_root} has only {len(dataset.train)} images: not the same data"
        )

    forget_idx = torch.tensor(forget, dtype=torch.long)
    forget_x = dataset.train.float_images(forget_idx)
    forget_y = dataset.train.labels[forget_idx]
    keep = ~torch.isin(original.train_indices, forget_idx)
    retain = dataset.train.subset(original.train_indices[keep]) if method_cls.needs_retain else None
    logger.info(
        "unlearning %d %s sample(s) from %s with %s%s",
        len(forget),
        dataset_name,
        args.model,
        args.method,
        f" (preset {args.preset})" if args.preset else "",
    )
    model_u, record = unlearner(
        original.model, forget_x, forget_y, retain, seed=args.seed, progress=None
    )

    unlearning: dict[str, Any] = {
        **record,
        "forget_indices": forget,
        "forget_labels": [int(v) for v in forget_y],
        "original_checkpoint": str(args.model.resolve()),
    }
    if "unlearning" in meta:
        unlearning["previous"] = meta["unlearning"]
    metadata = build_metadata(
        model_u,
        dataset=meta["dataset"],
        train_indices=original.train_indices,
        seed=meta.get("seed"),
    )
    for key, value in meta.items():
        metadata.setdefault(key, value)
    metadata["unlearning"] = unlearning
    save_checkpoint(model_u, args.output, metadata)
    print(
        f"unlearned {len(forget)} sample(s) with {args.method} in {record['seconds']:.1f} s: "
        f"forget loss {record['forget_loss_before']:.4f} -> {record['forget_loss_after']:.4f}; "
        f"saved {args.output}"
    )
    return 0
