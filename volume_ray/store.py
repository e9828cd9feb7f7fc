"""The result store: `<storage>/<sweep name>/`, Parquet and JSON only, written atomically.

Layout (DESIGN section 5):
- `spec.yaml`        the validated spec, as it was run;
- `models.parquet`   one row per trained model; per-model rows live in `models/` first;
- `checkpoints/`     one state dict per model (`torch.load(weights_only=True)`);
- `radii/`           a Parquet dataset, one file per finished shard, named by its
                     directions (`shard_name`);
- `curvature.parquet` one row per (model, landscape): the Hessian spectrum (DESIGN §7);
                     per-pair rows live in `curvature/` first;
- `thermodynamic/`   per (model, landscape, threshold) restraint ladder: its whitening
                     and one file per finished rung (`ladder_name`);
- `volumes.parquet`  one row per (model, landscape, metric, threshold, estimator);
- `tune/`            Ray Tune's experiment folders (resumable training states).

`storage` is a local path (on a multi-node cluster: one that every node mounts) or any
pyarrow filesystem URI: `s3://bucket/prefix`, `gs://bucket/prefix`, `file:///path`
(see `locations`). Every file is written whole or not at all (`write_atomic`), so a
crash leaves the old file or the new one; a rerun finds finished work and skips it.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pyarrow import fs

from volume_ray.locations import (
    Location,
    exists,
    is_uri,
    join,
    list_files,
    locate,
    names_in,
    read_bytes,
    sizes_in,
    split,
    write_atomic,
)

__all__ = ["PARQUET_MIN_BYTES", "SweepStore", "read_tensors", "write_table"]

# The smallest file a Parquet reader can open: the 'PAR1' header, the 4-byte length of
# the footer and the 'PAR1' trailer. Anything shorter is an empty or cut-off file.
PARQUET_MIN_BYTES = 12
# A rung's columns but the chains' states (n numbers a chain): what an estimate reads.
RUNG_LIGHT_COLUMNS = ["chain", "k", "step", "acceptance", "radius_searches",
                      "loss_evaluations", "radius", "trace"]  # fmt: skip
SHARD_READERS = 16  # shards read at once by `read_radii`: on S3 each is a round trip
_SHARD_COUNT = re.compile(r".+__L\d+__d\d+-(\d+)\.parquet")  # the `count` of `shard_name`


def read_tensors(location: Location) -> dict:
    """A torch file of tensors and plain values (a state dict, a training state), local
    or at a URI, loaded with `weights_only`: never pickled code."""
    import torch  # the store is also read where torch is not needed

    data = read_bytes(location)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def write_table(
    frame: pd.DataFrame, path: Location, metadata: dict[str, str] | None = None
) -> Location:
    """Write `frame` to the Parquet file `path` (local or URI) atomically, with optional
    key-value `metadata` in its schema; return the path."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    write_atomic(path, lambda sink: pq.write_table(table, sink))
    return path


class SweepStore:
    """The folder of one sweep, and what is already finished in it.

    `location` (a str: the absolute path or the URI) is what travels to Ray actors and
    Tune. `root` and the paths below it are `Path`s for a local store, so callers may
    use them as files; for a URI store they are URIs, read through this module."""

    def __init__(self, storage: Location, name: str):
        base = storage if is_uri(storage) else os.path.abspath(storage)
        self.root = join(base, name)
        self.location = str(self.root)
        self.spec_path = join(self.root, "spec.yaml")
        self.models_path = join(self.root, "models.parquet")
        self.model_rows = join(self.root, "models")
        self.checkpoints = join(self.root, "checkpoints")
        self.radii = join(self.root, "radii")
        self.volumes_path = join(self.root, "volumes.parquet")
        self.curvature_rows = join(self.root, "curvature")
        self.curvature_path = join(self.root, "curvature.parquet")
        self.ladders = join(self.root, "thermodynamic")
        self.tune = join(self.root, "tune")

    @classmethod
    def at(cls, location: Location) -> SweepStore:
        """The store whose sweep folder is `location` (`<storage>/<name>`)."""
        return cls(*split(location))

    # -- the spec ---------------------------------------------------------------------

    def claim(self, spec_dict: dict, canonical=lambda recorded: recorded) -> None:
        """Record the spec, or check it matches the one already recorded: one store
        never mixes results of two different specs (resources, and the estimators that
        aggregate the radii, may change freely). `canonical` fills in the defaults of
        fields the recorded spec predates."""
        if exists(self.spec_path):
            recorded = canonical(self.recorded_spec())
            if _results_part(recorded) != _results_part(spec_dict):
                raise ValueError(
                    f"{self.location} already holds sweep '{spec_dict['name']}' run with a "
                    "different spec; rename the sweep or pick another --storage to keep both"
                )
            if recorded == spec_dict:
                return
        text = yaml.safe_dump(spec_dict, sort_keys=False).encode()  # as it is run now
        write_atomic(self.spec_path, lambda sink: sink.write(text))

    def recorded_spec(self) -> dict:
        try:
            return yaml.safe_load(read_bytes(self.spec_path))
        except FileNotFoundError:
            raise ValueError(f"{self.location} holds no sweep: spec.yaml is missing") from None

    # -- models -----------------------------------------------------------------------

    def checkpoint_path(self, model_id: str) -> Location:
        return join(self.checkpoints, f"{model_id}.pt")

    def write_checkpoint(self, model_id: str, source: str | os.PathLike) -> None:
        """Copy a local state dict file into the store, atomically."""
        data = Path(source).read_bytes()
        write_atomic(self.checkpoint_path(model_id), lambda sink: sink.write(data))

    def read_state_dict(self, checkpoint: str) -> dict:
        """The state dict at `checkpoint`, relative to the sweep folder as in
        models.parquet, read through the store's filesystem: any node that sees the
        store can load it."""
        return read_tensors(join(self.root, *checkpoint.split("/")))

    def write_model_row(self, row: dict) -> None:
        write_table(pd.DataFrame([row]), join(self.model_rows, f"{row['model_id']}.parquet"))

    def finished_models(self) -> pd.DataFrame:
        """Rows of the models whose row and checkpoint are both in the store."""
        saved_names = names_in(self.checkpoints, ".pt")
        filesystem, rows = list_files(self.model_rows, ".parquet")
        frames = []
        for path in rows:
            frame = _read_model_row(filesystem, path)
            if f"{frame.model_id.iloc[0]}.pt" in saved_names:
                frames.append(frame)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def write_models(self) -> pd.DataFrame:
        models = self.finished_models()
        write_table(models, self.models_path)
        return models

    # -- radii shards -----------------------------------------------------------------

    @staticmethod
    def shard_name(model_id: str, landscape_size: int, start: int, count: int) -> str:
        return f"{model_id}__L{landscape_size}__d{start:07d}-{count}.parquet"

    def shard_path(self, model_id: str, landscape_size: int, start: int, count: int) -> Location:
        return join(self.radii, self.shard_name(model_id, landscape_size, start, count))

    def finished_shards(self) -> set[str]:
        """Names of the finished shard files in `radii/`, from one listing of names and
        sizes: on an object store, opening 10,000 shards to check them would cost 10,000
        requests. Shards are written whole (`write_atomic`), so a file under its final
        name is finished unless it is too small to be Parquet at all (as a copy killed
        midway may leave): that one is measured again. Damage past that can only come
        from outside, and `read_radii` names it."""
        sizes = sizes_in(self.radii, ".parquet")
        return {name for name, size in sizes.items() if size >= PARQUET_MIN_BYTES}

    def read_radii(self) -> pd.DataFrame:
        """Every shard's rows, each file checked on the way: it must be a readable shard
        holding one row per direction its name counts and per threshold of the recorded
        spec. A file that fails says which and how to fix it, never a quiet gap."""
        filesystem, files = list_files(self.radii, ".parquet")
        if not files:
            return pd.DataFrame()
        per_direction = len(self.recorded_spec()["volume"]["thresholds"])

        def read(path: str) -> pa.Table:
            location = join(self.radii, posixpath.basename(path))
            return _read_shard(filesystem, path, location, per_direction)

        with ThreadPoolExecutor(SHARD_READERS) as pool:
            tables = list(pool.map(read, files))
        return pa.concat_tables(tables, promote_options="default").to_pandas()

    # -- curvature ----------------------------------------------------------------------

    @staticmethod
    def curvature_name(model_id: str, landscape_size: int, settings: str) -> str:
        """A pair's spectrum file; `settings` names the budget that computed it, so that
        rows of another budget are never mixed in."""
        return f"{model_id}__L{landscape_size}__{settings}.parquet"

    def write_curvature_row(self, row: dict, settings: str) -> None:
        """One (model, landscape) pair's spectrum, atomically: a rerun skips it."""
        name = self.curvature_name(row["model_id"], row["landscape_size"], settings)
        write_table(pd.DataFrame([row]), join(self.curvature_rows, name))

    def written_curvature(self) -> set[str]:
        """File names in `curvature/`, from one listing."""
        return names_in(self.curvature_rows, ".parquet")

    def write_curvature(self, settings: str) -> pd.DataFrame:
        """curvature.parquet from the per-pair rows of these `settings` (none: no file)."""
        filesystem, files = list_files(self.curvature_rows, f"__{settings}.parquet")
        if not files:
            return pd.DataFrame()
        table = pq.ParquetDataset(files, filesystem=filesystem).read().to_pandas()
        table = table.sort_values(["model_id", "landscape_size"], ignore_index=True)
        write_table(table, self.curvature_path)
        return table

    # -- thermodynamic ladders ---------------------------------------------------------

    @staticmethod
    def ladder_name(model_id: str, landscape_size: int, threshold: float, settings: str) -> str:
        """One (model, landscape, threshold) ladder at a budget (`settings`); its files
        are `<name>__whitening.parquet` and `<name>__rung<index>.parquet`."""
        return f"{model_id}__L{landscape_size}__T{threshold!r}__{settings}"

    def ladder_files(self) -> set[str]:
        """Names of the finished files in `thermodynamic/`, from one listing (as
        `finished_shards`: a file too short to be Parquet is not finished)."""
        sizes = sizes_in(self.ladders, ".parquet")
        return {name for name, size in sizes.items() if size >= PARQUET_MIN_BYTES}

    def write_whitening(self, ladder: str, matrix: np.ndarray, cost: dict[str, int]) -> None:
        """A ladder's whitening A (dense: one row per matrix row; diagonal: one row),
        with `cost`, what finding it took (radius searches, loss evaluations)."""
        metadata = {"volume_ray.dense": str(matrix.ndim == 2)}
        metadata |= {f"volume_ray.{k}": str(v) for k, v in cost.items()}
        frame = pd.DataFrame({"row": pd.Series(list(np.atleast_2d(matrix)), dtype=object)})
        write_table(frame, join(self.ladders, f"{ladder}__whitening.parquet"), metadata)

    def read_whitening(self, ladder: str) -> np.ndarray:
        """The whitening A that `write_whitening` wrote."""
        table = self._read_ladder_file(f"{ladder}__whitening.parquet")
        rows = np.stack(table.column("row").to_numpy(zero_copy_only=False))
        return rows if table.schema.metadata[b"volume_ray.dense"] == b"True" else rows[0]

    def whitening_cost(self, ladder: str) -> dict[str, int]:
        """What finding a ladder's whitening took, from its file's footer alone."""
        metadata = self._read_ladder_file(f"{ladder}__whitening.parquet", schema=True).metadata
        keys = ("radius_searches", "loss_evaluations")
        return {key: int(metadata[f"volume_ray.{key}".encode()]) for key in keys}

    def write_empty_ladder(self, ladder: str, reason: str) -> None:
        """Mark a ladder whose basin is empty (the threshold at or below the base loss)."""
        write_table(
            pd.DataFrame({"reason": [reason]}), join(self.ladders, f"{ladder}__empty.parquet")
        )

    def write_rung(self, ladder: str, index: int, columns: dict) -> None:
        """One finished rung of a ladder (`Rung.to_columns`), atomically; then the rung
        before it loses its chains' states (n numbers a chain, all but the last rung's
        are never read again), rewritten whole: a crash in between leaves them there."""
        write_table(pd.DataFrame(columns), join(self.ladders, _rung_name(ladder, index)))
        if index > 0:
            before = _rung_name(ladder, index - 1)
            light = self._read_ladder_file(before, columns=RUNG_LIGHT_COLUMNS)
            write_atomic(join(self.ladders, before), lambda sink: pq.write_table(light, sink))

    def read_rungs(self, ladder: str, finished: set[str]) -> list[dict]:
        """The ladder's rungs 0, 1, ... as far as they run without a gap in `finished`
        (`ladder_files`), as column dicts; only the last with the chains' states."""
        count = 0
        while _rung_name(ladder, count) in finished:
            count += 1
        rungs = []
        for index in range(count):
            states = None if index == count - 1 else RUNG_LIGHT_COLUMNS
            rungs.append(
                self._read_ladder_file(_rung_name(ladder, index), columns=states).to_pydict()
            )
        return rungs

    def _read_ladder_file(
        self, name: str, *, columns: list[str] | None = None, schema: bool = False
    ) -> pa.Table | pa.Schema:
        """One ladder file (its `columns`, or only its `schema`), or a clear error: they
        are written whole, so one that cannot be read was damaged from outside."""
        filesystem, path = locate(join(self.ladders, name))
        try:
            if schema:
                with filesystem.open_input_file(path) as source:
                    return pq.read_schema(source)
            return pq.read_table(path, filesystem=filesystem, columns=columns)
        except (OSError, pa.ArrowInvalid) as error:
            raise RuntimeError(
                f"the ladder file {join(self.ladders, name)} cannot be read ({error}): it was "
                "damaged from outside the sweep. Delete it; a rerun computes it again."
            ) from None


def _rung_name(ladder: str, index: int) -> str:
    return f"{ladder}__rung{index:04d}.parquet"


def _results_part(spec_dict: dict) -> dict:
    """What decides the stored radii and models: everything but where they are computed,
    which estimators aggregate them (volumes.parquet is rewritten whole each time) and
    the curvature and ladder budgets (their files are kept per budget), save the
    quadratic radii."""
    part = {k: v for k, v in spec_dict.items() if k not in ("resources", "thermodynamic")}
    volume = {k: v for k, v in part.get("volume", {}).items() if k != "estimators"}
    quadratic = (part.get("curvature") or {}).get("quadratic_radii", False)
    return {**part, "volume": volume, "curvature": {"quadratic_radii": quadratic}}


def _read_shard(
    filesystem: fs.FileSystem, path: str, location: Location, per_direction: int
) -> pa.Table:
    """One shard's rows, or a clear error: shards are written whole, so a file that is
    no shard, cannot be read or holds other rows was damaged or put there from outside."""
    named = _SHARD_COUNT.fullmatch(posixpath.basename(path))
    if named is None:
        raise RuntimeError(
            f"{location} is not named as a radii shard "
            "(<model>__L<size>__d<start>-<count>.parquet); move it out of radii/"
        )
    try:
        table = pq.read_table(path, filesystem=filesystem)
        problem = None
    except (OSError, pa.ArrowInvalid) as error:
        problem = f"cannot be read ({error})"
    rows = int(named[1]) * per_direction
    if problem is None and table.num_rows != rows:
        problem = (
            f"holds {table.num_rows} rows, not the {rows} of {named[1]} directions x "
            f"{per_direction} thresholds"
        )
    if problem:
        raise RuntimeError(
            f"the radii shard {location} {problem}: it was damaged or replaced from outside "
            "the sweep. Delete it; a rerun measures its directions again."
        )
    return table


def _read_model_row(filesystem: fs.FileSystem, path: str) -> pd.DataFrame:
    """One trained model's row. Rows are written whole, so one that cannot be read was
    damaged from outside: say so rather than quietly train that model again."""
    try:
        frame = pq.read_table(path, filesystem=filesystem).to_pandas()
    except (OSError, pa.ArrowInvalid) as error:
        raise RuntimeError(
            f"the model row {path} cannot be read ({error}); delete it and its checkpoint "
            "to train that model again, or restore both from a copy"
        ) from None
    if len(frame) != 1 or "model_id" not in frame:
        raise RuntimeError(
            f"the model row {path} holds no single model row; delete it and its checkpoint "
            "to train that model again"
        )
    return frame
