"""The paper's experiment families, told apart by what a sweep's spec varies, and the
figure set each is read through (`analysis/paper_figures.py` writes them).

A family is a question: how volume moves with the data (data scaling, Fig. 4), with
corrupted extras (poison, noise), with a skewed class mix (imbalance), with the batch
size, with SAM against AdamW, and over training (grokking). Each figure puts log-volume
in the clean base landscape beside test accuracy against the family's variable, one
faint line per seed and the mean ± sd over seeds per variant, so a reader sees at once
whether volume tracks generalisation there.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from volume_ray.analysis import figures  # noqa: E402
from volume_ray.analysis.report import KEPT_EPOCH  # noqa: E402
from volume_ray.analysis.trends import with_variant  # noqa: E402
from volume_ray.spec import SweepSpec  # noqa: E402

__all__ = ["FAMILIES", "families_of", "family_figures"]

# family -> (its title; its figures' variable, a column of the joined table; the axis
# label; log x?)
FAMILIES = {
    "data_scaling": (
        "Volume and generalisation against data",
        "train_size",
        "training-set size",
        True,
    ),
    "poison": ("Label poisoning", "extras", "poisoned samples added", False),
    "noise": ("Noise samples", "extras", "noise samples added", False),
    "imbalance": ("Class imbalance", "extras", "class-skewed samples added", False),
    "batch_size": ("Batch size", "batch_size", "batch size", True),
    "sam": ("SAM against AdamW", "train_size", "training-set size", True),
    "grokking": ("Grokking: volume and test accuracy over training", "epochs", "epoch", False),
}


def families_of(spec: SweepSpec) -> list[str]:
    """The families a sweep belongs to, from what its spec varies (a sweep may vary
    several things: SAM across data sizes is both `sam` and `data_scaling`)."""
    found = []
    kind = spec.dataset.extra_kind
    if kind in ("poison", "noise"):
        found.append(kind)
    elif kind == "imbalanced":
        found.append("imbalance")
    elif len(spec.dataset.extra_sizes) > 1:
        found.append("data_scaling")
    if len(spec.train.batch_sizes) > 1:
        found.append("batch_size")
    if any(rho > 0 for rho in spec.train.sam_rhos):
        found.append("sam")
    if spec.train.checkpoint_epochs:
        found.append("grokking")
    return found


def family_figures(
    family: str,
    volumes: pd.DataFrame,
    models: pd.DataFrame,
    base_size: int,
    threshold: float,
    estimator: str = "paper",
    cutoffs: pd.DataFrame | None = None,
) -> dict[str, plt.Figure]:
    """The figures of `family` at one threshold, by file stem. Data scaling gets Fig. 4
    top and bottom (every landscape); every family gets volume in the base landscape
    and test accuracy against its variable."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    title, column, label, log_x = FAMILIES[family]
    chosen = volumes[(volumes.estimator == estimator) & (volumes.landscape_size == base_size)]
    table = _joined(chosen[chosen.threshold == threshold], models, base_size)
    if family != "grokking":  # kept epochs are the grokking family's alone
        table = table[~table.kept_epoch]
    drawn = {
        f"{family}_volume_and_accuracy": _against(
            table, column, label, log_x, f"{title} ({estimator}, threshold {threshold})"
        )
    }
    if family == "data_scaling":
        final = models[~models.model_id.str.contains(KEPT_EPOCH)]
        drawn["data_scaling_fig4_top"] = figures.volume_against_train_size(
            volumes, final, threshold
        )
        drawn["data_scaling_fig4_bottom"] = figures.volume_against_landscape(
            volumes, final, threshold, cutoffs
        )
    return drawn


def _joined(volumes: pd.DataFrame, models: pd.DataFrame, base_size: int) -> pd.DataFrame:
    """Volumes with their models' facts, the extras each model was trained on, and
    whether the row is a kept epoch rather than a final model."""
    facts = with_variant(models)
    facts = facts.assign(
        extras=facts.train_size - base_size,
        kept_epoch=facts.model_id.str.contains(KEPT_EPOCH),
        variant=facts.variant.str.replace(r"@e\d+$", "", regex=True),  # one line per trial
    )
    columns = ["model_id", "train_size", "batch_size", "epochs", "seed", "test_acc"]
    return volumes.merge(facts[[*columns, "extras", "kept_epoch", "variant"]], on="model_id")


def _against(table: pd.DataFrame, column: str, label: str, log_x: bool, title: str):
    """Log-volume (left) and test accuracy (right) against `column`: a faint line per
    seed and variant, and each variant's mean ± sd over seeds."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    several = table.variant.nunique() > 1
    for axis, value, ylabel in (
        (axes[0], "log_volume", "log-volume (nats)"),
        (axes[1], "test_acc", "test accuracy"),
    ):
        for variant, same in table.groupby("variant"):
            name = f"{variant}: " if several else ""
            (line,) = axis.plot([], [])
            for _, trace in same.groupby("seed"):
                trace = trace.sort_values(column)
                axis.plot(trace[column], trace[value], "o-", alpha=0.3, lw=1,
                          color=line.get_color())  # fmt: skip
            stats = same.groupby(column)[value].agg(["mean", "std"]).fillna(0)
            axis.errorbar(stats.index, stats["mean"], yerr=stats["std"], capsize=3,
                          color=line.get_color(), label=f"{name}mean ± sd over seeds")  # fmt: skip
        axis.set(xlabel=label, ylabel=ylabel, xscale="log" if log_x else "linear")
        axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    return figure
