"""Models: the protocol table's parameter counts, seeded init, causal attention."""

import pytest
import torch
import torch.nn.functional as F

from volume_ray.directions import perturbed_parameters
from volume_ray.models import (
    MODELS,
    build_model,
    count_parameters,
    describe_model,
    loss_for_task,
)


@pytest.mark.parametrize(
    "name,shape,outputs,kwargs,expected",
    [
        ("mlp", (1, 28, 28), 10, {"hidden": [256, 128]}, 235_146),  # MNIST MLP
        ("mlp", (2,), 1, {"hidden": [32] * 5}, 4_353),  # swiss roll
        ("cnn", (3, 32, 32), 10, {"channels": [32, 64, 128], "hidden": [512, 256]}, 1_276_234),
        ("mlp", (194,), 97, {"hidden": [250]}, 194 * 250 + 250 + 250 * 97 + 97),  # modular
    ],
)
def test_parameter_counts_match_the_protocol_table(name, shape, outputs, kwargs, expected):
    model = build_model(name, shape, outputs, **kwargs)
    assert count_parameters(model) == expected
    assert perturbed_parameters(model).count == expected
    assert model(torch.zeros(2, *shape)).shape == (2, outputs)


def test_init_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(9)
    expected = torch.rand(2)
    torch.manual_seed(9)
    a = build_model("cnn", (1, 28, 28), 10, channels=[8], hidden=[16], seed=3)
    b = build_model("cnn", (1, 28, 28), 10, channels=[8], hidden=[16], seed=3)
    c = build_model("cnn", (1, 28, 28), 10, channels=[8], hidden=[16], seed=4)
    assert torch.equal(torch.rand(2), expected)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.convs[0].weight, c.convs[0].weight)


def test_char_transformer_is_causal_and_ties_its_head():
    model = build_model("char_transformer", (16,), 11, layers=2, heads=2, width=8).eval()
    tokens = torch.randint(0, 11, (1, 16))
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 11
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[0, :10], model(changed)[0, :10])
        assert not torch.allclose(model(tokens)[0, 10:], model(changed)[0, 10:])
    assert model.head.weight is model.wte.weight
    names = perturbed_parameters(model).names
    assert "wte.weight" in names and "head.weight" not in names  # tied: perturbed once


def test_losses_of_each_task():
    logits = torch.randn(4, 3)
    assert loss_for_task("classification")(logits, torch.tensor([0, 1, 2, 0])) > 0
    assert loss_for_task("binary")(torch.randn(4, 1), torch.ones(4, 1)) > 0
    assert loss_for_task("onehot_mse")(logits, torch.eye(3)[[0, 1, 2, 0]]) == pytest.approx(
        F.mse_loss(logits, torch.eye(3)[[0, 1, 2, 0]]).item()
    )
    sequence = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    torch.testing.assert_close(
        loss_for_task("language")(sequence, targets),
        F.cross_entropy(sequence.reshape(10, 7), targets.reshape(10)),
    )


@pytest.mark.parametrize(
    "name,shape,kwargs,match",
    [
        ("resnet", (64,), {}, "mlp"),
        ("cnn", (64,), {"channels": [8]}, "square images"),
        ("char_transformer", (64, 3), {}, "char_text"),
        ("cnn", (1, 8, 8), {"channels": [4, 4, 4, 4]}, "fewer channels"),
        ("char_transformer", (16,), {"width": 10, "heads": 3}, "multiple"),
    ],
)
def test_bad_models_are_explained(name, shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, shape, 10, **kwargs)
    assert set(MODELS) == {"mlp", "cnn", "char_transformer"}


def test_each_model_reports_its_size_loss_and_metric():
    model = build_model("mlp", (2,), 1, hidden=[32] * 5)
    assert describe_model("mlp", model, "binary") == {
        "model": "mlp",
        "n_params": 4_353,
        "loss": "binary_cross_entropy_with_logits",
        "metric": "accuracy",
    }
    with pytest.raises(ValueError, match="task"):
        describe_model("mlp", model, "ranking")


@pytest.mark.parametrize(
    "name,shape,kwargs",
    [("mlp", (64,), {"hidden": [32, 16]}), ("cnn", (1, 8, 8), {"channels": [4], "hidden": [8]})],
)
def test_forward_and_gradients_equal_a_plain_out_of_place_forward(name, shape, kwargs):
    # The models apply ReLU in place; training must not see the difference.
    model = build_model(name, shape, 10, seed=0, **kwargs)
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(1))
    y = torch.arange(5)

    def plain(x):
        for conv in getattr(model, "convs", []):
            x = F.max_pool2d(torch.relu(F.conv2d(x, conv.weight, conv.bias, padding=1)), 2)
        layers = model.head.layers if name == "cnn" else model.layers
        x = x.flatten(1)
        for layer in layers[:-1]:
            x = torch.relu(F.linear(x, layer.weight, layer.bias))
        return F.linear(x, layers[-1].weight, layers[-1].bias)

    grads = []
    for forward in (model, plain):
        model.zero_grad()
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(model(x), plain(x))
    for mine, reference in zip(*grads):
        torch.testing.assert_close(mine, reference)
