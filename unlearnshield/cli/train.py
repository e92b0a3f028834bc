"""``unlearnshield train``: train the original model θo and save it with its metadata."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from unlearnshield.checkpoints import build_metadata, save_checkpoint
from unlearnshield.cli._common import (
    UsageError,
    add_data_options,
    check_output_path,
    parse_assignments,
    user_errors,
)
from unlearnshield.data import load_dataset, subset_indices
from unlearnshield.models import MODELS, build_model
from unlearnshield.training import RECIPES, seed_everything, train_model

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train an original model on a dataset",
        description=(
            "Train the original model θo and save it as safetensors with its metadata "
            "(architecture, normalisation, dataset and the training indices used), so that "
            "later steps can check that a forget sample was a training member. The 'cpu' "
            "recipe trains the ConvNet (width 16, stride-2 stem) on 15,000 CIFAR-10 images "
            "for 4 epochs (66% test accuracy) in under two and a half minutes on two idle cores; "
            "'reference' is the attack paper's 120-epoch recipe."
        ),
    )
    add_data_options(p)
    p.add_argument("--model", choices=MODELS.names(), default="convnet", help="architecture")
    p.add_argument("--width", type=int, default=None, help="ConvNet width (default 16 for cpu)")
    p.add_argument(
        "--stem-stride",
        type=int,
        choices=(1, 2),
        default=None,
        help="ConvNet first-layer stride (default 2 for the cpu recipe, 1 otherwise)",
    )
    p.add_argument("--recipe", choices=RECIPES.names(), default="cpu", help="training recipe")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--lr", type=float, default=None, help="override the recipe's (peak) lr")
    p.add_argument(
        "--subset",
        type=int,
        default=None,
        help="train on this many random training images (default: the recipe's; 0 = all)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for init, subset, shuffling")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any other recipe field, e.g. --set batch_size=256",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="output .safetensors")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.output.suffix != ".safetensors":
        raise UsageError(f"output must end in .safetensors, got {args.output.name}")
    check_output_path(args.output)
    try:
        recipe = RECIPES.get(args.recipe).replace(
            epochs=args.epochs, lr=args.lr, **parse_assignments(args.set)
        )
    except (TypeError, ValueError) as err:
        raise UsageError(f"bad recipe override: {err}") from err
    subset = recipe.subset if args.subset is None else (args.subset or None)

    with user_errors():
        dataset = load_dataset(args.dataset, args.data_root, download=not args.no_download)
    indices = subset_indices(len(dataset.train), subset, seed=args.seed)
    train = dataset.train.subset(indices)

    arch_kwargs: dict[str, int] = {}
    if args.model == "convnet":
        arch_kwargs["width"] = args.width or (16 if args.recipe == "cpu" else 64)
        arch_kwargs["stem_stride"] = args.stem_stride or (2 if args.recipe == "cpu" else 1)
    elif args.width is not None or args.stem_stride is not None:
        raise UsageError("--width and --stem-stride apply to the convnet model only")
    seed_everything(args.seed)
    model = build_model(
        args.model,
        dataset.num_classes,
        input_shape=dataset.input_shape,
        mean=dataset.mean,
        std=dataset.std,
        **arch_kwargs,
    )
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "training %s %s (%d parameters) on %d %s images, recipe %s",
        args.model,
        arch_kwargs,
        n_params,
        len(train),
        dataset.name,
        args.recipe,
    )
    report = train_model(model, train, recipe=recipe, seed=args.seed, test=dataset.test)
    metadata = build_metadata(
        model,
        dataset={"name": dataset.name, "source": dataset.source},
        train_indices=indices,
        seed=args.seed,
        training={
            "recipe_name": args.recipe,
            "recipe": report.recipe,
            "epochs": report.epochs,
            "test_accuracy": report.test_accuracy,
            "seconds": report.seconds,
        },
    )
    save_checkpoint(model, args.output, metadata)
    print(
        f"test accuracy {100 * (report.test_accuracy or 0):.2f}% on {len(dataset.test)} "
        f"{dataset.name} test images after {report.seconds:.0f} s of training; saved {args.output}"
    )
    return 0
