"""On a CUDA device: the device path's radii against the CPU's, one host sync per
search round, device-drawn directions, pinned drawing, the calibration and the
curvature. Skipped only where CUDA is absent; `benchmarks/gpu_check.py` runs them."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from volume_ray.curvature import curvature
from volume_ray.directions import raw_directions
from volume_ray.landscape import Landscape
from volume_ray.measure import RadiusMeter, measure_radii
from volume_ray.search import DEFAULT_RTOL

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is absent"),
]


def test_gpu_radii_equal_cpu_radii_with_tf32_off(model, digits):
    x, y = digits
    settings = {"num_directions": 48, "thresholds": (0.1, 0.05)}
    on_cpu = measure_radii(model, x, y, F.cross_entropy, device="cpu", **settings)
    on_gpu = measure_radii(model, x, y, F.cross_entropy, device="cuda", **settings)
    np.testing.assert_allclose(on_gpu.radius, on_cpu.radius, rtol=4 * DEFAULT_RTOL)
    assert (on_gpu.censored == on_cpu.censored).all()


def test_a_search_round_syncs_with_the_host_once(model, digits):
    """CUDA's sync debug mode warns at every op that waits for the device: one score
    call, many points over many chunks, warns once (the bounds coming back)."""
    x, y = digits
    landscape = Landscape(
        model, x.cuda(), y.cuda(), F.cross_entropy, batch_size=64, points_per_pass=8,
        sync_once=True,
    )  # fmt: skip
    prepared = landscape.prepare(raw_directions(landscape.params, 1, range(4)).cuda())
    rows, coefficients = [0, 1, 2, 3] * 5, np.linspace(0.0, 0.5, 20).tolist()
    above, below = np.full(20, 0.2 * len(x)), np.full(20, 0.01 * len(x))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            landscape.score(prepared, rows, coefficients, above, below)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


def test_a_whole_walk_syncs_about_once_a_round(model, digits):
    """Across `measure`, rounds (at most the most evaluations a walk took) plus the
    surrogates' one read and a few per block (norms, the rows), not one per walk."""
    x, y = digits
    meter = RadiusMeter(model, x, y, F.cross_entropy, device="cuda", points_per_pass=16)
    meter.measure(0, 4)  # warm
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            frame = meter.measure(100, 64)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= frame.evals.max() + 8, len(syncs)


def test_device_directions_on_cuda_are_reproducible_whatever_the_sharding(model, digits):
    x, y = digits
    settings = {"device": "cuda", "direction_rng": "device", "points_per_pass": 1}
    whole = measure_radii(model, x, y, F.cross_entropy, num_directions=8, **settings)
    parts = [
        measure_radii(model, x, y, F.cross_entropy, num_directions=4, start=s, **settings)
        for s in (0, 4)
    ]
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), whole)


def test_paper_directions_are_drawn_into_pinned_memory(model, digits):
    x, y = digits
    meter = RadiusMeter(model, x, y, F.cross_entropy, device="cuda")
    drawn = meter._draw(range(3))
    assert drawn.is_pinned() and not drawn.is_cuda
    assert torch.equal(drawn, raw_directions(meter.landscape.params, 1, range(3)).cpu())


def test_the_gpu_calibrates_its_pass_size(model, digits):
    x, y = digits
    meter = RadiusMeter(model, x, y, F.cross_entropy, device="cuda")
    assert meter.device_path and meter.landscape.points_per_pass in (1, 4, 16, 64, 256)


def test_gpu_curvature_equals_cpu_curvature(model, digits):
    x, y = digits
    settings = {"probes": 4, "lanczos_steps": 16, "top_k": 3}
    on_cpu = curvature(model, x, y, F.cross_entropy, device="cpu", **settings)
    on_gpu = curvature(model, x, y, F.cross_entropy, device="cuda", **settings)
    np.testing.assert_allclose(on_gpu.top_eigenvalues, on_cpu.top_eigenvalues, rtol=1e-3)
    assert on_gpu.trace == pytest.approx(on_cpu.trace, rel=1e-3)
