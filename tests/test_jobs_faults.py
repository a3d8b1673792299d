"""The jobs store under faults (service/jobs.py, "Faults"): a disk that fills while results are
written, a read-only jobs directory, a database truncated or garbled between two runs, and one
deleted while the server runs. Each gives a clear error and a metric, interactive classify keeps
working, no accepted batch is lost, and a damaged file is moved aside, never written in place.

Real SQLite on real file systems: the full disk and the read-only directory are a small tmpfs
mounted by the test (root in a container that allows mounts; elsewhere those two tests skip,
saying so); the rest needs nothing. The app runs on real uvicorn over the fake backend.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import sqlite3
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from servers import metric, uvicorn_thread
from test_batch_jobs import classify_body, create, get_batch, metric_value, png, records, request_line, upload, wait_finished

from service.app import create_app
from service.backends import FakeBackend
from service.jobs import Batch, SqliteJobStore, StoreEvents, StoreFault, fault_reason
from service.settings import Settings

LINES = 40


def settings(jobs_dir: Path, **kw) -> Settings:
    return Settings(**{"warmup": False, "max_batch_size": 8, "max_batch_wait_ms": 2, "jobs_dir": jobs_dir,
                       "jobs_max_lines": 1000, "jobs_concurrency": 1, **kw})


def batch_file(n: int = LINES) -> bytes:
    return "\n".join(request_line(f"r{i}", classify_body(i)) for i in range(n)).encode() + b"\n"


def start_batch(base: str, n: int = LINES) -> str:
    r = upload(base, batch_file(n))
    assert r.status_code == 200, r.text
    r = create(base, r.json()["id"])
    assert r.status_code == 200, r.text
    return r.json()["id"]


def assert_every_line_once(base: str, batch: dict, n: int = LINES) -> None:
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": n, "completed": n, "failed": 0}
    assert [r["custom_id"] for r in records(base, batch["output_file_id"])] == [f"r{i}" for i in range(n)]


def assert_classify_works(base: str) -> None:
    r = httpx.post(f"{base}/v1/classify", json={"images": [png((200, 10, 10))], "labels": ["red", "blue"]},
                   timeout=30)
    assert r.status_code == 200, r.text


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of `size` at `path`, or the test skips (mounting needs root and a container that allows it)."""
    path.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                           text=True)
    except FileNotFoundError:
        pytest.skip("no mount command: the full-disk and read-only tests need a tmpfs")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): the full-disk and read-only tests need one")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)


def fill(path: Path, leave: int) -> Path:
    """A file taking all the free space of `path`'s file system but `leave` bytes."""
    st = os.statvfs(path)
    filler = path / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


# -- how a fault is named ----------------------------------------------------------------------------------

def test_faults_are_named_by_what_the_os_or_sqlite_says(tmp_path):
    assert fault_reason(OSError(errno.ENOSPC, "No space left on device")) == "disk_full"
    assert fault_reason(OSError(errno.EROFS, "Read-only file system")) == "read_only"
    assert fault_reason(OSError(errno.ENOENT, "No such file or directory")) == "missing"
    assert fault_reason(OSError(errno.EIO, "Input/output error")) == "io"
    # real SQLite errors: a database that may not grow past its pages is "full", as on a full disk
    conn = sqlite3.connect(tmp_path / "db")
    conn.execute("CREATE TABLE t (x BLOB)")
    conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
    with pytest.raises(sqlite3.Error) as full:
        conn.execute("INSERT INTO t VALUES (zeroblob(100000))")
    assert fault_reason(full.value) == "disk_full"
    conn.close()
    (tmp_path / "garbage").write_bytes(b"not a database, " * 512)
    with pytest.raises(sqlite3.Error) as notadb:
        sqlite3.connect(tmp_path / "garbage").execute("SELECT * FROM sqlite_master").fetchall()
    assert fault_reason(notadb.value) == "damaged"
    ro = sqlite3.connect(f"file:{tmp_path / 'db'}?mode=ro", uri=True)
    with pytest.raises(sqlite3.Error) as readonly:
        ro.execute("INSERT INTO t VALUES (1)")
    assert fault_reason(readonly.value) == "read_only"
    e = StoreFault("disk_full", "database or disk is full")
    assert (e.status, e.body()["code"], e.headers["Retry-After"]) == (503, "jobs_store_fault", "30")
    assert "disk_full" in e.message and "interactive requests are unaffected" in e.message


# -- a full disk -------------------------------------------------------------------------------------------

def test_a_disk_that_fills_mid_job_pauses_the_batch_until_it_has_room(tmp_path):
    disk = tmp_path / "disk"
    with tmpfs(disk, "2m"):
        app = create_app(settings(disk), backend=FakeBackend(delay_s=0.01))
        with uvicorn_thread(app) as base:
            file_id = upload(base, batch_file()).json()["id"]
            filler = fill(disk, leave=0)
            r = upload(base, batch_file(2))  # no room even for the upload: a clear 503, and nothing left behind
            assert (r.status_code, r.json()["code"]) == (503, "jobs_store_fault"), r.text
            assert "disk_full" in r.json()["error"] and r.headers["Retry-After"]
            assert list((disk / "files" / "tmp").iterdir()) == []
            os.truncate(filler, filler.stat().st_size - 48 * 1024)  # room for the batch and a few results
            r = create(base, file_id)
            assert r.status_code == 200, r.text
            batch_id = r.json()["id"]
            deadline = time.monotonic() + 30
            while metric_value(base, "limoe_jobs_store_faults_total", reason="disk_full") < 2:
                assert time.monotonic() < deadline, "the disk never filled"
                time.sleep(0.05)
            assert metric(base, "limoe_jobs_store_healthy") == 0
            stuck = get_batch(base, batch_id)  # reads work on a full disk
            assert stuck["status"] == "in_progress" and stuck["request_counts"]["completed"] < LINES
            assert_classify_works(base)  # interactive traffic does not touch the store
            filler.unlink()  # the operator makes room: the batch goes on by itself
            batch = wait_finished(base, batch_id, timeout=60)
            assert_every_line_once(base, batch)
            assert metric(base, "limoe_jobs_store_healthy") == 1


# -- a read-only jobs directory ----------------------------------------------------------------------------

def test_a_read_only_jobs_directory_turns_jobs_off_with_its_reason_and_keeps_their_batches(tmp_path):
    disk = tmp_path / "disk"
    with tmpfs(disk, "8m"):
        app = create_app(settings(disk), backend=FakeBackend(delay_s=0.2))
        with uvicorn_thread(app) as base:  # accepted, then the server stops in the middle of it
            batch_id = start_batch(base, 10)
        remount(disk, "ro")
        with uvicorn_thread(create_app(settings(disk), backend=FakeBackend())) as base:
            r = httpx.get(f"{base}/v1/batches/{batch_id}", timeout=10)
            assert (r.status_code, r.json()["code"]) == (503, "jobs_unavailable")
            assert "Read-only file system" in r.json()["error"]
            assert metric_value(base, "limoe_jobs_store_faults_total", reason="read_only") == 1
            assert_classify_works(base)
        remount(disk, "rw")
        with uvicorn_thread(create_app(settings(disk), backend=FakeBackend())) as base:
            assert_every_line_once(base, wait_finished(base, batch_id), 10)


# -- a database damaged between two runs -------------------------------------------------------------------

def garble(path: Path) -> None:
    """Overwrite 16 KiB in the results' pages, past the schema and the batches."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 40_000, len(data) - 24_000):
        data[i] = (data[i] * 7 + 13) & 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def header(path: Path) -> None:
    """Overwrite the magic string that says it is a SQLite database."""
    with open(path, "r+b") as f:
        f.write(b"garbage garbage ")


def empty(path: Path) -> None:
    os.truncate(path, 0)


async def stored_batches(root: Path, unfinished: int, results: int) -> None:
    """`unfinished` batches in progress with `results` results each, and one completed."""
    store = SqliteJobStore.open(root, 3600)
    now = time.time()
    for i in range(unfinished + 1):
        await store.create_batch(Batch(f"batch_{i}", "", "/v1/classify", "file-x", "24h",
                                       "in_progress" if i else "completed", now, now + 3600, total=results))
        for line in range(results if i else 0):
            await store.put_result(f"batch_{i}", line, f"c{line}", True, b'{"ok": true}' + b" " * 300)
    await store.close()


@pytest.mark.parametrize("damage", [garble, truncate, header, empty])
def test_a_damaged_database_is_moved_aside_salvaged_and_reported(tmp_path, damage):
    asyncio.run(stored_batches(tmp_path, unfinished=2, results=3000))
    db = tmp_path / "jobs.sqlite3"
    damage(db)
    damaged = sha(db)
    recovered = []
    store = SqliteJobStore.open(tmp_path, 3600, StoreEvents(recovered=recovered.append))
    try:
        assert recovered == ["damaged"] and store.set_aside is not None
        assert sha(store.set_aside) == damaged  # moved, never written to
        assert store.set_aside.name.startswith("jobs.sqlite3.damaged-")

        async def read() -> list[Batch | None]:
            return [await store.get_batch(f"batch_{i}") for i in range(3)]

        batches = asyncio.run(read())
    finally:
        asyncio.run(store.close())
    if damage is empty:  # nothing to salvage: the move is logged and counted
        assert batches == [None, None, None]
        return
    assert batches[0].status == "completed"
    for b in batches[1:]:  # unfinished: failed, naming where the damaged file is
        assert b.status == "failed" and b.errors[0]["code"] == "jobs_store_damaged"
        assert store.set_aside.name in b.errors[0]["message"]


def test_a_server_started_on_a_damaged_database_serves_jobs_anew(tmp_path):
    asyncio.run(stored_batches(tmp_path, unfinished=1, results=3000))
    garble(tmp_path / "jobs.sqlite3")
    with uvicorn_thread(create_app(settings(tmp_path), backend=FakeBackend())) as base:
        assert metric_value(base, "limoe_jobs_store_recovered_total", reason="damaged") == 1
        old = get_batch(base, "batch_1")
        assert old["status"] == "failed" and old["errors"]["data"][0]["code"] == "jobs_store_damaged"
        assert_every_line_once(base, wait_finished(base, start_batch(base, 5)), 5)
        assert_classify_works(base)
    assert len(list(tmp_path.glob("jobs.sqlite3.damaged-*"))) >= 1


# -- a database deleted while the server runs --------------------------------------------------------------

@pytest.mark.parametrize("what", ["jobs.sqlite3", "jobs.sqlite3*"])
def test_a_database_deleted_while_the_server_runs_is_written_again(tmp_path, what):
    app = create_app(settings(tmp_path), backend=FakeBackend(delay_s=0.05))
    with uvicorn_thread(app) as base:
        batch_id = start_batch(base, 20)
        while get_batch(base, batch_id)["request_counts"]["completed"] < 3:
            time.sleep(0.02)
        for path in tmp_path.glob(what):
            path.unlink()
        batch = wait_finished(base, batch_id)
        assert_every_line_once(base, batch, 20)
        assert metric_value(base, "limoe_jobs_store_recovered_total", reason="missing") == 1
        assert (tmp_path / "jobs.sqlite3").exists()
    with uvicorn_thread(create_app(settings(tmp_path), backend=FakeBackend())) as base:  # and after a restart
        assert_every_line_once(base, get_batch(base, batch_id), 20)
