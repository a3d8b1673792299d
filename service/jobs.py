"""Where batch jobs live: files (batch input, output and error files), batches, and each request's
result, behind a narrow interface (`JobStore`) that the runner (service/job_runner.py) and the
routes (service/api_batch.py) use. `SqliteJobStore` is the embedded default: one SQLite database
and a folder of files under LIMOE_JOBS_DIR. docs/BATCH.md says how PostgreSQL and object storage
would replace it for several replicas.

Results are keyed by (batch, line): storing a line's result twice keeps the first, so a server
killed in the middle of a job and restarted never writes a request twice; finishing writes the
output and error files from the stored results in input order.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sqlite3
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO, Protocol

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")  # a runner works on these
FINISHED = ("failed", "completed", "expired", "cancelled")
STATUSES = ACTIVE + FINISHED


class JobsUnavailable(Exception):
    """The jobs directory cannot be used (not writable, or another server holds it)."""


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


@dataclass
class FileMeta:
    id: str
    owner: str  # sha256 of the API key that uploaded it; "" without keys
    purpose: str  # batch (uploaded) or batch_output (written by a batch)
    filename: str
    bytes: int
    created_at: float
    expires_at: float

    def to_api(self) -> dict[str, Any]:
        """The OpenAI file object."""
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": int(self.created_at),
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "expires_at": int(self.expires_at)}


@dataclass
class Batch:
    id: str
    owner: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: float
    expires_at: float  # the end of the completion window: an unfinished batch then expires
    metadata: dict[str, str] | None = None
    errors: list[dict[str, Any]] | None = None  # why validation failed, one entry per problem
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    failed_at: float | None = None
    expired_at: float | None = None
    cancelling_at: float | None = None
    cancelled_at: float | None = None
    ended_at: float | None = None  # when it reached a finished status; the TTL counts from here
    total: int = 0  # requests in the input file, once validated
    completed: int = 0  # requests answered 2xx (in the output file)
    failed: int = 0  # the others (in the error file)
    model_versions: dict[str, str] | None = None  # model name -> the version the batch pinned (job_runner)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def to_api(self) -> dict[str, Any]:
        """The OpenAI batch object."""
        def ts(v: float | None) -> int | None:
            return None if v is None else int(v)

        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": ts(self.created_at), "in_progress_at": ts(self.in_progress_at),
            "expires_at": ts(self.expires_at), "finalizing_at": ts(self.finalizing_at),
            "completed_at": ts(self.completed_at), "failed_at": ts(self.failed_at),
            "expired_at": ts(self.expired_at), "cancelling_at": ts(self.cancelling_at),
            "cancelled_at": ts(self.cancelled_at),
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata, "model_versions": self.model_versions}


class JobStore(Protocol):
    """What batch jobs need from storage. Every method may be called from the event loop; those
    that touch storage are coroutines (the SQLite store runs them in a thread of its own)."""

    # files
    def staging(self) -> Path: """A fresh local path to write a file to before `put_file`."""
    async def put_file(self, meta: FileMeta, staged: Path) -> None: """Store `staged` (moved) as `meta`."""
    async def get_file(self, file_id: str) -> FileMeta | None: ...
    def open_file(self, file_id: str) -> BinaryIO: """The file's bytes (blocking reads: use a thread)."""
    async def delete_file(self, file_id: str) -> bool: ...
    async def file_in_use(self, file_id: str) -> bool: """An unfinished batch reads it."""

    # batches
    async def create_batch(self, batch: Batch) -> None: ...
    async def get_batch(self, batch_id: str) -> Batch | None: """With live request counts while active."""
    async def list_batches(self, owner: str, after: str | None, limit: int) -> list[Batch]: """Newest first."""
    async def update_batch(self, batch_id: str, **changes: Any) -> None: ...
    async def active_batches(self) -> list[Batch]: ...
    async def count_by_status(self) -> dict[str, int]: ...

    # one result per request line
    async def put_result(self, batch_id: str, line: int, custom_id: str | None, ok: bool, record: bytes) -> bool:
        """Store a line's output record; False (and nothing changes) when the line has one already."""
    async def done_lines(self, batch_id: str) -> set[int]: ...
    async def export_results(self, batch_id: str, ok: bool, dest: Path) -> int:
        """Write the records of the lines that succeeded (`ok`) or failed, in line order, as JSONL."""
    async def finish(self, batch_id: str, changes: dict[str, Any], files: list[tuple[FileMeta, Path]]) -> None:
        """Store the batch's output files, apply `changes` (its final status) and drop its results."""

    # expiry
    async def expire(self, now: float) -> tuple[int, int]:
        """Delete files past their expires_at (unless an unfinished batch reads them) and finished
        batches whose TTL has passed: (files, batches) deleted."""

    async def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, purpose TEXT NOT NULL, filename TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, owner TEXT NOT NULL, status TEXT NOT NULL,
    ended_at REAL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS batches_by_owner ON batches (owner, seq);
CREATE TABLE IF NOT EXISTS results (
    batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT, ok INTEGER NOT NULL, record BLOB NOT NULL,
    PRIMARY KEY (batch_id, line)) WITHOUT ROWID;
"""


class SqliteJobStore:
    """SQLite (WAL) in LIMOE_JOBS_DIR/jobs.sqlite3, files in LIMOE_JOBS_DIR/files. One server
    per directory: `open` takes an exclusive lock (released by the kernel however the process
    ends, SIGKILL included). All statements run on one thread; a batch's row is its JSON
    document plus the columns that queries select on."""

    def __init__(self, root: Path, ttl_s: float):
        self.root, self.ttl_s = Path(root), ttl_s
        self.files = self.root / "files"
        self._db_path = self.root / "jobs.sqlite3"
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="limoe-jobs-db")
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None

    @classmethod
    def open(cls, root: Path, ttl_s: float) -> SqliteJobStore:
        """The store in `root` (created), locked for this process; JobsUnavailable if it cannot be."""
        store = cls(root, ttl_s)
        try:
            (store.files / "tmp").mkdir(parents=True, exist_ok=True)
            fd = os.open(store.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise JobsUnavailable(f"cannot use LIMOE_JOBS_DIR={root}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise JobsUnavailable(f"LIMOE_JOBS_DIR={root} is in use by another server") from None
        store._lock_fd = fd
        for leftover in (store.files / "tmp").iterdir():  # uploads and outputs cut short by a crash
            leftover.unlink(missing_ok=True)
        return store

    # -- plumbing ---------------------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self._db_path, isolation_level=None)  # autocommit; BEGIN where needed
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # in WAL mode: durable across process crashes
            conn.executescript(_SCHEMA)
            self._conn = conn
        return self._conn

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await self._run(shut)
        self._thread.shutdown(wait=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def _path(self, file_id: str) -> Path:
        if not file_id.replace("-", "").replace("_", "").isalnum():  # ids become file names
            raise ValueError(f"bad file id {file_id!r}")
        return self.files / file_id

    # -- files ------------------------------------------------------------------------------------------
    def staging(self) -> Path:
        return self.files / "tmp" / uuid.uuid4().hex

    async def put_file(self, meta: FileMeta, staged: Path) -> None:
        def put() -> None:
            os.replace(staged, self._path(meta.id))  # atomic: a file is whole or absent
            self._db().execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)", _file_row(meta))

        await self._run(put)

    async def get_file(self, file_id: str) -> FileMeta | None:
        def get() -> FileMeta | None:
            row = self._db().execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
            return None if row is None else FileMeta(*row)

        return await self._run(get)

    def open_file(self, file_id: str) -> BinaryIO:
        return open(self._path(file_id), "rb")

    async def delete_file(self, file_id: str) -> bool:
        def delete() -> bool:
            deleted = self._db().execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
            self._path(file_id).unlink(missing_ok=True)
            return bool(deleted)

        return await self._run(delete)

    async def file_in_use(self, file_id: str) -> bool:
        return any(b.input_file_id == file_id for b in await self.active_batches())

    # -- batches ----------------------------------------------------------------------------------------
    async def create_batch(self, batch: Batch) -> None:
        await self._run(lambda: self._db().execute(
            "INSERT INTO batches (id, owner, status, ended_at, doc) VALUES (?, ?, ?, ?, ?)",
            (batch.id, batch.owner, batch.status, batch.ended_at, _doc(batch))))

    def _load(self, doc: str) -> Batch:
        batch = Batch(**json.loads(doc))
        if batch.active:  # live counts
            for ok, n in self._db().execute("SELECT ok, count(*) FROM results WHERE batch_id = ? GROUP BY ok",
                                            (batch.id,)):
                if ok:
                    batch.completed = n
                else:
                    batch.failed = n
        return batch

    async def get_batch(self, batch_id: str) -> Batch | None:
        def get() -> Batch | None:
            row = self._db().execute("SELECT doc FROM batches WHERE id = ?", (batch_id,)).fetchone()
            return None if row is None else self._load(row[0])

        return await self._run(get)

    async def list_batches(self, owner: str, after: str | None, limit: int) -> list[Batch]:
        def select() -> list[Batch]:
            if after is None:
                rows = self._db().execute("SELECT doc FROM batches WHERE owner = ? ORDER BY seq DESC LIMIT ?",
                                          (owner, limit))
            else:  # an unknown cursor selects nothing (seq < NULL)
                rows = self._db().execute(
                    "SELECT doc FROM batches WHERE owner = ? AND seq < (SELECT seq FROM batches WHERE id = ? AND "
                    "owner = ?) ORDER BY seq DESC LIMIT ?", (owner, after, owner, limit))
            return [self._load(doc) for (doc,) in rows.fetchall()]

        return await self._run(select)

    def _update(self, batch_id: str, changes: dict[str, Any]) -> None:
        db = self._db()
        row = db.execute("SELECT doc FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None:
            return
        batch = Batch(**{**json.loads(row[0]), **changes})
        db.execute("UPDATE batches SET status = ?, ended_at = ?, doc = ? WHERE id = ?",
                   (batch.status, batch.ended_at, _doc(batch), batch_id))

    async def update_batch(self, batch_id: str, **changes: Any) -> None:
        await self._run(self._update, batch_id, changes)

    async def active_batches(self) -> list[Batch]:
        def select() -> list[Batch]:
            marks = ",".join("?" * len(ACTIVE))
            rows = self._db().execute(f"SELECT doc FROM batches WHERE status IN ({marks}) ORDER BY seq", ACTIVE)
            return [Batch(**json.loads(doc)) for (doc,) in rows.fetchall()]

        return await self._run(select)

    async def count_by_status(self) -> dict[str, int]:
        def count() -> dict[str, int]:
            return dict(self._db().execute("SELECT status, count(*) FROM batches GROUP BY status").fetchall())

        return await self._run(count)

    # -- results ----------------------------------------------------------------------------------------
    async def put_result(self, batch_id: str, line: int, custom_id: str | None, ok: bool, record: bytes) -> bool:
        def put() -> bool:
            cur = self._db().execute("INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?)",
                                     (batch_id, line, custom_id, int(ok), record))
            return cur.rowcount == 1

        return await self._run(put)

    async def done_lines(self, batch_id: str) -> set[int]:
        def select() -> set[int]:
            return {line for (line,) in self._db().execute("SELECT line FROM results WHERE batch_id = ?",
                                                            (batch_id,))}

        return await self._run(select)

    async def export_results(self, batch_id: str, ok: bool, dest: Path) -> int:
        def export() -> int:
            # a connection of its own, on another thread: a large export does not hold up the others
            conn = sqlite3.connect(self._db_path)
            n = 0
            try:
                with open(dest, "wb") as out:
                    for (record,) in conn.execute("SELECT record FROM results WHERE batch_id = ? AND ok = ? "
                                                  "ORDER BY line", (batch_id, int(ok))):
                        out.write(record + b"\n")
                        n += 1
                    out.flush()
                    os.fsync(out.fileno())
            finally:
                conn.close()
            return n

        return await asyncio.to_thread(export)

    async def finish(self, batch_id: str, changes: dict[str, Any], files: list[tuple[FileMeta, Path]]) -> None:
        def finish() -> None:
            for meta, staged in files:
                os.replace(staged, self._path(meta.id))
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                for meta, _ in files:
                    db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)", _file_row(meta))
                self._update(batch_id, changes)
                db.execute("DELETE FROM results WHERE batch_id = ?", (batch_id,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._run(finish)

    # -- expiry -----------------------------------------------------------------------------------------
    async def expire(self, now: float) -> tuple[int, int]:
        def expire() -> tuple[int, int]:
            db = self._db()
            marks = ",".join("?" * len(ACTIVE))
            reading = {json.loads(doc)["input_file_id"]
                       for (doc,) in db.execute(f"SELECT doc FROM batches WHERE status IN ({marks})", ACTIVE)}
            gone = [fid for (fid,) in db.execute("SELECT id FROM files WHERE expires_at < ?", (now,)).fetchall()
                    if fid not in reading]
            for fid in gone:
                db.execute("DELETE FROM files WHERE id = ?", (fid,))
                self._path(fid).unlink(missing_ok=True)
            old = [bid for (bid,) in db.execute("SELECT id FROM batches WHERE ended_at < ?",
                                                (now - self.ttl_s,)).fetchall()]
            for bid in old:
                db.execute("DELETE FROM batches WHERE id = ?", (bid,))
                db.execute("DELETE FROM results WHERE batch_id = ?", (bid,))
            return len(gone), len(old)

        return await self._run(expire)


def _file_row(meta: FileMeta) -> tuple:
    return tuple(getattr(meta, f.name) for f in fields(FileMeta))


def _doc(batch: Batch) -> str:
    return json.dumps(asdict(batch))
