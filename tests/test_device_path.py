"""The GPU's code paths, run on CPU tensors: one host sync per round, batched points,
the calibrated pass size, directions drawn ahead on a thread, drawn on the device,
and float32 precision. Each gives what the plain CPU path gives."""

import threading

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from volume_ray.device_budget import BLOCK_FLOATS, calibrated_points_per_pass, memory_budget
from volume_ray.direction_prefetch import prefetched
from volume_ray.directions import perturbed_parameters, raw_directions
from volume_ray.early_exit import ChunkedSum
from volume_ray.landscape import Landscape
from volume_ray.measure import RadiusMeter, measure_radii
from volume_ray.models import build_model
from volume_ray.precision import float32_precision
from volume_ray.surrogate import OutputSurrogate


def one_at_a_time(model, x, y, **kwargs) -> pd.DataFrame:
    meter = RadiusMeter(model, x, y, F.cross_entropy, parallel_walks=1, device_path=False, **kwargs)
    return meter.measure(0, 12)


@pytest.mark.parametrize("points_per_pass", [1, 5, 64])
@pytest.mark.parametrize("metric,thresholds", [("loss", (0.1, 0.05)), ("accuracy", (0.9,))])
def test_the_device_path_gives_the_radii_of_one_point_at_a_time(
    model, digits, points_per_pass, metric, thresholds
):
    x, y = digits
    settings = {"metric": metric, "thresholds": thresholds}
    expected = one_at_a_time(model, x, y, **settings)
    meter = RadiusMeter(
        model, x, y, F.cross_entropy, device_path=True, points_per_pass=points_per_pass,
        **settings,
    )  # fmt: skip
    found = meter.measure(0, 12)
    assert meter.parallel_walks == 1 and meter.landscape.sync_once
    np.testing.assert_allclose(found.radius, expected.radius, rtol=2e-4)
    assert (found.censored == expected.censored).all()
    if points_per_pass == 1:  # the same sums in the same order: the same walk, bit for bit
        pd.testing.assert_frame_equal(found, expected)


def test_the_device_path_without_a_kept_input_layer(digits):
    """A CNN's first layer is not kept (`input_layer`): the points run in full."""
    x, y = digits
    cnn = build_model("cnn", (1, 8, 8), 10, seed=0).eval()
    images = x.reshape(-1, 1, 8, 8)[:200]
    base = F.cross_entropy(cnn(images), y[:200]).item()
    settings = {"thresholds": (base + 0.5,), "max_coefficient": 2.0}
    expected = one_at_a_time(cnn, images, y[:200], **settings)
    found = RadiusMeter(
        cnn, images, y[:200], F.cross_entropy, device_path=True, points_per_pass=8, **settings
    ).measure(0, 12)
    np.testing.assert_allclose(found.radius, expected.radius, rtol=2e-4)


def test_sums_on_the_device_decide_as_the_host_does():
    """Random per-chunk sums, bounds on both sides: the same totals, counts and kept
    outputs from `sum` (decided chunk by chunk on the host) and `sum_on_device`."""
    generator = np.random.default_rng(0)
    size, points = 1000, 9
    summed = ChunkedSum(size, 100, sample_max=1.0)
    terms = torch.from_numpy(generator.uniform(0, 1, (points, size)))
    terms[3, 250] = float("nan")

    def score_chunk(active, chunk):
        outputs = terms[active, chunk].unsqueeze(-1)  # (P', B, 1)
        return outputs, outputs.sum((1, 2))

    above = generator.uniform(100, 600, points).tolist()
    below = generator.uniform(300, 800, points).tolist()
    above[0], below[0] = float("inf"), float("-inf")  # scored in full
    totals, samples, outputs = summed.sum(score_chunk, above, below, keep_outputs=True)
    plan = summed.plan(above, below)
    found, counts, pieces = summed.sum_on_device(
        score_chunk, torch.tensor(above), torch.tensor(below), plan, keep_outputs=True
    )
    np.testing.assert_array_equal(found.numpy(), totals)
    np.testing.assert_array_equal(counts.numpy(), samples)
    assert 0 < min(samples) < size == max(samples)  # some stopped early, some did not
    kept = summed.whole_outputs(pieces, counts.numpy())
    for mine, theirs in zip(kept, outputs, strict=True):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            assert torch.equal(mine, theirs)


def test_the_calibration_times_each_candidate_and_keeps_the_fastest(model, digits):
    x, y = digits
    landscape = Landscape(model, x, y, F.cross_entropy, points_per_pass=16, sync_once=True)
    raw = raw_directions(landscape.params, 1, [0])
    prepared = landscape.prepare(raw)
    best, rates = calibrated_points_per_pass(landscape, prepared, most=16)
    assert list(rates) == [1, 4, 16]  # none past `most`
    assert all(rate > 0 for rate in rates.values())
    assert best == max(rates, key=rates.get) == landscape.points_per_pass


def test_the_device_path_calibrates_when_no_pass_size_is_given(model, digits, caplog):
    x, y = digits
    with caplog.at_level("INFO", logger="volume_ray.device_budget"):
        meter = RadiusMeter(model, x, y, F.cross_entropy, device_path=True)
    assert meter.landscape.points_per_pass in (1, 4, 16, 64, 256)
    assert f"points per pass: {meter.landscape.points_per_pass} " in caplog.text
    expected = one_at_a_time(model, x, y)
    np.testing.assert_allclose(meter.measure(0, 12).radius, expected.radius, rtol=2e-4)


def test_the_cpu_budget_is_the_fixed_block():
    assert memory_budget(torch.device("cpu"), 0.5) == BLOCK_FLOATS


def test_blocks_are_drawn_ahead_on_a_thread_of_their_own():
    """While block i is walked, block i + 1 is being drawn, on another thread; the rows
    come back in order."""
    blocks = [range(0, 3), range(3, 6), range(6, 8)]
    started = {block.start: threading.Event() for block in blocks}
    threads = set()

    def draw(block):
        threads.add(threading.current_thread().name)
        started[block.start].set()
        return torch.arange(block.start, block.stop, dtype=torch.float32)

    walked = []
    for i, (block, rows) in enumerate(prefetched(blocks, draw, torch.device("cpu"))):
        assert rows.tolist() == list(block)
        if i + 1 < len(blocks):  # the walk of this block waits; the next is drawn anyway
            assert started[blocks[i + 1].start].wait(timeout=10)
        walked.append(block)
    assert walked == blocks
    assert threads == {"volume_ray_directions_0"}


def test_the_device_path_with_blocks_smaller_than_the_walk(model, digits):
    """Several blocks, so the prefetch hands over more than one."""
    x, y = digits
    meter = RadiusMeter(model, x, y, F.cross_entropy, device_path=True, points_per_pass=4)
    meter.block = 5
    np.testing.assert_allclose(
        meter.measure(0, 12).radius, one_at_a_time(model, x, y).radius, rtol=2e-4
    )


def test_device_directions_are_reproducible_whatever_the_sharding(model, digits):
    x, y = digits
    params = perturbed_parameters(model)
    whole = raw_directions(params, 3, range(8), rng="device")
    assert torch.equal(raw_directions(params, 3, [5, 2], rng="device"), whole[[5, 2]])
    # one generator per (seed, index): no overlap between seeds, unlike seed + index
    assert not torch.equal(raw_directions(params, 4, [0], rng="device")[0], whole[1])
    assert not torch.equal(whole, raw_directions(params, 3, range(8)))  # not the paper's
    assert whole.mean().abs() < 0.01 and (whole.std() - 1).abs() < 0.01
    one = measure_radii(model, x, y, F.cross_entropy, num_directions=6, direction_rng="device")
    parts = [
        measure_radii(
            model, x, y, F.cross_entropy, num_directions=3, start=start, direction_rng="device"
        )
        for start in (0, 3)
    ]
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), one)
    paper = measure_radii(model, x, y, F.cross_entropy, num_directions=6)
    assert not np.allclose(one.radius, paper.radius)


def test_float32_precision_sets_both_switches_inside_and_restores_them():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with float32_precision(False):
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with pytest.raises(RuntimeError), float32_precision(True):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
            raise RuntimeError
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_the_walks_run_at_the_asked_precision_and_leave_the_switches(model, digits, allow_tf32):
    """The loss sees TF32 as asked while radii are measured; afterwards the process's
    switches are as they were (here: on, as some library may have left them)."""
    x, y = digits
    seen = set()

    def watched_loss(outputs, targets):
        seen.add((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return F.cross_entropy(outputs, targets)

    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        measure_radii(model, x, y, watched_loss, num_directions=3, allow_tf32=allow_tf32)
        assert seen == {(allow_tf32, allow_tf32)}
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def test_the_device_path_refuses_threads_and_a_bad_memory_fraction(model, digits):
    x, y = digits
    with pytest.raises(ValueError, match="parallel_walks"):
        RadiusMeter(model, x, y, F.cross_entropy, device_path=True, parallel_walks=2)
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match="memory_fraction"):
            RadiusMeter(model, x, y, F.cross_entropy, memory_fraction=fraction)


def test_the_device_path_computes_every_surrogate_value_ahead(model, digits, monkeypatch):
    """Each walk's surrogate is asked once, in its third round: on the device path every
    such value was computed ahead, for all walks together (one read back, not one per
    walk); the CPU path computes them as asked."""
    x, y = digits
    asked, missed = [], []
    plain = OutputSurrogate.__call__

    def watched(self, c):
        asked.append(c)
        if c not in self._known:
            missed.append(c)
        return plain(self, c)

    monkeypatch.setattr(OutputSurrogate, "__call__", watched)
    RadiusMeter(model, x, y, F.cross_entropy, device_path=True, points_per_pass=4).measure(0, 12)
    assert asked and not missed
    asked.clear()
    one_at_a_time(model, x, y)
    assert asked and missed == asked


def test_a_surrogate_value_computed_ahead_is_forgotten_when_a_point_is_scored(model, digits):
    x, y = digits
    landscape = Landscape(model, x, y, F.cross_entropy)
    surrogate = landscape.surrogate()
    outputs = landscape._base_outputs
    surrogate.record(0.1, 1.0, outputs * 1.1)
    surrogate.record(0.2, 2.0, outputs * 1.2)
    ahead = surrogate.summed_loss(0.15)
    assert surrogate(0.15) == ahead.item()  # the same value, computed later
    surrogate.remember(0.15, 7.0)
    assert surrogate(0.15) == 7.0
    surrogate.record(0.3, 3.0, outputs * 1.3)  # a third point: the surrogate knows nothing
    assert surrogate(0.15) is None
