"""The paper's figure set for any sweep store, by experiment family.

    python analysis/paper_figures.py DIR [--estimator paper]

The family comes from the sweep's recorded spec (`volume_ray.analysis.families`): data
scaling (Fig. 4 top and bottom), poison and noise, imbalance, batch size, SAM against
AdamW, grokking. Every figure goes into DIR/report/paper/ as PNG, one per family and
threshold; DIR may be a path or a URI, as for `volume-ray report`.
"""

from __future__ import annotations

import argparse
import os

from volume_ray.analysis.families import families_of, family_figures
from volume_ray.analysis.report import cutoffs, png_bytes
from volume_ray.estimators import ESTIMATORS
from volume_ray.locations import join, write_atomic
from volume_ray.results import load_table
from volume_ray.spec import load_spec
from volume_ray.store import SweepStore


def write_paper_figures(sweep_dir: str | os.PathLike, estimator: str = "paper") -> list[str]:
    """Draw every figure of the sweep's families into DIR/report/paper/; return the
    files written."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {list(ESTIMATORS)}, got {estimator!r}")
    store = SweepStore.at(sweep_dir)
    spec = load_spec(store.recorded_spec())
    models, volumes = load_table(store.root, "models"), load_table(store.root, "volumes")
    if estimator not in set(volumes.estimator):
        raise ValueError(
            f"estimator {estimator!r} has no rows in {store.location}/volumes.parquet; "
            f"it holds {sorted(set(volumes.estimator))}"
        )
    families = families_of(spec)
    if not families:
        raise ValueError(
            f"the sweep {spec.name!r} varies nothing a paper family compares (extra sizes, "
            "extra kind, batch sizes, SAM rhos or kept epochs): no figures to draw"
        )
    cut = cutoffs(spec, store, models) if "data_scaling" in families else None
    out, written = join(store.root, "report", "paper"), []
    for family in families:
        for threshold in spec.volume.thresholds:
            drawn = family_figures(
                family, volumes, models, spec.dataset.base_size, threshold, estimator, cut
            )
            for stem, figure in drawn.items():
                data, path = png_bytes(figure), join(out, f"{stem}_T{threshold:g}.png")
                write_atomic(path, lambda sink, data=data: sink.write(data))
                written.append(str(path))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a sweep store: a path or a URI")
    parser.add_argument("--estimator", default="paper", help="the volume drawn (default paper)")
    args = parser.parse_args(argv)
    for path in write_paper_figures(args.sweep_dir, args.estimator):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
