"""`volume-ray`: the command line (DESIGN section 5).

- `run SPEC`       train, measure and aggregate; resumes whatever is already done;
- `train SPEC`, `measure SPEC`   single stages (`measure` also aggregates);
- `validate SPEC`  print the plan, or the bad field and how to fix it;
- `status DIR`     what a sweep's store holds;
- `query DIR`      a table of the store, filtered, as text, CSV or JSON;
- `report DIR`     figures and a Markdown summary with the trend tables, in `DIR/report/`;
- `demo`           one digits MLP measured in this process, without Ray.

Without `--address` a local Ray starts; with one, the command joins that cluster.
`--storage` and `DIR` take a local path or a pyarrow filesystem URI (`s3://...`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

DEFAULT_STORAGE = "results"
SWEEP_DIR_HELP = "the sweep's folder, <storage>/<name>: a path or a URI (s3://bucket/prefix/name)"


def _spec(args: argparse.Namespace):
    from volume_ray.spec import load_spec, smoke_variant

    spec = load_spec(args.spec)
    spec = smoke_variant(spec) if args.smoke else spec
    chosen = {"workers": args.workers, "gpus_per_worker": args.gpus_per_worker}
    chosen = {k: v for k, v in chosen.items() if v is not None}
    if chosen:  # resources never change results, so a run may pick its own
        raw = spec.model_dump(mode="json")
        spec = load_spec({**raw, "resources": {**raw["resources"], **chosen}})
    return spec


def _run(args: argparse.Namespace, stages: tuple[str, ...]) -> int:
    import ray

    from volume_ray.driver import connect, keep_dashboard_up, run_sweep
    from volume_ray.experiment import check_runnable
    from volume_ray.locations import exists
    from volume_ray.results import TABLES

    spec = _spec(args)
    check_runnable(spec)
    began = time.perf_counter()
    # --keep-dashboard: this process holds the Ray it may start, past run_sweep's end
    held = connect(args.address) if args.keep_dashboard else False
    store = run_sweep(spec, args.storage, address=args.address, stages=stages)
    where = store.location
    print(f"\n{spec.name}: done in {time.perf_counter() - began:.0f} s, results in {where}")
    if exists(store.volumes_path):
        _print_volumes(where)
        paths = {"models": store.models_path, "radii": store.radii,
                 "volumes": store.volumes_path, "curvature": store.curvature_path}  # fmt: skip
        print(
            "\nRead the tables in Python:\n"
            "  from volume_ray.results import load_table\n"
            + "".join(
                f"  load_table('{where}', '{table}')\n" for table in TABLES if exists(paths[table])
            ),
            end="",
        )
    if held:
        keep_dashboard_up()
        ray.shutdown()
    elif args.keep_dashboard:
        print("--keep-dashboard: this run joined a cluster, which stays up anyway")
    return 0


def _print_volumes(sweep: str) -> None:
    """Per (metric, threshold), each estimator's log-volumes (rows: models, columns:
    landscapes), headed by how many directions carry it."""
    from volume_ray.analysis.figures import estimators_in
    from volume_ray.analysis.report import carried_by
    from volume_ray.results import load_table

    volumes = load_table(sweep, "volumes")
    order = load_table(sweep, "models").sort_values(["train_size", "optimizer", "seed"])
    for (metric, threshold), group in volumes.groupby(["metric", "threshold"]):
        print(f"\nlog-volume ({metric} threshold {threshold}); rows: models, columns: landscapes")
        for estimator in estimators_in(group):
            rows = group[group.estimator == estimator]
            if estimator == "censored_lower_bound" and (rows.n_censored == 0).all():
                print("censored_lower_bound = paper, nothing censored")
                continue
            table = rows.pivot(index="model_id", columns="landscape_size", values="log_volume")
            table = table.reindex([m for m in order.model_id if m in table.index])
            table.index.name = table.columns.name = None
            print(f"{estimator} ({carried_by(rows)})")
            print(table.to_string(float_format=lambda v: f"{v:,.1f}"))


def _validate(args: argparse.Namespace) -> int:
    from volume_ray.data import MissingDataError
    from volume_ray.data.subsets import landscapes_use_extras
    from volume_ray.experiment import check_runnable
    from volume_ray.spec import plan_pairs, plan_trials

    spec = _spec(args)
    try:
        data = check_runnable(spec)
        test = f"test {len(data.test_set[0])}"
    except MissingDataError as error:  # the plan still stands; `run` will need the files
        test = f"data NOT checked: {error}"
    trials = plan_trials(spec)
    pairs = plan_pairs(spec, trials, landscapes_use_extras(spec.dataset.extra_kind))
    v = spec.volume
    shards = len(pairs) * -(-v.directions // v.shard_size)
    print(f"sweep {spec.name}: valid")
    d = spec.dataset
    print(f"  data      {d.name}: base {d.base_size} + extras {d.extra_sizes} "
          f"({d.extra_kind}), {test}")  # fmt: skip
    print(f"  trials    {len(trials)}: {len(spec.dataset.extra_sizes)} sizes x "
          f"{len(spec.train.batch_sizes)} batch sizes x {len(spec.train.optimizers)} optimizers "
          f"x {len(spec.train.sam_rhos)} SAM rhos x {len(spec.train.seeds)} seeds")  # fmt: skip
    r = spec.resources
    print(f"  resources workers {r.workers}, GPUs per worker {r.gpus_per_worker}, "
          f"CPUs per trial {r.cpus_per_trial}")  # fmt: skip
    print(f"  pairs     {len(pairs)} (model, landscape)")
    print(f"  measuring {v.directions} directions per pair, seed {v.seed}, {len(v.thresholds)} "
          f"{v.metric} thresholds {v.thresholds}, {v.search} search; {shards} shards")  # fmt: skip
    c = spec.curvature
    if c.enabled:
        print(f"  curvature {len(pairs)} tasks, one per pair: {c.probes} probes x "
              f"{c.lanczos_steps} Lanczos steps")  # fmt: skip
    if c.quadratic_radii:
        print("  quadratic radii: one Hessian-vector product per direction")
    if "thermodynamic" in v.estimators:
        t = spec.thermodynamic
        rungs = "adaptive" if t.rungs is None else t.rungs
        print(f"  ladders   {len(pairs) * len(v.thresholds)}, one per pair and threshold: "
              f"{t.chains} chains x {t.steps} moves a rung, rungs {rungs}")  # fmt: skip
    print(f"  estimators {', '.join(v.estimators)}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from volume_ray.driver import pending_curvature, pending_shards, trained_pairs
    from volume_ray.ladder_tasks import pending_ladders
    from volume_ray.locations import exists
    from volume_ray.spec import load_spec, plan_trials
    from volume_ray.store import SweepStore

    store = SweepStore.at(args.dir)
    spec = load_spec(store.recorded_spec())
    models = store.finished_models()
    missing, total = pending_shards(spec, store)
    print(f"sweep {spec.name} in {store.location}")
    print(f"  models   {len(models)}/{len(plan_trials(spec))} trained")
    print(f"  shards   {total - len(missing)}/{total} measured (of the trained models)")
    if spec.curvature.enabled:
        pending, pairs = pending_curvature(spec, store)
        print(f"  curvature {pairs - len(pending)}/{pairs} pairs written (of the trained models)")
    else:
        print("  curvature off (curvature.enabled: false)")
    if "thermodynamic" in spec.volume.estimators:
        unfinished, ladders = pending_ladders(spec, store, trained_pairs(spec, store))
        print(f"  ladders  {ladders - len(unfinished)}/{ladders} finished (of the trained models)")
    print(f"  volumes  {'written' if exists(store.volumes_path) else 'not yet'}")
    return 0


def _query(args: argparse.Namespace) -> int:
    from volume_ray.results import load_table

    frame = load_table(args.dir, args.table, where=args.where)
    if args.format == "csv":
        print(frame.to_csv(index=False), end="")
    elif args.format == "json":
        print(frame.to_json(orient="records"))
    else:
        print(frame.to_string(index=False))
    return 0


def _report(args: argparse.Namespace) -> int:
    from volume_ray.analysis.report import write_report
    from volume_ray.locations import join, list_files

    out = write_report(args.dir)
    _, figures = list_files(out, ".png")
    print(f"wrote {len(figures)} figures and {join(out, 'summary.md')}")
    return 0


def _animate(args: argparse.Namespace) -> int:
    from volume_ray.analysis.report import write_animations

    written = write_animations(args.dir, model_id=args.model, frames=args.frames)
    if not written:
        print("nothing to animate: the sweep keeps no epochs and has fewer than three minima")
    for location in written:
        print(f"wrote {location}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from volume_ray.allocator import keep_freed_memory
    from volume_ray.data import load_source
    from volume_ray.directions import perturbed_parameters
    from volume_ray.estimators import volume_table
    from volume_ray.measure import measure_radii
    from volume_ray.models import build_model
    from volume_ray.store import write_table
    from volume_ray.train import TrainConfig, train

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    keep_freed_memory()  # this process trains and measures (see volume_ray.allocator)
    source = load_source("digits", seed=args.seed)
    x, y = source.x_train, source.y_train
    model = build_model("mlp", source.input_shape, 10, hidden=args.hidden, seed=args.seed)
    started = time.perf_counter()
    config = TrainConfig(epochs=args.epochs, target_loss=1e-3, seed=args.seed)
    history = train(model, (x, y), (source.x_test, source.y_test), F.cross_entropy, config)
    print(
        f"trained MLP 64-{'-'.join(map(str, args.hidden))}-10 on {len(x)} digits: train loss "
        f"{history[-1]['train_loss']:.2e}, test accuracy {history[-1]['test_acc']:.1%} after "
        f"{len(history)} epochs ({time.perf_counter() - started:.1f} s)"
    )
    started = time.perf_counter()
    radii = measure_radii(
        model, x, y, F.cross_entropy, num_directions=args.directions, thresholds=args.thresholds
    )
    volumes = volume_table(radii, perturbed_parameters(model).count)
    print(
        f"measured {args.directions} directions x {len(args.thresholds)} thresholds "
        f"({radii.evals.mean():.1f} evaluations per direction, "
        f"{time.perf_counter() - started:.1f} s)\n"
    )
    print("log_volume (nats) by estimator; ess: how many directions carry it; CI —: withheld")
    print(_side_by_side(volumes).to_string(index=False, float_format=lambda v: f"{v:,.2f}"))
    out = Path(args.out)
    write_table(radii, out / "radii.parquet")
    write_table(volumes, out / "volumes.parquet")
    print(f"\nwrote {out / 'radii.parquet'} and {out / 'volumes.parquet'}")
    return 0


def _side_by_side(volumes):
    """One row per threshold: each estimator's log-volume, its interval ("—" where
    withheld) and how many directions carry it (ess), then the censoring."""
    import pandas as pd

    rows = []
    for threshold, group in volumes.groupby("threshold"):
        first = group.iloc[0]  # radius facts are the same in every estimator's row
        row = {"threshold": threshold}
        for e in group.itertuples():
            interval = f"[{e.ci_low:,.1f}, {e.ci_high:,.1f}]" if e.ci_valid else "—"
            row |= {e.estimator: e.log_volume, f"{e.estimator} CI": interval,
                    f"{e.estimator} ess": e.ess}  # fmt: skip
        rows.append({**row, "censored": first.n_censored, "mean_radius": first.mean_radius})
    return pd.DataFrame(rows)


def _parser() -> argparse.ArgumentParser:
    from volume_ray.results import TABLES

    parser = argparse.ArgumentParser(
        prog="volume-ray", description="Measure the volume of loss-landscape minima."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, stages, text in (
        ("run", ("train", "measure", "aggregate"), "train, measure and aggregate a sweep"),
        ("train", ("train",), "train a sweep's models (stage A)"),
        ("measure", ("measure", "aggregate"), "measure and aggregate trained models"),
    ):
        command = commands.add_parser(name, help=text)
        _spec_options(command)
        command.add_argument(
            "--storage", default=DEFAULT_STORAGE,
            help="results root: a folder (on a cluster, one every node mounts) or a URI "
            "such as s3://bucket/prefix",
        )  # fmt: skip
        command.add_argument("--address", default=None, help="Ray cluster to join")
        command.add_argument(
            "--keep-dashboard", action="store_true",
            help="keep the local Ray and its dashboard up after the run, until Ctrl-C",
        )  # fmt: skip
        command.set_defaults(run=lambda args, stages=stages: _run(args, stages))
    validate = commands.add_parser("validate", help="check a spec and print its plan")
    _spec_options(validate)
    validate.set_defaults(run=_validate)
    status = commands.add_parser("status", help="what a sweep's store holds")
    status.add_argument("dir", help=SWEEP_DIR_HELP)
    status.set_defaults(run=_status)
    query = commands.add_parser("query", help="print a table of a sweep's store")
    query.add_argument("dir", help=SWEEP_DIR_HELP)
    query.add_argument("--table", choices=TABLES, default="volumes")
    query.add_argument("--where", default=None, help="a pandas query, e.g. 'threshold == 0.1'")
    query.add_argument("--format", choices=("table", "csv", "json"), default="table")
    query.set_defaults(run=_query)
    report = commands.add_parser("report", help="figures and a Markdown summary of a sweep")
    report.add_argument("dir", help=SWEEP_DIR_HELP)
    report.set_defaults(run=_report)
    animate = commands.add_parser(
        "animate",
        help="GIFs (and MP4s, with the video extra) of the loss slice over training and of "
        "the three minima's surface",
    )
    animate.add_argument("dir", help=SWEEP_DIR_HELP)
    animate.add_argument(
        "--model", default=None, help="a model with kept epochs (default: the first)"
    )
    animate.add_argument(
        "--frames", type=_positive_int, default=36, help="views of the turning surface"
    )
    animate.set_defaults(run=_animate)
    demo = commands.add_parser(
        "demo", help="train an MLP on the embedded digits set and measure it, without Ray"
    )
    demo.add_argument("--directions", type=_positive_int, default=200)
    demo.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.05, 0.02, 0.01])
    demo.add_argument("--hidden", type=_positive_int, nargs="+", default=[256, 256])
    demo.add_argument("--epochs", type=_positive_int, default=2000)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="results/demo", help="folder for the Parquet tables")
    demo.set_defaults(run=_demo)
    return parser


def _spec_options(command: argparse.ArgumentParser) -> None:
    """The spec and what may change for one run: its small form and its resources."""
    command.add_argument("spec", help="sweep spec (YAML)")
    command.add_argument("--smoke", action="store_true", help="the small form (see spec)")
    command.add_argument(
        "--workers", type=_auto_or(int), default=None,
        help="measuring actors (overrides resources.workers; 'auto' counts the cluster's "
        "GPUs or CPUs now, so an autoscaling cluster that starts empty needs a number)",
    )  # fmt: skip
    command.add_argument(
        "--gpus-per-worker", type=_auto_or(float), default=None,
        help="GPUs per trial and per measuring actor (overrides resources.gpus_per_worker)",
    )  # fmt: skip


def _auto_or(cast):
    """An argparse type: 'auto', or a value of `cast` (the spec checks its range)."""

    def parse(text: str):
        if text == "auto":
            return text
        try:
            return cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None

    return parse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's tables: our bars say enough
    # A resumable state every STATE_EVERY epochs is deliberate; Tune's warning about
    # frequent experiment snapshots adds nothing for a user.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:  # bad input: the message names the field and the fix
        print(f"volume-ray: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # work failed (trials, shards); finished work is kept
        print(f"volume-ray: failed: {error}\nRerun the same command to resume.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
