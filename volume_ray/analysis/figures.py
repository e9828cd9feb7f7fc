"""The paper's figures from a results store, with matplotlib (no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from volume_ray.analysis.trends import with_variant  # noqa: E402
from volume_ray.estimators import bootstrap_log_volume, log_volume_by_count  # noqa: E402

__all__ = [
    "loss_slice",
    "volume_against_landscape",
    "volume_against_test_accuracy",
    "volume_against_train_size",
    "estimate_against_directions",
    "radius_distributions",
]


def _paper(volumes: pd.DataFrame, models: pd.DataFrame, threshold: float) -> pd.DataFrame:
    chosen = volumes[(volumes.estimator == "paper") & (volumes.threshold == threshold)]
    facts = with_variant(models)[["model_id", "train_size", "seed", "test_acc", "variant"]]
    return chosen.merge(facts, on="model_id")


def volume_against_train_size(volumes, models, threshold: float):
    """Fig. 4 top: log-volume against training-set size in each fixed landscape, one
    trace per seed, with the mean and spread over seeds (per variant, if several)."""
    table = _paper(volumes, models, threshold)
    landscapes = sorted(table.landscape_size.unique())
    figure, axes = plt.subplots(
        1, len(landscapes), figsize=(4 * len(landscapes), 3.5), squeeze=False
    )
    for axis, landscape in zip(axes[0], landscapes):
        part = table[table.landscape_size == landscape]
        several = part.variant.nunique() > 1  # e.g. AdamW and SAM: one mean each
        for variant, same in part.groupby("variant"):
            name = f"{variant}: " if several else ""
            for seed, trace in same.groupby("seed"):
                trace = trace.sort_values("train_size")
                axis.plot(trace.train_size, trace.log_volume, "o-", alpha=0.3,
                          label=f"{name}seed {seed}")  # fmt: skip
            stats = same.groupby("train_size").log_volume.agg(["mean", "std"]).fillna(0)
            axis.errorbar(stats.index, stats["mean"], yerr=stats["std"], capsize=3,
                          color=None if several else "k", label=f"{name}mean ± sd")  # fmt: skip
        axis.set(xscale="log", title=f"landscape of {landscape} samples",
                 xlabel="training-set size", ylabel="log-volume (nats)")  # fmt: skip
        axis.legend(fontsize=7)
    metric = table.metric.iloc[0] if len(table) else "loss"
    figure.suptitle(f"Minimum volume against training-set size ({metric} threshold {threshold})")
    figure.tight_layout()
    return figure


def volume_against_landscape(
    volumes, models, threshold: float, cutoffs: pd.DataFrame | None = None
):
    """Fig. 4 bottom: each minimum's log-volume against landscape size (mean over
    seeds), with the landscape size where it stops being a minimum marked."""
    table = _paper(volumes, models, threshold)
    figure, axis = plt.subplots(figsize=(6, 4))
    several = table.variant.nunique() > 1
    for (variant, size), group in table.groupby(["variant", "train_size"]):
        mean = group.groupby("landscape_size").log_volume.mean()
        label = f"{variant}, trained on {size}" if several else f"trained on {size}"
        (line,) = axis.plot(mean.index, mean.values, "o-", label=label)
        if cutoffs is not None:
            cut = cutoffs[
                (cutoffs.train_size == size) & (cutoffs.threshold == threshold)
            ].cutoff.dropna()
            for value in cut.unique():
                axis.axvline(value, color=line.get_color(), ls=":", alpha=0.6)
    metric = table.metric.iloc[0] if len(table) else "loss"
    title = f"Minima across landscapes ({metric} threshold {threshold}; dotted: cutoffs)"
    _finish(figure, axis, title, "landscape size (samples)", "log-volume (nats)", xscale="log")
    return figure


def volume_against_test_accuracy(volumes, models, threshold: float, landscape: int):
    """Log-volume in one landscape against the test accuracy of each minimum."""
    table = _paper(volumes, models, threshold)
    table = table[table.landscape_size == landscape]
    figure, axis = plt.subplots(figsize=(5, 4))
    points = axis.scatter(
        table.test_acc, table.log_volume, c=np.log(table.train_size), cmap="viridis"
    )
    figure.colorbar(points, label="log training-set size")
    axis.set(xlabel="test accuracy", ylabel="log-volume (nats)",
             title=f"Volume against generalisation (landscape {landscape})")  # fmt: skip
    figure.tight_layout()
    return figure


def estimate_against_directions(
    radii: pd.DataFrame, models: pd.DataFrame, threshold: float, landscape: int
):
    """The paper estimate from the first K directions, with its 95% bootstrap band, for
    each minimum of a landscape."""
    figure, axis = plt.subplots(figsize=(6, 4))
    params = dict(zip(models.model_id, models.n_params))
    chosen = radii[(radii.threshold == threshold) & (radii.landscape_size == landscape)]
    for model_id, group in chosen.groupby("model_id"):
        ordered = group.sort_values("direction").radius.to_numpy()
        n = int(params[model_id])
        counts = np.unique(np.geomspace(1, len(ordered), 20).astype(int))
        (line,) = axis.plot(counts, log_volume_by_count(ordered, n, counts), label=model_id)
        low, high = zip(*(_interval(ordered[:k], n) for k in counts))
        axis.fill_between(counts, low, high, color=line.get_color(), alpha=0.15)
    title = f"Estimate against the number of directions (landscape {landscape})"
    _finish(figure, axis, title, "directions K", "log-volume estimate (nats)", xscale="log")
    return figure


def _finish(figure, axis, title: str, xlabel: str, ylabel: str, **scales) -> None:
    """Title, labels and legend of a one-axis figure, laid out."""
    axis.set(title=title, xlabel=xlabel, ylabel=ylabel, **scales)
    axis.legend(fontsize=6)
    figure.tight_layout()


def _interval(radii: np.ndarray, n_params: int) -> tuple[float, float]:
    finite = radii[np.isfinite(radii)]
    if len(finite) < 2:
        return (np.nan, np.nan)
    result = bootstrap_log_volume(finite, n_params, num_resamples=200)
    return result.ci_low, result.ci_high


def radius_distributions(radii: pd.DataFrame, threshold: float, landscape: int):
    """Histograms of the radii of each minimum in one landscape."""
    figure, axis = plt.subplots(figsize=(6, 4))
    chosen = radii[(radii.threshold == threshold) & (radii.landscape_size == landscape)]
    for model_id, group in chosen.groupby("model_id"):
        axis.hist(group.radius.dropna(), bins=30, histtype="step", label=model_id)
    _finish(figure, axis, f"Radii (landscape {landscape}, T={threshold})", "radius", "directions")
    return figure


def loss_slice(a: np.ndarray, b: np.ndarray, losses: np.ndarray, labels: list[str]):
    """Contour and surface views of a loss plane through three minima (Fig. 1)."""
    figure = plt.figure(figsize=(11, 4.5))
    contour_axis = figure.add_subplot(1, 2, 1)
    grid_a, grid_b = np.meshgrid(a, b, indexing="ij")
    log_loss = np.log10(np.clip(losses, 1e-12, None))
    filled = contour_axis.contourf(grid_a, grid_b, log_loss, levels=30, cmap="viridis")
    figure.colorbar(filled, ax=contour_axis, label="log10 loss")
    for (pa, pb), label in zip([(0, 0), (1, 0), (0, 1)], labels):
        contour_axis.plot(pa, pb, "r*", markersize=12)
        contour_axis.annotate(label, (pa, pb), textcoords="offset points", xytext=(5, 5),
                              fontsize=7, color="w")  # fmt: skip
    contour_axis.set(xlabel="a: towards minimum 2", ylabel="b: towards minimum 3",
                     title="Loss through three minima (contour)")  # fmt: skip
    surface_axis = figure.add_subplot(1, 2, 2, projection="3d")
    surface_axis.plot_surface(grid_a, grid_b, log_loss, cmap="viridis", linewidth=0)
    surface_axis.set(xlabel="a", ylabel="b", zlabel="log10 loss", title="(surface)")
    figure.tight_layout()
    return figure
