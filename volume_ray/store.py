"""The result store: `<storage>/<sweep name>/`, Parquet and JSON only, written atomically.

Layout (DESIGN section 5):
- `spec.yaml`        the validated spec, as it was run;
- `models.parquet`   one row per trained model; per-model rows live in `models/` first;
- `checkpoints/`     one state dict per model (`torch.load(weights_only=True)`);
- `radii/`           a Parquet dataset, one file per finished shard;
- `volumes.parquet`  one row per (model, landscape, metric, threshold, estimator).

Every file is written to a temporary name in its folder, flushed, then renamed, so a
crash leaves the old file or the new one; a rerun finds finished work and skips it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

__all__ = ["SweepStore", "write_table"]


def write_table(
    frame: pd.DataFrame, path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write `frame` to the Parquet file `path` atomically, with optional key-value
    `metadata` in its schema; return the path."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    return _atomic(Path(path), lambda sink: pq.write_table(table, sink))


def _atomic(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as sink:
            write(sink)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


class SweepStore:
    """The folder of one sweep, and what is already finished in it."""

    def __init__(self, storage: str | os.PathLike, name: str):
        self.root = Path(storage) / name
        self.spec_path = self.root / "spec.yaml"
        self.models_path = self.root / "models.parquet"
        self.model_rows = self.root / "models"
        self.checkpoints = self.root / "checkpoints"
        self.radii = self.root / "radii"
        self.volumes_path = self.root / "volumes.parquet"

    # -- the spec ---------------------------------------------------------------------

    def claim(self, spec_dict: dict) -> None:
        """Record the spec, or check it matches the one already recorded: one store
        never mixes results of two different specs (resources may change freely)."""
        if self.spec_path.exists():
            recorded = yaml.safe_load(self.spec_path.read_text())
            if _results_part(recorded) != _results_part(spec_dict):
                raise ValueError(
                    f"{self.root} already holds sweep '{spec_dict['name']}' run with a "
                    "different spec; rename the sweep or pick another --storage to keep both"
                )
            return
        text = yaml.safe_dump(spec_dict, sort_keys=False).encode()
        _atomic(self.spec_path, lambda sink: sink.write(text))

    def recorded_spec(self) -> dict:
        if not self.spec_path.exists():
            raise ValueError(f"{self.root} holds no sweep: spec.yaml is missing")
        return yaml.safe_load(self.spec_path.read_text())

    # -- models -----------------------------------------------------------------------

    def checkpoint_path(self, model_id: str) -> Path:
        return self.checkpoints / f"{model_id}.pt"

    def write_checkpoint(self, model_id: str, source: Path) -> None:
        """Copy a state dict file into the store, atomically."""
        data = Path(source).read_bytes()
        _atomic(self.checkpoint_path(model_id), lambda sink: sink.write(data))

    def write_model_row(self, row: dict) -> None:
        write_table(pd.DataFrame([row]), self.model_rows / f"{row['model_id']}.parquet")

    def finished_models(self) -> pd.DataFrame:
        """Rows of the models whose row and checkpoint are both on disk."""
        frames = []
        for path in sorted(self.model_rows.glob("*.parquet")):
            frame = _read_or_none(path)
            if frame is not None and self.checkpoint_path(frame.model_id.iloc[0]).exists():
                frames.append(frame)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def write_models(self) -> pd.DataFrame:
        models = self.finished_models()
        write_table(models, self.models_path)
        return models

    # -- radii shards -----------------------------------------------------------------

    def shard_path(self, model_id: str, landscape_size: int, start: int, count: int) -> Path:
        return self.radii / f"{model_id}__L{landscape_size}__d{start:07d}-{count}.parquet"

    def shard_is_complete(self, path: Path, rows: int) -> bool:
        """A readable shard with the rows it should hold. Anything else (a truncated
        or foreign file) is measured again and atomically replaced."""
        if not path.exists():
            return False
        try:
            return pq.read_metadata(path).num_rows == rows
        except (OSError, pa.ArrowInvalid):
            return False

    def read_radii(self) -> pd.DataFrame:
        files = sorted(self.radii.glob("*.parquet"))
        if not files:
            return pd.DataFrame()
        return pq.ParquetDataset(files).read().to_pandas()


def _results_part(spec_dict: dict) -> dict:
    """What decides the results: everything but where they are computed."""
    return {k: v for k, v in spec_dict.items() if k != "resources"}


def _read_or_none(path: Path) -> pd.DataFrame | None:
    try:
        return pq.read_table(path).to_pandas()
    except (OSError, pa.ArrowInvalid):
        return None
