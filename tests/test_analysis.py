"""Analysis: trend fits, rank counts and cutoffs on known inputs; the report on a run."""

from pathlib import Path

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


# -- estimators in the report and the CLI ------------------------------------------------


def _radii(model_id, landscape, n_directions, spread, seed, threshold=0.1):
    """A measure_radii-like table of lognormal radii, all crossing."""
    radius = np.random.default_rng(seed).lognormal(0.0, spread, n_directions)
    return pd.DataFrame({"model_id": model_id, "landscape_size": landscape,
                         "direction": np.arange(n_directions), "metric": "loss",
                         "threshold": threshold, "radius": radius, "coefficient": radius / 10,
                         "raw_norm": 10.0, "censored": False})  # fmt: skip


def _polygons(axis):
    from matplotlib.collections import PolyCollection

    return [c for c in axis.collections if isinstance(c, PolyCollection)]


def test_directions_figure_draws_bands_only_where_ess_reaches_the_minimum():
    import matplotlib.pyplot as plt

    from volume_ray.analysis.figures import estimate_against_directions
    from volume_ray.estimators import MIN_ESS

    # "even": n = 5 and radii within 1%: every direction weighs alike (ess ~ K).
    # "spiky": n = 20,000, radii spread 5%: the largest direction carries everything.
    radii = pd.concat([_radii("even", 100, 200, 0.01, 0), _radii("spiky", 100, 200, 0.05, 1)])
    models = pd.DataFrame({"model_id": ["even", "spiky"], "n_params": [5, 20_000]})
    figure = estimate_against_directions(radii, models, 0.1, 100)
    top, bottom = figure.axes
    assert [line.get_label() for line in top.lines] == ["even", "spiky"]
    (band,) = _polygons(top)  # one band: the spiky minimum's would be meaningless
    assert band.get_facecolor()[0][:3] == pytest.approx(plt.matplotlib.colors.to_rgb(
        top.lines[0].get_color()))  # fmt: skip
    assert band.get_paths()[0].vertices[:, 0].min() >= MIN_ESS  # none below K = MIN_ESS
    even, spiky, floor = bottom.lines
    assert even.get_ydata()[-1] > 190 and np.nanmax(spiky.get_ydata()) < 2
    assert list(floor.get_ydata()) == [MIN_ESS, MIN_ESS]
    for axis in (top, bottom):
        assert axis.get_title() and axis.get_xlabel() and axis.get_ylabel()
    plt.close(figure)


def _volumes_and_models(n_directions=40):
    """volume_table's rows for two seeds x three training sizes in two landscapes: the
    paper estimate at n = 5,000 (one direction carries it), typical beside it."""
    from volume_ray.estimators import volume_table

    models, frames = [], []
    for seed in (0, 1):
        for size in (100, 300, 900):
            model_id = f"n{size}-s{seed}"
            models.append({"model_id": model_id, "train_size": size, "batch_size": size,
                           "optimizer": "adamw", "seed": seed, "n_params": 5_000,
                           "test_loss": 1 / size, "test_acc": 1 - 1 / size})  # fmt: skip
            for landscape in (100, 300):
                if landscape <= size:
                    radii = _radii(model_id, landscape, n_directions, 0.05, seed * 7 + size)
                    table = volume_table(radii, 5_000, num_resamples=50)
                    frames.append(table.assign(model_id=model_id, landscape_size=landscape))
    return pd.concat(frames, ignore_index=True), pd.DataFrame(models)


def test_estimators_figure_has_a_panel_per_estimator_and_valid_intervals_only():
    import matplotlib.pyplot as plt

    from volume_ray.analysis.figures import estimators_against_train_size

    volumes, models = _volumes_and_models()
    figure = estimators_against_train_size(volumes, models, 0.1)
    paper, typical = figure.axes
    assert (paper.get_title(), typical.get_title()) == ("paper", "typical")
    for axis in (paper, typical):  # one mean line per landscape, at its training sizes
        points = sorted(len(line.get_xdata()) for line in axis.lines if line.get_marker() == "o")
        assert points == [2, 3]
    assert _polygons(paper) == []  # ci_valid is False throughout: no interval drawn
    assert len(_polygons(typical)) == 2
    plt.close(figure)
    # one seed's interval withheld at 900 samples: that size loses its band
    volumes.loc[(volumes.estimator == "typical") & (volumes.model_id == "n900-s1"),
                "ci_valid"] = False  # fmt: skip
    figure = estimators_against_train_size(volumes, models, 0.1)
    for band in _polygons(figure.axes[1]):
        assert band.get_paths()[0].vertices[:, 0].max() <= 300
    plt.close(figure)


def test_spectrum_draws_a_density_per_minimum_from_stored_curvature(tmp_path):
    import matplotlib.pyplot as plt
    import torch
    import torch.nn.functional as F

    from volume_ray.analysis.figures import spectrum
    from volume_ray.curvature import curvature
    from volume_ray.models import build_model
    from volume_ray.results import load_table
    from volume_ray.store import write_table

    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    rows = []
    for seed, floor in ((0, 1e-3), (1, np.nan)):
        model = build_model("mlp", (4,), 3, hidden=[5], seed=seed)
        found = curvature(model, x, y, F.cross_entropy, top_k=3, probes=3, lanczos_steps=12)
        rows.append({"model_id": f"m{seed}", "landscape_size": 30, **found.to_record(),
                     "floor": floor})  # fmt: skip
    rows.append({**rows[0], "landscape_size": 60})  # another landscape: not drawn
    write_table(pd.DataFrame(rows), tmp_path / "curvature.parquet")
    table = load_table(tmp_path, "curvature")  # lists come back as arrays of arrays
    figure = spectrum(table, 30)
    (axis,) = figure.axes
    densities = [line for line in axis.lines if len(line.get_xdata()) > 3]
    tops = [line for line in axis.lines if line.get_marker() == "v"]
    floors = [line for line in axis.lines if line.get_linestyle() == ":"]
    assert [line.get_label() for line in densities] == ["m0", "m1"]
    for line, row in zip(tops, rows):  # each minimum's top three eigenvalues, on its curve
        assert list(line.get_xdata()) == pytest.approx(list(row["top_eigenvalues"]))
    assert len(tops) == 2 and [list(line.get_xdata()) for line in floors] == [[1e-3, 1e-3]]
    grid, density = densities[0].get_xdata(), densities[0].get_ydata()
    assert grid.min() <= min(tops[0].get_xdata()) and grid.max() >= max(tops[0].get_xdata())
    assert np.trapezoid(density, grid) == pytest.approx(1, abs=0.1)  # still a density
    assert axis.get_xscale() == "symlog" and axis.get_title()
    plt.close(figure)


def test_quadratic_radii_figure_shows_the_finite_pairs_and_counts_the_rest():
    import matplotlib.pyplot as plt

    from volume_ray.analysis.figures import quadratic_against_measured_radii

    radii = _radii("a", 100, 6, 0.1, 0)
    radii["radius_quadratic"] = radii.radius * [1.0, 1.1, 0.9, np.inf, 0.0, 1.0]
    radii.loc[5, "radius"] = np.nan  # censored
    other = _radii("b", 100, 3, 0.1, 1).assign(radius_quadratic=[0.5, 0.6, 0.7])
    figure = quadratic_against_measured_radii(pd.concat([radii, other]), 0.1, 100)
    (axis,) = figure.axes
    assert [len(c.get_offsets()) for c in axis.collections] == [3, 3]
    (diagonal,) = axis.lines
    assert list(diagonal.get_xdata()) == list(diagonal.get_ydata())
    assert "3 directions not shown" in axis.get_title()
    assert axis.get_xscale() == axis.get_yscale() == "log"
    plt.close(figure)


def test_summary_says_how_many_directions_carry_each_estimator():
    from volume_ray.analysis.report import _summary
    from volume_ray.spec import load_spec

    volumes, models = _volumes_and_models()
    radii = pd.concat([_radii(m, 100, 40, 0.05, i) for i, m in enumerate(models.model_id)])
    spec = load_spec(Path(__file__).resolve().parents[1] / "sweeps/digits_data_scaling.yaml")
    text = _summary(spec, models, volumes, radii, None, pd.DataFrame(), [])
    section = text.split("## How many directions carry each estimator")[1].split("\n## ")[0]
    assert ("- **paper**: carried by median ess 1.0 of 40 directions: one direction decides "
            "it; intervals withheld (10 estimates; ess below 10 in 10)") in section  # fmt: skip
    assert "- **typical**: carried by every one of 40 directions (10 estimates" in section
    rows = [line for line in section.splitlines() if line.startswith("| paper")]
    assert len(rows) == 10 and all("| — |" in row for row in rows)
    rows = [line for line in section.splitlines() if line.startswith("| typical")]
    assert len(rows) == 10 and all("| [" in row for row in rows)
    ranks = text.split("## Do volume ranks follow generalisation?")[1].split("\n## ")[0]
    assert "| paper | 100 |" in ranks and "| typical | 100 |" in ranks
    trends = text.split("## Power law of volume against training-set size")[1].split("\n## ")[0]
    assert "| paper |" in trends and "| typical |" in trends


def test_printed_volumes_show_every_estimator_with_its_carriers(tmp_path, capsys):
    from volume_ray.cli import _print_volumes, _side_by_side
    from volume_ray.store import write_table

    volumes, models = _volumes_and_models()
    write_table(models, tmp_path / "models.parquet")
    write_table(volumes, tmp_path / "volumes.parquet")
    _print_volumes(str(tmp_path))
    out = capsys.readouterr().out
    assert "log-volume (loss threshold 0.1); rows: models, columns: landscapes" in out
    paper = out.index("paper (median ess 1.0 of 40 directions: one direction decides it; "
                      "intervals withheld)")  # fmt: skip
    typical = out.index("typical (every one of 40 directions)")
    assert paper < typical
    lines = out[paper:typical].splitlines()[1:]
    assert [line.split()[0] for line in lines[1:]] == [
        "n100-s0", "n100-s1", "n300-s0", "n300-s1", "n900-s0", "n900-s1"
    ]  # fmt: skip
    value = volumes.query("estimator == 'paper' and model_id == 'n900-s1'").log_volume
    assert f"{value.iloc[0]:,.1f}" in lines[-1] and f"{value.iloc[1]:,.1f}" in lines[-1]
    shown = _side_by_side(volumes[volumes.model_id == "n100-s0"])
    assert list(shown.columns) == ["threshold", "paper", "paper CI", "paper ess", "typical",
                                   "typical CI", "typical ess", "censored",
                                   "mean_radius"]  # fmt: skip
    assert shown["paper CI"].iloc[0] == "—" and shown["typical CI"].iloc[0].startswith("[")


def test_status_counts_the_curvature_pairs_written(tmp_path, capsys):
    from volume_ray.cli import main
    from volume_ray.driver import curvature_settings
    from volume_ray.spec import load_spec, plan_trials, smoke_variant
    from volume_ray.store import SweepStore

    spec = smoke_variant(
        load_spec(Path(__file__).resolve().parents[1] / "sweeps/digits_data_scaling.yaml")
    )
    raw = spec.model_dump(mode="json")
    spec = load_spec({**raw, "curvature": {**raw["curvature"], "enabled": True}})
    store = SweepStore(tmp_path, spec.name)
    store.claim(spec.model_dump(mode="json"))
    (tmp_path / "weights.pt").write_bytes(b"")
    for trial in plan_trials(spec):  # two models: base + 0 (one landscape), base + 200 (two)
        store.write_checkpoint(trial.model_id, tmp_path / "weights.pt")
        store.write_model_row({"model_id": trial.model_id,
                               "checkpoint": f"checkpoints/{trial.model_id}.pt"})  # fmt: skip
    row = {"model_id": trial.model_id, "landscape_size": 100, "trace": 1.0}
    store.write_curvature_row(row, curvature_settings(spec))
    store.write_curvature_row(row, "p1-m1-k1-s0")  # another budget's row: not this one's
    assert main(["status", store.location]) == 0
    out = capsys.readouterr().out
    assert "models   2/2 trained" in out and "curvature 1/3 pairs written" in out
    assert "volumes  not yet" in out


def test_a_lower_bound_equal_to_paper_is_one_line_not_a_twin_table(tmp_path, capsys):
    """Nothing censored: censored_lower_bound is paper to the bit, so it is named, not
    printed again; with censored directions it is a table of its own."""
    from volume_ray.cli import _print_volumes
    from volume_ray.estimators import volume_table
    from volume_ray.store import write_table

    _, models = _volumes_and_models()
    models = models[models.model_id == "n100-s0"]
    radii = _radii("n100-s0", 100, 40, 0.05, 3)
    kinds = ["paper", "censored_lower_bound", "typical"]
    volumes = volume_table(radii, 5_000, estimators=kinds, num_resamples=20)
    write_table(models, tmp_path / "models.parquet")
    write_table(
        volumes.assign(model_id="n100-s0", landscape_size=100), tmp_path / "volumes.parquet"
    )
    _print_volumes(str(tmp_path))
    out = capsys.readouterr().out
    assert "censored_lower_bound = paper, nothing censored" in out
    assert "censored_lower_bound (" not in out
    censored = radii.copy()
    censored.loc[censored.index[:3], "censored"] = True
    censored.loc[censored.index[:3], "radius"] = np.nan
    volumes = volume_table(censored, 5_000, estimators=kinds, num_resamples=20)
    write_table(
        volumes.assign(model_id="n100-s0", landscape_size=100), tmp_path / "volumes.parquet"
    )
    _print_volumes(str(tmp_path))
    out = capsys.readouterr().out
    assert "censored_lower_bound (" in out and "nothing censored" not in out


def test_the_loss_slice_names_its_landscape_and_draws_the_thresholds():
    import matplotlib.pyplot as plt

    from volume_ray.analysis.figures import loss_slice

    a = b = np.linspace(0, 1, 6)
    losses = 0.01 + np.add.outer(a, b) ** 2
    figure = loss_slice(a, b, losses, ["n=1", "n=2", "n=3"], landscape=1100, thresholds=[0.1, 0.5])
    contour, _colorbar, surface = figure.axes
    assert contour.get_title() == "Loss through three minima, landscape of 1,100 samples"
    assert surface.get_title() == "(surface; loss thresholds 0.1, 0.5)"
    labels = {text.get_text() for text in contour.texts}
    assert {"T=0.1", "T=0.5"} <= labels
    plt.close(figure)


def test_mp4_is_written_with_the_encoder_and_skipped_without_it(monkeypatch, tmp_path):
    """An MP4 (an ISO media file: `ftyp` at byte 4) from imageio's ffmpeg writer, and
    None, not an error, where that encoder is not installed."""
    import sys

    import imageio.v2 as imageio
    from PIL import Image

    from volume_ray.analysis.animations import mp4_bytes

    frames = [Image.new("RGB", (64, 48), colour) for colour in ("red", "green", "blue")]
    data = mp4_bytes(frames, milliseconds=100)
    assert data[4:8] == b"ftyp"
    (tmp_path / "a.mp4").write_bytes(data)
    with imageio.get_reader(tmp_path / "a.mp4", format="FFMPEG") as video:
        assert video.count_frames() == 3 and video.get_meta_data()["fps"] == 10
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import raises ImportError
    assert mp4_bytes(frames, milliseconds=100) is None
