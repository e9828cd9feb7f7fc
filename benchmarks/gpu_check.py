"""One-shot check of the GPU path (issue 17), for the few minutes a device is lent.

    python benchmarks/gpu_check.py                 # writes under $OUT, else ./gpu_check
    python benchmarks/gpu_check.py --out DIR --budget 300
    python benchmarks/gpu_check.py --device cpu --scale 0.01   # a rehearsal, on the CPU

In order, within about `--budget` seconds (default 300) on one GPU:
1. the tests marked `gpu` (`pytest -m gpu`);
2. the device's measured float32 matmul peak (TF32 off, as the measuring code runs);
3. CPU radii against GPU radii on the digits MLP 64-256-256-10 (1,437 samples);
4. directions/s and achieved TFLOP/s at 1, 4, 16, 64 and 256 points per pass, and
   the pass size the set-up calibration picks, on:
   - the digits MLP above;
   - the paper's MNIST MLP 784-256-128-10 on a 60,000-sample landscape (MNIST-shaped
     synthetic data, trained to a minimum: no MNIST files are needed);
   - the CIFAR CNN (conv 32-64-128, fc 512-256) on 10,000 CIFAR-shaped samples;
   - the char transformer (6 layers, 6 heads, width 384) on 200 windows of 256;
5. the projected time of the paper's full MNIST measuring stage: the 63 (model,
   landscape) pairs of `sweeps/mnist_mlp_data_scaling.yaml`, 500 directions each,
   4 thresholds per walk, from the MNIST MLP's directions/s at 600, 6,000 and 60,000
   samples.

It writes `gpu_check.json` and `gpu_check.md` (the table) and prints the table. TFLOP/s
counts the floating-point work the walks really ran (`torch.utils.flop_counter` over a
few directions: kept input layers and early exits included), against the matmul peak.
Exit status: 0 when the tests pass and the radii agree, 1 otherwise, 2 without CUDA.
`--device cpu --scale s` rehearses every step on the CPU with s times the samples and
epochs, so that the script is known to run before device time is spent on it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.utils.flop_counter import FlopCounterMode

from volume_ray.data import load_source
from volume_ray.measure import RadiusMeter
from volume_ray.models import build_model, loss_for_task
from volume_ray.search import DEFAULT_RTOL
from volume_ray.spec import load_spec, plan_pairs, plan_trials
from volume_ray.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
POINTS_PER_PASS = (1, 4, 16, 64, 256)
SECONDS_PER_CELL = 4.0  # measuring time aimed at per (model, points per pass)
DIGITS_TARGET = 20_000  # directions/s
STAGE_TARGET = 600.0  # seconds for the paper's MNIST measuring stage
MNIST_THRESHOLDS = (0.1, 0.05, 0.02, 0.01)
TESTS_TIMEOUT = 150  # seconds
DEVICE = torch.device("cuda")  # set by --device
SCALE = 1.0  # set by --scale: samples and epochs, times this


def scaled(count: int) -> int:
    return max(20, round(count * SCALE))


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def synthetic_classes(count: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, ...]:
    """`count` samples of `shape` in 10 classes: a smooth random template per class plus
    noise, so that a network fits them to a deep minimum within seconds."""
    generator = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, *shape, generator=generator)
    labels = torch.randint(0, 10, (count,), generator=generator)
    x = templates[labels] + 0.8 * torch.randn(count, *shape, generator=generator)
    return x, labels


def trained(model, x, y, loss_fn, **config):
    """`model` trained on (x, y) on the device with the project's own loop."""
    model, x, y = model.to(DEVICE), x.to(DEVICE), y.to(DEVICE)
    config["epochs"] = scaled(config["epochs"])
    history = train(model, (x, y), None, loss_fn, TrainConfig(**config))
    return model, x, y, history[-1]["train_loss"]


def workloads():
    """(name, model, x, y, loss_fn, thresholds, max_coefficient) on the GPU, trained."""
    source = load_source("digits")
    digits = build_model("mlp", (64,), 10, hidden=[256, 256], seed=0)
    x, y = (
        source.x_train[: scaled(len(source.x_train))],
        source.y_train[: scaled(len(source.x_train))],
    )
    model, x, y, loss = trained(
        digits, x, y, F.cross_entropy, lr=1e-3, epochs=3000,
        target_loss=1e-3,
    )  # fmt: skip
    yield "digits MLP 64-256-256-10", model, x, y, F.cross_entropy, (0.1,), 1.0, loss
    images, labels = synthetic_classes(scaled(60_000), (784,), seed=1)
    mnist = build_model("mlp", (784,), 10, hidden=[256, 128], seed=0)
    model, x, y, loss = trained(
        mnist, images, labels, F.cross_entropy, lr=1e-3, epochs=500, target_loss=1e-3
    )
    yield "MNIST MLP 784-256-128-10", model, x, y, F.cross_entropy, MNIST_THRESHOLDS, 1.0, loss
    images, labels = synthetic_classes(scaled(10_000), (3, 32, 32), seed=2)
    cnn = build_model("cnn", (3, 32, 32), 10, channels=[32, 64, 128], hidden=[512, 256])
    model, x, y, loss = trained(
        cnn, images, labels, F.cross_entropy, lr=1e-3, epochs=60, batch_size=1024,
        target_loss=1e-3,
    )  # fmt: skip
    # a threshold above the loss reached, should training stop short of the target
    yield "CIFAR CNN", model, x, y, F.cross_entropy, (max(0.1, loss + 0.05),), 1.0, loss
    generator = torch.Generator().manual_seed(3)
    text = torch.randint(0, 65, (scaled(200), 257), generator=generator)
    text[:, 1::2] = (text[:, 0:-1:2] * 7 + 3) % 65  # half of the next characters follow
    tokens = loss_for_task("language")
    transformer = build_model("char_transformer", (256,), 65, layers=6, heads=6, width=384)
    model, x, y, loss = trained(
        transformer, text[:, :-1], text[:, 1:], tokens, lr=1e-3, epochs=30, batch_size=64
    )
    yield "char transformer 6x384", model, x, y, tokens, (loss + 0.5,), 0.05, loss


def matmul_peak() -> float:
    """TFLOP/s of a float32 square matrix product (8192 on a GPU), TF32 off."""
    torch.backends.cuda.matmul.allow_tf32 = False
    size = 8192 if DEVICE.type == "cuda" else 1024
    a = torch.randn(size, size, device=DEVICE)
    b = torch.randn(size, size, device=DEVICE)
    a @ b
    synchronize()
    began = time.perf_counter()
    for _ in range(10):
        a @ b
    synchronize()
    return 10 * 2 * size**3 / (time.perf_counter() - began) / 1e12


def run_tests() -> dict:
    if DEVICE.type != "cuda":
        return {"passed": True, "summary": "not run (no GPU: a rehearsal)", "seconds": 0.0}
    began = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py"],
            cwd=ROOT, capture_output=True, text=True, timeout=TESTS_TIMEOUT,
        )  # fmt: skip
    except subprocess.TimeoutExpired as expired:
        return {
            "passed": False,
            "summary": f"timed out after {TESTS_TIMEOUT} s",
            "seconds": time.perf_counter() - began,
            "output": str(expired.stdout)[-4000:],
        }
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {
        "passed": done.returncode == 0,
        "summary": summary,
        "seconds": time.perf_counter() - began,
        "output": done.stdout[-4000:] + done.stderr[-2000:],
    }


def radii_agree(model, x, y) -> dict:
    """Radii of 32 directions on the CPU's threads and on the device path (TF32 off)."""
    cpu = RadiusMeter(model, x, y, F.cross_entropy, device="cpu", device_path=False)
    on_cpu = cpu.measure(0, 32)
    on_gpu = RadiusMeter(model, x, y, F.cross_entropy, device=DEVICE, device_path=True)
    on_gpu = on_gpu.measure(0, 32)
    relative = np.abs(on_gpu.radius - on_cpu.radius) / on_cpu.radius
    worst = float(np.nanmax(relative))
    same_censoring = bool((on_gpu.censored == on_cpu.censored).all())
    return {
        "directions": 32,
        "max_relative_difference": worst,
        "rtol": DEFAULT_RTOL,
        "agree": same_censoring and worst <= 4 * DEFAULT_RTOL,
    }


def throughput(meter: RadiusMeter, seconds: float) -> tuple[float, int]:
    """Directions a second over about `seconds` (after a warm-up block), and how many."""
    meter.measure(0, min(meter.landscape.points_per_pass, 16))
    synchronize()
    count, start, elapsed, walked = 16, 1000, 0.0, 0
    while elapsed < seconds:
        began = time.perf_counter()
        meter.measure(start, count)
        synchronize()
        elapsed += time.perf_counter() - began
        start, walked = start + count, walked + count
        count = min(4 * count, 65_536)
    return walked / elapsed, walked


def flops_per_direction(meter: RadiusMeter, directions: int = 8) -> float:
    """Floating-point operations a walk runs, counted over `directions` walks (NaN
    where the counter cannot follow the walk)."""
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            meter.measure(50_000, directions)
    except Exception as error:  # noqa: BLE001 - a missing figure, not a failed check
        print(f"flop counter: {error}", flush=True)
        return math.nan
    return counter.get_total_flops() / directions


def cells(name, model, x, y, loss_fn, thresholds, max_coefficient, peak, deadline) -> list:
    rows = []
    settings = {"thresholds": thresholds, "max_coefficient": max_coefficient}
    flops = None
    for points in POINTS_PER_PASS:
        if time.monotonic() > deadline:
            rows.append({"model": name, "points_per_pass": points, "skipped": "budget"})
            continue
        try:
            meter = RadiusMeter(
                model, x, y, loss_fn, device=DEVICE, device_path=True, points_per_pass=points,
                **settings,
            )  # fmt: skip
            rate, walked = throughput(meter, SECONDS_PER_CELL)
            if flops is None:
                flops = flops_per_direction(meter)
        except torch.cuda.OutOfMemoryError:
            rows.append({"model": name, "points_per_pass": points, "skipped": "out of memory"})
            break  # larger passes would not fit either
        achieved = rate * flops / 1e12
        rows.append({
            "model": name, "points_per_pass": points, "directions_per_second": rate,
            "directions": walked, "tflops": achieved, "of_peak": achieved / peak,
        })  # fmt: skip
        del meter
        torch.cuda.empty_cache()
    torch.cuda.empty_cache()
    if time.monotonic() < deadline:
        chosen = RadiusMeter(model, x, y, loss_fn, device=DEVICE, device_path=True, **settings)
        for row in rows:
            row["calibrated"] = chosen.landscape.points_per_pass
    return rows


def stage_projection(model, x, y) -> dict:
    """Seconds for 63 pairs x 500 directions, from directions/s at three landscape sizes
    (calibrated pass size each), interpolated in log-log between them."""
    spec = load_spec(yaml.safe_load((ROOT / "sweeps/mnist_mlp_data_scaling.yaml").read_text()))
    pairs = plan_pairs(spec, plan_trials(spec), True)
    measured = {}
    for size in sorted({min(len(x), s) for s in (600, 6_000, 60_000)}):
        meter = RadiusMeter(
            model, x[:size], y[:size], F.cross_entropy, device=DEVICE, device_path=True,
            thresholds=MNIST_THRESHOLDS,
        )  # fmt: skip
        measured[size] = throughput(meter, SECONDS_PER_CELL / 2)[0]
    sizes = np.log(list(measured))
    rates = np.log(list(measured.values()))
    total = 0.0
    for pair in pairs:
        rate = math.exp(np.interp(math.log(pair.landscape_size), sizes, rates))
        total += spec.volume.directions / rate
    return {
        "pairs": len(pairs),
        "directions": spec.volume.directions,
        "thresholds": len(spec.volume.thresholds),
        "directions_per_second_by_landscape": measured,
        "projected_seconds": total,
        "target_seconds": STAGE_TARGET,
    }


def markdown(report: dict) -> str:
    lines = [
        f"# gpu_check on {report['device']}",
        "",
        f"- tests marked gpu: {report['tests']['summary']}",
        f"- float32 matmul peak (TF32 off): {report['peak_tflops']:.1f} TFLOP/s",
        f"- CPU vs GPU radii, digits MLP, {report['radii']['directions']} directions: max "
        f"relative difference {report['radii']['max_relative_difference']:.2e} "
        f"({'agree' if report['radii']['agree'] else 'DISAGREE'}, rtol {DEFAULT_RTOL:g})",
        "",
        "| model | points per pass | directions/s | TFLOP/s | of peak | calibrated |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["throughput"]:
        if "skipped" in row:
            lines.append(f"| {row['model']} | {row['points_per_pass']} | {row['skipped']} | | | |")
            continue
        lines.append(
            f"| {row['model']} | {row['points_per_pass']} | {row['directions_per_second']:,.0f} "
            f"| {row['tflops']:.3g} | {row['of_peak']:.2%} | {row.get('calibrated', '-')} |"
        )
    stage = report.get("mnist_stage")
    if stage:
        lines += [
            "",
            f"Paper's MNIST measuring stage ({stage['pairs']} pairs x {stage['directions']} "
            f"directions x {stage['thresholds']} thresholds): projected "
            f"{stage['projected_seconds'] / 60:.1f} min on one GPU (target "
            f"{stage['target_seconds'] / 60:.0f} min); directions/s by landscape size: "
            + ", ".join(
                f"{k:,}: {v:,.0f}" for k, v in stage["directions_per_second_by_landscape"].items()
            ),
        ]
    digits = [
        r for r in report["throughput"] if r["model"].startswith("digits") and "skipped" not in r
    ]
    if digits:
        best = max(r["directions_per_second"] for r in digits)
        lines.append(f"\nDigits MLP: best {best:,.0f} directions/s (target {DIGITS_TARGET:,}).")
    losses = ", ".join(f"{k}: {v:.2g}" for k, v in report["training_losses"].items())
    lines.append(f"\nTraining losses reached: {losses}.")
    lines.append(f"\nTotal {report['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds, roughly")
    parser.add_argument("--device", default="cuda", help="cpu: a rehearsal of the script")
    parser.add_argument("--scale", type=float, default=1.0, help="samples and epochs, times")
    args = parser.parse_args()
    global DEVICE, SCALE
    DEVICE, SCALE = torch.device(args.device), args.scale
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine; run it where a GPU is.")
        return 2
    began = time.monotonic()
    deadline = began + args.budget - 60  # the projection and the files after the table
    out = Path(args.out or os.environ.get("OUT") or "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "the CPU (rehearsal)"
    report = {"device": name, "torch": torch.__version__, "scale": SCALE}
    report["tests"] = run_tests()
    print(f"tests: {report['tests']['summary']}", flush=True)
    report["peak_tflops"] = matmul_peak()
    report["throughput"], report["training_losses"] = [], {}
    for name, model, x, y, loss_fn, thresholds, cap, loss in workloads():
        report["training_losses"][name] = loss
        if time.monotonic() > deadline and not name.startswith("digits"):
            print(f"{name}: skipped, past the budget", flush=True)
            continue
        if name.startswith("digits"):
            report["radii"] = radii_agree(model, x, y)
            print(f"radii: {report['radii']}", flush=True)
        report["throughput"] += cells(
            name, model, x, y, loss_fn, thresholds, cap, report["peak_tflops"], deadline
        )
        print(json.dumps(report["throughput"][-len(POINTS_PER_PASS) :]), flush=True)
        if name.startswith("MNIST"):
            report["mnist_stage"] = stage_projection(model, x, y)
            print(f"stage: {report['mnist_stage']}", flush=True)
        del model, x, y
        torch.cuda.empty_cache()
    report["seconds"] = time.monotonic() - began
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    table = markdown(report)
    (out / "gpu_check.md").write_text(table)
    print(table)
    return 0 if report["tests"]["passed"] and report["radii"]["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
