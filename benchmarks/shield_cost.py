"""Cost of UnlearnShield against the forward+backward passes it cannot avoid, in one run.

On the CIFAR ResNet18 (11.2M parameters) with one forget sample, UnlearnShield's ten Adam
iterations each need one forward and one backward pass for L_forget; everything else (AIM,
the analytic gradients of L_privacy and L_acc, Adam, building the release, the report) is
overhead. This script times, side by side and alternating so that load changes hit both:

* ``passes``: ten forward+backward passes of L_forget (softmax distance to θu's outputs) on
  the same model and sample, the cheaper of two ways (gradients accumulated into ``.grad``
  tensors allocated before the timing, and ``torch.autograd.grad``);
* ``shield``: the whole ``protect(..., defense="shield")`` call (defaults of the paper);
* ``straightforward``: the same method written plainly (autograd through a flat δ,
  ``F.cosine_similarity``, ``torch.optim.Adam``), for comparison;
* each baseline defense's ``protect`` call (Soteria: one backward per head feature, 512).

It prints milliseconds (medians) and ratios to ``passes``. Each repeat times the passes, the
shield and the passes again, one after the other; the last line is the median over repeats of
shield / (the faster passes of that repeat), ``shield_over_passes_resnet18: X``, which a
change of machine load between repeats does not bias. On a shared virtual machine the passes
alone vary by ±25% from one repeat to the next, hence ten repeats by default; the ratio of the
fastest shield to the fastest passes is printed beside it (best-of-n, as ``timeit`` advises).
The straightforward version, at about 6 s a run, is timed fewer times.

    python benchmarks/shield_cost.py [--repeats 10] [--straightforward-repeats 2]
                                     [--baseline-repeats 1] [--threads N] [--device cpu]
                                     [--skip-baselines]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from unlearnshield.defenses import DEFENSES, protect
from unlearnshield.defenses.base import ParameterLayout
from unlearnshield.defenses.shield import aim_sigma
from unlearnshield.metrics import output_distance
from unlearnshield.models import build_model


def make_problem(device: str, seed: int = 0):
    """θo (random init, eval mode), θu = θo + η∇CE at η = 1e-3, one forget sample."""
    torch.manual_seed(seed)
    original = build_model("resnet18", 10).to(device).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, 32, 32, generator=g).to(device)
    y = torch.tensor([3], device=device)
    unlearned = copy.deepcopy(original)
    loss = F.cross_entropy(unlearned(x), y)
    grads = torch.autograd.grad(loss, list(unlearned.parameters()))
    with torch.no_grad():
        for p, gr in zip(unlearned.parameters(), grads, strict=True):
            p.add_(1e-3 * gr)
    for p in unlearned.parameters():
        p.requires_grad_(False)
    return original, unlearned, x, y


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prepare_accumulation(model) -> None:
    """Give every parameter a preallocated ``.grad`` (outside the timed region)."""
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = torch.zeros_like(p)


def passes_accumulate(model, x, reference, iterations: int = 10) -> None:
    """Forward+backward passes accumulating into the preallocated ``.grad`` tensors."""
    for _ in range(iterations):
        output_distance(reference, model(x)).mean().backward()


def passes_autograd(model, x, reference, iterations: int = 10) -> None:
    """Forward+backward passes with ``torch.autograd.grad`` (fresh gradient tensors)."""
    params = [p.detach().requires_grad_(True) for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    for _ in range(iterations):
        logits = functional_call(model, dict(zip(names, params, strict=True)), (x,))
        torch.autograd.grad(output_distance(reference, logits).mean(), params)


def straightforward_shield(original, unlearned, x, seed: int = 0, iterations: int = 10):
    """UnlearnShield written plainly: the reference point of the optimisation."""
    layout = ParameterLayout.of(unlearned)
    theta_o = torch.cat([p.detach().reshape(-1) for p in original.parameters()])
    theta_u = torch.cat([p.detach().reshape(-1) for p in unlearned.parameters()])
    delta = theta_u - theta_o
    sigma = delta.abs().mean()
    generator = torch.Generator(device=delta.device).manual_seed(seed)
    perturbation = torch.randn(delta.shape, generator=generator, device=delta.device) * sigma
    perturbation.requires_grad_(True)
    optimizer = torch.optim.Adam([perturbation], lr=1e-5)
    model = copy.deepcopy(unlearned).eval()
    with torch.no_grad():
        reference = model(x)
    for _ in range(iterations):
        released = theta_u + perturbation
        logits = functional_call(model, layout.as_dict(released), (x,))
        l_privacy = 1 + F.cosine_similarity(delta, delta + perturbation, dim=0)
        l_acc = perturbation.pow(2).sum()
        l_forget = output_distance(reference, logits).mean()
        loss = l_privacy + 0.5 * l_acc + 0.5 * l_forget
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return perturbation.detach()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return 1000 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed runs of shield")
    parser.add_argument(
        "--straightforward-repeats",
        type=int,
        default=2,
        help="timed runs of the straightforward version",
    )
    parser.add_argument(
        "--baseline-repeats", type=int, default=1, help="timed runs of each baseline defense"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--skip-baselines", action="store_true", help="time only shield")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    original, unlearned, x, y = make_problem(device)
    n_params = sum(p.numel() for p in original.parameters())
    delta = torch.cat(
        [
            (u.detach() - o.detach()).reshape(-1)
            for u, o in zip(unlearned.parameters(), original.parameters(), strict=True)
        ]
    )
    print(
        f"ResNet18, {n_params:,} parameters, one 3x32x32 forget sample, device {device}, "
        f"{torch.get_num_threads()} threads; ‖Δ‖ {float(delta.norm()):.3g}, "
        f"σ = mean|Δ| {aim_sigma(delta):.3g}"
    )
    model = copy.deepcopy(unlearned).eval()
    with torch.no_grad():
        reference = model(x)
    accumulating = copy.deepcopy(model)
    prepare_accumulation(accumulating)

    # shield sits between the two pass measurements of each repeat, so that its ratio is
    # taken against passes timed under the same load
    entries = {
        "passes (accumulate .grad)": lambda: passes_accumulate(accumulating, x, reference),
        "shield": lambda: protect(original, unlearned, x, y, "shield", seed=0),
        "passes (autograd.grad)": lambda: passes_autograd(model, x, reference),
    }
    baselines = {"straightforward shield": lambda: straightforward_shield(original, unlearned, x)}
    if not args.skip_baselines:
        for name in DEFENSES.names():
            if name != "shield":
                baselines[name] = lambda name=name: protect(original, unlearned, x, y, name, seed=0)

    # warm-up, then alternate the entries so that load changes hit all of them alike
    for fn in [*entries.values(), *baselines.values()]:
        fn()
    times: dict[str, list[float]] = {name: [] for name in [*entries, *baselines]}
    ratios = []
    for _ in range(args.repeats):
        for name, fn in entries.items():
            times[name].append(timed(fn, device))
        passes = min(times["passes (accumulate .grad)"][-1], times["passes (autograd.grad)"][-1])
        ratios.append(times["shield"][-1] / passes)
    for i in range(max(args.baseline_repeats, args.straightforward_repeats)):
        for name, fn in baselines.items():
            repeats = (
                args.straightforward_repeats
                if name == "straightforward shield"
                else args.baseline_repeats
            )
            if i < repeats:
                times[name].append(timed(fn, device))

    median = {name: statistics.median(t) for name, t in times.items() if t}
    passes = min(median["passes (accumulate .grad)"], median["passes (autograd.grad)"])
    width = max(len(n) for n in median)
    print(f"{'entry':<{width}}  {'ms (median)':>12}  {'/ passes':>9}  runs (ms)")
    for name, ms in median.items():
        runs = ", ".join(f"{t:.0f}" for t in times[name])
        print(f"{name:<{width}}  {ms:>12.1f}  {ms / passes:>9.2f}  {runs}")
    fastest_passes = min(
        min(times["passes (accumulate .grad)"]), min(times["passes (autograd.grad)"])
    )
    print(
        "shield / passes per repeat: "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + f" (ratio of the medians {median['shield'] / passes:.2f}, of the fastest runs "
        + f"{min(times['shield']) / fastest_passes:.2f})"
    )
    print(f"shield_over_passes_resnet18: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
