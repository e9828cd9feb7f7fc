"""Reading a sweep's store into pandas: the tables of DESIGN section 5."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds

__all__ = ["TABLES", "load_table"]

TABLES = ("models", "radii", "volumes")


def load_table(sweep: str | os.PathLike, table: str, *, where: str | None = None) -> pd.DataFrame:
    """`models`, `radii` or `volumes` of the sweep folder `sweep`, optionally filtered
    by a pandas query such as "threshold == 0.1 and estimator == 'paper'"."""
    if table not in TABLES:
        raise ValueError(f"table must be one of {TABLES}, got {table!r}")
    path = Path(sweep) / (table if table == "radii" else f"{table}.parquet")
    if not path.exists():
        raise ValueError(f"{path} does not exist: run the sweep (volume-ray run SPEC) first")
    if table == "radii":
        files = sorted(str(p) for p in path.glob("*.parquet"))
        frame = (
            ds.dataset(files, format="parquet").to_table().to_pandas() if files else pd.DataFrame()
        )
    else:
        frame = pd.read_parquet(path)
    if where:
        try:
            frame = frame.query(where)
        except Exception as error:  # pandas raises many kinds for a bad expression
            raise ValueError(
                f"--where {where!r} is not a valid query on {table}: {error}"
            ) from None
    return frame.reset_index(drop=True)
