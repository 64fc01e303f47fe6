"""Read training data from the forms people have it in.

Accepted: a list (or tuple) of examples; a Hugging Face ``datasets.Dataset``, a
``DatasetDict`` (its ``train`` split) or an ``IterableDataset`` (read as a stream); a pandas
``DataFrame``; a path or glob of JSON Lines, JSON, CSV or Parquet files. ``columns=`` maps
the data's column names onto the names nbpeft reads, in either direction: ``{"question":
"prompt"}`` (data column → nbpeft's name, as ``datasets.rename_columns``) or ``{"prompt":
"question"}``; the names decide which, and a mapping that reads both ways is refused.

Every row keeps a name for error messages: ``row 7`` for in-memory data, ``chat.jsonl
line 8`` for files. ``datasets``, pandas and pyarrow are optional: data in their forms
comes from them, and reading Parquet files is the one place nbpeft needs pyarrow itself.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

FIELDS = ("prompt", "response", "text", "label", "messages")
FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Source:
    """Rows to read, with a name for each (``where(i)``) and their count (None for a stream)."""

    rows: Iterable[Any]
    length: int | None
    where: Callable[[int], str]
    batches: bool = False  # already tokenised batches (a DataLoader or dicts with input_ids)


def _row_name(i: int) -> str:
    return f"row {i}"


def read(data: Any, columns: dict[str, str] | None = None, caller: str = "train()") -> Source:
    """The rows of ``data`` in any accepted form, with ``columns`` renamed."""
    _check_columns(columns, caller)
    source = _open(data, caller)
    if columns and not source.batches:
        source.rows = _renamed(source, columns, caller)
    return source


def _open(data: Any, caller: str) -> Source:
    if isinstance(data, (str, os.PathLike)):
        return _files(data, caller)
    package = type(data).__module__.split(".")[0]
    kind = type(data).__name__
    if package == "datasets":
        if kind in ("DatasetDict", "IterableDatasetDict"):
            if "train" not in data:
                raise ConfigError(f"{caller}: this {kind} has no 'train' split (it has {', '.join(data)}); "
                                  f"pass one split, e.g. data['{next(iter(data), 'train')}']")
            data, kind = data["train"], type(data["train"]).__name__
        if kind == "Dataset":
            return Source(data.to_list(), len(data), _row_name)
        if kind == "IterableDataset":
            return Source(data, None, _row_name)
    if package == "pandas" and kind == "DataFrame":
        return Source(data.to_dict("records"), len(data), _row_name)
    if isinstance(data, (list, tuple)):
        if data and isinstance(data[0], dict) and _is_batch(data[0].get("input_ids")):
            return Source(data, len(data), _row_name, batches=True)
        return Source(list(data), len(data), _row_name)
    if isinstance(data, (bytes, dict)) or not isinstance(data, Iterable):
        raise ConfigError(f"{caller}: cannot read data of type {type(data).__name__}; pass a list of examples, "
                          "a datasets.Dataset, a pandas DataFrame, a file path or glob, or a DataLoader")
    length = len(data) if hasattr(data, "__len__") else None
    return Source(data, length, _row_name, batches=True)


def _is_batch(input_ids: Any) -> bool:
    """Whether ``input_ids`` holds a whole batch (rows of ids), not one example's ids."""
    if hasattr(input_ids, "dim"):
        return input_ids.dim() >= 2
    return isinstance(input_ids, (list, tuple)) and bool(input_ids) and isinstance(input_ids[0], (list, tuple))


def _check_columns(columns: Any, caller: str) -> None:
    if columns is None:
        return
    if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
        raise ConfigError(f"{caller}: columns= maps the data's column names to nbpeft's, "
                          "e.g. columns={'question': 'prompt', 'answer': 'response'}")


def _ours_to_theirs(columns: dict[str, str], seen: list[str], caller: str) -> dict[str, str]:
    """``columns`` as nbpeft's name → the data's column, whichever way round it was given.

    The direction follows from the names: the data's columns (``seen``, from the first row)
    on one side and the names nbpeft reads (``FIELDS``) on the other.
    """
    flipped = {theirs: ours for ours, theirs in columns.items()}
    ours_first = all(k in FIELDS for k in columns) and all(v in seen for v in columns.values())
    theirs_first = all(k in seen for k in columns) and all(v in FIELDS for v in columns.values())
    if ours_first and theirs_first and columns != flipped:
        raise ConfigError(f"{caller}: columns={columns!r} reads both ways: the data has columns named as nbpeft's "
                          f"fields ({', '.join(n for n in seen if n in FIELDS)}); rename the data's columns first")
    if theirs_first:
        return flipped
    if ours_first:
        return dict(columns)
    unknown = [n for n in [*columns, *columns.values()] if n not in seen and n not in FIELDS]
    what = (f"{unknown[0]!r} is neither a column of the data nor a name nbpeft reads" if unknown
            else "it mixes both directions")
    raise ConfigError(f"{caller}: columns={columns!r}: {what}; map each data column to one of {', '.join(FIELDS)}, "
                      f"e.g. columns={{'question': 'prompt'}} (the data's columns are {', '.join(map(str, seen)) or 'none'})")


def _renamed(source: Source, columns: dict[str, str], caller: str) -> Iterable[Any]:
    mapping: dict[str, str] = {}

    def rename(i: int, row: Any) -> Any:
        if not isinstance(row, dict):
            return row
        if not mapping:  # the first row's columns decide the direction
            mapping.update(_ours_to_theirs(columns, list(row), caller))
        missing = [theirs for theirs in mapping.values() if theirs not in row]
        if missing:
            raise ConfigError(f"{caller}: {source.where(i)} has no column {missing[0]!r} (named in columns=); "
                              f"its columns are {', '.join(map(str, row)) or 'none'}")
        out = {k: v for k, v in row.items() if k not in mapping.values()}
        out.update({ours: row[theirs] for ours, theirs in mapping.items()})
        return out

    if source.length is not None:
        return [rename(i, row) for i, row in enumerate(source.rows)]
    return _Renamed(source.rows, rename)


class _Renamed:
    """A stream renamed row by row each time it is read."""

    def __init__(self, rows: Iterable[Any], rename: Callable[[int, Any], Any]) -> None:
        self.rows, self.rename = rows, rename

    def __iter__(self) -> Iterator[Any]:
        for i, row in enumerate(self.rows):
            yield self.rename(i, row)


# ---------------------------------------------------------------- files


def _files(path: str | os.PathLike, caller: str) -> Source:
    text = os.fspath(path)
    if any(ch in text for ch in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file()]
        if not paths:
            raise ConfigError(f"{caller}: no file matches {text!r}; check the pattern")
    else:
        one = Path(text)
        if one.is_dir():
            raise ConfigError(f"{caller}: {text!r} is a folder; pass a file or a glob such as '{one / '*.jsonl'}'")
        if not one.is_file():
            raise ConfigError(f"{caller}: {text} does not exist; check the path (data= takes a path, a glob or a list of examples)")
        paths = [one]
    rows: list[Any] = []
    names: list[str] = []
    for p in paths:
        suffix = p.suffix.lower()
        if suffix not in FILE_TYPES:
            raise ConfigError(f"{caller}: cannot read {p.name}: nbpeft reads {', '.join(FILE_TYPES)} files")
        for name, row in _READERS[suffix](p, caller):
            rows.append(row)
            names.append(name)
    if not rows:
        raise ConfigError(f"{caller}: {text!r} holds no rows; add examples to the file")
    return Source(rows, len(rows), lambda i: names[i])


def _jsonl(path: Path, caller: str) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path.name} line {n}", json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{caller}: {path.name} line {n} is not valid JSON ({err.msg} at column {err.colno}); "
                                  "fix that line (one JSON object per line)") from None


def _json(path: Path, caller: str) -> Iterator[tuple[str, Any]]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{caller}: {path.name} line {err.lineno} is not valid JSON ({err.msg}); fix the file") from None
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))  # {"data": [...]}
    if not isinstance(value, list):
        raise ConfigError(f"{caller}: {path.name} holds a {type(value).__name__}; a .json file must hold a list of examples")
    for i, row in enumerate(value):
        yield f"{path.name} item {i}", row


def _csv(path: Path, caller: str) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, []))
                raise ConfigError(f"{caller}: {path.name} line {reader.line_num} has {fields} "
                                  f"fields, the header {len(reader.fieldnames or [])}; fix that line")
            yield f"{path.name} line {reader.line_num}", row


def _parquet(path: Path, caller: str) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{caller}: reading Parquet files needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise ConfigError(f"{caller}: {path.name} is not a readable Parquet file ({str(err).splitlines()[0]})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path.name} row {i}", row


_READERS = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}
