"""Landscape scoring against plain forward passes, and its early-exit bounds."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from volume_ray.directions import perturbed_parameters, raw_directions
from volume_ray.landscape import Landscape
from volume_ray.models import sample_accuracy
from volume_ray.parallel_walks import ParallelWalks

INF = np.inf


def plain_totals(model, params, directions, coefficients, x, y):
    """Summed loss and error count at each point, by a plain full-batch forward."""
    losses, errors = [], []
    for d, c in zip(directions, coefficients):
        walked = copy.deepcopy(model)
        with torch.no_grad():
            for name, value in params.tensors(params.flat + c * d).items():
                walked.get_parameter(name).copy_(value)
            out = walked(x)
        losses.append(F.cross_entropy(out, y, reduction="sum").item())
        errors.append((out.argmax(1) != y).sum().item())
    return np.array(losses), np.array(errors, dtype=float)


@pytest.fixture
def walk(model, digits):
    params = perturbed_parameters(model)
    directions = raw_directions(params, seed=1, indices=range(4)) * 0.05
    coefficients = [0.0, 0.5, 1.0, 2.0]
    losses, errors = plain_totals(model, params, directions, coefficients, *digits)
    return params, directions, coefficients, losses, errors


@pytest.mark.parametrize("points_per_pass", [1, 3])
def test_full_scores_equal_a_plain_forward(model, digits, walk, points_per_pass):
    params, directions, coefficients, losses, errors = walk
    for metric, expected in (("loss", losses), ("accuracy", errors)):
        landscape = Landscape(model, *digits, F.cross_entropy, metric=metric, batch_size=128,
            points_per_pass=points_per_pass,
        )  # fmt: skip
        scores = landscape.score(
            landscape.prepare(directions), range(4), coefficients, np.full(4, INF), np.full(4, -INF)
        )
        np.testing.assert_allclose(scores.lower, expected, rtol=1e-5)
        np.testing.assert_array_equal(scores.lower, scores.upper)
        assert (scores.samples == 600).all()
        assert landscape.base_total == pytest.approx(expected[0], rel=1e-5)


def test_early_exit_bounds_hold_for_loss(model, digits, walk):
    params, directions, coefficients, losses, _ = walk
    landscape = Landscape(model, *digits, F.cross_entropy, batch_size=50)
    level = losses[1:].min() / 4  # every walked point is well past it
    scores = landscape.score(
        landscape.prepare(directions),
        [1, 2, 3],
        coefficients[1:],
        np.full(3, level),
        np.full(3, -INF),
    )
    assert (scores.lower > level).all()
    assert (scores.lower <= losses[1:] * (1 + 1e-6)).all()
    assert (scores.upper == INF).all()  # a loss has no upper bound per sample
    assert (scores.samples < 600).all()


def test_early_exit_bounds_hold_for_errors(model, digits, walk):
    params, directions, coefficients, _, errors = walk
    landscape = Landscape(model, *digits, F.cross_entropy, metric="accuracy", batch_size=50)
    high = errors[3] + 300  # no point can be past this: stops once the upper bound is below
    scores = landscape.score(
        landscape.prepare(directions), [3], [coefficients[3]], np.array([INF]), np.array([high])
    )
    assert scores.lower[0] <= errors[3] <= scores.upper[0] <= high
    assert scores.samples[0] < 600


def test_samples_are_ordered_hardest_first(model, digits):
    landscape = Landscape(model, *digits, F.cross_entropy)
    with torch.no_grad():
        per_sample = F.cross_entropy(model(landscape.x), landscape.y, reduction="none")
    assert (per_sample[:-1] >= per_sample[1:]).all()


def test_sample_accuracy_reads_every_head():
    logits = torch.tensor([[2.0, 0.1], [0.0, 3.0]])
    assert sample_accuracy(logits, torch.tensor([0, 0])).tolist() == [1.0, 0.0]
    one_hot = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert sample_accuracy(logits, one_hot).tolist() == [1.0, 0.0]
    binary = torch.tensor([[0.7], [-0.2]])
    assert sample_accuracy(binary, torch.tensor([[1.0], [1.0]])).tolist() == [1.0, 0.0]
    stacked = logits.expand(3, 2, 2)  # (P, B, C): several weight sets at once
    assert sample_accuracy(stacked, torch.tensor([0, 1])).tolist() == [[1.0, 1.0]] * 3
    sequences = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]]])  # (B=1, T=4, V)
    assert sample_accuracy(sequences, torch.tensor([[0, 1, 1, 1]])).tolist() == [0.5]
    assert sample_accuracy(sequences.expand(2, 1, 4, 2), torch.tensor([[0, 1, 1, 1]])).tolist() == [
        [0.5],
        [0.5],
    ]


def test_a_loss_with_negative_terms_is_always_scored_in_full(model, digits, walk):
    params, directions, coefficients, losses, _ = walk

    def shifted(out, target):  # cross-entropy - 1: negative for confident samples
        return F.cross_entropy(out, target) - 1.0

    with pytest.warns(RuntimeWarning, match="negative per-sample terms"):
        landscape = Landscape(model, *digits, shifted, batch_size=50)
    assert not landscape.losses_nonnegative
    scores = landscape.score(
        landscape.prepare(directions), [3], [coefficients[3]], np.array([-1e9]), np.array([-INF])
    )
    assert scores.samples[0] == 600
    assert scores.lower[0] == pytest.approx(losses[3] - 600, rel=1e-5)


def test_a_point_that_cannot_stop_early_is_scored_in_one_pass(model, digits, walk):
    params, directions, coefficients, losses, _ = walk
    landscape = Landscape(model, *digits, F.cross_entropy)
    passes = []
    landscape.model.layers[-1].register_forward_hook(lambda *_: passes.append(1))
    walks = landscape.prepare(directions)
    stops = np.full(1, INF), np.full(1, -INF)
    full = landscape.score(walks, [2], [coefficients[2]], *stops)
    assert len(passes) == 1  # 600 samples, no bound to reach: one chunk
    passes.clear()
    early = landscape.score(walks, [2], [coefficients[2]], np.array([1e12]), np.array([-INF]))
    assert len(passes) == 2  # the hardest eighth first, in case it decides
    assert full.lower[0] == pytest.approx(early.lower[0], rel=1e-6)
    assert full.lower[0] == pytest.approx(losses[2], rel=1e-5)


@pytest.mark.parametrize("points_per_pass", [1, 3])
def test_fully_scored_points_return_their_outputs(model, digits, walk, points_per_pass):
    params, directions, coefficients, _, _ = walk
    landscape = Landscape(
        model, *digits, F.cross_entropy, batch_size=128, points_per_pass=points_per_pass
    )
    walks = landscape.prepare(directions)
    full = landscape.score(walks, range(4), coefficients, np.full(4, INF), np.full(4, -INF))
    for d, c, outputs in zip(directions, coefficients, full.outputs):
        walked = copy.deepcopy(model)
        with torch.no_grad():
            for name, value in params.tensors(params.flat + c * d).items():
                walked.get_parameter(name).copy_(value)
            torch.testing.assert_close(outputs, walked(landscape.x), rtol=1e-5, atol=1e-5)
    stopped = landscape.score(walks, [3], [coefficients[3]], np.array([1.0]), np.array([-INF]))
    assert stopped.samples[0] < 600 and stopped.outputs == [None]


def surrogate_through(landscape, scored):
    """The landscape's surrogate for a walk, given the points scored as (c, total, outputs)."""
    surrogate = landscape.surrogate()
    for c, total, outputs in scored:
        surrogate.record(c, total, outputs)
    return surrogate


def test_the_surrogate_is_exact_where_outputs_are_quadratic_in_c(digits):
    # Softmax regression: the logits x(W + cD)^T + b + c*e are affine in c, so the
    # quadratic through c = 0 and two scored points is exact, and so is the loss.
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)
    params = perturbed_parameters(model)
    landscape = Landscape(model, *digits, F.cross_entropy)
    d = raw_directions(params, seed=3, indices=[0]) * 0.05
    prepared = landscape.prepare(d)
    coefficients = [0.3, 0.5, 0.05, 0.9, 2.0]
    full = landscape.score(prepared, [0] * 5, coefficients, np.full(5, INF), np.full(5, -INF))
    surrogate = surrogate_through(landscape, zip(coefficients[:2], full.lower, full.outputs))
    for c, total in zip(coefficients, full.lower):
        assert surrogate(c) == pytest.approx(total, rel=1e-5)
    assert surrogate(0.0) == pytest.approx(landscape.base_total, rel=1e-5)


@pytest.fixture
def three_points(model, digits, walk):
    """A landscape, and direction 1 scored fully there at c = 0.5, 1.0 and 0.75."""
    directions = walk[1]
    landscape = Landscape(model, *digits, F.cross_entropy)
    full = landscape.score(
        landscape.prepare(directions), [1, 1, 1], [0.5, 1.0, 0.75], np.full(3, INF),
        np.full(3, -INF),
    )  # fmt: skip
    return landscape, full


def test_the_surrogate_interpolates_an_mlp_at_its_scored_points(three_points):
    landscape, full = three_points
    surrogate = surrogate_through(landscape, zip([0.5, 1.0], full.lower, full.outputs))
    assert surrogate(0.5) == pytest.approx(full.lower[0], rel=1e-5)
    assert surrogate(1.0) == pytest.approx(full.lower[1], rel=1e-5)
    between = surrogate(0.75)  # a model, not the truth
    assert between != full.lower[2] and between == pytest.approx(full.lower[2], rel=0.05)


def test_the_surrogate_rests_on_the_first_two_fully_scored_finite_points(
    model, digits, three_points
):
    """Points stopped early (no outputs) or with a NaN sum do not count; a third point
    ends the surrogate, as the search then interpolates scored points alone."""
    landscape, full = three_points
    surrogate = landscape.surrogate()
    surrogate.record(0.5, full.lower[0], full.outputs[0])
    assert surrogate(0.6) is None  # one point
    surrogate.record(0.9, 1e9, None)  # stopped early
    surrogate.record(0.8, np.nan, full.outputs[2])  # a NaN sum
    assert surrogate(0.6) is None
    surrogate.record(1.0, full.lower[1], full.outputs[1])
    assert surrogate(1.0) == pytest.approx(full.lower[1], rel=1e-5)
    surrogate.record(0.75, full.lower[2], full.outputs[2])
    assert surrogate(0.6) is None
    assert Landscape(model, *digits, F.cross_entropy, metric="accuracy").surrogate() is None


def test_outputs_are_kept_only_for_the_loss_and_up_to_a_size(model, digits, monkeypatch):
    assert Landscape(model, *digits, F.cross_entropy).keeps_outputs
    errors = Landscape(model, *digits, F.cross_entropy, metric="accuracy")
    assert not errors.keeps_outputs and errors.floats_per_walk == 600 * 32
    monkeypatch.setattr("volume_ray.landscape.OUTPUT_FLOATS", 600 * 10 - 1)
    large = Landscape(model, *digits, F.cross_entropy)
    assert not large.keeps_outputs and large.floats_per_walk == 600 * 32


def test_points_scored_together_keep_outputs_of_their_own(model, digits, walk):
    params, directions, coefficients, _, _ = walk
    landscape = Landscape(model, *digits, F.cross_entropy, points_per_pass=3)
    full = landscape.score(
        landscape.prepare(directions), range(3), coefficients[:3], np.full(3, INF), np.full(3, -INF)
    )
    assert all(outputs.shape == (600, 10) and outputs._base is None for outputs in full.outputs)


def test_a_grid_search_keeps_no_outputs(model, digits):
    grid = Landscape(model, *digits, F.cross_entropy, keep_outputs=False)
    assert not grid.keeps_outputs and grid.floats_per_walk == 600 * 32


def test_a_replica_scores_alike_on_a_model_of_its_own_at_the_same_time(model, digits, walk):
    params, directions, coefficients, losses, _ = walk
    landscape = Landscape(model, *digits, F.cross_entropy)
    twin = landscape.replica()
    assert landscape.input_layer is not None
    assert twin.input_layer.module is not landscape.input_layer.module
    for one in (model, landscape.model):
        assert not any(p is q for p in twin.model.parameters() for q in one.parameters())
    assert twin._point.data_ptr() != landscape._point.data_ptr()
    assert twin.x is landscape.x and twin._layer_output is landscape._layer_output

    def score(_k, on):
        stops = np.full(4, INF), np.full(4, -INF)
        return on.score(on.prepare(directions), range(4), coefficients, *stops).lower

    both = ParallelWalks(2).map(score, [landscape, twin])
    np.testing.assert_array_equal(both[0], both[1])
    np.testing.assert_allclose(both[0], losses, rtol=1e-5)
