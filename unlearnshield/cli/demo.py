"""``unlearnshield demo``: a small end-to-end run that works offline in minutes."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from unlearnshield.checkpoints import build_metadata, save_checkpoint
from unlearnshield.data import load_dataset, subset_indices
from unlearnshield.models import build_model
from unlearnshield.training import RECIPES, seed_everything, train_model

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train and evaluate a small model on the embedded digits (offline, ~1 minute)",
        description=(
            "Interim demo: trains the small ConvNet on scikit-learn's embedded digits "
            "(32×32 RGB) with the cpu recipe and reports its test accuracy. It needs no "
            "data download."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print("demo: training a ConvNet (width 16, stride-2 stem) on the embedded digits data")
    dataset = load_dataset("digits")
    indices = subset_indices(len(dataset.train), None, seed=args.seed)
    seed_everything(args.seed)
    model = build_model(
        "convnet",
        dataset.num_classes,
        input_shape=dataset.input_shape,
        mean=dataset.mean,
        std=dataset.std,
        width=16,
        stem_stride=2,
    )
    recipe = RECIPES.get("cpu").replace(epochs=8, batch_size=64)
    report = train_model(model, dataset.train, recipe=recipe, seed=args.seed, test=dataset.test)
    path = args.out / "theta_o.safetensors"
    save_checkpoint(
        model,
        path,
        build_metadata(
            model,
            dataset={"name": dataset.name, "source": dataset.source},
            train_indices=indices,
            seed=args.seed,
        ),
    )
    print(
        f"demo: test accuracy {100 * (report.test_accuracy or 0):.1f}% on "
        f"{len(dataset.test)} digits after {report.seconds:.1f} s; saved {path}"
    )
    return 0
