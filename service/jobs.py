"""Where batch jobs live: files (batch input, output and error files), batches, and each request's
result, behind a narrow interface (`JobStore`) that the runner (service/job_runner.py) and the
routes (service/api_batch.py) use. `SqliteJobStore` is the embedded default: one SQLite database
and a folder of files under LIMOE_JOBS_DIR. docs/BATCH.md says how PostgreSQL and object storage
would replace it for several replicas.

Results are keyed by (batch, line): storing a line's result twice keeps the first, so a server
killed in the middle of a job and restarted never writes a request twice; finishing writes the
output and error files from the stored results in input order.

Faults (docs/BATCH.md, "When the jobs store fails"). Every failed operation raises `StoreFault`
(503 jobs_store_fault to a client) with its reason: disk_full, read_only, damaged, missing or io,
counted by the store's `StoreEvents`. The SQLite store also mends what it can by itself:
- a database found damaged when the server starts (it fails SQLite's quick_check, or a file the
  store made is empty) is never opened in place: it is moved aside to
  `jobs.sqlite3.damaged-<time>` with its WAL, what can still be read of it is salvaged into a new
  database (its files, its finished batches; an unfinished batch is failed, naming the file, as
  its stored results cannot be trusted), and the move is logged and counted;
- a database deleted (or replaced) while the server runs is noticed before the next operation and
  written anew from the connection still open on it, so nothing stored is lost.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import sqlite3
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO, Callable, Protocol

from service.errors import ServiceError

log = logging.getLogger("limoe.service")

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")  # a runner works on these
FINISHED = ("failed", "completed", "expired", "cancelled")
STATUSES = ACTIVE + FINISHED


class JobsUnavailable(Exception):
    """The jobs directory cannot be used (not writable, or another server holds it)."""


class StoreFault(ServiceError):
    """A jobs store operation failed. `reason`: disk_full, read_only, damaged, missing or io."""

    status, code = 503, "jobs_store_fault"
    headers = {"Retry-After": "30"}

    def __init__(self, reason: str, detail: str):
        super().__init__(f"the batch jobs store failed ({reason}: {detail}); batches keep their results and go on "
                         "when it works again; interactive requests are unaffected")
        self.reason = reason


def fault_reason(e: BaseException) -> str:
    """What kind of fault an OSError or sqlite3.Error is."""
    if isinstance(e, OSError):
        return {errno.ENOSPC: "disk_full", errno.EDQUOT: "disk_full", errno.EFBIG: "disk_full",
                errno.EROFS: "read_only", errno.EACCES: "read_only", errno.EPERM: "read_only",
                errno.ENOENT: "missing"}.get(e.errno, "io")
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        primary = code & 0xFF
        for reason, codes in (("disk_full", ("SQLITE_FULL",)), ("read_only", ("SQLITE_READONLY", "SQLITE_PERM")),
                              ("damaged", ("SQLITE_CORRUPT", "SQLITE_NOTADB")), ("missing", ("SQLITE_CANTOPEN",))):
            if primary in {getattr(sqlite3, c) for c in codes}:
                return reason
    text = str(e).lower()
    if "full" in text:
        return "disk_full"
    if "readonly" in text or "read-only" in text:
        return "read_only"
    return "damaged" if "malformed" in text or "not a database" in text else "io"


def fault_detail(e: BaseException) -> str:
    """The error's own words, without a path."""
    return (e.strerror or str(e)) if isinstance(e, OSError) else str(e)


@dataclass
class StoreEvents:
    """What a store reports, for the metrics (service/job_runner.py wires them)."""

    fault: Callable[[str], None] = lambda reason: None  # an operation failed, for `reason`
    ok: Callable[[], None] = lambda: None  # an operation succeeded
    recovered: Callable[[str], None] = lambda reason: None  # a damaged or deleted database was mended


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

    def report(self, e: BaseException) -> StoreFault:
        """The StoreFault for an OSError met while writing a `staging()` path (counted)."""

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

    def __init__(self, root: Path, ttl_s: float, events: StoreEvents | None = None):
        self.root, self.ttl_s = Path(root), ttl_s
        self.events = events or StoreEvents()
        self.files = self.root / "files"
        self._db_path = self.root / "jobs.sqlite3"
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="limoe-jobs-db")
        self._conn: sqlite3.Connection | None = None
        self._ident: tuple[int, int] | None = None  # (device, inode) of the file the connection has open
        self._lock_fd: int | None = None
        self.set_aside: Path | None = None  # where a damaged database found at start-up was moved

    @classmethod
    def open(cls, root: Path, ttl_s: float, events: StoreEvents | None = None) -> SqliteJobStore:
        """The store in `root` (created), locked for this process; JobsUnavailable if it cannot be.
        A damaged database is moved aside and salvaged (the module's doc)."""
        store = cls(root, ttl_s, events)
        try:
            (store.files / "tmp").mkdir(parents=True, exist_ok=True)
            fd = os.open(store.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            store.events.fault(fault_reason(e))
            raise JobsUnavailable(f"cannot use LIMOE_JOBS_DIR={root}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise JobsUnavailable(f"LIMOE_JOBS_DIR={root} is in use by another server") from None
        store._lock_fd = fd
        for leftover in (store.files / "tmp").iterdir():  # uploads and outputs cut short by a crash
            leftover.unlink(missing_ok=True)
        try:
            if (why := store._damage()) is not None:
                store._set_aside_and_salvage(why)
            store._db()
        except OSError as e:
            store._release_lock()
            store.events.fault(fault_reason(e))
            raise JobsUnavailable(f"cannot use LIMOE_JOBS_DIR={root}: {e.strerror}") from None
        except sqlite3.Error as e:
            store._release_lock()
            store.events.fault(fault_reason(e))
            raise JobsUnavailable(f"cannot use LIMOE_JOBS_DIR={root}: {e}") from None
        return store

    # -- plumbing ---------------------------------------------------------------------------------------
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            # autocommit, BEGIN where needed; opened by `open`, then used on the store's one thread
            conn = sqlite3.connect(self._db_path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")  # in WAL mode: durable across process crashes
                conn.executescript(_SCHEMA)
            except BaseException:
                conn.close()
                raise
            st = os.stat(self._db_path)
            self._conn, self._ident = conn, (st.st_dev, st.st_ino)
        return self._conn

    def _guarded(self, fn, *args):
        """fn(*args) on the store's thread, after making sure the database is still where it was."""
        self._check_file()
        return fn(*args)

    async def _run(self, fn, *args):
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._thread, self._guarded, fn, *args)
        except (OSError, sqlite3.Error) as e:
            if self._conn is not None and self._conn.in_transaction:
                await asyncio.get_running_loop().run_in_executor(self._thread, self._rollback)
            raise self.report(e) from e
        self.events.ok()
        return result

    def _rollback(self) -> None:
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def report(self, e: BaseException) -> StoreFault:
        reason = fault_reason(e)
        if reason == "io":  # SQLite says only "disk I/O error": ask the file system why
            try:
                st = os.statvfs(self.root)
                reason = "read_only" if st.f_flag & os.ST_RDONLY else "disk_full" if st.f_bavail == 0 else reason
            except OSError:
                pass
        log.warning("jobs store: %s (%s)", fault_detail(e), reason)
        self.events.fault(reason)
        return StoreFault(reason, fault_detail(e))

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    async def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._thread, shut)
        self._thread.shutdown(wait=True)
        self._release_lock()

    # -- damage and deletion ----------------------------------------------------------------------------
    def _damage(self) -> str | None:
        """Why the database on disk cannot be trusted, or None (also when there is none yet)."""
        if not self._db_path.exists():
            return None
        if self._db_path.stat().st_size == 0:  # the store's databases always hold their schema
            return "the file is empty"
        try:
            conn = sqlite3.connect(f"file:{self._db_path}?mode=ro", uri=True)
            try:
                verdict = [row[0] for row in conn.execute("PRAGMA quick_check")]
                for (doc,) in conn.execute("SELECT doc FROM batches"):
                    json.loads(doc)
            finally:
                conn.close()
        except sqlite3.Error as e:
            if fault_reason(e) != "damaged":
                raise  # not damage: the directory or the disk (JobsUnavailable)
            return str(e)
        except ValueError:
            return "a batch's row is not valid JSON"
        return None if verdict == ["ok"] else "; ".join(verdict[:3])

    def _set_aside_and_salvage(self, why: str) -> None:
        """Move the damaged database (and its WAL) aside, never writing to it, and start a new
        one with what can still be read of it."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        aside = self._db_path.with_name(f"{self._db_path.name}.damaged-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self._db_path}{suffix}")
            if src.exists():
                os.replace(src, f"{aside}{suffix}")
        self.set_aside = aside
        salvaged = self._salvage(aside)
        log.error("jobs store: %s was damaged (%s) and is moved aside to %s; salvaged %d files and %d batches, "
                  "%d unfinished batches failed", self._db_path.name, why, aside.name, *salvaged)
        self.events.recovered("damaged")

    def _salvage(self, aside: Path) -> tuple[int, int, int]:
        """Copy what is readable of `aside` into a new database: (files, batches, failed batches)."""
        files: list[tuple] = []
        batches: list[Batch] = []
        self._read_damaged(aside, files, batches)
        if not files and not batches:  # a header that lies about its size (a truncated file), or garbled
            mended = aside.with_name(aside.name + ".mended")
            try:
                mended.write_bytes(_mended_header(aside.read_bytes()))
                self._read_damaged(mended, files, batches)
            finally:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{mended}{suffix}").unlink(missing_ok=True)
        files = [f for f in files if len(f) == len(fields(FileMeta)) and self._path_ok(f[0])]
        failed = 0
        message = (f"the jobs database was found damaged when the server started and moved aside to {aside.name}; "
                   "this batch's stored results cannot be trusted: submit it again")
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        for f in files:
            db.execute("INSERT OR IGNORE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)", f)
        for b in batches:
            if b.active:
                now = time.time()
                b = Batch(**{**asdict(b), "status": "failed", "failed_at": now, "ended_at": now,
                             "errors": [{"code": "jobs_store_damaged", "message": message, "line": None,
                                         "param": None}]})
                failed += 1
            db.execute("INSERT OR IGNORE INTO batches (id, owner, status, ended_at, doc) VALUES (?, ?, ?, ?, ?)",
                       (b.id, b.owner, b.status, b.ended_at, _doc(b)))
        db.execute("COMMIT")
        return len(files), len(batches), failed

    @staticmethod
    def _read_damaged(path: Path, files: list[tuple], batches: list[Batch]) -> None:
        """Append the readable rows of a damaged database's files and batches, never writing to it."""
        try:  # read-only: SQLite never writes to it
            old = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            old.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error:
            try:  # immutable: not even its WAL is read
                old = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
            except sqlite3.Error:
                return
        try:
            for query, rows in (("SELECT * FROM files", files), ("SELECT doc FROM batches", batches)):
                try:
                    for row in old.execute(query):
                        try:
                            rows.append(row if rows is files else Batch(**json.loads(row[0])))
                        except (ValueError, TypeError):
                            continue
                except sqlite3.Error:
                    continue  # the rest of the table is unreadable
        finally:
            old.close()

    def _path_ok(self, file_id: Any) -> bool:
        try:
            return isinstance(file_id, str) and self._path(file_id).is_file()
        except ValueError:
            return False

    def _check_file(self) -> None:
        """If the database file was deleted or replaced under the open connection, write it anew
        from that connection (which still reads the old file), so nothing stored is lost. A file
        put in its place is moved aside, not overwritten."""
        if self._conn is None:
            return
        try:
            st = os.stat(self._db_path)
            if (st.st_dev, st.st_ino) == self._ident:
                return
            stray = self._db_path.with_name(f"{self._db_path.name}.replaced-{time.strftime('%Y%m%dT%H%M%S')}")
            os.replace(self._db_path, stray)
            log.error("jobs store: %s was replaced while the server ran; the new file is moved aside to %s",
                      self._db_path.name, stray.name)
        except FileNotFoundError:
            log.error("jobs store: %s was deleted while the server ran; writing it again from the open connection",
                      self._db_path.name)
        fresh = self._db_path.with_name(self._db_path.name + ".rewrite")
        fresh.unlink(missing_ok=True)
        copy = sqlite3.connect(fresh)
        try:
            self._conn.backup(copy)
        finally:
            copy.close()
        self._conn.close()  # checkpoints into the deleted file and removes its WAL
        self._conn = None
        os.replace(fresh, self._db_path)
        self._db()
        self.events.recovered("missing")

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
        batch = _batch(doc)
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
        batch = Batch(**{**asdict(_batch(row[0])), **changes})
        db.execute("UPDATE batches SET status = ?, ended_at = ?, doc = ? WHERE id = ?",
                   (batch.status, batch.ended_at, _doc(batch), batch_id))

    async def update_batch(self, batch_id: str, **changes: Any) -> None:
        await self._run(self._update, batch_id, changes)

    async def active_batches(self) -> list[Batch]:
        def select() -> list[Batch]:
            marks = ",".join("?" * len(ACTIVE))
            rows = self._db().execute(f"SELECT doc FROM batches WHERE status IN ({marks}) ORDER BY seq", ACTIVE)
            return [_batch(doc) for (doc,) in rows.fetchall()]

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

        await self._run(lambda: None)  # the database is where it was (the export opens it by name)
        try:
            return await asyncio.to_thread(export)
        except (OSError, sqlite3.Error) as e:
            raise self.report(e) from e

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
            reading = {_batch(doc).input_file_id
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


def _mended_header(data: bytes) -> bytes:
    """A damaged database's bytes with the first 100 (the header) made consistent with what is
    left: SQLite's magic string, and the page count of the bytes there are (a truncated file's
    header still counts the pages it lost, and SQLite then reads none)."""
    head = bytearray(data[:100].ljust(100, b"\0"))
    head[0:16] = b"SQLite format 3\0"
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page if page >= 512 and page & (page - 1) == 0 else 4096
    head[16:18] = (1 if page == 65536 else page).to_bytes(2, "big")
    head[28:32] = (len(data) // page).to_bytes(4, "big")
    head[92:96] = head[24:28]  # the page count is valid for this change counter
    return bytes(head) + data[100:len(data) // page * page]


def _batch(doc: str) -> Batch:
    try:
        return Batch(**json.loads(doc))
    except (ValueError, TypeError) as e:
        raise sqlite3.DatabaseError(f"database disk image is malformed (a batch's row: {e})") from None
