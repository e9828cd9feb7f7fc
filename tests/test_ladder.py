"""The ladder's resampling between rungs, against direct computations."""

import math

import numpy as np
import pytest

from volume_ray.ladder import GROUPS, Rung, groups, incremental_log_weights, resampled
from volume_ray.polar import rung_potentials


def rung(k: float, radii: np.ndarray) -> Rung:
    chains = len(radii)
    return Rung(
        k=k, gaussians=np.arange(chains, dtype=float)[:, None], radii=radii,
        trace=radii[None, :], step=0.1, acceptance=math.nan, radius_searches=0,
        loss_evaluations=0,
    )  # fmt: skip


def test_incremental_weights_are_the_ratio_of_the_two_rungs_laws():
    radii = np.linspace(0.5, 2.0, 16)
    previous, n, k = rung(4.0, radii), 30, 1.0
    expected = rung_potentials(4.0, radii, n) - rung_potentials(1.0, radii, n)
    np.testing.assert_allclose(incremental_log_weights(previous, k, n), expected)


def test_resampling_keeps_each_group_apart_and_follows_the_weights():
    """Systematic resampling: each chain's copies are its weight times the group's size,
    rounded one way or the other, and never cross into another group."""
    chains, n, k = 64, 50, 0.5
    radii = np.random.default_rng(0).uniform(0.5, 1.5, chains)
    previous = rung(2.0, radii)
    ancestors = resampled(previous, k, n, np.random.default_rng(1))
    assert len(ancestors) == chains
    log_w = incremental_log_weights(previous, k, n)
    for group in groups(chains):
        mine = ancestors[group]
        assert set(mine) <= set(group)
        w = np.exp(log_w[group] - log_w[group].max())
        expected = len(group) * w / w.sum()
        copies = np.array([(mine == chain).sum() for chain in group])
        assert np.all(np.abs(copies - expected) < 1)


@pytest.mark.parametrize("chains", [GROUPS, 17, 64])
def test_equal_weights_keep_every_chain_once(chains):
    previous = rung(1.0, np.full(chains, 0.7))
    ancestors = resampled(previous, 1.0, 10, np.random.default_rng(0))
    np.testing.assert_array_equal(np.sort(ancestors), np.arange(chains))
    assert len(groups(chains)) == GROUPS
