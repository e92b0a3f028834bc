"""How well the attack works on CIFAR-10 at CPU budgets: the trade-off behind the ``cpu`` budget.

Trains (or reuses) the CPU original model, draws 8 forget samples at random from its
training members, unlearns each with one-step gradient ascent, and attacks the 8 releases
in one batched run per attack setting. It prints, per setting, mean ± std SSIM, LPIPS and
PSNR against the truth and the wall time, next to the calibration rows (random
initialisation, flat mean colour, truth averaged over 4×4 blocks). Each setting's
reconstructions go to OUT/<setting>.png, and all of them, one row per setting under the
truth, to OUT/all-settings.png.

    python benchmarks/attack_cpu_budget.py --data-root ../shared/data \
        --grid '[{"iterations": 1500, "restarts": 1, "tv_weight": 0.2}]'
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from unlearnshield.attacks import BUDGETS, infer_labels, reconstruct
from unlearnshield.checkpoints import load_checkpoint
from unlearnshield.data import load_dataset
from unlearnshield.metrics import calibration_images, reconstruction_scores, try_lpips
from unlearnshield.unlearning import unlearn
from unlearnshield.visualize import save_grid


def stats(values: torch.Tensor) -> str:
    return f"{values.mean():.3f} ± {values.std():.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--model", type=Path, default=Path("runs/cpu/theta_o.safetensors"))
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the forget-sample draw")
    parser.add_argument("--step-size", type=float, default=1e-3, help="ga-step η")
    parser.add_argument("--grid", default=None, help="JSON list of budget overrides")
    parser.add_argument("--lpips-backbone", default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/attack-budget"))
    args = parser.parse_args()

    if not args.model.exists():
        subprocess.run(
            [sys.executable, "-m", "unlearnshield.cli", "train", "--dataset", "cifar10",
             "--data-root", args.data_root, "-o", str(args.model)],
            check=True,
        )  # fmt: skip
    ckpt = load_checkpoint(args.model)
    data = load_dataset("cifar10", args.data_root, download=False)
    members = ckpt.train_indices
    pick = members[torch.randperm(len(members), generator=torch.Generator().manual_seed(args.seed))]
    pick = pick[: args.samples]
    truth = data.train.float_images(pick)
    labels = data.train.labels[pick]
    releases = [
        unlearn(ckpt.model, truth[i : i + 1], labels[i : i + 1], step_size=args.step_size)[0]
        for i in range(len(pick))
    ]
    lpips, reason = try_lpips(args.lpips_backbone)
    if lpips is None:
        print(f"LPIPS unavailable: {reason}")

    print(f"CIFAR-10 (JPEG copy), {args.model}, forget samples {pick.tolist()}")
    inferred = torch.stack([infer_labels(ckpt.model, rel)[0] for rel in releases])
    print(f"label inference from Δ: {int((inferred == labels).sum())}/{len(labels)} correct")
    print(f"{'setting':<58} {'SSIM':>13} {'LPIPS':>13} {'PSNR':>13} {'seconds':>8}")
    for name, images in calibration_images(truth, seed=0).items():
        s = reconstruction_scores(images, truth, lpips=lpips)
        print(f"{'calibration: ' + name:<58} {stats(s['ssim']):>13} "
              f"{stats(s['lpips']):>13} {stats(s['psnr']):>13} {'':>8}")  # fmt: skip
    grid = json.loads(args.grid) if args.grid else [{}]
    args.out.mkdir(parents=True, exist_ok=True)
    rows, row_labels = [truth], ["truth"]
    for overrides in grid:
        config = BUDGETS.get("cpu").replace(**overrides)
        start = time.perf_counter()
        rec = reconstruct(
            ckpt.model,
            releases,
            input_shape=data.input_shape,
            labels=labels[:, None],
            budget=config,
            progress=False,
        )
        seconds = time.perf_counter() - start
        s = reconstruction_scores(rec.images[:, 0], truth, lpips=lpips)
        label = json.dumps(overrides, separators=(",", ":")) if overrides else "cpu budget"
        print(f"{f'{len(rows)}: {label}':<58} {stats(s['ssim']):>13} {stats(s['lpips']):>13} "
              f"{stats(s['psnr']):>13} {seconds:>8.0f}", flush=True)  # fmt: skip
        tag = "".join(c for c in label if c.isalnum() or c in "._-")[:80]
        save_grid(args.out / f"{tag}.png", [truth, rec.images[:, 0]], row_labels=["truth", "uia"])
        rows.append(rec.images[:, 0])
        row_labels.append(f"setting {len(rows) - 1}")
        save_grid(args.out / "all-settings.png", rows, row_labels=row_labels)


if __name__ == "__main__":
    main()
