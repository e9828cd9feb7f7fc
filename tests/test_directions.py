"""Directions follow the paper's seeding and filter normalisation exactly."""

import pytest
import torch
from torch import nn

from volume_ray.directions import FilterNorm, perturbed_parameters, raw_directions
from volume_ray.models import MLP


class Mixed(nn.Module):
    """Parameters of every kind: conv (4-D), linear (2-D), norm (1-D), and two whose
    names have no `weight`/`bias` token."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.norm = nn.LayerNorm(5)
        self.fc = nn.Linear(5, 4)
        self.temperature = nn.Parameter(torch.tensor(2.0))
        self.weights_extra = nn.Parameter(torch.ones(3))
        self.bias = nn.Module()  # a module named "bias": its parameters carry the token
        self.bias.scale = nn.Parameter(torch.ones(2))


def test_raw_directions_are_the_global_rng_convention():
    model = Mixed()
    params = perturbed_parameters(model)
    raw = raw_directions(params, seed=7, indices=[0, 3])
    for row, index in zip(raw, [0, 3]):
        torch.manual_seed(7 + index)
        expected = [
            torch.randn_like(p).reshape(-1)
            for name, p in model.named_parameters()
            if {"weight", "bias"} & set(name.split("."))
        ]
        assert torch.equal(row, torch.cat(expected))


def test_raw_directions_leave_the_global_rng_alone():
    params = perturbed_parameters(MLP(4, [3], 2))
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    raw_directions(params, seed=1, indices=range(4))
    assert torch.equal(torch.rand(5), expected)


def test_only_weight_and_bias_tokens_are_perturbed():
    params = perturbed_parameters(Mixed())
    assert params.names == (
        "conv.weight",
        "conv.bias",
        "norm.weight",
        "norm.bias",
        "fc.weight",
        "fc.bias",
        "bias.scale",
    )
    assert params.count == 3 * 2 * 9 + 3 + 5 + 5 + 4 * 5 + 4 + 2


def test_mnist_mlp_counts_the_protocol_table_parameters():
    assert perturbed_parameters(MLP(784, [256, 128], 10)).count == 235_146


def test_paper_filter_norm_scales_rows_by_weight_row_norms():
    model = Mixed()
    params = perturbed_parameters(model)
    raw = raw_directions(params, seed=1, indices=[0, 1])
    d = params.tensors(FilterNorm(params, "paper")(raw))
    g = params.tensors(raw)
    conv_norms = model.conv.weight.detach().flatten(1).norm(dim=1)  # (3,)
    fc_norms = model.fc.weight.detach().norm(dim=1)  # (4,)
    torch.testing.assert_close(d["conv.weight"], g["conv.weight"] * conv_norms[:, None, None, None])
    torch.testing.assert_close(d["fc.weight"], g["fc.weight"] * fc_norms[:, None])
    for name in ("conv.bias", "norm.weight", "norm.bias", "fc.bias"):
        assert torch.equal(d[name], g[name])  # 1-D: multiplied by 1


def test_li2018_rows_take_the_weight_row_norms():
    model = Mixed()
    params = perturbed_parameters(model)
    d = params.tensors(FilterNorm(params, "li2018")(raw_directions(params, 1, [0, 1])))
    torch.testing.assert_close(
        d["fc.weight"].norm(dim=-1), model.fc.weight.detach().norm(dim=1).expand(2, 4)
    )
    torch.testing.assert_close(
        d["conv.weight"].flatten(2).norm(dim=-1),
        model.conv.weight.detach().flatten(1).norm(dim=1).expand(2, 3),
    )
    torch.testing.assert_close(
        d["norm.bias"].norm(dim=-1), model.norm.bias.detach().norm().expand(2)
    )


def test_none_is_isotropic():
    params = perturbed_parameters(Mixed())
    raw = raw_directions(params, 1, [0])
    assert torch.equal(FilterNorm(params, "none")(raw), raw)


def test_unknown_filter_norm_is_named():
    with pytest.raises(ValueError, match="filter_norm"):
        FilterNorm(perturbed_parameters(Mixed()), "layer")


def test_nothing_to_perturb_is_refused():
    model = nn.Module()
    model.scale = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="no parameter to perturb"):
        perturbed_parameters(model)
