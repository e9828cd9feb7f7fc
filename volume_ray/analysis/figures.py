"""The paper's figures from a results store, with matplotlib (no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import ticker  # noqa: E402

from volume_ray.analysis.trends import with_variant  # noqa: E402
from volume_ray.estimators import (  # noqa: E402
    ESTIMATORS,
    MIN_ESS,
    log_volume_by_count,
    paper_estimate,
)

__all__ = [
    "estimate_against_directions",
    "estimators_against_train_size",
    "estimators_in",
    "loss_slice",
    "quadratic_against_measured_radii",
    "radius_distributions",
    "spectrum",
    "volume_against_landscape",
    "volume_against_test_accuracy",
    "volume_against_train_size",
]

SPECTRUM_WIDTH = 0.05  # the density's Gaussian width, relative to |eigenvalue|


def estimators_in(volumes: pd.DataFrame) -> list[str]:
    """The estimators of a volumes table in ESTIMATORS order (any other name after)."""
    names = set(volumes.estimator)
    return [e for e in ESTIMATORS if e in names] + sorted(names - set(ESTIMATORS))


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


def estimators_against_train_size(volumes, models, threshold: float):
    """Every estimator's log-volume against training-set size, one panel each (their
    scales differ by thousands of nats), one line per landscape: mean ± sd over seeds.
    The shaded interval is the seeds' mean interval, drawn only at sizes where every
    seed's interval is valid (`ci_valid`)."""
    chosen = volumes[volumes.threshold == threshold]
    facts = with_variant(models)[["model_id", "train_size", "variant"]]
    table = chosen.merge(facts, on="model_id")
    present = estimators_in(table)
    figure, axes = plt.subplots(
        1, max(1, len(present)), figsize=(4.5 * max(1, len(present)), 3.8), squeeze=False
    )
    several = table.variant.nunique() > 1
    for axis, estimator in zip(axes[0], present):
        part = table[table.estimator == estimator]
        for (variant, landscape), group in part.groupby(["variant", "landscape_size"]):
            by_size = group.groupby("train_size")
            stats = by_size.log_volume.agg(["mean", "std"]).fillna(0)
            label = f"{variant}, landscape {landscape}" if several else f"landscape {landscape}"
            bars = axis.errorbar(stats.index, stats["mean"], yerr=stats["std"], fmt="o-",
                                 capsize=3, label=label)  # fmt: skip
            valid = by_size.ci_valid.all()
            if valid.any():
                ci = by_size[["ci_low", "ci_high"]].mean().where(valid)
                axis.fill_between(ci.index, ci.ci_low, ci.ci_high, alpha=0.2,
                                  color=bars.lines[0].get_color())  # fmt: skip
        axis.set(xscale="log", title=estimator, xlabel="training-set size",
                 ylabel="log-volume (nats)")  # fmt: skip
        axis.legend(fontsize=7)
    metric = table.metric.iloc[0] if len(table) else "loss"
    figure.suptitle(
        f"Every estimator against training-set size ({metric} threshold {threshold}; "
        "mean ± sd over seeds, shaded: valid intervals)"
    )
    figure.tight_layout()
    return figure


def estimate_against_directions(
    radii: pd.DataFrame, models: pd.DataFrame, threshold: float, landscape: int
):
    """The paper estimate from the first K directions for each minimum of a landscape
    (top), and how many of them carry it, its ess (bottom). The 95% bootstrap band is
    drawn only where ess >= MIN_ESS: below it the band is a resampling of one or two
    directions and says nothing about the mean of r^n."""
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6.5), sharex=True)
    params = dict(zip(models.model_id, models.n_params))
    chosen = radii[(radii.threshold == threshold) & (radii.landscape_size == landscape)]
    for model_id, group in chosen.groupby("model_id"):
        ordered = group.sort_values("direction").radius.to_numpy()
        n = int(params[model_id])
        counts = np.unique(np.geomspace(1, len(ordered), 20).astype(int))
        (line,) = top.plot(counts, log_volume_by_count(ordered, n, counts), label=model_id)
        low, high, ess = np.array([_interval(ordered[:k], n) for k in counts]).T
        if np.isfinite(low).any():
            top.fill_between(counts, low, high, color=line.get_color(), alpha=0.15)
        bottom.plot(counts, ess, "o-", ms=3, color=line.get_color(), label=model_id)
    bottom.axhline(MIN_ESS, color="k", ls=":", label=f"ess {MIN_ESS}: bands above")
    title = f"Paper estimate against the number of directions (landscape {landscape})"
    _finish(figure, top, title, "directions K", "log-volume estimate (nats)", xscale="log")
    _finish(figure, bottom, "Directions carrying it (ess of the weights r^n)", "directions K",
            "effective directions", xscale="log", yscale="log")  # fmt: skip
    return figure


def _finish(figure, axis, title: str, xlabel: str, ylabel: str, **scales) -> None:
    """Title, labels and legend of one axis, with the figure laid out."""
    axis.set(title=title, xlabel=xlabel, ylabel=ylabel, **scales)
    axis.legend(fontsize=6)
    figure.tight_layout()


def _interval(radii: np.ndarray, n_params: int) -> tuple[float, float, float]:
    """(ci_low, ci_high, ess) of the paper estimate from these radii; the interval is
    NaN where `paper_estimate` withholds it (ess < MIN_ESS)."""
    finite = radii[np.isfinite(radii)]
    if len(finite) == 0:
        return (np.nan, np.nan, np.nan)
    result = paper_estimate(finite, n_params, num_resamples=200)
    return result.ci_low, result.ci_high, result.ess


def radius_distributions(radii: pd.DataFrame, threshold: float, landscape: int):
    """Histograms of the radii of each minimum in one landscape."""
    figure, axis = plt.subplots(figsize=(6, 4))
    chosen = radii[(radii.threshold == threshold) & (radii.landscape_size == landscape)]
    for model_id, group in chosen.groupby("model_id"):
        axis.hist(group.radius.dropna(), bins=30, histtype="step", label=model_id)
    _finish(figure, axis, f"Radii (landscape {landscape}, T={threshold})", "radius", "directions")
    return figure


def spectrum(curvature: pd.DataFrame, landscape: int):
    """The Hessian eigenvalue density of each minimum in one landscape (SLQ), on a
    symmetric-log axis so the bulk near zero and the outliers both show. The Gaussian
    smoothing is SPECTRUM_WIDTH of |eigenvalue| wide, the same on every decade. Below
    the smallest laplace floor (where recorded; eigenvalues under it count as flat) the
    axis turns linear. Triangles mark each minimum's top eigenvalues."""
    from volume_ray.curvature import Curvature  # torch: only when there is a spectrum

    chosen = curvature[curvature.landscape_size == landscape]
    spectra = {row["model_id"]: Curvature.from_record(row) for _, row in chosen.iterrows()}
    nodes = np.concatenate(
        [np.r_[s.slq_nodes.ravel(), s.top_eigenvalues] for s in spectra.values()] or [[1.0]]
    )
    high = np.abs(nodes).max() or 1.0
    floor_of = dict(zip(chosen.model_id, chosen["floor"])) if "floor" in chosen else {}
    floors = np.array([f for f in floor_of.values() if np.isfinite(f) and f > 0])
    linear = min(floors.min() if len(floors) else high * 1e-6, high / 10)
    grid = np.concatenate([
        -_log_grid(linear, -1.5 * nodes.min())[::-1],
        np.arange(-linear, linear, SPECTRUM_WIDTH * linear),
        _log_grid(linear, 1.5 * nodes.max()),
    ])  # fmt: skip
    widths = SPECTRUM_WIDTH * np.maximum(np.abs(grid), linear)
    figure, axis = plt.subplots(figsize=(7, 4))
    peak = 0.0
    for model_id, one in spectra.items():
        density = one.density(grid, widths)
        peak = max(peak, density.max())
        (line,) = axis.plot(grid, density, label=model_id)
        tops = one.top_eigenvalues
        axis.plot(tops, np.interp(tops, grid, density), "v", color=line.get_color(), ms=6)
        if model_id in floor_of and np.isfinite(floor_of[model_id]):
            axis.axvline(floor_of[model_id], color=line.get_color(), ls=":", lw=0.8)
    if peak > 0:  # a log axis: show eight decades below the highest peak
        axis.set_ylim(peak * 1e-8, peak * 3)
    axis.set_xscale("symlog", linthresh=linear)
    limits = axis.get_xlim()
    axis.set_xticks([t for t in axis.get_xticks() if t == 0 or abs(t) >= linear])  # no crowding
    axis.set_xlim(limits)
    title = (
        f"Hessian eigenvalue density (landscape {landscape})\n"
        "triangles: top eigenvalues; dotted: laplace floor"
    )
    _finish(figure, axis, title, "eigenvalue (in the radii's coordinates)", "density",
            yscale="log")  # fmt: skip
    return figure


def _log_grid(low: float, high: float) -> np.ndarray:
    """From low to high, SPECTRUM_WIDTH apart in ln (empty when high <= low)."""
    if high <= low:
        return np.empty(0)
    return np.geomspace(low, high, int(np.log(high / low) / SPECTRUM_WIDTH) + 2)


def quadratic_against_measured_radii(radii: pd.DataFrame, threshold: float, landscape: int):
    """The radius a quadratic basin with the measured Hessian gives along each direction
    against the measured one, on log axes with y = x: where the points leave the line,
    the basin is not quadratic. Censored directions, and those whose quadratic radius
    is infinite (curvature <= 0 along them) or zero, cannot show and are counted."""
    chosen = radii[(radii.threshold == threshold) & (radii.landscape_size == landscape)]
    figure, axis = plt.subplots(figsize=(5.5, 5))
    hidden = 0
    for model_id, group in chosen.groupby("model_id"):
        shown = np.isfinite(group.radius) & np.isfinite(group.radius_quadratic)
        shown &= (group.radius > 0) & (group.radius_quadratic > 0)
        hidden += int((~shown).sum())
        axis.scatter(group.radius[shown], group.radius_quadratic[shown], s=8, alpha=0.6,
                     label=model_id)  # fmt: skip
    both = chosen[["radius", "radius_quadratic"]].to_numpy().ravel()
    both = both[np.isfinite(both) & (both > 0)]
    if len(both):  # the same range on both axes, so y = x is the diagonal
        span = [both.min() / 1.2, both.max() * 1.2]
        axis.plot(span, span, "k:", lw=1, label="y = x")
        axis.set(xlim=span, ylim=span, aspect="equal")
    title = f"Quadratic against measured radii (landscape {landscape}, T={threshold})"
    if hidden:
        title += f"\n{hidden} directions not shown (censored, or quadratic radius 0 or inf)"
    _finish(figure, axis, title, "measured radius", "quadratic radius", xscale="log",
            yscale="log")  # fmt: skip
    for scale in (axis.xaxis, axis.yaxis):  # 1-2-5 labels: spans of a decade or two stay legible
        scale.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        scale.set_major_formatter(ticker.FormatStrFormatter("%g"))
        scale.set_minor_formatter(ticker.NullFormatter())
    return figure


def loss_slice(
    a: np.ndarray, b: np.ndarray, losses: np.ndarray, labels: list[str], *, landscape: int,
    thresholds: list[float],
):  # fmt: skip
    """Contour and surface views of a loss plane through three minima (Fig. 1), on the
    landscape of `landscape` samples, with the loss thresholds drawn as white lines."""
    figure = plt.figure(figsize=(11, 4.5))
    contour_axis = figure.add_subplot(1, 2, 1)
    grid_a, grid_b = np.meshgrid(a, b, indexing="ij")
    log_loss = np.log10(np.clip(losses, 1e-12, None))
    filled = contour_axis.contourf(grid_a, grid_b, log_loss, levels=30, cmap="viridis")
    figure.colorbar(filled, ax=contour_axis, label="log10 loss")
    levels = sorted(np.log10(thresholds))
    if len(levels):
        lines = contour_axis.contour(grid_a, grid_b, log_loss, levels=levels, colors="w",
                                     linewidths=0.8)  # fmt: skip
        contour_axis.clabel(lines, fmt={lv: f"T={10**lv:g}" for lv in levels}, fontsize=7)
    for (pa, pb), label in zip([(0, 0), (1, 0), (0, 1)], labels):
        contour_axis.plot(pa, pb, "r*", markersize=12)
        contour_axis.annotate(label, (pa, pb), textcoords="offset points", xytext=(5, 5),
                              fontsize=7, color="w")  # fmt: skip
    title = f"Loss through three minima, landscape of {landscape:,} samples"
    contour_axis.set(xlabel="a: towards minimum 2", ylabel="b: towards minimum 3", title=title)
    surface_axis = figure.add_subplot(1, 2, 2, projection="3d")
    surface_axis.plot_surface(grid_a, grid_b, log_loss, cmap="viridis", linewidth=0)
    shown = ", ".join(f"{t:g}" for t in thresholds) or "none (accuracy metric)"
    surface_axis.set(xlabel="a", ylabel="b", zlabel="log10 loss",
                     title=f"(surface; loss thresholds {shown})")  # fmt: skip
    figure.tight_layout()
    return figure
