"""Speed of the two attack engines, measured side by side in one run.

For the ConvNet (width 16, stride-2 stem, the CPU setting) and the CIFAR ResNet18 at 32×32,
and batch sizes B = 1, 8, 32, it times the per-image loop and the batched engine with both
of its per-sample gradient methods (``vmap``: ``torch.func``; ``layers``: layer-wise, the
default where it applies) on the same targets, and reports milliseconds per image-iteration
(one optimisation step of one reconstruction) and the ratios to the loop. On the ConvNet the
three are timed in turn ``--rounds`` times and the medians kept, so that a change of machine
load hits all three. It then measures the peak memory of one ResNet18 reconstruction in a
fresh process, for each method. The last line is ``batched_speedup_convnet16_b8: X`` (loop
time / time of the batched engine as it runs by default, per image-iteration).

    python benchmarks/attack_engines.py [--steps 20] [--resnet-steps 3] [--batches 1,8,32]
                                        [--rounds 3] [--models convnet16,resnet18]
                                        [--skip-memory]
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import statistics
import time

import torch

from unlearnshield.attacks import AttackConfig
from unlearnshield.attacks.engines import invert_batched, invert_loop
from unlearnshield.models import build_model

MODELS = {
    "convnet16": ("convnet", {"width": 16, "stem_stride": 2}),
    "resnet18": ("resnet18", {}),
}


def make_problem(name: str, batch: int, device: str, seed: int = 0):
    arch, kwargs = MODELS[name]
    torch.manual_seed(seed)
    model = build_model(arch, 10, **kwargs).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(seed)
    targets = torch.randn(batch, n_params, generator=g).to(device)
    labels = torch.randint(0, 10, (batch, 1), generator=g).to(device)
    init = torch.randn(batch, 1, 3, 32, 32, generator=g).to(device)
    return model, targets, labels, init


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_engine(engine, name: str, batch: int, steps: int, device: str) -> float:
    """Milliseconds per image-iteration (after one warm-up step per reconstruction)."""
    model, targets, labels, init = make_problem(name, batch, device)
    kwargs = dict(similarity_cost=lambda c: 1 - c, progress=False)
    engine(model, targets, labels, init, config=AttackConfig(iterations=1, log_every=0), **kwargs)
    sync(device)
    start = time.perf_counter()
    engine(
        model, targets, labels, init, config=AttackConfig(iterations=steps, log_every=0), **kwargs
    )
    sync(device)
    return 1000 * (time.perf_counter() - start) / (batch * steps)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_memory_child(queue, device: str, steps: int, per_sample: str) -> None:
    model, targets, labels, init = make_problem("resnet18", 1, device)
    # A forked child inherits its parent's high-water mark: reset it (Linux), then measure.
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status_kib("VmRSS")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    invert_batched(
        model,
        targets,
        labels,
        init,
        config=AttackConfig(iterations=steps, log_every=0),
        similarity_cost=lambda c: 1 - c,
        progress=False,
        per_sample=per_sample,
    )
    after = _status_kib("VmHWM")
    gpu = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.startswith("cuda") else None
    queue.put(((after - before) / 1024, after / 1024, gpu))


def peak_memory(device: str, steps: int, per_sample: str) -> tuple[float, float, float | None]:
    """(extra host MiB during the attack, peak host MiB of the process, GPU MiB or None)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_memory_child, args=(queue, device, steps, per_sample))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps (ConvNet)")
    parser.add_argument("--resnet-steps", type=int, default=3, help="timed steps (ResNet18)")
    parser.add_argument("--batches", default="1,8,32", help="batch sizes B")
    parser.add_argument(
        "--rounds", type=int, default=3, help="timings of each engine on the ConvNet"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"models to time, of {', '.join(MODELS)}"
    )
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak-memory run")
    args = parser.parse_args()
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown or "convnet16" not in models:
        parser.error(f"--models must include convnet16 and name only {', '.join(MODELS)}")
    batches = [int(b) for b in args.batches.split(",")]
    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    engines = {
        "loop": invert_loop,
        "vmap": functools.partial(invert_batched, per_sample="vmap"),
        "layers": functools.partial(invert_batched, per_sample="layers"),
    }
    print("ms per image-iteration (median of the rounds); ratio = loop / batched")
    print(
        f"{'model':<10} {'B':>3} {'loop':>8} {'vmap':>8} {'layers':>8} "
        f"{'loop/vmap':>10} {'loop/layers':>12}"
    )
    speedup = {}
    for name in models:
        steps = args.steps if name == "convnet16" else args.resnet_steps
        rounds = args.rounds if name == "convnet16" else 1
        for b in batches:
            times: dict[str, list[float]] = {e: [] for e in engines}
            for _ in range(rounds):
                for engine, fn in engines.items():
                    times[engine].append(time_engine(fn, name, b, steps, args.device))
            ms = {e: statistics.median(t) for e, t in times.items()}
            speedup[(name, b)] = ms["loop"] / ms["layers"]
            print(
                f"{name:<10} {b:>3} {ms['loop']:>8.1f} {ms['vmap']:>8.1f} {ms['layers']:>8.1f} "
                f"{ms['loop'] / ms['vmap']:>10.2f} {ms['loop'] / ms['layers']:>12.2f}",
                flush=True,
            )
    if not args.skip_memory:
        for per_sample in ("vmap", "layers"):
            extra, total, gpu = peak_memory(args.device, steps=2, per_sample=per_sample)
            print(
                f"peak memory of one ResNet18 reconstruction ({per_sample}): +{extra:.0f} MiB "
                f"host during the attack (process peak {total:.0f} MiB)"
                + (f", {gpu:.0f} MiB GPU" if gpu is not None else "")
            )
    print(f"batched_speedup_convnet16_b8: {speedup[('convnet16', 8)]:.2f}")


if __name__ == "__main__":
    main()
