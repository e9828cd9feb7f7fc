"""Analysis: trend fits, rank counts and cutoffs on known inputs; the report on a run."""

import numpy as np
import pandas as pd
import pytest

from volume_ray.analysis.cutoffs import cutoff_size
from volume_ray.analysis.ranks import (
    adjacent_inversions,
    own_minimum_is_largest,
    ranking_stability,
    volume_accuracy_spearman,
)
from volume_ray.analysis.trends import fit_power_law, scaling_table


def test_power_law_fit_recovers_a_known_exponent():
    sizes = np.repeat([100, 300, 1000, 3000], 3)
    noise = np.random.default_rng(0).normal(0, 0.05, len(sizes))
    fit = fit_power_law(sizes, -1.7 * np.log(sizes) + 12 + noise)
    assert fit.exponent == pytest.approx(-1.7, abs=0.05)
    assert fit.ci_low < -1.7 < fit.ci_high and fit.ci_high - fit.ci_low < 0.2
    assert fit.intercept == pytest.approx(12, abs=0.3)


def test_scaling_table_fits_per_landscape_and_per_minimum():
    models = pd.DataFrame({"model_id": ["a", "b", "c"], "train_size": [100, 200, 400],
                           "optimizer": "adamw", "batch_size": [100, 200, 400]})  # fmt: skip
    rows = []
    for model, size in zip(models.model_id, models.train_size):
        for landscape in (100, 200, 400):
            if landscape <= size:
                value = -2.0 * np.log(size) - 0.5 * np.log(landscape)
                rows.append({"model_id": model, "landscape_size": landscape, "metric": "loss",
                             "threshold": 0.1, "estimator": "paper", "log_volume": value,
                             "n_params": 10})  # fmt: skip
    volumes = pd.DataFrame(rows)
    by_size = scaling_table(volumes, models, against="train_size")
    assert by_size.set_index("landscape_size").loc[100, "exponent"] == pytest.approx(-2.0)
    by_landscape = scaling_table(volumes, models, against="landscape_size")
    assert by_landscape.set_index("model_id").loc["c", "exponent"] == pytest.approx(-0.5)
    per_dimension = scaling_table(volumes, models, per_dimension=True)
    assert per_dimension.exponent.iloc[0] == pytest.approx(-0.2)


def test_adjacent_inversions_and_spearman_on_hand_made_tables():
    # volumes order: d > b > a > c; test losses in that order: 0.1, 0.3, 0.2, 0.4 -> 1 inversion
    volumes = np.array([5.0, 7.0, 1.0, 9.0])  # a, b, c, d
    losses = np.array([0.2, 0.3, 0.4, 0.1])
    assert adjacent_inversions(volumes, losses) == 1
    assert adjacent_inversions(volumes, 1 - volumes / 10) == 0
    assert volume_accuracy_spearman(volumes, volumes * 2) == pytest.approx(1.0)
    assert volume_accuracy_spearman(volumes, -volumes) == pytest.approx(-1.0)


def test_own_minimum_is_largest():
    models = pd.DataFrame({"model_id": ["s", "l"], "train_size": [100, 300],
                           "optimizer": "adamw", "batch_size": [100, 300]})  # fmt: skip
    volumes = pd.DataFrame({"model_id": ["s", "l", "l"], "landscape_size": [100, 100, 300],
                            "metric": "loss", "threshold": 0.1, "estimator": "paper",
                            "log_volume": [10.0, 8.0, 7.0]})  # fmt: skip
    table = own_minimum_is_largest(volumes, models).set_index("landscape_size")
    assert table.loc[100, "own_is_largest"] and table.loc[300, "own_is_largest"]


def test_ranking_stability_grows_with_directions():
    generator = np.random.default_rng(0)
    radii = {"a": generator.lognormal(0, 0.05, 200), "b": generator.lognormal(0.02, 0.05, 200)}
    table = ranking_stability(radii, {"a": 5, "b": 5}, [2, 50, 200], subsets=100)
    fractions = table.stable_fraction.to_numpy()
    assert fractions[-1] == 1.0 and fractions[0] < fractions[1] <= 1.0
    assert table.rank_correlation.iloc[-1] == pytest.approx(1.0)


def test_cutoff_on_a_hand_made_loss_sequence():
    losses = np.array([0.0, 0.0, 0.1, 0.1, 0.9, 0.9, 0.9])
    # running means: 0, 0, .033, .05, .22, .33, .41
    assert cutoff_size(losses, 0.2, base_size=2) == 5
    assert cutoff_size(losses, 0.04, base_size=2) == 4
    assert cutoff_size(losses, 0.5, base_size=2) is None
    with pytest.raises(ValueError, match="base_size"):
        cutoff_size(losses, 0.1, base_size=0)


def test_loss_plane_passes_through_the_three_minima():
    import torch
    import torch.nn.functional as F

    from volume_ray.analysis.slices import loss_plane
    from volume_ray.models import build_model

    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    minima = [build_model("mlp", (5,), 3, hidden=[4], seed=s) for s in range(3)]
    a, b, losses = loss_plane(minima, x, y, F.cross_entropy, resolution=5, span=(0.0, 1.0))
    with torch.no_grad():
        own = [F.cross_entropy(m(x), y).item() for m in minima]
    assert losses[0, 0] == pytest.approx(own[0], rel=1e-5)
    assert losses[-1, 0] == pytest.approx(own[1], rel=1e-5)  # a = 1: the second minimum
    assert losses[0, -1] == pytest.approx(own[2], rel=1e-5)
    with pytest.raises(ValueError, match="three minima"):
        loss_plane(minima[:2], x, y, F.cross_entropy)


def test_scaling_table_skips_groups_without_two_finite_sizes():
    models = pd.DataFrame({"model_id": ["a", "b"], "train_size": [100, 200],
                           "optimizer": "adamw", "batch_size": [100, 200]})  # fmt: skip
    volumes = pd.DataFrame({"model_id": ["a", "b"], "landscape_size": [100, 100], "metric": "loss",
                            "threshold": 0.1, "estimator": "paper", "log_volume": [-np.inf, 3.0],
                            "n_params": 4})  # fmt: skip
    assert scaling_table(volumes, models).empty


def test_variants_keep_optimizers_batch_sizes_and_kept_epochs_apart():
    from volume_ray.analysis.trends import with_variant

    models = pd.DataFrame({
        "model_id": ["n1-bfull-adamw-s0", "n1-bfull-adamw+sam0.05-s0", "n1-b100-adamw-s0",
                     "n1-bfull-adamw-s0-e200"],
        "optimizer": ["adamw", "adamw+sam0.05", "adamw", "adamw"],
        "batch_size": [1000, 1000, 100, 1000], "train_size": 1000,
    })  # fmt: skip
    assert list(with_variant(models).variant) == [
        "adamw bfull",
        "adamw+sam0.05 bfull",
        "adamw b100",
        "adamw bfull@e200",
    ]
