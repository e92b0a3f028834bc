"""``unlearnshield attack``: the unlearning-inversion attack on a released model."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from unlearnshield._io import atomic_write_json
from unlearnshield.attacks import (
    ATTACKERS,
    BUDGETS,
    ENGINES,
    AttackError,
    DefenseAwareAttacker,
    reconstruct,
)
from unlearnshield.attacks.config import resolve_budget
from unlearnshield.attacks.engines import PER_SAMPLE_METHODS
from unlearnshield.checkpoints import load_checkpoint
from unlearnshield.cli._common import UsageError, check_output_path, parse_assignments, user_errors
from unlearnshield.defenses import DEFENSES
from unlearnshield.visualize import save_grid

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attack",
        help="reconstruct forgotten images from an original and a released model",
        description=(
            "Run the unlearning-inversion attack as an adversary would: it sees only the "
            "original model, the released model, the input shape (from the original's "
            "metadata) and, if the threat model grants it, the label. It optimises dummy "
            "images whose gradient at the original matches the parameter difference in "
            "cosine, and writes the best reconstruction as a PNG. Budgets: "
            + ", ".join(
                f"{n} ({BUDGETS.get(n).iterations} steps × {BUDGETS.get(n).restarts} restarts)"
                for n in BUDGETS.names()
            )
            + "; an integer is the cpu budget at that many steps."
        ),
    )
    p.add_argument("--original", type=Path, required=True, help="θo checkpoint")
    p.add_argument("--released", type=Path, required=True, help="released θu' checkpoint")
    p.add_argument(
        "--label",
        default=None,
        help="label(s) of the forgotten sample(s), comma-separated; omitted = inferred",
    )
    p.add_argument("--num-images", type=int, default=1, help="forgotten images to reconstruct (k)")
    p.add_argument("--attacker", choices=ATTACKERS.names(), default="standard")
    p.add_argument(
        "--defense",
        choices=DEFENSES.names(),
        default=None,
        help="with --attacker defense-aware: the defense the attacker assumes and simulates",
    )
    p.add_argument(
        "--defense-set",
        action="append",
        metavar="KEY=VALUE",
        help="a hyper-parameter of that defense as the attacker knows it (repeatable)",
    )
    p.add_argument(
        "--refresh-every",
        type=int,
        default=50,
        help="with --attacker defense-aware: steps between two simulations of the defense",
    )
    p.add_argument(
        "--budget",
        default="cpu",
        help=f"{', '.join(BUDGETS.names())}, or a number of steps (default cpu)",
    )
    p.add_argument(
        "--engine",
        choices=ENGINES.names(),
        default="batched",
        help="batched (default) or loop, the per-image reference; on a CPU, loop is the "
        "faster for ResNet18",
    )
    p.add_argument(
        "--per-sample",
        choices=PER_SAMPLE_METHODS,
        default="auto",
        help="how the batched engine computes per-sample gradients: layers (Conv2d, Linear, "
        "BatchNorm models), vmap (any model), auto (layers where it applies; default)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a budget field, e.g. --set tv_weight=0.1 --set restarts=1",
    )
    p.add_argument(
        "--arch",
        default=None,
        help="architecture of checkpoints without our metadata (e.g. resnet18)",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="reconstruction .png")
    p.add_argument("--report", type=Path, default=None, help="write a JSON report here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_output_path(args.output, args.original, args.released)
    if args.report is not None:
        check_output_path(args.report, args.original, args.released, args.output)
    try:
        config = resolve_budget(args.budget).replace(**parse_assignments(args.set))
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"bad budget {args.budget!r}: {err}") from err
    attacker = _attacker(args)
    labels = None
    if args.label is not None:
        try:
            labels = [int(v) for v in args.label.split(",")]
        except ValueError:
            raise UsageError(f"--label expects integers, got {args.label!r}") from None
    with user_errors():
        original = load_checkpoint(args.original, arch=args.arch)
        released = load_checkpoint(args.released, arch=args.arch)
    shape = original.model.spec.input_shape if original.model.spec else (3, 32, 32)
    try:
        result = reconstruct(
            original.model,
            released.model,
            input_shape=shape,
            labels=labels,
            num_images=len(labels) if labels else args.num_images,
            attacker=attacker,
            budget=config,
            engine=args.engine,
            per_sample=args.per_sample,
            seed=args.seed,
        )
    except AttackError as err:
        raise UsageError(str(err)) from err
    save_grid(args.output, [result.images[0]])
    summary = {
        "original": str(args.original),
        "released": str(args.released),
        "output": str(args.output),
        **result.summary(),
    }
    if args.report is not None:
        atomic_write_json(args.report, summary)
    print(
        f"reconstructed {result.images.shape[1]} image(s) with labels "
        f"{result.labels[0].tolist()}{' (inferred)' if result.labels_inferred else ''}: "
        f"cosine {result.cosine[0]:+.4f} after {result.seconds:.0f} s; wrote {args.output}"
    )
    logger.debug("report: %s", json.dumps(summary)[:500])
    return 0


def _attacker(args: argparse.Namespace) -> str | DefenseAwareAttacker:
    """The attacker name, or the defense-aware attacker built from its options."""
    if args.attacker != DefenseAwareAttacker.name:
        if args.defense is not None or args.defense_set:
            raise UsageError("--defense and --defense-set need --attacker defense-aware")
        return args.attacker
    if args.defense is None:
        raise UsageError(
            "--attacker defense-aware needs --defense NAME, the defense it assumes "
            f"({', '.join(DEFENSES.names())})"
        )
    try:
        return DefenseAwareAttacker(
            args.defense,
            defense_options=parse_assignments(args.defense_set, "--defense-set"),
            refresh_every=args.refresh_every,
        )
    except ValueError as err:
        raise UsageError(f"bad defense-aware attacker settings: {err}") from err
