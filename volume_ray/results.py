"""Reading result stores into pandas: the tables of DESIGN section 5.

A sweep folder may be a local path or any pyarrow filesystem URI (`file:///...`,
`s3://bucket/sweeps/name`, `gs://...`); the Parquet files are read through pyarrow
datasets, so a filter on a large radii table never loads more than it needs.
"""

from __future__ import annotations

import os

import pandas as pd
import pyarrow.dataset as ds
from pyarrow import fs

from volume_ray.locations import join, locate

__all__ = ["TABLES", "joined_volumes", "load_sweeps", "load_table"]

TABLES = ("models", "radii", "volumes", "curvature")


def load_table(
    sweep: str | os.PathLike, table: str, *, where: str | None = None, **equal: object
) -> pd.DataFrame:
    """`models`, `radii`, `volumes` or `curvature` of one sweep folder. `equal` keeps rows whose
    columns equal the given values (landscape_size=100, threshold=0.1, ...); `where`
    is a pandas query for anything else ("log_volume > 0 and estimator == 'paper'")."""
    if table not in TABLES:
        raise ValueError(f"table must be one of {TABLES}, got {table!r}")
    filesystem, root = locate(sweep)
    path = f"{root}/{table}" if table == "radii" else f"{root}/{table}.parquet"
    info = filesystem.get_file_info(path)
    if info.type == fs.FileType.NotFound:
        raise ValueError(f"{sweep}: no {table} table at {path}; run the sweep first")
    dataset = ds.dataset(path, filesystem=filesystem, format="parquet")
    unknown = [c for c in equal if c not in dataset.schema.names]
    if unknown:
        raise ValueError(f"{table} has no column {unknown[0]!r}; columns: {dataset.schema.names}")
    condition = None
    for column, value in equal.items():
        term = ds.field(column) == value
        condition = term if condition is None else condition & term
    frame = dataset.to_table(filter=condition).to_pandas()
    if where:
        try:
            frame = frame.query(where)
        except Exception as error:  # pandas raises many kinds for a bad expression
            raise ValueError(
                f"--where {where!r} is not a valid query on {table}: {error}"
            ) from None
    return frame.reset_index(drop=True)


def load_sweeps(storage: str | os.PathLike, table: str, **equal: object) -> pd.DataFrame:
    """One table of every sweep under a storage root, with a `sweep` column."""
    filesystem, root = locate(storage)
    selector = fs.FileSelector(root, recursive=False)
    frames = []
    for entry in sorted(filesystem.get_file_info(selector), key=lambda e: e.path):
        spec = filesystem.get_file_info(f"{entry.path}/spec.yaml")
        if entry.type == fs.FileType.Directory and spec.type == fs.FileType.File:
            frame = load_table(join(storage, entry.base_name), table, **equal)
            frames.append(frame.assign(sweep=entry.base_name))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def joined_volumes(sweep: str | os.PathLike, **equal: object) -> pd.DataFrame:
    """Volumes joined with their models' facts (train size, seed, test metrics...)."""
    models = load_table(sweep, "models").drop(columns=["n_params"])
    return load_table(sweep, "volumes", **equal).merge(models, on="model_id", how="left")
