"""`curvature` against the explicit Hessian of a small MLP trained on real digits."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from volume_ray.basins import quadratic_basin
from volume_ray.curvature import Curvature, HessianOperator, curvature
from volume_ray.directions import FilterNorm, perturbed_parameters
from volume_ray.estimators import laplace_estimate
from volume_ray.models import build_model, loss_for_task
from volume_ray.train import TrainConfig, train


@pytest.fixture(scope="module")
def mlp(digits) -> nn.Module:
    """A 64-16-10 MLP (1,210 parameters) trained near a minimum of `digits`."""
    model = build_model("mlp", (64,), 10, hidden=[16], seed=0)
    history = train(model, digits, None, F.cross_entropy, TrainConfig(lr=1e-2, epochs=300))
    assert history[-1]["train_loss"] < 1e-2
    return model.eval()


def exact_hessian(model: nn.Module, x, y, loss_fn, filter_norm: str) -> torch.Tensor:
    """H_z of the mean loss, formed explicitly in float64: the reference."""
    double = copy.deepcopy(model).double()
    params = perturbed_parameters(double)
    scale = FilterNorm(params, filter_norm).scale

    def loss(z):
        weights = params.tensors(params.flat + scale * z)
        return loss_fn(functional_call(double, weights, (x.double(),)), y)

    zero = torch.zeros(params.count, dtype=torch.float64)
    return torch.autograd.functional.hessian(loss, zero, vectorize=True)


@pytest.fixture(scope="module", params=["none", "paper"])
def case(request, mlp, digits) -> SimpleNamespace:
    """The explicit Hessian and `curvature` with its defaults, for one filter norm."""
    x, y = digits
    hessian = exact_hessian(mlp, x, y, F.cross_entropy, request.param)
    found = curvature(mlp, x, y, F.cross_entropy, filter_norm=request.param)
    return SimpleNamespace(
        filter_norm=request.param,
        x=x,
        y=y,
        hessian=hessian,
        eigenvalues=torch.linalg.eigvalsh(hessian).flip(0).numpy(),  # descending
        found=found,
    )


def test_top_eigenvalues_match_the_exact_spectrum(case):
    top = case.found.top_eigenvalues
    assert top.shape == (5,)
    assert np.all(np.diff(top) <= 0)
    np.testing.assert_allclose(top, case.eigenvalues[:5], rtol=1e-3)


def test_hutchinson_trace_lies_within_three_standard_errors(case):
    hessian, found = case.hessian, case.found
    exact = float(hessian.trace())
    assert abs(found.trace - exact) <= 3 * found.trace_stderr
    # The standard error is Hutchinson's: Var(vᵀHv) = 2(|H|_F² − Σ H_ii²) for Rademacher v.
    spread = np.sqrt(2 * float((hessian**2).sum() - (hessian.diagonal() ** 2).sum()))
    assert 0.5 < found.trace_stderr / (spread / np.sqrt(found.probes)) < 2


def test_slq_log_det_matches_the_exact_spectrum(case):
    floor = 1e-3 * case.eigenvalues[0]
    exact = np.log(np.maximum(case.eigenvalues, floor)).sum()
    samples = case.found.log_det_samples(floor)
    assert samples.shape == (32,)
    assert case.found.log_det(floor) == pytest.approx(samples.mean(), rel=1e-12)
    assert case.found.log_det(floor) == pytest.approx(exact, rel=0.02)


def test_diagonal_estimate_has_hutchinsons_error(case):
    exact = case.hessian.diagonal().numpy()
    estimate = case.found.diagonal
    assert estimate.shape == (case.found.n_params,)
    # E|d̂ − d|² = Σ_{i≠j} H_ij² / probes: the estimate is as good as Hutchinson's, no worse.
    off_diagonal = float((case.hessian**2).sum()) - (exact**2).sum()
    assert ((estimate - exact) ** 2).sum() < 2 * off_diagonal / case.found.probes
    assert np.corrcoef(estimate, exact)[0, 1] > 0.7


def test_density_integrates_to_one(case):
    top, bottom = case.eigenvalues[0], case.eigenvalues[-1]
    sigma = 0.01 * top
    grid = np.linspace(bottom - 10 * sigma, top + 10 * sigma, 4001)
    density = case.found.density(grid, sigma)
    assert np.all(density >= 0)
    assert np.trapezoid(density, grid) == pytest.approx(1, abs=1e-3)


def test_base_loss_is_the_mean_loss_at_the_weights(case, mlp):
    with torch.no_grad():
        expected = float(F.cross_entropy(mlp(case.x), case.y))
    assert case.found.base_loss == pytest.approx(expected, rel=1e-5)
    assert case.found.n_params == 1210


def test_record_round_trips_through_parquet(case, tmp_path):
    record = case.found.to_record()
    json.dumps(record)  # plain Python values only
    assert "diagonal" not in record
    assert np.shape(record["lanczos_alpha"]) == (32, 64)
    assert np.shape(record["lanczos_beta"]) == (32, 63)
    pd.DataFrame([record]).to_parquet(tmp_path / "curvature.parquet")
    row = pd.read_parquet(tmp_path / "curvature.parquet").iloc[0]
    back = Curvature.from_record(row)
    assert back.diagonal is None
    assert (back.probes, back.lanczos_steps) == (32, 64)
    np.testing.assert_array_equal(back.top_eigenvalues, case.found.top_eigenvalues)
    for floor in (1e-6, 1e-3 * case.eigenvalues[0]):
        assert back.log_det(floor) == case.found.log_det(floor)


def test_hessian_operator_matches_the_explicit_product(case, mlp):
    params = perturbed_parameters(mlp)
    scale = None if case.filter_norm == "none" else FilterNorm(params, "paper").scale
    operator = HessianOperator(mlp, case.x, case.y, F.cross_entropy, scale=scale)
    chunked = HessianOperator(mlp, case.x, case.y, F.cross_entropy, scale=scale, batch_size=128)
    vectors = torch.randn(3, operator.n, generator=torch.Generator().manual_seed(0))
    expected = (case.hessian @ vectors.double().T).T
    single = operator.matvec(vectors[0])
    assert single.shape == (operator.n,) and single.dtype == torch.float32
    assert torch.linalg.norm(single.double() - expected[0]) < 1e-4 * torch.linalg.norm(expected[0])
    for product in (operator.matvec(vectors), chunked.matvec(vectors.double())):
        assert product.shape == (3, operator.n)
        error = torch.linalg.norm(product.double() - expected, dim=1)
        assert torch.all(error < 1e-4 * torch.linalg.norm(expected, dim=1))
    assert (operator.count, chunked.count) == (4, 3)


def test_filter_norm_scale_is_the_multiplier_of_the_directions(mlp):
    params = perturbed_parameters(mlp)
    ones = torch.ones(1, params.count)
    for mode in ("paper", "none"):
        to_norm = FilterNorm(params, mode)
        assert torch.equal(to_norm.scale, to_norm(ones)[0])
    with pytest.raises(ValueError, match="filter_norm"):
        FilterNorm(params, "li2018").scale  # noqa: B018


def test_repeated_eigenvalues_and_steps_clipped_to_n():
    """A least-squares model with an orthonormal design has H = 2I: Lanczos meets an
    invariant subspace at once, restarts, and still finds every eigenvalue."""
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(50, 6, generator=generator, dtype=torch.float64))
    x = q * np.sqrt(50)  # xᵀx / N = I
    y = torch.randn(50, 1, generator=generator, dtype=torch.float64)
    model = nn.Linear(6, 1, bias=False).double()
    found = curvature(model, x, y, F.mse_loss, filter_norm="none", top_k=6, probes=3)
    assert found.lanczos_steps == 6
    np.testing.assert_allclose(found.top_eigenvalues, 2.0, rtol=1e-10)
    np.testing.assert_allclose(found.log_det_samples(1e-3), 6 * np.log(2.0), rtol=1e-10)
    assert found.trace == pytest.approx(12.0, rel=1e-10) and found.trace_stderr < 1e-10


def test_the_callers_model_is_left_as_it_was(mlp, digits):
    model = copy.deepcopy(mlp).train()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    curvature(model, *digits, F.cross_entropy, probes=2, lanczos_steps=5, device="cpu")
    assert model.training and all(module.training for module in model.modules())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


class OnceDifferentiableCrossEntropy(torch.autograd.Function):
    """Cross-entropy with a hand-written backward that has no derivative of its own."""

    @staticmethod
    def forward(outputs, targets):
        return F.cross_entropy(outputs, targets)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        outputs, targets = ctx.saved_tensors
        residual = outputs.softmax(dim=1) - F.one_hot(targets, outputs.shape[1])
        return grad_output * residual / len(outputs), None


class HandWrittenCrossEntropy(torch.autograd.Function):
    """Cross-entropy with hand-written first derivatives (both twice differentiable) and
    no vmap rule: batched products must take one vector at a time."""

    @staticmethod
    def forward(outputs, targets):
        return F.cross_entropy(outputs, targets)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad_output):
        outputs, targets = ctx.saved_tensors
        residual = outputs.softmax(dim=1) - F.one_hot(targets, outputs.shape[1])
        return grad_output * residual / len(outputs), None

    @staticmethod
    def jvp(ctx, outputs_tangent, targets_tangent):
        outputs, targets = ctx.saved_tensors
        residual = outputs.softmax(dim=1) - F.one_hot(targets, outputs.shape[1])
        return (residual * outputs_tangent).sum() / len(outputs)


def test_a_loss_without_a_vmap_rule_gets_products_one_by_one(mlp, digits):
    custom = HessianOperator(mlp, *digits, HandWrittenCrossEntropy.apply)
    builtin = HessianOperator(mlp, *digits, F.cross_entropy)
    vectors = torch.randn(3, custom.n, generator=torch.Generator().manual_seed(1))
    expected = builtin.matvec(vectors)
    with pytest.warns(RuntimeWarning, match="one vector per pass"):
        products = custom.matvec(vectors)
    error = torch.linalg.norm(products - expected, dim=1)
    assert torch.all(error < 1e-5 * torch.linalg.norm(expected, dim=1))
    assert custom.count == 3


@pytest.mark.parametrize(
    "kwargs, loss_fn, names",
    [
        ({"top_k": 1211}, F.cross_entropy, "top_k"),
        ({"top_k": 0}, F.cross_entropy, "top_k"),
        ({"top_k": 8, "lanczos_steps": 4}, F.cross_entropy, "top_k"),
        ({"probes": 0}, F.cross_entropy, "probes"),
        ({"lanczos_steps": 0}, F.cross_entropy, "lanczos_steps"),
        ({"filter_norm": "li2018"}, F.cross_entropy, "filter_norm"),
        ({"batch_size": 0}, F.cross_entropy, "batch_size"),
        ({"device": "nonsense"}, F.cross_entropy, "device"),
        ({}, OnceDifferentiableCrossEntropy.apply, "loss_fn must be twice differentiable"),
        ({}, lambda o, t: F.cross_entropy(o.detach(), t), "loss_fn must be twice differentiable"),
        ({}, lambda o, t: F.cross_entropy(o, t, reduction="none"), "loss_fn"),
    ],
)
def test_bad_arguments_are_named(mlp, digits, kwargs, loss_fn, names):
    with pytest.raises(ValueError, match=names):
        curvature(mlp, *digits, loss_fn, **kwargs)


def test_mismatched_data_and_bad_floor_are_named(mlp, digits, case):
    x, y = digits
    with pytest.raises(ValueError, match="len\\(x\\)"):
        curvature(mlp, x, y[:-1], F.cross_entropy)
    for floor in (0.0, -1.0):
        with pytest.raises(ValueError, match="floor"):
            case.found.log_det(floor)
    with pytest.raises(ValueError, match="sigma"):
        case.found.density(np.linspace(0, 1, 5), 0.0)


# -- laplace on least-squares basins of known volume -------------------------------------

THRESHOLD = 0.1


def laplace_of(basin, **budget):
    found = curvature(basin.model, basin.x, basin.y, basin.loss_fn, **budget)
    delta = THRESHOLD - found.base_loss
    floor = 1e-3 * basin.eigenvalues.min()  # below the whole spectrum: nothing clipped
    samples, error = found.log_det_samples(floor), found.log_det_error(floor)
    return found, laplace_estimate(samples, basin.n_params, delta, log_det_error=error)


def test_laplace_is_exact_on_a_quadratic_basin_when_lanczos_spans_the_space():
    basin = quadratic_basin(100, seed=1)
    found, result = laplace_of(basin, probes=2, lanczos_steps=100)
    assert found.exact
    truth = basin.log_volume(THRESHOLD)
    assert result.estimate == pytest.approx(truth, rel=1e-6)
    assert found.trace == pytest.approx(basin.eigenvalues.sum(), rel=1e-6)
    assert found.trace_stderr == 0 and result.stderr < 1e-3  # the probes agree to fp32


def test_laplace_by_slq_lands_within_one_percent_at_n_1000():
    # a 4-decade spectrum: each probe's log-det spreads by sqrt(2 n var(ln lambda)) ~ 120
    # nats, so 128 probes give about 0.45% (one standard error) of the truth
    basin = quadratic_basin(1000, seed=1)
    found, result = laplace_of(basin, probes=128, lanczos_steps=64)
    truth = basin.log_volume(THRESHOLD)
    assert not found.exact
    assert abs(result.estimate - truth) <= 0.01 * abs(truth)
    assert result.ci_valid and result.ci_low <= truth <= result.ci_high


def test_the_interval_owns_the_bias_of_too_few_lanczos_steps():
    # 32 steps cannot resolve a 4-decade spectrum: the Gauss rule is biased by several
    # standard errors, and only the quadrature's own convergence term shows it
    basin = quadratic_basin(1000, seed=1)
    found, result = laplace_of(basin, probes=32, lanczos_steps=32)
    truth = basin.log_volume(THRESHOLD)
    floor = 1e-3 * basin.eigenvalues.min()
    assert abs(result.estimate - truth) > 3 * result.stderr  # the spread alone misses it
    assert found.log_det_error(floor) > 0
    assert result.ci_low <= truth <= result.ci_high


def test_attention_models_get_products_through_the_math_kernel():
    # the fused attention kernels have no forward-mode derivative
    model = build_model("char_transformer", (16,), 20, layers=1, heads=2, width=16, seed=0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 20, (8, 16), generator=generator)
    y = torch.randint(0, 20, (8, 16), generator=generator)
    operator = HessianOperator(model, x, y, loss_for_task("language"))
    u, v = torch.randn(2, operator.n, generator=generator, dtype=torch.float64)
    hu, hv = operator.matvec(torch.stack([u, v]).float()).double()
    assert torch.isfinite(hu).all() and (hu @ v).item() == pytest.approx((hv @ u).item(), rel=1e-3)
