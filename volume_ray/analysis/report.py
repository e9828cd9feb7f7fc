"""`volume-ray report DIR`: the figures, a Markdown summary and the same as one
self-contained HTML page (`html_report`), written into the store's `report/` folder
through its filesystem (figures are rendered to bytes), so a report of a sweep on an
object store lands beside its tables."""

from __future__ import annotations

import io
import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import yaml
from torch import nn

from volume_ray.analysis import figures
from volume_ray.analysis.animations import (
    gif_bytes,
    mp4_bytes,
    rotating_surface_frames,
    training_slice_frames,
)
from volume_ray.analysis.cutoffs import cutoff_size, per_sample_losses
from volume_ray.analysis.html_report import html_report
from volume_ray.analysis.ranks import (
    adjacent_inversions,
    own_minimum_is_largest,
    ranking_stability,
    volume_accuracy_spearman,
)
from volume_ray.analysis.slices import loss_plane
from volume_ray.analysis.trends import scaling_table
from volume_ray.estimators import MIN_ESS
from volume_ray.experiment import experiment_data, new_model
from volume_ray.locations import exists, join, write_atomic
from volume_ray.models import loss_for_task
from volume_ray.results import load_table
from volume_ray.spec import load_spec
from volume_ray.store import SweepStore

__all__ = [
    "carried_by", "cutoffs", "ess_table", "png_bytes", "write_animations", "write_report",
]  # fmt: skip

RANKED = ("paper", "typical")  # the estimators whose ranks the summary compares
KEPT_EPOCH = r"-e\d+$"  # the end of a kept epoch's model id (`spec.checkpoint_id`)


def cutoffs(spec, store: SweepStore, models: pd.DataFrame) -> pd.DataFrame:
    """Per model and threshold: the landscape size where its loss first passes T."""
    data = experiment_data(spec)
    if not data.landscapes_use_extras:
        return pd.DataFrame(columns=["model_id", "train_size", "threshold", "cutoff"])
    x, y = data.training_set(len(data.pool_x))  # the landscape order: base, then the pool
    loss_fn = loss_for_task(data.source.task)
    rows = []
    for model in models.itertuples():
        network = _trained(spec, data, store, model)
        losses = per_sample_losses(network, x, y, loss_fn)
        for threshold in spec.volume.thresholds:
            cut = (
                cutoff_size(losses, threshold, data.base_size)
                if spec.volume.metric == "loss"
                else None
            )
            rows.append({"model_id": model.model_id, "train_size": model.train_size,
                         "threshold": threshold, "cutoff": cut})  # fmt: skip
    return pd.DataFrame(rows)


def _trained(spec, data, store: SweepStore, row) -> nn.Module:
    """The minimum of a models.parquet row, with its weights from the store."""
    network = new_model(spec, data, int(row.seed))
    network.load_state_dict(store.read_state_dict(row.checkpoint))
    return network


def png_bytes(figure) -> bytes:
    """The figure as PNG bytes, closed after: a sweep may draw many."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def write_report(sweep_dir: str | os.PathLike) -> Path | str:
    """Write `report/` (PNG figures, summary.md and index.html) into the sweep folder, a
    path or a URI; return its location (a `Path` for a local sweep)."""
    store = SweepStore.at(sweep_dir)
    spec = load_spec(store.recorded_spec())
    models, volumes, radii = (load_table(store.root, t) for t in ("models", "volumes", "radii"))
    curvature = load_table(store.root, "curvature") if exists(store.curvature_path) else None
    out = join(store.root, "report")
    base = int(volumes.landscape_size.min())
    cut = cutoffs(spec, store, models)
    quadratic = "radius_quadratic" in radii and radii.radius_quadratic.notna().any()
    drawn: dict[str, bytes] = {}

    def draw(name: str, figure) -> None:  # written at once: a sweep may have many figures
        if figure is not None:
            png = png_bytes(figure)
            write_atomic(join(out, f"{name}.png"), lambda sink: sink.write(png))
            drawn[f"{name}.png"] = png

    for threshold in spec.volume.thresholds:
        tag = f"T{threshold:g}"
        draw(
            f"volume_vs_train_size_{tag}",
            figures.volume_against_train_size(volumes, models, threshold),
        )
        draw(
            f"estimators_vs_train_size_{tag}",
            figures.estimators_against_train_size(volumes, models, threshold),
        )
        draw(
            f"volume_vs_landscape_{tag}",
            figures.volume_against_landscape(volumes, models, threshold, cut),
        )
        draw(
            f"volume_vs_test_accuracy_{tag}",
            figures.volume_against_test_accuracy(volumes, models, threshold, base),
        )
        draw(
            f"estimate_vs_directions_{tag}",
            figures.estimate_against_directions(radii, models, threshold, base),
        )
        draw(f"radii_{tag}", figures.radius_distributions(radii, threshold, base))
        if quadratic:
            draw(
                f"quadratic_radii_{tag}",
                figures.quadratic_against_measured_radii(radii, threshold, base),
            )
    if curvature is not None:
        draw("spectrum", figures.spectrum(curvature, base))
    draw("loss_slice", _slice_through_three_minima(spec, store, models))
    summary = _summary(spec, models, volumes, radii, curvature, cut, list(drawn))
    write_atomic(join(out, "summary.md"), lambda sink: sink.write(summary.encode()))
    tables = [name for name, path in _table_files(store) if exists(path)]
    spec_yaml = yaml.safe_dump(store.recorded_spec(), sort_keys=False)
    page = html_report(summary, drawn, spec_yaml, tables).encode()
    write_atomic(join(out, "index.html"), lambda sink: sink.write(page))
    return out


def write_animations(
    sweep_dir: str | os.PathLike, model_id: str | None = None, frames: int = 36
) -> list[Path | str]:
    """Write `report/animations/`: the loss slice through `model_id`'s kept epochs over
    training (None: the smallest trial with kept epochs; none without `checkpoint_epochs`)
    and the surface through three minima, turning in `frames` views, as GIFs (and MP4s
    where an encoder is installed). Returns the files written."""
    store = SweepStore.at(sweep_dir)
    spec = load_spec(store.recorded_spec())
    models = load_table(store.root, "models")
    out, written = join(store.root, "report", "animations"), []

    def write(stem: str, images) -> None:
        milliseconds = 400 if stem.startswith("training") else 120
        for suffix, data in ((".gif", gif_bytes(images, milliseconds)),
                             (".mp4", mp4_bytes(images, milliseconds))):  # fmt: skip
            if data is not None:  # no MP4 without an encoder
                write_atomic(join(out, stem + suffix), lambda sink, data=data: sink.write(data))
                written.append(join(out, stem + suffix))

    kept = models[models.model_id.str.contains(KEPT_EPOCH)]
    if model_id is None and not kept.empty:
        first = kept.sort_values(["train_size", "seed", "model_id"]).model_id.iloc[0]
        model_id = first.rsplit("-e", 1)[0]
    if model_id is not None:
        rows = models[
            (models.model_id == model_id) | models.model_id.str.startswith(f"{model_id}-e")
        ]
        if rows.empty:
            raise ValueError(f"model {model_id!r} is not in {store.location}/models.parquet")
        data = experiment_data(spec)
        checkpoints = [
            (int(row.epochs), _trained(spec, data, store, row))
            for row in rows.sort_values("epochs").itertuples()
        ]  # fmt: skip
        thresholds = spec.volume.thresholds if spec.volume.metric == "loss" else []
        images = training_slice_frames(
            checkpoints, data.base_x, data.base_y, loss_for_task(data.source.task),
            landscape=len(data.base_x), thresholds=thresholds, seed=spec.volume.seed,
        )  # fmt: skip
        write(f"training_slice_{model_id}", images)
    plane = three_minima_plane(spec, store, models)
    if plane is not None:
        a, b, losses, labels, landscape = plane
        write("minima_surface", rotating_surface_frames(
            a, b, losses, labels, landscape=landscape, frames=frames
        ))  # fmt: skip
    return written


def _table_files(store: SweepStore) -> list[tuple[str, object]]:
    """The Parquet tables a report links to, by their name in the sweep folder."""
    return [
        ("models.parquet", store.models_path),
        ("volumes.parquet", store.volumes_path),
        ("curvature.parquet", store.curvature_path),
        ("radii/", store.radii),
    ]


def carried_by(rows: pd.DataFrame) -> str:
    """How many directions carry one estimator's rows of volumes.parquet, in words, and
    whether its intervals are withheld: the paper estimate at large n is decided by one
    direction, and a reader must see that next to the number."""
    directions = int(rows.n_directions.median())
    ess = rows.ess.dropna()
    if ess.empty:
        words = "the Hessian spectrum, not directions"
    elif ess.median() >= directions:
        words = f"every one of {directions} directions"
    else:
        median = ess.median()
        words = f"median ess {median:.1f} of {directions} directions"
        if median < 1.5:
            words += ": one direction decides it"
        elif median < MIN_ESS:
            words += f": fewer than {MIN_ESS} decide it"
    withheld = int((~rows.ci_valid.astype(bool)).sum())
    if withheld == len(rows):
        words += "; intervals withheld"
    elif withheld:
        words += f"; intervals withheld in {withheld} of {len(rows)}"
    return words


def ess_table(volumes: pd.DataFrame, models: pd.DataFrame) -> pd.DataFrame:
    """Every estimate with the number of directions carrying it: the interval as text,
    or "—" where it is withheld (`ci_valid` False). Minima in training-set order."""
    order = {name: i for i, name in enumerate(figures.estimators_in(volumes))}
    table = volumes.merge(models[["model_id", "train_size", "seed"]], on="model_id")
    table = table.assign(_order=table.estimator.map(order)).sort_values(
        ["_order", "threshold", "landscape_size", "train_size", "seed", "model_id"]
    )
    interval = [
        f"[{low:.4g}, {high:.4g}]" if valid else "—"
        for low, high, valid in zip(table.ci_low, table.ci_high, table.ci_valid.astype(bool))
    ]
    columns = ["estimator", "model_id", "landscape_size", "threshold", "log_volume"]
    return table[columns].assign(interval=interval, ess=table.ess, top_share=table.top_share)


def _slice_through_three_minima(spec, store: SweepStore, models: pd.DataFrame):
    """Fig. 1 (`three_minima_plane`); None with fewer than three minima."""
    plane = three_minima_plane(spec, store, models)
    if plane is None:
        return None
    a, b, losses, labels, landscape = plane
    thresholds = spec.volume.thresholds if spec.volume.metric == "loss" else []
    return figures.loss_slice(a, b, losses, labels, landscape=landscape, thresholds=thresholds)


def three_minima_plane(spec, store: SweepStore, models: pd.DataFrame):
    """The loss plane through the smallest, a middle and the largest training set's
    minima (first seed, final weights), in the base landscape: (a, b, losses, labels,
    landscape size); None with fewer than three minima."""
    seed = models.seed.min()
    final = ~models.model_id.str.contains(KEPT_EPOCH)
    chosen = models[(models.seed == seed) & final].sort_values("train_size")
    if len(chosen) < 3:
        return None
    chosen = chosen.iloc[[0, len(chosen) // 2, len(chosen) - 1]]
    data = experiment_data(spec)
    minima = [_trained(spec, data, store, row) for row in chosen.itertuples()]
    a, b, losses = loss_plane(minima, data.base_x, data.base_y, loss_for_task(data.source.task))
    labels = [f"n={size}" for size in chosen.train_size]
    return a, b, losses, labels, len(data.base_x)


def _summary(spec, models, volumes, radii, curvature, cut, drawn) -> str:
    ranked = volumes[volumes.estimator.isin(RANKED)]
    merged = ranked.merge(models[["model_id", "train_size", "test_loss", "test_acc"]],
                          on="model_id")  # fmt: skip
    keys = ["estimator", "landscape_size", "threshold"]
    ranks = [
        {
            **dict(zip(keys, key)),
            "minima": len(group),
            "adjacent_inversions": adjacent_inversions(group.log_volume, group.test_loss),
            "spearman_volume_test_acc": volume_accuracy_spearman(group.log_volume, group.test_acc),
        }
        for key, group in merged.groupby(keys)
        if len(group) >= 2
    ]
    accuracy = models.groupby("train_size")[["test_loss", "test_acc"]].mean().reset_index()
    present = figures.estimators_in(volumes)
    carriers = "\n".join(_carriers(volumes[volumes.estimator == name]) for name in present)
    sections = [
        ("Models (mean over seeds)", _table(accuracy)),
        ("How many directions carry each estimator",
         f"{carriers}\n\nAn interval is shown only where it can be trusted (`ci_valid`); "
         f"the paper's bootstrap needs ess >= {MIN_ESS}.\n\n" + _table(ess_table(volumes, models))),
        ("Power law of volume against training-set size, per landscape",
         _table(scaling_table(volumes, models, against="train_size"))),
        ("Power law of volume against landscape size, per minimum",
         _table(scaling_table(volumes, models, against="landscape_size"))),
        ("Per-dimension exponents (log-volume / n) against training-set size",
         _table(scaling_table(volumes, models, against="train_size", per_dimension=True))),
        ("Do volume ranks follow generalisation?", _table(pd.DataFrame(ranks))),
        ("Is a landscape's own minimum the largest there?",
         _table(own_minimum_is_largest(volumes, models))),
        ("Ranking stability: how often K random directions rank the base landscape's "
         "minima as all directions do (paper)", _table(_stability(spec, volumes, radii, models))),
        ("Cutoffs: landscape size where each minimum's loss first passes T", _table(cut)),
        ("Censoring", f"{int(radii.censored.sum())} of {len(radii)} radii censored "
                      f"({radii.censored.mean():.2%})."),
    ]  # fmt: skip
    if curvature is not None:
        sections.append(("Curvature (Hessian in the radii's coordinates)", _curvature(curvature)))
    sections.append(("Figures", "\n".join(f"![{name}]({name})" for name in drawn)))
    estimates = volumes.groupby(["model_id", "landscape_size", "metric", "threshold"]).ngroups
    header = (
        f"# {spec.name}\n\n{len(models)} models; {estimates} (model, landscape, threshold) "
        f"estimates from {spec.volume.directions} directions each, by {', '.join(present)}.\n"
    )
    return header + "".join(f"\n## {title}\n\n{body}\n" for title, body in sections)


def _carriers(rows: pd.DataFrame) -> str:
    """One estimator's line: what carries it, and in how many estimates too few do."""
    line = f"- **{rows.estimator.iloc[0]}**: carried by {carried_by(rows)} ({len(rows)} estimates"
    if rows.ess.notna().any():
        line += f"; ess below {MIN_ESS} in {int((rows.ess < MIN_ESS).sum())}"
    return line + ")"


def _curvature(curvature: pd.DataFrame) -> str:
    """One line per (model, landscape): the largest eigenvalue and the trace."""
    table = curvature[["model_id", "landscape_size", "n_params", "base_loss"]].assign(
        top_eigenvalue=[float(np.max(values)) for values in curvature.top_eigenvalues],
        trace=curvature.trace,
        trace_stderr=curvature.trace_stderr,
    )
    return _table(table)


def _stability(spec, volumes, radii, models) -> pd.DataFrame:
    """Ranking stability in the base landscape at the first threshold."""
    base, threshold = volumes.landscape_size.min(), spec.volume.thresholds[0]
    chosen = radii[(radii.landscape_size == base) & (radii.threshold == threshold)]
    by_model = {
        m: g.sort_values("direction").radius.to_numpy() for m, g in chosen.groupby("model_id")
    }
    if len(by_model) < 2:
        return pd.DataFrame()
    directions = min(len(r) for r in by_model.values())
    counts = sorted({k for k in (5, 10, 25, 50, 100, 250, 500, directions) if k <= directions})
    params = dict(zip(models.model_id, models.n_params))
    return ranking_stability(by_model, {m: int(params[m]) for m in by_model}, counts, subsets=100)


def _table(frame: pd.DataFrame) -> str:
    """A Markdown table (numbers to 4 significant digits)."""
    if frame.empty:
        return "(nothing to show)"

    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])
