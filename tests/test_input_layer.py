"""The input layer's output kept once per direction: exact, and only where it may be."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import volume_ray.landscape as landscape_module
from volume_ray.directions import perturbed_parameters, raw_directions
from volume_ray.input_layer import KeptOutput, find_input_layer
from volume_ray.landscape import Landscape
from volume_ray.models import build_model

INF = np.inf


def plain_sums(model, params, directions, coefficients, x, y):
    """Summed cross-entropy at each point, by a plain forward pass of a copied model."""
    sums = []
    for d, c in zip(directions, coefficients):
        with torch.no_grad():
            weights = params.tensors(params.flat + c * d)
            out = torch.func.functional_call(model, weights, (x,))
        sums.append(F.cross_entropy(out, y, reduction="sum").item())
    return np.array(sums)


def small_cnn():
    return build_model("cnn", (1, 8, 8), 10, channels=[4], hidden=[16], seed=0).eval()


@pytest.mark.parametrize("points_per_pass", [1, 3])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_kept_input_layer_scores_equal_a_plain_forward(model, digits, kind, points_per_pass):
    x, y = digits
    if kind == "cnn":
        model, x = small_cnn(), x.reshape(-1, 1, 8, 8)
    params = perturbed_parameters(model)
    landscape = Landscape(
        model, x, y, F.cross_entropy, points_per_pass=points_per_pass, batch_size=128
    )
    path = "layers.0" if kind == "mlp" else "convs.0"
    assert landscape.input_layer is not None and landscape.input_layer.path == path
    assert isinstance(landscape.model.get_submodule(path), KeptOutput)
    directions = raw_directions(params, seed=1, indices=range(4)) * 0.05
    coefficients = [0.0, 0.5, 1.0, 2.0]
    expected = plain_sums(model, params, directions, coefficients, landscape.x, landscape.y)
    scores = landscape.score(
        landscape.prepare(directions), range(4), coefficients, np.full(4, INF), np.full(4, -INF)
    )
    np.testing.assert_allclose(scores.lower, expected, rtol=1e-5)
    assert type(model.get_submodule(path)) in (torch.nn.Linear, torch.nn.Conv2d)  # yours: as it was


def test_directions_through_the_kept_layer_match_the_layer_itself(model, digits):
    params = perturbed_parameters(model)
    layer = find_input_layer(model, params, digits[0][:2])
    d = raw_directions(params, seed=4, indices=[0])[0]
    x = digits[0][:50]
    g = layer.output(x, d)
    c = 0.3
    with torch.no_grad():
        walked = layer.output(x, params.flat + c * d)
        np.testing.assert_allclose(walked, layer.output(x, params.flat) + c * g, atol=1e-5)


class InputScaledByAWeight(nn.Module):
    """The first layer's input depends on a perturbed weight used outside any layer."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(64, 64)
        self.layer = nn.Linear(64, 10)

    def forward(self, x):
        return self.layer(x @ self.pre.weight.T)


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(torch.relu(self.layer(torch.relu(self.layer(x)))))


class ScaledLinear(nn.Linear):
    """A Linear subclass whose forward is not affine in its weights."""

    def forward(self, x):
        return super().forward(x) * self.weight.abs().sum()


@pytest.mark.parametrize(
    "model",
    [
        InputScaledByAWeight(),
        CalledTwice(),
        nn.Sequential(ScaledLinear(64, 10)),
        build_model("char_transformer", (8,), 20, layers=1, heads=2, width=16),
    ],
    ids=["input-depends-on-a-weight", "called-twice", "linear-subclass", "embedding-first"],
)
def test_input_layer_is_refused_where_keeping_it_would_not_be_exact(model, digits):
    x = torch.randint(0, 20, (2, 8)) if hasattr(model, "wte") else digits[0][:2]
    assert find_input_layer(model, perturbed_parameters(model), x) is None


def test_a_large_input_layer_output_is_not_kept(model, digits, monkeypatch):
    params = perturbed_parameters(model)
    kept = Landscape(model, *digits, F.cross_entropy)
    kept_outputs = 2 * 600 * 10  # a search keeps two points' outputs for its surrogate
    assert kept.floats_per_walk == 600 * 32 + kept_outputs
    monkeypatch.setattr(landscape_module, "INPUT_LAYER_FLOATS", 600 * 32 - 1)
    dropped = Landscape(model, *digits, F.cross_entropy)
    assert dropped.input_layer is None and dropped.floats_per_walk == kept_outputs
    assert dropped.prepare(params.flat[None]).layer_outputs is None
    assert dropped.base_total == pytest.approx(kept.base_total, rel=1e-6)


def test_a_model_that_is_one_affine_layer_is_kept_whole(digits):
    """A linear model: its whole output is the kept layer's, h* + c*g."""
    torch.manual_seed(0)
    model = nn.Linear(64, 10)
    landscape = Landscape(model, *digits, F.cross_entropy)
    assert isinstance(landscape.model, KeptOutput) and landscape.input_layer.path == ""
    params = perturbed_parameters(model)
    d = raw_directions(params, seed=2, indices=[0]) * 0.05
    scores = landscape.score(landscape.prepare(d), [0], [0.7], np.full(1, INF), np.full(1, -INF))
    expected = plain_sums(model, params, d, [0.7], landscape.x, landscape.y)
    np.testing.assert_allclose(scores.lower, expected, rtol=1e-5)
    assert type(model) is nn.Linear


def test_the_kept_output_is_given_only_within_its_block(model, digits):
    landscape = Landscape(model, *digits, F.cross_entropy)
    kept = landscape.model.get_submodule("layers.0")
    with kept.giving(torch.zeros(3, 32)):
        assert landscape.model(digits[0][:3]).shape == (3, 10)
    with pytest.raises(RuntimeError, match="output was not given"):
        landscape.model(digits[0][:3])
    # it holds the layer's parameters under their own names
    assert [name for name, _ in landscape.model.named_parameters()] == [
        name for name, _ in model.named_parameters()
    ]
