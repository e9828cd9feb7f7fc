"""measure_radii against closed forms, an independent paper loop, and bad input."""

import math
import threading
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from volume_ray import log_volume, measure_radii
from volume_ray.basins import quadratic_basin
from volume_ray.measure import RADII_COLUMNS, RadiusMeter
from volume_ray.search import paper_grid

# -- closed forms: least squares under MSE --------------------------------------------


def least_squares_model(column_scales, n=64, seed=0):
    """A bias-free linear model at its least-squares optimum, with X^T X / N =
    diag(column_scales**2), so the Hessian of the MSE is H = 2 diag(column_scales**2)."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(
        torch.randn(n, len(column_scales), generator=generator, dtype=torch.float64)
    )
    x = q * math.sqrt(n) * torch.tensor(column_scales, dtype=torch.float64)  # (N, d)
    y = x @ torch.randn(len(column_scales), 1, generator=generator, dtype=torch.float64)
    y = y + 0.1 * torch.randn(n, 1, generator=generator, dtype=torch.float64)
    model = nn.Linear(len(column_scales), 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    base = F.mse_loss(model(x), y).item()
    hessian = 2 * x.T @ x / n
    return model, x, y, base, hessian


def test_radius_matches_the_quadratic_closed_form():
    model, x, y, base, hessian = least_squares_model([0.5, 1.0, 2.0, 3.0])
    threshold = base + 0.3
    df = measure_radii(
        model, x, y, F.mse_loss, num_directions=24, thresholds=(threshold,),
        filter_norm="none", rtol=1e-8, max_coefficient=10.0,
    )  # fmt: skip
    generator = torch.Generator()
    for row in df.itertuples():
        generator.manual_seed(1 + row.direction)
        u = torch.randn(1, 4, generator=generator, dtype=torch.float64).reshape(-1)
        u = u / u.norm()
        expected = math.sqrt(2 * (threshold - base) / (u @ hessian @ u).item())
        assert row.radius == pytest.approx(expected, rel=1e-5)
        assert row.radius_euclid == pytest.approx(expected, rel=1e-5)  # none: d = g


def test_isotropic_log_volume_is_exact():
    model, x, y, base, _ = least_squares_model([1.5] * 6)
    threshold = base + 0.2
    df = measure_radii(
        model, x, y, F.mse_loss, num_directions=16, thresholds=(threshold,),
        filter_norm="none", rtol=1e-9, max_coefficient=10.0,
    )  # fmt: skip
    radius = math.sqrt(2 * 0.2 / (2 * 1.5**2))
    assert log_volume(df.radius, 6) == pytest.approx(6 * math.log(radius), abs=1e-6)


def test_anisotropic_volume_converges_to_the_ellipsoid():
    scales = [0.5, 1.0, 1.6]
    model, x, y, base, hessian = least_squares_model(scales)
    gap = 0.25
    df = measure_radii(
        model, x, y, F.mse_loss, num_directions=3000, thresholds=(base + gap,),
        filter_norm="none", rtol=1e-6, max_coefficient=10.0,
    )  # fmt: skip
    eigenvalues = torch.linalg.eigvalsh(hessian).numpy()
    expected = float(np.sum(0.5 * np.log(2 * gap / eigenvalues)))  # log prod sqrt(2 gap / l)
    cubes = df.radius.to_numpy() ** 3
    stderr = cubes.std(ddof=1) / cubes.mean() / math.sqrt(len(cubes))  # of log mean r^3
    assert abs(log_volume(df.radius, 3) - expected) < 4 * stderr
    assert stderr < 0.05  # the test can tell a wrong answer apart


# -- paper parity: an independent loop in the paper's global-RNG convention ----------------


def paper_loop_coefficients(model, x, y, thresholds, num_directions, seed, metric="loss"):
    """The paper's stage 1, written plainly: for each direction the first grid point
    whose metric is past each threshold (NaN if none), and the raw norms."""
    grid = np.linspace(0, 1, 100) ** 2
    params = [(n, p) for n, p in model.named_parameters() if n.split(".")[-1] in ("weight", "bias")]
    trained = [p.detach().clone() for _, p in params]
    answers, norms = [], []
    with torch.no_grad():
        for i in range(num_directions):
            torch.manual_seed(seed + i)
            gaussians = [torch.randn_like(p) for _, p in params]
            norms.append(torch.cat([g.reshape(-1) for g in gaussians]).double().norm().item())
            directions = []
            for g, w in zip(gaussians, trained):
                if w.dim() in (2, 4):
                    row_norms = w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
                    directions.append(g * row_norms)
                else:
                    directions.append(g)
            first = [math.nan] * len(thresholds)
            for c in grid:
                for (_, p), w, d in zip(params, trained, directions):
                    p.copy_(w + float(c) * d)
                out = model(x)
                if metric == "loss":
                    value = F.cross_entropy(out, y).item()
                    past = [value > t for t in thresholds]
                else:
                    value = (out.argmax(1) == y).double().mean().item()
                    past = [value < t for t in thresholds]
                for k, is_past in enumerate(past):
                    if is_past and math.isnan(first[k]):
                        first[k] = float(c)
            answers.append(first)
        for (_, p), w in zip(params, trained):
            p.copy_(w)
    return np.array(answers), np.array(norms)


@pytest.mark.parametrize("metric,thresholds", [("loss", (0.1, 0.02)), ("accuracy", (0.9, 0.5))])
def test_grid_mode_equals_the_paper_loop_and_bisect_falls_in_its_step(
    model, digits, metric, thresholds
):
    x, y = digits
    expected, norms = paper_loop_coefficients(model, x, y, thresholds, 6, seed=3, metric=metric)
    common = dict(num_directions=6, seed=3, metric=metric, thresholds=thresholds)
    grid = measure_radii(model, x, y, F.cross_entropy, search="grid", **common)
    bisect = measure_radii(model, x, y, F.cross_entropy, **common)
    coefficients = paper_grid()
    for k, threshold in enumerate(thresholds):
        rows = grid[grid.threshold == threshold].sort_values("direction")
        assert not np.isnan(expected[:, k]).any()  # the walks do cross on this grid
        np.testing.assert_array_equal(rows.coefficient.to_numpy(), expected[:, k])
        np.testing.assert_allclose(rows.radius.to_numpy(), expected[:, k] * norms, rtol=1e-12)
        refined = bisect[bisect.threshold == threshold].sort_values("direction")
        step = np.searchsorted(coefficients, expected[:, k])
        assert np.all(refined.coefficient.to_numpy() > coefficients[step - 1])
        assert np.all(refined.coefficient.to_numpy() <= expected[:, k] * (1 + 1e-4))


def test_full_curve_reapplies_thresholds_without_recomputing(model, digits):
    x, y = digits
    df = measure_radii(
        model, x, y, F.cross_entropy, num_directions=3, search="grid", full_curve=True,
        thresholds=(0.1, 0.05),
    )  # fmt: skip
    grid = paper_grid()
    for row in df.itertuples():
        assert len(row.curve) == len(grid)
        assert row.coefficient == grid[np.argmax(np.asarray(row.curve) > row.threshold)]


# -- determinism, restoration, batching --------------------------------------------------


def test_directions_do_not_depend_on_the_shard(model, digits):
    x, y = digits
    whole = measure_radii(model, x, y, F.cross_entropy, num_directions=32)
    part = measure_radii(model, x, y, F.cross_entropy, num_directions=16, start=16)
    tail = whole[whole.direction >= 16].reset_index(drop=True)
    assert list(part.direction) == list(range(16, 32))
    assert part.equals(tail)
    # Batched passes group points differently per shard: equal up to summation order.
    batched = measure_radii(
        model, x, y, F.cross_entropy, num_directions=5, start=19, points_per_pass=3
    )
    np.testing.assert_allclose(batched.radius, whole.radius[19:24], rtol=2e-4)


def test_radii_do_not_depend_on_the_thread_count_or_the_parallel_walks(model, digits):
    """Every op of a walk runs on one thread, one walk at a time or several: the same bits."""
    x, y = digits
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = RadiusMeter(model, x, y, F.cross_entropy, thresholds=(0.1, 0.05)).measure(3, 7)
        torch.set_num_threads(2)
        two = RadiusMeter(model, x, y, F.cross_entropy, thresholds=(0.1, 0.05)).measure(3, 7)
        assert torch.get_num_threads() == 2
        three = RadiusMeter(model, x, y, F.cross_entropy, thresholds=(0.1, 0.05), parallel_walks=3)
        pd.testing.assert_frame_equal(two, alone)
        pd.testing.assert_frame_equal(three.measure(3, 7), alone)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_parallel_walks_default_to_the_threads_and_large_models_get_one(model, digits):
    x, y = digits
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert RadiusMeter(model, x, y, F.cross_entropy).parallel_walks == 2
        wide = nn.Sequential(nn.Linear(64, 2048), nn.Linear(2048, 2048), nn.Linear(2048, 10))
        assert sum(p.numel() for p in wide.parameters()) > 2**22
        big = RadiusMeter(wide, x[:16], y[:16], F.cross_entropy, thresholds=(1e9,), search="grid")
        assert big.parallel_walks == 1
    finally:
        torch.set_num_threads(before)


def test_a_model_that_cannot_be_copied_is_refused_with_the_fix(model, digits):
    x, y = digits
    model.guard = threading.Lock()  # deepcopy cannot copy a lock
    with pytest.raises(ValueError, match="model cannot be copied.*outside the module"):
        measure_radii(model, x, y, F.cross_entropy, num_directions=1)


def test_parallel_walks_are_checked(model, digits):
    x, y = digits
    with pytest.raises(ValueError, match="parallel_walks must be None or an integer >= 1, got 0"):
        RadiusMeter(model, x, y, F.cross_entropy, parallel_walks=0)


def test_the_callers_model_is_untouched_while_radii_are_measured(model, digits):
    """Another thread reads the model's weights and outputs throughout a measurement,
    in training mode, and sees them unchanged; no module carries a forward of its own,
    and no parameter is re-pointed, before, during or after."""
    x, y = digits
    model.train()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    storages = [p.data_ptr() for p in model.parameters()]
    with torch.no_grad():
        expected = model(x[:50])
    seen, done = [], threading.Event()

    def watch():
        while not done.is_set():
            with torch.no_grad():
                same_outputs = torch.equal(model(x[:50]), expected)
            same_weights = all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
            own_forward = any("forward" in vars(m) for m in model.modules())
            seen.append((same_outputs, same_weights, model.training, own_forward))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        measure_radii(model, x, y, F.cross_entropy, num_directions=6, quadratic_radii=True)
        measure_radii(model, x, y, F.cross_entropy, num_directions=2, points_per_pass=3)
    finally:
        done.set()
        watcher.join()
    assert len(seen) > 5
    assert all(s == (True, True, True, False) for s in seen)
    assert storages == [p.data_ptr() for p in model.parameters()]
    assert not any("forward" in vars(m) for m in model.modules())


def test_chunking_and_filter_norms_through_measure_radii(model, digits):
    x, y = digits
    whole = measure_radii(model, x, y, F.cross_entropy, num_directions=4)
    chunked = measure_radii(model, x, y, F.cross_entropy, num_directions=4, batch_size=50)
    np.testing.assert_allclose(chunked.radius, whole.radius, rtol=2e-4)
    li = measure_radii(model, x, y, F.cross_entropy, num_directions=4, filter_norm="li2018")
    isotropic = measure_radii(model, x, y, F.cross_entropy, num_directions=4, filter_norm="none")
    assert not np.allclose(li.coefficient, whole.coefficient)
    # the raw Gaussians are shared; only the scaling differs
    np.testing.assert_array_equal(li.raw_norm, isotropic.raw_norm)
    np.testing.assert_allclose(isotropic.radius_euclid, isotropic.radius)  # d = g


def test_device_is_checked(model, digits):
    x, y = digits
    on_cpu = measure_radii(model, x, y, F.cross_entropy, num_directions=2, device="cpu")
    assert (on_cpu.radius > 0).all()
    with pytest.raises(ValueError, match="device"):
        measure_radii(model, x, y, F.cross_entropy, num_directions=2, device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            measure_radii(model, x, y, F.cross_entropy, num_directions=2, device="cuda")


def test_batched_forward_passes_agree_with_one_at_a_time(model, digits):
    x, y = digits
    loop = measure_radii(model, x, y, F.cross_entropy, num_directions=8, thresholds=(0.1, 0.05))
    batched = measure_radii(
        model, x, y, F.cross_entropy, num_directions=8, thresholds=(0.1, 0.05), points_per_pass=4
    )
    np.testing.assert_allclose(batched.radius, loop.radius, rtol=2e-4)


def test_weights_and_mode_are_left_bit_exactly(model, digits):
    x, y = digits
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    storages = [p.data_ptr() for p in model.parameters()]
    measure_radii(model, x, y, F.cross_entropy, num_directions=3, search="grid")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert storages == [p.data_ptr() for p in model.parameters()]
    assert model.training


def test_weights_are_restored_when_the_loss_raises(model, digits):
    x, y = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = 0

    def flaky_loss(out, target):
        nonlocal calls
        calls += 1
        if calls == 20:
            raise RuntimeError("boom")
        return F.cross_entropy(out, target)

    with pytest.raises(RuntimeError, match="boom"):
        measure_radii(model, x, y, flaky_loss, num_directions=4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


CONTRACT_COLUMNS = [  # DESIGN section 5, in order
    "direction", "seed", "threshold", "metric", "coefficient", "radius", "radius_euclid",
    "raw_norm", "censored", "evals",
]  # fmt: skip


def test_columns_match_the_contract(model, digits):
    x, y = digits
    df = measure_radii(model, x, y, F.cross_entropy, num_directions=2, thresholds=(0.1, 0.2))
    assert list(df.columns) == CONTRACT_COLUMNS + ["data_passes", "nonfinite"] == RADII_COLUMNS
    assert len(df) == 4
    assert (df.evals > 0).all() and (df.data_passes > 0).all()


# -- censoring, base past the threshold, NaN --------------------------------------------


def test_walks_that_never_cross_are_censored(model, digits):
    x, y = digits
    df = measure_radii(model, x, y, F.cross_entropy, num_directions=3, max_coefficient=1e-3)
    assert df.censored.all() and df.radius.isna().all()
    assert (df.coefficient == 1e-3).all()
    grid = measure_radii(
        model, x, y, F.cross_entropy, num_directions=2, search="grid", coefficients=[0, 1e-4, 1e-3]
    )
    assert grid.censored.all() and (grid.coefficient == 1e-3).all()


def test_base_past_the_threshold_gives_zero_and_warns(model, digits):
    x, y = digits
    with pytest.warns(RuntimeWarning, match="already past"):
        df = measure_radii(model, x, y, F.cross_entropy, num_directions=2, thresholds=(1e-7, 0.1))
    low = df[df.threshold == 1e-7]
    assert (low.radius == 0).all() and not low.censored.any()
    assert (df[df.threshold == 0.1].radius > 0).all()


class NanOutside(nn.Module):
    """A linear classifier whose outputs turn NaN once its weights move further than
    `reach` from where they started."""

    def __init__(self, reach: float):
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.register_buffer("start", self.fc.weight.detach().clone())
        self.reach = reach

    def forward(self, x):
        out = self.fc(x)
        moved = (self.fc.weight - self.start).norm()
        return torch.where(moved > self.reach, torch.full_like(out, math.nan), out)


def test_nan_loss_counts_as_past_every_threshold_and_is_flagged(digits):
    x, y = digits
    torch.manual_seed(0)
    model = NanOutside(reach=0.05)
    df = measure_radii(
        model, x, y, F.cross_entropy, num_directions=3, thresholds=(50.0,), filter_norm="none"
    )
    accuracy = measure_radii(
        model, x, y, F.cross_entropy, num_directions=3, metric="accuracy", thresholds=(0.01,),
        filter_norm="none",
    )  # fmt: skip
    for frame in (df, accuracy):
        assert frame.nonfinite.all() and not frame.censored.any()
        for row in frame.itertuples():  # the NaN edge: c * |g restricted to fc.weight| = reach
            generator = torch.Generator().manual_seed(1 + row.direction)
            edge = 0.05 / torch.randn(10, 64, generator=generator).norm().item()
            assert edge < row.coefficient <= edge * (1 + 2e-4)


class TokenCopier(nn.Module):
    """Predicts each token of a sequence from itself: (B, T) ids -> (B, T, V) logits."""

    def __init__(self, vocabulary: int):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, 8)
        self.out = nn.Linear(8, vocabulary)

    def forward(self, ids):
        return self.out(self.embed(ids))


def test_sequence_accuracy_is_per_sample_fraction_of_positions():
    torch.manual_seed(0)
    model = TokenCopier(6)
    ids = torch.randint(0, 6, (40, 9))
    loss = lambda out, t: F.cross_entropy(out.flatten(0, 1), t.flatten())  # noqa: E731
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        loss(model(ids), ids).backward()
        optimizer.step()
    df = measure_radii(
        model, ids, ids, loss, num_directions=3, metric="accuracy", thresholds=(0.7,), rtol=1e-3
    )
    params = [(n, p) for n, p in model.named_parameters()]
    trained = [p.detach().clone() for _, p in params]
    for row in df.itertuples():  # token accuracy just past the crossing is below 0.7
        generator = torch.Generator().manual_seed(1 + row.direction)
        gaussians = [torch.randn(p.shape, generator=generator) for _, p in params]
        accuracies = []
        for c in (row.coefficient, row.coefficient * (1 - 1e-3)):
            with torch.no_grad():
                for (_, p), w, g in zip(params, trained, gaussians):
                    scale = w.norm(dim=1, keepdim=True) if w.dim() == 2 else 1.0
                    p.copy_(w + c * g * scale)
                accuracies.append((model(ids).argmax(-1) == ids).double().mean().item())
        assert accuracies[0] < 0.7 <= accuracies[1]
        with torch.no_grad():
            for (_, p), w in zip(params, trained):
                p.copy_(w)


# -- bad input ---------------------------------------------------------------------------

BAD = [
    ({"thresholds": ()}, "thresholds"),
    ({"thresholds": (-0.1,)}, "thresholds"),
    ({"thresholds": (math.nan,)}, "thresholds"),
    ({"metric": "accuracy", "thresholds": (1.5,)}, "accuracy thresholds"),
    ({"metric": "accuracy", "thresholds": (0.0,)}, "accuracy thresholds"),
    ({"num_directions": 0}, "num_directions"),
    ({"num_directions": -3}, "num_directions"),
    ({"max_coefficient": 0.0}, "max_coefficient"),
    ({"max_coefficient": -1.0}, "max_coefficient"),
    ({"rtol": 0.0}, "rtol"),
    ({"rtol": 0.5}, "rtol"),
    ({"metric": "loss2"}, "metric"),
    ({"filter_norm": "layer"}, "filter_norm"),
    ({"search": "golden"}, "search"),
    ({"search": "grid", "coefficients": [0.2, 0.1]}, "coefficients"),
    ({"coefficients": [0.1, 0.2]}, "search='grid'"),
    ({"batch_size": 0}, "batch_size"),
    ({"seed": -1}, "seed"),
    ({"direction_rng": "gpu"}, "direction_rng"),
    ({"allow_tf32": 1}, "allow_tf32"),
]


@pytest.mark.parametrize(
    "kwargs,name", BAD, ids=[f"{list(k)[0]}-{i}" for i, (k, _) in enumerate(BAD)]
)
def test_bad_arguments_name_the_argument(model, digits, kwargs, name):
    x, y = digits
    arguments = {"num_directions": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        measure_radii(model, x, y, F.cross_entropy, **arguments)


def test_mismatched_lengths_are_refused(model, digits):
    x, y = digits
    with pytest.raises(ValueError, match=r"len\(x\)=600 and len\(y\)=599"):
        measure_radii(model, x, y[:-1], F.cross_entropy, num_directions=1)


def test_a_model_with_nothing_to_perturb_is_refused(digits):
    x, y = digits

    class Scaler(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x[:, :10] * self.scale

    with pytest.raises(ValueError, match="no parameter to perturb"):
        measure_radii(Scaler(), x, y, F.cross_entropy, num_directions=1)


def test_no_warning_on_a_clean_run(model, digits):
    x, y = digits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        measure_radii(model, x, y, F.cross_entropy, num_directions=2)


def test_quadratic_radii_equal_measured_radii_on_an_exact_quadratic_basin():
    basin = quadratic_basin(60, decades=2.0, seed=3)
    thresholds = (0.05, 0.2)
    frame = measure_radii(
        basin.model, basin.x, basin.y, basin.loss_fn, num_directions=12,
        thresholds=thresholds, quadratic_radii=True,
    )  # fmt: skip
    assert not frame.censored.any()
    np.testing.assert_allclose(frame.radius_quadratic, frame.radius, rtol=1e-3)


def test_quadratic_radii_are_a_column_only_when_asked_and_leave_radii_alone(model, digits):
    x, y = digits
    kwargs = dict(num_directions=6, thresholds=(0.1, 0.5))
    plain = measure_radii(model, x, y, F.cross_entropy, **kwargs)
    with_quadratic = measure_radii(model, x, y, F.cross_entropy, quadratic_radii=True, **kwargs)
    assert "radius_quadratic" not in plain.columns
    pd.testing.assert_frame_equal(plain, with_quadratic.drop(columns="radius_quadratic"))
    # cross-entropy at a confident minimum rises faster than its quadratic model
    assert (with_quadratic.radius_quadratic > with_quadratic.radius).all()
    with pytest.raises(ValueError, match="quadratic_radii"):
        measure_radii(model, x, y, F.cross_entropy, num_directions=2, metric="accuracy",
                      thresholds=(0.5,), quadratic_radii=True)  # fmt: skip


def stubborn_cross_entropy(outputs, targets):
    """Cross-entropy behind a `.item()`: torch.func.vmap refuses it."""
    if outputs.sum().item() > -math.inf:
        return F.cross_entropy(outputs, targets)
    return outputs.sum()


def test_a_loss_that_cannot_be_split_per_sample_says_so_and_keeps_the_radii(model, digits):
    x, y = digits
    kwargs = dict(num_directions=4, thresholds=(0.1, 0.5))
    with pytest.warns(RuntimeWarning, match="cannot be split per sample.*no early exit"):
        slow = measure_radii(model, x, y, stubborn_cross_entropy, **kwargs)
    fast = measure_radii(model, x, y, F.cross_entropy, **kwargs)
    np.testing.assert_allclose(slow.radius, fast.radius, rtol=2e-4)  # both within rtol
    assert (slow.data_passes >= fast.data_passes).all()  # every point on the whole set


def test_a_loss_with_negative_terms_says_early_exit_is_off(model, digits):
    x, y = digits
    with pytest.warns(RuntimeWarning, match="negative per-sample terms"):
        measure_radii(model, x, y, lambda o, t: F.cross_entropy(o, t) - 1.0,
                      num_directions=2, thresholds=(0.1,))  # fmt: skip
