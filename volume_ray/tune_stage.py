"""Stage A: train every trial of a sweep with Ray Tune.

The trainable is a plain function: config in, `tune.report` out. It reports metrics
every epoch, the full training state every `STATE_EVERY` epochs (a retried trial
resumes from it, and so does the same trial in a later run of the sweep, after a lost
cluster or a killed driver), and the trained weights at the end. A driver-side callback copies
each finished model into the store at once, so a rerun skips it. Tune keeps its
experiments in `<store>/tune`, on the store's filesystem (a shared path or an object
store), so a trial resumes on any node.
"""

from __future__ import annotations

import json
import posixpath
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from pyarrow import fs
from ray import tune
from tqdm import tqdm

from volume_ray.experiment import experiment_data, new_model
from volume_ray.locations import join, locate
from volume_ray.models import count_parameters, loss_for_task
from volume_ray.ray_process import assigned_device, configure_process, trial_resources
from volume_ray.spec import SweepSpec, Trial, checkpoint_id, plan_trials
from volume_ray.store import SweepStore, read_tensors
from volume_ray.train import TrainConfig, evaluate, save_checkpoint, train

__all__ = ["resumable_states", "train_stage", "train_trial"]

STATE_EVERY = 50  # epochs between resumable checkpoints of a trial
REPORT_EVERY = 10  # epochs between progress reports: each waits on Tune's controller
MAX_FAILURES = 2  # retries of a failed trial


def train_trial(config: dict) -> None:
    """Train one trial (Tune trainable)."""
    configure_process()
    spec = SweepSpec.model_validate(config["spec"])
    trial = Trial(**config["trial"])
    device = assigned_device()
    data = experiment_data(spec)
    x, y = (t.to(device) for t in data.training_set(trial.extra))
    test = tuple(t.to(device) for t in data.test_set)
    model = new_model(spec, data, trial.seed).to(device)
    loss_fn = loss_for_task(data.source.task)
    t = spec.train
    settings = TrainConfig(
        optimizer=trial.optimizer, lr=t.lr, weight_decay=t.weight_decay, momentum=t.momentum,
        sam_rho=trial.sam_rho, sam_adaptive=t.sam_adaptive, epochs=t.epochs,
        batch_size=trial.batch_size, target_loss=t.target_loss, seed=trial.seed,
    )  # fmt: skip
    resume, kept = None, {}  # kept: epoch -> (weights, metrics) for checkpoint_epochs
    if (saved := tune.get_checkpoint()) is not None:  # a retry within this run
        with saved.as_directory() as folder:
            resume = read_tensors(Path(folder) / "state.pt")
    elif earlier := config.get("resume_states", {}).get(trial.model_id):  # an earlier run's
        try:
            resume = read_tensors(earlier)
        except (OSError, RuntimeError, EOFError) as error:  # cut off while it was written
            warnings.warn(f"{trial.model_id}: trains from epoch 0, {earlier} is unreadable "
                          f"({error})", stacklevel=1)  # fmt: skip
    if resume is not None:
        kept = resume.pop("kept")
    pending_state: list[dict] = []
    reported = False  # by this process: its first epoch is always reported

    def report(metrics: dict, network) -> None:
        nonlocal reported
        if metrics["epoch"] in t.checkpoint_epochs:
            weights = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
            kept[metrics["epoch"]] = (weights, metrics)
        if pending_state:  # a resumable state was just taken: ship it with this report
            with tempfile.TemporaryDirectory() as folder:
                torch.save({**pending_state.pop(), "kept": kept}, Path(folder) / "state.pt")
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        elif not reported or metrics["epoch"] % REPORT_EVERY == 0:
            tune.report(metrics)
        else:
            return
        reported = True

    history = train(
        model, (x, y), test, loss_fn, settings, on_epoch=report, resume=resume,
        on_state=pending_state.append, state_every=STATE_EVERY,
    )  # fmt: skip
    train_loss, train_acc = evaluate(model, x, y, loss_fn)
    test_loss, test_acc = evaluate(model, *test, loss_fn)
    final = {
        **history[-1],
        "final": True,
        "train_loss": train_loss,
        "train_acc": train_acc,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "n_params": count_parameters(model),
    }
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(model, Path(folder) / "model.pt")
        for epoch, (weights, metrics) in kept.items():
            torch.save(weights, Path(folder) / f"epoch_{epoch}.pt")
            (Path(folder) / f"epoch_{epoch}.json").write_text(json.dumps(metrics))
        tune.report(final, checkpoint=tune.Checkpoint.from_directory(folder))


def resumable_states(store: SweepStore) -> dict[str, str]:
    """model id -> location of the newest resumable state that an earlier, unfinished
    run of this sweep left in `<store>/tune` (a lost cluster, a killed driver), so that
    its trial goes on from there rather than from epoch 0. Trial folders are named by
    model id (`_trial_folder`), each holding its latest `checkpoint_*/state.pt`."""
    filesystem, root = locate(store.tune)
    selector = fs.FileSelector(root, recursive=True, allow_not_found=True)
    newest: dict[str, tuple[int, str]] = {}
    for info in filesystem.get_file_info(selector):
        relative = posixpath.relpath(info.path, root).split("/")
        if len(relative) != 4 or relative[-1] != "state.pt":  # run/trial/checkpoint/state
            continue
        model_id, stamp = relative[1], info.mtime_ns or 0
        if model_id not in newest or stamp > newest[model_id][0]:
            newest[model_id] = (stamp, str(join(store.tune, *relative)))
    return {model_id: location for model_id, (_, location) in newest.items()}


def _trial_name(trial) -> str:
    """A Tune trial's name in its status table and results: `train <model id>`."""
    return f"train {trial.config['trial']['model_id']}"


def _trial_folder(trial) -> str:
    """A Tune trial's folder: its model id, which a later run looks for."""
    return trial.config["trial"]["model_id"]


class _StoreFinishedModels(tune.Callback):
    """Copies each finished trial's weights and row into the store as it completes,
    and advances a progress bar over trials. `as_directory` downloads a checkpoint
    kept on an object store; the store writes through its own filesystem."""

    def __init__(self, spec: SweepSpec, store: SweepStore, bar: tqdm):
        self.spec = spec
        self.store = store
        self.bar = bar

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        done = Trial(**trial.config["trial"])
        result = trial.last_result
        with trial.checkpoint.as_directory() as folder:
            for kept in sorted(Path(folder).glob("epoch_*.json")):  # checkpoints first:
                epoch = int(kept.stem.removeprefix("epoch_"))  # the final row marks done
                model_id = checkpoint_id(done.model_id, epoch)
                self.store.write_checkpoint(model_id, kept.with_suffix(".pt"))
                metrics = {**json.loads(kept.read_text()), "n_params": result["n_params"]}
                self._write_row(done, model_id, metrics)
            self.store.write_checkpoint(done.model_id, Path(folder) / "model.pt")
        self._write_row(done, done.model_id, result)
        self.bar.update(1)

    def _write_row(self, done: Trial, model_id: str, metrics: dict) -> None:
        self.store.write_model_row(
            {
                "model_id": model_id,
                "dataset": self.spec.dataset.name,
                "train_size": done.train_size,
                "batch_size": done.batch_size or done.train_size,
                "optimizer": done.optimizer_label,
                "seed": done.seed,
                "epochs": int(metrics["epoch"]),
                "train_loss": float(metrics["train_loss"]),
                "train_acc": float(metrics["train_acc"]),
                "test_loss": float(metrics["test_loss"]),
                "test_acc": float(metrics["test_acc"]),
                "n_params": int(metrics["n_params"]),
                "checkpoint": f"checkpoints/{model_id}.pt",
            }
        )


def train_stage(
    spec: SweepSpec, store: SweepStore, *, progress: bool = True, trainable=train_trial
) -> list[Trial]:
    """Train the trials not yet in the store; return the trials trained now.
    `trainable` is the Tune function trial configs go to (`train_trial`)."""
    done = set(store.finished_models().get("model_id", []))
    todo = [t for t in plan_trials(spec) if t.model_id not in done]
    if todo:
        bar = tqdm(total=len(todo), unit="model", desc="training", disable=not progress)
        tuner = tune.Tuner(
            tune.with_resources(trainable, trial_resources(spec)),
            param_space={
                "spec": spec.model_dump(mode="json"),
                "trial": tune.grid_search([asdict(t) for t in todo]),
                "resume_states": resumable_states(store),
            },
            tune_config=tune.TuneConfig(
                reuse_actors=True,
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_folder,
            ),  # fmt: skip
            run_config=tune.RunConfig(
                name=f"train-{int(time.time())}",
                # a URI goes to Tune as it is: trials upload their states through it
                storage_path=str(store.tune),
                failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # the latest state
                callbacks=[_StoreFinishedModels(spec, store, bar)],
                verbose=0,
            ),
        )
        with bar:
            results = tuner.fit()
        failed = [r for r in results if r.error is not None]
        if failed:
            raise RuntimeError(
                f"{len(failed)} training trial(s) failed after {MAX_FAILURES} retries; the "
                f"first error: {failed[0].error}"
            )
    store.write_models()
    return todo
