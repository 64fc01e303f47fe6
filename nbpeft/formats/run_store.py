"""The run store: every ``train()`` run in one SQLite file that outlives the kernel.

Where it lives: ``train(runs=PATH)``, else the ``NBPEFT_RUNS`` environment variable, else
``~/.cache/nbpeft/runs.sqlite`` (under ``$XDG_CACHE_HOME`` when set). ``runs=False`` or
``NBPEFT_RUNS=off`` keeps no record.

Two tables: ``runs`` (one row per run: what trained, on what, how it ended, its final
figures) and ``points`` (one row per step: train loss, eval loss, learning rate, metrics).
A ``meta`` table marks the file as ours, so a foreign SQLite file is refused, never altered.
Every write is one transaction on a short-lived connection: several kernels may share the file.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ENV = "NBPEFT_RUNS"
OFF = ("off", "false", "0", "no", "")
MARK = ("format", "nbpeft-runs/1")
BUSY_TIMEOUT_S = 10.0  # another kernel writing: wait this long for its transaction

# The runs table, column by column; the JSON columns hold dicts.
RUN_COLUMNS = {
    "id": "TEXT PRIMARY KEY", "started": "TEXT", "model": "TEXT", "adapter": "TEXT", "method": "TEXT",
    "method_settings": "TEXT", "options": "TEXT", "data_fingerprint": "TEXT", "data_size": "INTEGER",
    "precision": "TEXT", "device": "TEXT", "trainable": "INTEGER", "total_steps": "INTEGER", "steps": "INTEGER",
    "seconds": "REAL", "tokens_per_s": "REAL", "peak_mem_bytes": "INTEGER", "final_loss": "REAL",
    "final_eval_loss": "REAL", "final_metrics": "TEXT", "adapter_path": "TEXT", "status": "TEXT", "message": "TEXT",
}
JSON_COLUMNS = ("method_settings", "options", "final_metrics")
POINT_COLUMNS = ("step", "loss", "eval_loss", "lr", "tokens", "step_time_s", "elapsed_s", "metrics")
# the store each run of this process was written to (a run may go to another store than the default)
STORES: dict[str, Path] = {}


class StoreError(Exception):
    """The store cannot be read or written: not ours, damaged, or out of reach."""


def default_path() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "nbpeft" / "runs.sqlite"


def location(runs: Any = True) -> Path | None:
    """The store's file for ``runs=`` (True: the environment's choice or the default; False: none)."""
    if runs is False:
        return None
    if runs is not True and runs is not None:
        return Path(os.fspath(runs)).expanduser()
    env = os.environ.get(ENV)
    if env is not None:
        return None if env.strip().lower() in OFF else Path(env).expanduser()
    return default_path()


def _connect(path: Path, create: bool) -> sqlite3.Connection:
    if not create and not path.exists():
        raise FileNotFoundError(path)
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)
        db.row_factory = sqlite3.Row
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "meta" not in tables:
            db.close()
            raise StoreError(f"{path} is an SQLite file of something else; point runs= or {ENV} at another file")
        if not tables:
            with db:
                db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
                db.execute("INSERT INTO meta VALUES (?, ?)", MARK)
                db.execute(f"CREATE TABLE runs ({', '.join(f'{k} {v}' for k, v in RUN_COLUMNS.items())})")
                db.execute("CREATE TABLE points (run_id TEXT, step INTEGER, loss REAL, eval_loss REAL, lr REAL, "
                           "tokens INTEGER, step_time_s REAL, elapsed_s REAL, metrics TEXT, PRIMARY KEY (run_id, step))")
        elif tuple(db.execute("SELECT key, value FROM meta WHERE key=?", MARK[:1]).fetchone() or ()) != MARK:
            db.close()
            raise StoreError(f"{path} is not an nbpeft run store this version reads; point runs= or {ENV} at another file")
        return db
    except (sqlite3.Error, OSError) as err:
        raise StoreError(f"{path}: {err}") from None


def _write(path: Path, statements: Iterable[tuple[str, tuple]]) -> None:
    """Run ``statements`` in one transaction: all of them or none."""
    db = _connect(path, create=True)
    try:
        with db:
            for sql, params in statements:
                db.execute(sql, params)
    except sqlite3.Error as err:
        raise StoreError(f"{path}: {err}") from None
    finally:
        db.close()


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    unknown = set(fields) - set(RUN_COLUMNS)
    if unknown:
        raise ValueError(f"no run column {', '.join(sorted(unknown))}")
    return {k: json.dumps(v) if k in JSON_COLUMNS and v is not None else v for k, v in fields.items()}


def insert_run(path: Path, fields: dict[str, Any]) -> None:
    encoded = _encode(fields)
    _write(path, [(f"INSERT INTO runs ({', '.join(encoded)}) VALUES ({', '.join('?' * len(encoded))})",
                   tuple(encoded.values()))])
    STORES[fields["id"]] = path


def path_of(run_id: str) -> Path | None:
    """The store a run of this process went to, else the default store (a run of an earlier session)."""
    return STORES.get(run_id) or location(True)


def update_run(path: Path, run_id: str, fields: dict[str, Any], points: Iterable[dict[str, Any]] = ()) -> None:
    """Change the run's columns and add its new points, together."""
    fields = _encode(fields)
    statements = [(f"INSERT OR REPLACE INTO points ({', '.join(POINT_COLUMNS)}, run_id) "
                   f"VALUES ({', '.join('?' * (len(POINT_COLUMNS) + 1))})",
                   (*(json.dumps(p[c]) if c == "metrics" else p.get(c) for c in POINT_COLUMNS), run_id))
                  for p in points]
    if fields:
        statements.append((f"UPDATE runs SET {', '.join(f'{k}=?' for k in fields)} WHERE id=?",
                           (*fields.values(), run_id)))
    _write(path, statements)


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for key in JSON_COLUMNS:
        if out.get(key) is not None:
            out[key] = json.loads(out[key])
    return out


def read_runs(path: Path, ids: list[str] | None = None) -> list[dict[str, Any]]:
    """Every run (or those of ``ids``), oldest first; an absent file has none."""
    try:
        db = _connect(path, create=False)
    except FileNotFoundError:
        return []
    try:
        if ids is None:
            rows = db.execute("SELECT * FROM runs ORDER BY started, rowid").fetchall()
        else:
            rows = db.execute(f"SELECT * FROM runs WHERE id IN ({', '.join('?' * len(ids))}) ORDER BY started, rowid",
                              tuple(ids)).fetchall()
        return [_decode(row) for row in rows]
    except sqlite3.Error as err:
        raise StoreError(f"{path}: {err}") from None
    finally:
        db.close()


def read_points(path: Path, run_id: str) -> list[dict[str, Any]]:
    """The run's steps in order: step, loss, eval_loss, lr, tokens, step_time_s, elapsed_s, metrics."""
    try:
        db = _connect(path, create=False)
    except FileNotFoundError:
        return []
    try:
        rows = db.execute(f"SELECT {', '.join(POINT_COLUMNS)} FROM points WHERE run_id=? ORDER BY step",
                          (run_id,)).fetchall()
    except sqlite3.Error as err:
        raise StoreError(f"{path}: {err}") from None
    finally:
        db.close()
    return [{**dict(row), "metrics": json.loads(row["metrics"] or "{}")} for row in rows]
