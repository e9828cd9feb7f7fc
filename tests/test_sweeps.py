"""Every sweep validates; the embedded families run end to end in their smoke form, and
the analysis reads their stores."""

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray

from volume_ray.analysis import figures
from volume_ray.analysis.report import write_report
from volume_ray.cli import main
from volume_ray.driver import run_sweep
from volume_ray.results import load_table
from volume_ray.spec import load_spec, smoke_variant

SWEEPS = sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml"))
EMBEDDED = ["digits_data_scaling", "mnist1d_data_scaling", "swiss_roll", "modular_data_scaling"]


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_sweep_validates(path, capsys):
    assert main(["validate", str(path)]) == 0
    assert "valid" in capsys.readouterr().out


def test_the_paper_families_are_all_there():
    names = {p.stem for p in SWEEPS}
    for family in ("digits", "mnist1d", "mnist_mlp", "mnist_cnn", "fashion_mnist", "svhn",
                   "cifar10_cnn", "cifar10_mlp", "poison", "noise", "batch_size", "sam_mnist",
                   "sam_swiss_roll", "sam_cifar10", "imbalance", "modular", "swiss_roll",
                   "char_transformer"):  # fmt: skip
        assert any(family in name for name in names), family


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    storage = tmp_path_factory.mktemp("smoke")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        stores = {}
        for name in EMBEDDED:
            spec = smoke_variant(load_spec(Path(SWEEPS[0]).parent / f"{name}.yaml"))
            stores[name] = run_sweep(spec, str(storage), progress=False)
    finally:
        ray.shutdown()
    return stores


@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_families_run_in_smoke_form(smoke_runs, name):
    store = smoke_runs[name]
    models = pd.read_parquet(store.models_path)
    volumes = pd.read_parquet(store.volumes_path)
    assert len(models) == 2  # the two smallest sizes, one seed
    estimators = len(load_spec(store.spec_path).volume.estimators)
    assert len(volumes) == 3 * len(volumes.threshold.unique()) * estimators  # 3 pairs x T x ...
    assert (volumes.n_directions == 8).all()


def test_queries_return_the_rows_the_parquet_files_hold(smoke_runs):
    root = smoke_runs["digits_data_scaling"].root
    files = sorted((root / "radii").glob("*.parquet"))
    direct = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
    keys = ["model_id", "landscape_size", "direction", "threshold"]
    queried = load_table(root, "radii")
    pd.testing.assert_frame_equal(
        queried.sort_values(keys).reset_index(drop=True),
        direct.sort_values(keys).reset_index(drop=True),
    )
    filtered = load_table(root, "volumes", where="estimator == 'paper' and landscape_size > 100")
    volumes = pd.read_parquet(root / "volumes.parquet")
    expected = volumes[(volumes.estimator == "paper") & (volumes.landscape_size > 100)]
    pd.testing.assert_frame_equal(filtered, expected.reset_index(drop=True))


def test_report_writes_figures_whose_axes_carry_data(smoke_runs):
    root = smoke_runs["digits_data_scaling"].root
    out = write_report(root)
    pngs = sorted(out.glob("*.png"))
    # 6 per threshold (with the quadratic radii: curvature is on) + the spectrum + a slice
    assert len(pngs) == 8 and all(p.stat().st_size > 10_000 for p in pngs)
    summary = (out / "summary.md").read_text()
    assert "Power law of volume against training-set size" in summary
    models, volumes, radii = (load_table(root, t) for t in ("models", "volumes", "radii"))
    drawn = [
        figures.volume_against_train_size(volumes, models, 0.1),
        figures.volume_against_landscape(volumes, models, 0.1),
        figures.volume_against_test_accuracy(volumes, models, 0.1, 100),
        figures.estimate_against_directions(radii, models, 0.1, 100),
        figures.radius_distributions(radii, 0.1, 100),
        figures.estimators_against_train_size(volumes, models, 0.1),
        figures.quadratic_against_measured_radii(radii, 0.1, 100),
        figures.spectrum(load_table(root, "curvature"), 100),
    ]
    for figure in drawn:
        for axis in figure.axes:
            if axis.get_label() == "<colorbar>":
                continue
            assert axis.get_title() and axis.get_xlabel() and axis.get_ylabel()
            data = [len(line.get_xdata()) for line in axis.lines]
            data += [len(c.get_offsets()) for c in axis.collections] + [len(axis.patches)]
            assert sum(data) > 0
        plt.close(figure)


def test_queries_through_a_filesystem_uri_filters_and_joins(smoke_runs):
    from volume_ray.results import joined_volumes, load_sweeps

    root = smoke_runs["digits_data_scaling"].root
    local = load_table(root, "volumes", landscape_size=100, estimator="paper")
    remote = load_table(f"file://{root}", "volumes", landscape_size=100, estimator="paper")
    pd.testing.assert_frame_equal(local, remote)
    assert set(local.landscape_size) == {100} and set(local.estimator) == {"paper"}
    everything = load_sweeps(root.parent, "models")
    assert set(everything.sweep) == {f"{name.replace('_', '-')}-smoke" for name in EMBEDDED}
    joined = joined_volumes(root, threshold=0.1)
    estimators = {"paper", "typical", "laplace"}  # curvature is on in the digits sweep
    assert {"train_size", "test_acc", "seed"} <= set(joined.columns) and len(joined) == 3 * 3
    assert set(joined.estimator) == estimators
    with pytest.raises(ValueError, match="no column 'temperature'"):
        load_table(root, "volumes", temperature=1)


def test_the_html_report_renders_in_a_real_browser(smoke_runs, tmp_path):
    """report/index.html, one self-contained file, in headless Chromium: its text, every
    figure loaded (the page counts them), and a screenshot of it."""
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "Chromium is missing: .ci/run installs it (apt-get install chromium)"
    root = smoke_runs["digits_data_scaling"].root
    page = write_report(root) / "index.html"
    text = page.read_text()
    assert 'src="data:image/png;base64,' in text and 'src="volume' not in text  # embedded
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}"]
    dom = subprocess.run(
        [*flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert 'data-images="8"' in dom and 'data-images-loaded="8"' in dom
    for words in ("How many directions carry each estimator", "Power law of volume",
                  "models.parquet", "digits-data-scaling-smoke", "<table>"):  # fmt: skip
        assert words in dom, words
    shot = tmp_path / "report.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    assert shot.stat().st_size > 20_000


def _run(spec: dict, storage) -> object:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        return run_sweep(load_spec(spec), str(storage), progress=False)
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def kept_epochs_run(tmp_path_factory):
    """A digits sweep keeping epochs 20 and 40 of 60 (the grokking family's shape)."""
    spec = {
        "name": "kept-epochs",
        "dataset": {"name": "digits", "base_size": 60, "extra_sizes": [0, 60, 180]},
        "model": {"name": "mlp", "hidden": [8]},
        "train": {"epochs": 60, "lr": 0.01, "seeds": [0], "checkpoint_epochs": [20, 40]},
        "volume": {"directions": 4, "shard_size": 4},
    }
    return _run(spec, tmp_path_factory.mktemp("kept"))


def test_animate_writes_gifs_and_mp4s_of_training_and_of_three_minima(kept_epochs_run, capsys):
    """The training slice has a frame per kept epoch and the final one, the surface the
    frames asked for, each 640 x 480, as GIF and as MP4 (the test extra installs the
    encoder)."""
    import imageio.v2 as imageio
    from PIL import Image

    store = kept_epochs_run
    assert main(["animate", str(store.root), "--frames", "6"]) == 0
    out = store.root / "report" / "animations"
    stems = {"training_slice_n60-bfull-adamw-s0": 3, "minima_surface": 6}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{stem}{suffix}" for stem in stems for suffix in (".gif", ".mp4")
    )
    for stem, frames in stems.items():
        with Image.open(out / f"{stem}.gif") as gif:
            assert gif.n_frames == frames and gif.size == (640, 480)
        with imageio.get_reader(out / f"{stem}.mp4", format="FFMPEG") as video:
            assert video.count_frames() == frames
            assert video.get_meta_data()["size"] == (640, 480)
    assert "wrote" in capsys.readouterr().out
    assert main(["animate", str(store.root), "--model", "nobody"]) == 2


def _paper_figures():
    """analysis/paper_figures.py, the researcher's script, as a module."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "analysis" / "paper_figures.py"
    loaded = importlib.util.spec_from_file_location("paper_figures", path)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


def test_paper_figures_for_four_families(smoke_runs, kept_epochs_run, tmp_path, capsys):
    """Data scaling, grokking, poison and SAM, each told from its spec; the files land
    in report/paper/, and the drawn means are the stored volumes' and accuracies'."""
    from volume_ray.analysis.families import families_of, family_figures

    poison_sam = _run(
        {
            "name": "poison-sam",
            "dataset": {"name": "digits", "base_size": 60, "extra_sizes": [0, 30],
                        "extra_kind": "poison"},
            "model": {"name": "mlp", "hidden": [16]},
            "train": {"epochs": 150, "lr": 0.01, "seeds": [0, 1], "sam_rhos": [0.0, 0.05]},
            "volume": {"directions": 4, "shard_size": 4, "thresholds": [0.5]},
        },
        tmp_path,
    )  # fmt: skip
    script = _paper_figures()
    expected = {
        smoke_runs["digits_data_scaling"]: (["data_scaling"], 3),
        kept_epochs_run: (["data_scaling", "grokking"], 4),
        poison_sam: (["poison", "sam"], 2),
    }
    for store, (families, per_threshold) in expected.items():
        spec = load_spec(store.spec_path)
        assert families_of(spec) == families
        assert script.main([str(store.root)]) == 0
        pngs = sorted((store.root / "report" / "paper").glob("*.png"))
        assert len(pngs) == per_threshold * len(spec.volume.thresholds)
        assert all(p.stat().st_size > 10_000 for p in pngs)
    assert "wrote" in capsys.readouterr().out

    models, volumes = load_table(poison_sam.root, "models"), load_table(poison_sam.root, "volumes")
    paper = volumes[(volumes.estimator == "paper") & (volumes.threshold == 0.5)]
    for family, x, variants in (("poison", [0, 30], 2), ("sam", [60, 90], 2)):
        (figure,) = family_figures(family, volumes, models, 60, 0.5).values()
        left, right = figure.axes
        assert len(left.containers) == variants == len(right.containers)
        for container in left.containers:  # each variant's mean over its two seeds
            line = container.lines[0]
            assert list(line.get_xdata()) == x
            optimizer = "adamw+sam0.05" if "sam" in container.get_label() else "adamw"
            rows = paper.merge(models, on="model_id")
            rows = rows[rows.optimizer == optimizer]
            means = rows.groupby("train_size").log_volume.mean().to_numpy()
            assert np.isfinite(means).all()  # trained below the threshold: basins exist
            np.testing.assert_allclose(np.asarray(line.get_ydata(), dtype=float), means)
        plt.close(figure)
    kept = [load_table(kept_epochs_run.root, t) for t in ("volumes", "models")]
    (figure,) = family_figures("grokking", *kept, 60, 0.1).values()
    (container,) = figure.axes[0].containers  # one trial: its kept epochs and its end
    assert list(container.lines[0].get_xdata()) == [20, 40, 60]
    plt.close(figure)
    with pytest.raises(ValueError, match="family must be one of"):
        family_figures("dropout", volumes, models, 60, 0.5)
    with pytest.raises(ValueError, match="estimator 'laplace' has no rows"):
        script.write_paper_figures(poison_sam.root, "laplace")
