"""Job history in SQLite (WAL): every job's settings, status, outputs and error, kept across restarts."""

from __future__ import annotations

import contextlib
import errno
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import LanceError

# Columns stored as JSON text.
_JSON_COLUMNS = ("settings", "outputs", "error")
_COLUMNS = ("id", "object", "task", "status", "progress", "created_at", "started_at", "completed_at", "model",
            "prompt", "settings", "outputs", "error", "answer")
ACTIVE = ("queued", "in_progress")
FINISHED = ("completed", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    object TEXT NOT NULL,          -- "image", "video" or "chat.completion"
    task TEXT NOT NULL,            -- t2i, t2v, i2v, image_edit, video_edit, x2t_image, x2t_video
    status TEXT NOT NULL,          -- queued, in_progress, completed, failed, cancelled
    progress INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    completed_at INTEGER,
    model TEXT,
    prompt TEXT,
    settings TEXT NOT NULL,        -- JSON: the request's settings, enough to run it again
    outputs TEXT NOT NULL,         -- JSON list of file names under the outputs folder
    error TEXT,                    -- JSON {"code", "message"} of a failed job
    answer TEXT                    -- the text of an understanding job
);
"""


class StorageError(LanceError):
    """The history database or the output folder's disk failed (full, read-only, I/O error); `code` says which:
    "storage_full" when the disk is full, else "storage_error"."""

    exit_code = 1

    def __init__(self, message: str, code: str = "storage_error"):
        super().__init__(message)
        self.code = code


def storage_error(e: BaseException, what: str) -> StorageError:
    """A database or OS error as a StorageError whose message names what failed but no path."""
    text = str(e).lower()
    full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "full" in text or "space" in text
    kind = "the disk is full" if full else f"{type(e).__name__}: {str(e)[:120]}"
    return StorageError(f"{what} failed: {kind}; free some space on the output folder's disk",
                        "storage_full" if full else "storage_error")


class History:
    """One connection shared by the server's threads under a lock (each statement is short). Every database failure
    is raised as a StorageError."""

    def __init__(self, path: Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10.0)
        self._db.row_factory = sqlite3.Row
        with self._locked("opening the history database"):
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _locked(self, what: str = "writing the job history"):
        with self._lock:
            try:
                yield
            except sqlite3.Error as e:
                raise storage_error(e, what) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def probe(self) -> None:
        """A small write (StorageError if the database cannot take one): tells when a full disk has room again."""
        with self._locked():
            self._db.execute("CREATE TABLE IF NOT EXISTS probe (at REAL)")
            self._db.execute("DELETE FROM probe")
            self._db.execute("INSERT INTO probe VALUES (?)", (time.time(),))

    def add(self, record: Dict[str, Any]) -> None:
        row = {c: _encode(c, record.get(c)) for c in _COLUMNS}
        row["outputs"] = row["outputs"] or "[]"
        row["settings"] = row["settings"] or "{}"
        with self._locked():
            self._db.execute(f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                             [row[c] for c in _COLUMNS])

    def update(self, job_id: str, **fields: Any) -> None:
        unknown = set(fields) - set(_COLUMNS)
        if unknown:
            raise KeyError(f"unknown history columns {sorted(unknown)}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._locked():
            self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", [_encode(k, v) for k, v in fields.items()]
                             + [job_id])

    def get(self, job_id: str) -> Optional[Dict[str, Any]]:
        with self._locked("reading the job history"):
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _decode(row)

    def list(self, limit: int, objects: Optional[tuple] = None, after: Optional[str] = None) -> List[Dict[str, Any]]:
        """Newest first (rowid: insertion order); `after` (an id) continues a listing past that job."""
        where, args = [], []
        if objects:
            where.append(f"object IN ({', '.join('?' * len(objects))})")
            args.extend(objects)
        if after:
            where.append("rowid < (SELECT rowid FROM jobs WHERE id = ?)")
            args.append(after)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        with self._locked("reading the job history"):
            rows = self._db.execute(sql + " ORDER BY rowid DESC LIMIT ?", args + [limit]).fetchall()
        return [_decode(r) for r in rows]

    def delete(self, job_id: str) -> None:
        with self._locked():
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def fail_interrupted(self, reason: str) -> int:
        """Mark jobs left queued or running by a process that died as failed; returns how many."""
        error = _encode("error", {"code": "server_restarted", "message": reason})
        with self._locked():
            cur = self._db.execute(f"UPDATE jobs SET status = 'failed', error = ?, completed_at = ? WHERE status IN "
                                   f"({', '.join('?' * len(ACTIVE))})", [error, int(time.time()), *ACTIVE])
        return cur.rowcount


def _encode(column: str, value: Any) -> Any:
    if column in _JSON_COLUMNS and value is not None:
        return json.dumps(value, ensure_ascii=False)
    return value


def _decode(row: sqlite3.Row) -> Dict[str, Any]:
    out = dict(row)
    for c in _JSON_COLUMNS:
        if out.get(c) is not None:
            out[c] = json.loads(out[c])
    return out


def storage_reason(e: StorageError) -> Dict[str, str]:
    """The {code, message} a storage failure fails a job and degrades the server with."""
    return {"code": e.code, "message": str(e)}


def out_of_space(e: BaseException) -> bool:
    """Whether an error (or what caused it) is a write that found the disk full."""
    while e is not None:
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "no space left" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False
