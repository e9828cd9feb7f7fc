"""Cross-entropy over class-major logits: the same values as PyTorch's own."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from volume_ray.cross_entropy import CLASS_MAJOR_ROWS, FEW_CLASSES, cross_entropy, faster_loss
from volume_ray.directions import perturbed_parameters, raw_directions
from volume_ray.landscape import Landscape


def logits_and_targets(rows, classes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    outputs = 3 * torch.randn(rows, classes, generator=generator)
    return outputs, torch.randint(0, classes, (rows,), generator=generator)


@pytest.mark.parametrize("classes", [2, 3, 10, 15, 16, 100])
@pytest.mark.parametrize("rows", [CLASS_MAJOR_ROWS - 1, CLASS_MAJOR_ROWS, 3000])
def test_cross_entropy_equals_torch_and_goes_class_major_by_its_rule(rows, classes):
    outputs, targets = logits_and_targets(rows, classes)
    ours = cross_entropy(outputs, targets)
    assert ours.item() == pytest.approx(F.cross_entropy(outputs, targets).item(), rel=1e-6)
    # by hand, in float64: log-sum-exp of each row minus its target's logit
    wide = outputs.double()
    by_hand = (wide.logsumexp(1) - wide[torch.arange(rows), targets]).mean().item()
    assert ours.item() == pytest.approx(by_hand, rel=1e-6)
    class_major = classes in FEW_CLASSES and rows >= CLASS_MAJOR_ROWS
    down_the_columns = F.cross_entropy(outputs.t().contiguous().unsqueeze(0), targets[None])
    assert torch.equal(ours, down_the_columns if class_major else F.cross_entropy(outputs, targets))


def test_cross_entropy_takes_soft_targets_as_torch_does():
    outputs, _ = logits_and_targets(CLASS_MAJOR_ROWS, 10)
    soft = torch.softmax(torch.randn(CLASS_MAJOR_ROWS, 10), dim=1)
    assert torch.equal(cross_entropy(outputs, soft), F.cross_entropy(outputs, soft))


def test_cross_entropy_works_inside_vmap():
    outputs, targets = logits_and_targets(3 * 400, 10)
    batched = outputs.view(3, 400, 10)
    ours = torch.func.vmap(cross_entropy, in_dims=(0, None))(batched, targets[:400])
    plain = torch.stack([F.cross_entropy(o, targets[:400]) for o in batched])
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=0)


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, nn.CrossEntropyLoss()])
def test_plain_cross_entropy_on_class_indices_has_a_faster_equivalent(loss_fn):
    assert faster_loss(loss_fn, torch.tensor([0, 3, 9])) is cross_entropy


@pytest.mark.parametrize(
    "loss_fn, targets",
    [
        (nn.CrossEntropyLoss(weight=torch.ones(10)), torch.tensor([0, 3])),
        (nn.CrossEntropyLoss(label_smoothing=0.1), torch.tensor([0, 3])),
        (nn.CrossEntropyLoss(reduction="sum"), torch.tensor([0, 3])),
        (F.cross_entropy, torch.tensor([0, -100])),  # the ignored index
        (F.cross_entropy, torch.tensor([[0.2, 0.8], [1.0, 0.0]])),  # soft targets
        (F.cross_entropy, torch.zeros(0, dtype=torch.long)),
        (F.cross_entropy, torch.zeros(4, 7, dtype=torch.long)),  # sequences
        (F.mse_loss, torch.tensor([0.0, 1.0])),
        (lambda out, y: F.cross_entropy(out, y), torch.tensor([0, 3])),  # a wrapper
    ],
)
def test_other_losses_and_targets_have_none(loss_fn, targets):
    assert faster_loss(loss_fn, targets) is None


@pytest.mark.parametrize("points_per_pass", [1, 3])
def test_a_landscape_scores_a_classifier_as_a_plain_forward(points_per_pass):
    """Enough samples for the class-major layout; sums and outputs match a plain forward."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2 * CLASS_MAJOR_ROWS, 20, generator=generator)
    y = torch.randint(0, 10, (len(x),), generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    params = perturbed_parameters(model)
    directions = raw_directions(params, seed=1, indices=range(3)) * 0.1
    landscape = Landscape(model, x, y, F.cross_entropy, points_per_pass=points_per_pass)
    assert landscape.loss_fn is cross_entropy
    coefficients = [0.5, 1.0, 2.0]
    scores = landscape.score(
        landscape.prepare(directions),
        range(3),
        coefficients,
        np.full(3, np.inf),
        np.full(3, -np.inf),
    )
    for k, (d, c) in enumerate(zip(directions, coefficients)):
        weights = params.tensors(params.flat + c * d)
        outputs = torch.func.functional_call(model, weights, (landscape.x,))  # its order
        expected = F.cross_entropy(outputs, landscape.y, reduction="sum").item()
        assert scores.lower[k] == pytest.approx(expected, rel=1e-5)
        torch.testing.assert_close(scores.outputs[k], outputs, rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(m) for m in model.modules())
