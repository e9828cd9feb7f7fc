"""The sweep spec: one YAML file, validated in one place, expanded into a plan.

Every rule lives here, as a field constraint or a model validator with a message that
names the field and the fix; nothing downstream re-validates. Unknown fields are
refused, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from volume_ray.data import DATASETS, EXTRA_KINDS
from volume_ray.directions import DIRECTION_RNGS, FILTER_NORMS
from volume_ray.estimators import DEFAULT_ESTIMATORS, ESTIMATORS
from volume_ray.ladder import GROUPS
from volume_ray.landscape import METRICS
from volume_ray.measure import SEARCHES
from volume_ray.models import MODELS
from volume_ray.search import DEFAULT_RTOL, MIN_RTOL
from volume_ray.thermodynamic import CHAINS, STEPS
from volume_ray.train import OPTIMIZERS

__all__ = [
    "Pair",
    "SpecError",
    "SweepSpec",
    "Trial",
    "checkpoint_id",
    "load_spec",
    "plan_pairs",
    "plan_trials",
    "smoke_variant",
]

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class SpecError(ValueError):
    """A spec that cannot run; the message names the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetSpec(_Strict):
    name: Literal[DATASETS]  # type: ignore[valid-type]
    base_size: PositiveInt
    extra_sizes: list[NonNegativeInt] = Field(min_length=1)
    data_seed: NonNegativeInt = 0
    extra_kind: Literal[EXTRA_KINDS] = "data"  # type: ignore[valid-type]
    root: str | None = None  # folder of file datasets, or the text file of char_text
    download: bool = False
    imbalance_class: NonNegativeInt = 0
    imbalance_fraction: Annotated[float, Field(ge=0, le=1)] = 0.9
    options: dict[str, float | int] = Field(default_factory=dict)  # e.g. modulus, block_size

    @field_validator("extra_sizes")
    @classmethod
    def _sorted_unique(cls, sizes: list[int]) -> list[int]:
        if sizes != sorted(set(sizes)):
            raise ValueError("must be strictly increasing: sort them and drop repeats")
        return sizes


class ModelSpec(_Strict):
    name: Literal[MODELS]  # type: ignore[valid-type]
    hidden: list[PositiveInt] = Field(default_factory=list)
    channels: list[PositiveInt] = Field(default_factory=list)
    layers: PositiveInt = 6
    heads: PositiveInt = 6
    width: PositiveInt = 384


class TrainSpec(_Strict):
    optimizers: list[Literal[OPTIMIZERS]] = Field(default=["adamw"], min_length=1)  # type: ignore[valid-type]
    sam_rhos: list[Annotated[float, Field(ge=0)]] = Field(default=[0.0], min_length=1)
    sam_adaptive: bool = False
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    epochs: PositiveInt = 500
    target_loss: Annotated[float, Field(gt=0)] | None = None
    batch_sizes: list[PositiveInt | Literal["full"]] = Field(default=["full"], min_length=1)
    seeds: list[NonNegativeInt] = Field(default=[0], min_length=1)

    @field_validator("optimizers", "sam_rhos", "batch_sizes", "seeds")
    @classmethod
    def _distinct(cls, values: list) -> list:
        if len(set(values)) != len(values):
            raise ValueError("must not repeat a value: each one is a trial axis")
        return values

    # Each trial also keeps its weights at these epochs, as models of their own
    # (`<model id>-e<epoch>`), measured like the final one: grokking sweeps.
    checkpoint_epochs: list[PositiveInt] = Field(default_factory=list)

    @field_validator("checkpoint_epochs")
    @classmethod
    def _within_training(cls, epochs: list[int], info) -> list[int]:
        last = info.data.get("epochs", 0)
        if epochs != sorted(set(epochs)) or (epochs and epochs[-1] >= last):
            raise ValueError(
                f"must be strictly increasing and below train.epochs ({last}); the last "
                "epoch is the final model already"
            )
        return epochs


class VolumeSpec(_Strict):
    directions: PositiveInt = 500
    seed: NonNegativeInt = 1
    filter_norm: Literal[FILTER_NORMS] = "paper"  # type: ignore[valid-type]
    metric: Literal[METRICS] = "loss"  # type: ignore[valid-type]
    thresholds: list[float] = Field(default=[0.1], min_length=1)
    search: Literal[SEARCHES] = "bisect"  # type: ignore[valid-type]
    rtol: Annotated[float, Field(ge=MIN_RTOL, lt=0.5)] = DEFAULT_RTOL
    max_coefficient: Annotated[float, Field(gt=0)] = 1.0
    shard_size: PositiveInt = 32
    batch_size: PositiveInt | None = None
    # Default: paper and typical, plus laplace when the curvature stage is on (SweepSpec).
    estimators: list[Literal[ESTIMATORS]] = Field(default=list(DEFAULT_ESTIMATORS), min_length=1)  # type: ignore[valid-type]
    # cpu: the paper's directions (a CPU generator seeded with seed + i); device: drawn
    # on the GPU from (seed, i), reproducible but not the paper's (`directions`)
    direction_rng: Literal[DIRECTION_RNGS] = "cpu"  # type: ignore[valid-type]
    # TF32 products on a GPU: faster, but radii then part from the CPU's (`precision`)
    allow_tf32: bool = False

    @field_validator("estimators")
    @classmethod
    def _distinct_estimators(cls, values: list[str]) -> list[str]:
        if len(set(values)) != len(values):
            raise ValueError("must not repeat an estimator")
        return values

    @model_validator(mode="after")
    def _seed_fits_the_device_generator(self) -> VolumeSpec:
        if self.direction_rng == "device" and self.seed >= 2**31:
            raise ValueError(
                f"volume.seed must be below 2**31 with direction_rng 'device', got {self.seed}"
            )
        return self

    @field_validator("thresholds")
    @classmethod
    def _thresholds_fit_the_metric(cls, thresholds: list[float], info) -> list[float]:
        metric = info.data.get("metric", "loss")
        for t in thresholds:
            if not math.isfinite(t) or t <= 0 or (metric == "accuracy" and t > 1):
                rule = "in (0, 1]" if metric == "accuracy" else "finite and > 0"
                raise ValueError(f"each must be {rule} for metric {metric!r}")
        return thresholds


class CurvatureSpec(_Strict):
    """The Hessian of each landscape's loss in the radii's coordinates (one task per
    (model, landscape) pair), for the laplace estimator and the spectrum figures."""

    enabled: bool = False
    top_k: PositiveInt = 5
    probes: Annotated[int, Field(ge=2)] = 32  # two at least: the interval is their spread
    lanczos_steps: PositiveInt = 64
    seed: NonNegativeInt = 0
    # One Hessian-vector product per direction: the radius a quadratic basin would
    # give, stored beside the measured one (radii column radius_quadratic).
    quadratic_radii: bool = False


class ThermodynamicSpec(_Strict):
    """The consistent volume (estimator `thermodynamic`, on when volume.estimators
    names it): one restraint ladder per (model, landscape, threshold), whitened first,
    then run rung after rung on the measuring actors (`thermodynamic_log_volume`)."""

    rungs: Annotated[int, Field(ge=2)] | None = None  # None: placed adaptively
    chains: Annotated[int, Field(ge=GROUPS)] = CHAINS  # GROUPS at least: the spread
    steps: Annotated[int, Field(ge=2)] = STEPS
    # uniform directions per whitening iteration; None: 50 per parameter, up to 20,000
    whitening_directions: PositiveInt | None = None
    seed: NonNegativeInt = 0


class ResourcesSpec(_Strict):
    workers: PositiveInt | Literal["auto"] = "auto"
    gpus_per_worker: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = "auto"
    # under gpus_per_worker auto: trials and actors that share one GPU (small models
    # leave most of a device idle), each asking for 1/actors_per_gpu of it
    actors_per_gpu: PositiveInt = 1
    # of a GPU's free memory, the share its actors may fill (split between them)
    gpu_memory_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.5
    cpus_per_trial: Annotated[float, Field(gt=0)] = 1.0


class SweepSpec(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    dataset: DatasetSpec
    model: ModelSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    volume: VolumeSpec = Field(default_factory=VolumeSpec)
    curvature: CurvatureSpec = Field(default_factory=CurvatureSpec)
    thermodynamic: ThermodynamicSpec = Field(default_factory=ThermodynamicSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    @model_validator(mode="before")
    @classmethod
    def _laplace_by_default_with_curvature(cls, raw: object) -> object:
        """volume.estimators, when not given: paper and typical, and laplace too when
        the curvature stage runs."""
        if not isinstance(raw, dict):
            return raw
        volume, curvature = raw.get("volume") or {}, raw.get("curvature") or {}
        if isinstance(volume, dict) and "estimators" not in volume:
            on = isinstance(curvature, dict) and curvature.get("enabled") is True
            chosen = [*DEFAULT_ESTIMATORS, *(["laplace"] if on else [])]
            raw = {**raw, "volume": {**volume, "estimators": chosen}}
        return raw

    @model_validator(mode="after")
    def _curvature_fits_the_volume(self) -> SweepSpec:
        v, c = self.volume, self.curvature
        if "laplace" in v.estimators and not c.enabled:
            raise ValueError(
                "volume.estimators: laplace needs the landscape's curvature; set "
                "curvature.enabled: true or drop laplace"
            )
        if (c.enabled or c.quadratic_radii) and v.metric != "loss":
            raise ValueError(
                "curvature: the Hessian is of the loss, so it needs volume.metric: loss; "
                "set curvature.enabled and curvature.quadratic_radii to false"
            )
        if "thermodynamic" in v.estimators and (v.metric != "loss" or v.filter_norm == "li2018"):
            raise ValueError(
                "volume.estimators: thermodynamic moves along the loss's gradient in the "
                "radii's fixed coordinates, so it needs volume.metric: loss and "
                "volume.filter_norm paper or none; drop thermodynamic otherwise"
            )
        if c.enabled and v.filter_norm == "li2018":
            raise ValueError(
                "curvature.enabled: li2018 rescales each direction by its own norm, so its "
                "radii have no fixed coordinates for a Hessian; use volume.filter_norm "
                "paper or none, or set curvature.enabled: false"
            )
        return self


SMOKE_EPOCHS, SMOKE_DIRECTIONS = 200, 8
SMOKE_PROBES, SMOKE_LANCZOS_STEPS = 4, 16
SMOKE_CHAINS, SMOKE_STEPS, SMOKE_WHITENING_DIRECTIONS = 16, 6, 200


def smoke_variant(spec: SweepSpec) -> SweepSpec:
    """The documented small form of any sweep (CLI `--smoke`): the two smallest extra
    sizes, the first batch size, optimizer, SAM rho and seed, at most 200 epochs and 8
    directions, at most 4 curvature probes of 16 Lanczos steps, and ladders of at most
    16 chains, 6 moves a rung and 200 whitening directions, under the name
    `<name>-smoke`."""
    d, t, v, c, ladder = spec.dataset, spec.train, spec.volume, spec.curvature, spec.thermodynamic
    epochs = min(t.epochs, SMOKE_EPOCHS)
    small = spec.model_copy(
        update={
            "name": f"{spec.name}-smoke",
            "dataset": d.model_copy(update={"extra_sizes": d.extra_sizes[:2]}),
            "train": t.model_copy(
                update={
                    "epochs": epochs,
                    "checkpoint_epochs": [e for e in t.checkpoint_epochs if e < epochs],
                    "batch_sizes": t.batch_sizes[:1],
                    "optimizers": t.optimizers[:1],
                    "sam_rhos": t.sam_rhos[:1],
                    "seeds": t.seeds[:1],
                }
            ),
            "volume": v.model_copy(
                update={"directions": min(v.directions, SMOKE_DIRECTIONS), "shard_size": 4}
            ),
            "curvature": c.model_copy(
                update={
                    "probes": min(c.probes, SMOKE_PROBES),
                    "lanczos_steps": min(c.lanczos_steps, SMOKE_LANCZOS_STEPS),
                }
            ),  # fmt: skip
            "thermodynamic": ladder.model_copy(
                update={
                    "chains": min(ladder.chains, SMOKE_CHAINS),
                    "steps": min(ladder.steps, SMOKE_STEPS),
                    "whitening_directions": min(
                        ladder.whitening_directions or SMOKE_WHITENING_DIRECTIONS,
                        SMOKE_WHITENING_DIRECTIONS,
                    ),
                }
            ),
        }
    )
    return SweepSpec.model_validate(small.model_dump(mode="json"))  # every rule still holds


def load_spec(source: str | Path | dict) -> SweepSpec:
    """Read and validate a spec from a YAML path (or a dict); raise SpecError naming
    the first bad field."""
    if isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        if not path.is_file():
            raise SpecError(f"spec file {path} does not exist: pass the path of a sweep YAML")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise SpecError(f"{path} is not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise SpecError(f"{path} must hold a mapping with name, dataset, model, ...")
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if not first["loc"]:  # a rule across fields: its message starts with the field
            raise SpecError(f"spec field {message}") from None
        field = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            raise SpecError(
                f"spec field {field}: {_unknown(first['loc'], first['input'])}"
            ) from None
        got = (
            f" (got {first['input']!r})" if "input" in first and first["type"] != "missing" else ""
        )
        raise SpecError(f"spec field {field}: {message}{got}") from None


def _unknown(location: tuple, value: object) -> str:
    """Why a field is refused, with the known field of its section it is nearest to, in
    the form that field takes (a list where it is one)."""
    section = SweepSpec
    for part in location[:-1]:
        section = section.model_fields[str(part)].annotation
    known = list(section.model_fields)
    close = difflib.get_close_matches(str(location[-1]), known, n=1, cutoff=0.6)
    if not close:
        return f"unknown field; the section's fields are {known}"
    wanted = section.model_fields[close[0]].annotation
    if get_origin(wanted) is list and not isinstance(value, list):
        value = [value]
    shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")
    return f"unknown field; did you mean `{close[0]}: {shown}`?"


@dataclass(frozen=True)
class Trial:
    """One model to train: base + `extra` samples, with one batch size, optimizer and seed."""

    model_id: str
    extra: int
    train_size: int
    batch_size: int | None  # None: full batch
    optimizer: str
    sam_rho: float
    seed: int

    @property
    def optimizer_label(self) -> str:
        return f"{self.optimizer}+sam{self.sam_rho:g}" if self.sam_rho > 0 else self.optimizer

    def model_ids(self, checkpoint_epochs: list[int]) -> list[str]:
        """The final model's id, then one per kept epoch."""
        return [self.model_id, *(checkpoint_id(self.model_id, e) for e in checkpoint_epochs)]


def checkpoint_id(model_id: str, epoch: int) -> str:
    """The id of a trial's weights kept at `epoch`."""
    return f"{model_id}-e{epoch}"


@dataclass(frozen=True)
class Pair:
    """One model measured in one landscape: base + the first `landscape_extra` samples."""

    model_id: str
    landscape_extra: int
    landscape_size: int


def plan_trials(spec: SweepSpec) -> list[Trial]:
    """Every trial: extra sizes x batch sizes x optimizers x SAM rhos x seeds."""
    trials = []
    for extra in spec.dataset.extra_sizes:
        for batch in spec.train.batch_sizes:
            for optimizer in spec.train.optimizers:
                for rho in spec.train.sam_rhos:
                    for seed in spec.train.seeds:
                        size = None if batch == "full" else batch
                        label = f"{optimizer}+sam{rho:g}" if rho > 0 else optimizer
                        model_id = f"n{spec.dataset.base_size + extra}-b{batch}-{label}-s{seed}"
                        trials.append(
                            Trial(model_id, extra, spec.dataset.base_size + extra, size,
                                  optimizer, rho, seed)
                        )  # fmt: skip
    ids = [t.model_id for t in trials]
    if len(set(ids)) != len(ids):
        raise SpecError("train.sam_rhos: two values print alike (:g); make them differ more")
    return trials


def plan_pairs(spec: SweepSpec, trials: list[Trial], landscapes_use_extras: bool) -> list[Pair]:
    """Each model in every landscape no larger than its training set; poison and noise
    models in the clean base only."""
    base = spec.dataset.base_size
    pairs = []
    for trial in trials:
        sizes = [e for e in spec.dataset.extra_sizes if e <= trial.extra]
        for model_id in trial.model_ids(spec.train.checkpoint_epochs):
            for extra in sizes if landscapes_use_extras else [0]:
                pairs.append(Pair(model_id, extra, base + extra))
    return pairs
