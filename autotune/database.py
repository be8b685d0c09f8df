"""The tuning database: an append-only record of (workload, config, measured ms), as in TVM's
MetaSchedule. A workload is a ``TuningKey``: kernel source hash, shapes, dtypes, device name and
library versions, so a new Triton, torch or kiln (or another GPU) tunes again. The best record
of a workload is its lowest time.

SQLite (stdlib ``sqlite3``) by default, one file per cache directory (``tuning.sqlite``), safe for
several processes (WAL, busy timeout); ``MemoryDatabase`` for tests and one-off runs. The fleet's
shared database behind ``kiln serve`` implements the same two methods.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from typing import Protocol

DB_NAME = "tuning.sqlite"


def versions() -> str:
    import torch
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    try:
        from importlib.metadata import version
        kv = version("kiln")
    except Exception:       # noqa: BLE001 - a source checkout without install
        kv = "src"
    return f"torch={torch.__version__};triton={tv};kiln={kv}"


@dataclass(frozen=True)
class TuningKey:
    kernel_hash: str
    shapes: tuple
    dtypes: tuple
    device: str
    versions: str

    @staticmethod
    def make(source: str, shapes, dtypes, device: str, libs: str | None = None) -> "TuningKey":
        return TuningKey(hashlib.sha256(source.encode()).hexdigest()[:24],
                         tuple(tuple(int(d) for d in s) for s in shapes), tuple(str(d) for d in dtypes),
                         device, libs if libs is not None else versions())

    def workload(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


class Database(Protocol):
    def best(self, key: TuningKey) -> tuple[dict, float] | None: ...
    def commit(self, key: TuningKey, measured: list[tuple[dict, float]], tuning_s: float = 0.0) -> None: ...


class MemoryDatabase:
    def __init__(self):
        self.records: dict[str, list[tuple[dict, float]]] = {}

    def best(self, key: TuningKey):
        recs = self.records.get(key.workload())
        return min(recs, key=lambda r: r[1]) if recs else None

    def commit(self, key: TuningKey, measured, tuning_s: float = 0.0) -> None:
        self.records.setdefault(key.workload(), []).extend((dict(c), float(ms)) for c, ms in measured)


class SQLiteDatabase:
    SCHEMA = """CREATE TABLE IF NOT EXISTS records (
        workload TEXT NOT NULL, kernel_hash TEXT, shapes TEXT, dtypes TEXT, device TEXT, versions TEXT,
        config TEXT NOT NULL, ms REAL NOT NULL, tuning_s REAL, created REAL);
        CREATE INDEX IF NOT EXISTS records_workload ON records (workload, ms);"""

    def __init__(self, path: str):
        self.path = path
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
        if path != ":memory:":
            self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(self.SCHEMA)

    def best(self, key: TuningKey):
        with self._lock:
            row = self._conn.execute("SELECT config, ms FROM records WHERE workload = ? ORDER BY ms LIMIT 1",
                                     (key.workload(),)).fetchone()
        return (json.loads(row[0]), row[1]) if row else None

    def commit(self, key: TuningKey, measured, tuning_s: float = 0.0) -> None:
        now, w = time.time(), key.workload()
        rows = [(w, key.kernel_hash, json.dumps(key.shapes), json.dumps(key.dtypes), key.device, key.versions,
                 json.dumps(c, sort_keys=True), float(ms), tuning_s, now) for c, ms in measured]
        with self._lock:
            self._conn.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def count(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]


_OPEN: dict[str, SQLiteDatabase] = {}
_OPEN_LOCK = threading.Lock()


def open_database(where: str) -> Database:
    """A cache directory (its tuning.sqlite), a .sqlite/.db path, ``sqlite:///path`` or ``:memory:``.
    Connections are shared per path within a process."""
    if where == ":memory:":
        return MemoryDatabase()
    if where.startswith("sqlite:///"):
        path = where[len("sqlite:///"):]
    elif "://" in where:
        raise ValueError(f"tuning database {where!r}: only SQLite (a path or sqlite:///path) is built in; "
                         "other SQLAlchemy URLs are served by 'kiln serve'")
    elif where.endswith((".sqlite", ".db")):
        path = where
    else:
        path = os.path.join(where, DB_NAME)
    path = os.path.abspath(path)
    with _OPEN_LOCK:
        db = _OPEN.get(path)
        if db is None:
            db = _OPEN[path] = SQLiteDatabase(path)
        return db
