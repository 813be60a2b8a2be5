"""Load a table from a DataFrame, CSV, Parquet, JSONL or a Hugging Face dataset."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

from dplm.datasets import load_census
from dplm.errors import DplmError

READERS = {
    ".csv": pd.read_csv,
    ".parquet": pd.read_parquet,
    ".pq": pd.read_parquet,
    ".jsonl": lambda p: pd.read_json(p, lines=True),
    ".json": pd.read_json,
}


def load_table(source, as_text: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """A pandas DataFrame from any supported source; `"census"` is the bundled census table.

    `source` may be a DataFrame, a `datasets.Dataset`, or a path (optionally compressed,
    e.g. `.csv.gz`). A CSV's `as_text` columns are read as written ("007" stays "007").
    """
    if isinstance(source, pd.DataFrame):
        df = source.copy()
    elif type(source).__name__ == "Dataset" and hasattr(source, "to_pandas"):
        df = source.to_pandas()
    elif str(source) == "census":
        df = load_census()
    else:
        df = _read_file(Path(source), as_text)
    if len(df) == 0 or len(df.columns) == 0:
        raise DplmError(f"table '{_name(source)}' is empty; give a table with at least one row and column")
    df.columns = [str(c) for c in df.columns]
    return df.reset_index(drop=True)


WRITERS = {
    ".csv": lambda df, path: df.to_csv(path, index=False),
    ".parquet": lambda df, path: df.to_parquet(path, index=False),
    ".jsonl": lambda df, path: df.to_json(path, orient="records", lines=True, date_format="iso", force_ascii=False),
}


def write_table(df, path: str | Path) -> None:
    """Write CSV, Parquet or JSONL by the file's extension, atomically: a failed write leaves
    no partial file."""
    path = check_output_file(path)
    writer = WRITERS[path.suffix.lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    os.close(fd)
    try:
        writer(df, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path: str | Path, content: str | bytes) -> Path:
    """Write a file whole or not at all (a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content if isinstance(content, bytes) else content.encode())
    tmp.replace(path)
    return path


def check_output_file(path: str | Path) -> Path:
    """The path, if its extension names a format `write_table` writes; else a one-line error."""
    path = Path(path)
    if path.suffix.lower() not in WRITERS:
        raise DplmError(f"output file '{path}': unknown format '{path.suffix}'; use .csv, .parquet or .jsonl")
    return path


def _read_file(path: Path, as_text=()) -> pd.DataFrame:
    if not path.exists():
        raise DplmError(f"data file '{path}' not found; check the path")
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".zip", ".xz", ".zst")]
    reader = READERS.get(suffixes[-1].lower() if suffixes else "")
    if reader is None:
        raise DplmError(f"data file '{path}': unknown format; use .csv, .parquet, .jsonl or .json (optionally .gz)")
    try:
        if reader is pd.read_csv:
            return pd.read_csv(path, dtype={c: str for c in as_text})
        return reader(path)
    except pd.errors.EmptyDataError:
        raise DplmError(f"table '{path}' is empty; give a table with at least one row and column") from None
    except Exception as e:  # a reader's own message, on one line
        raise DplmError(f"data file '{path}' could not be read: {str(e).splitlines()[0]}") from None


def _name(source) -> str:
    return source if isinstance(source, (str, Path)) else type(source).__name__
