"""Runs batch jobs (docs/BATCH.md): validates a batch's input file, answers its requests through
the same code as the HTTP route they name (`ENDPOINTS`), at low priority, a few at a time, and
writes the output and error files. Started and stopped with the app (service/app.py).

A batch moves validating -> in_progress -> finalizing -> completed, or to failed (its input file
is not a valid batch), cancelling -> cancelled, or expired (not finished within its completion
window). Every request's result is stored as soon as it is known (`JobStore.put_result`); on
start-up the runner takes up every unfinished batch where it stopped, skipping the requests that
have a result, so a server killed in the middle of a job finishes it after a restart and the
output holds each request exactly once.

A request names its model in its body (`model`, as POST /v1/classify takes it; default: the
server's default model). The first request naming a model pins that model's current version for
the rest of the batch, recorded on the batch (`model_versions`): the batch holds that version
(service.models.Loaded.lease) until it ends, so a rollout that begins meanwhile does not change
its answers. A batch resumed after a restart uses the recorded versions; where one is no longer
loaded, its requests fail with 404 not_found, naming it.

When the store fails (a full disk, a read-only directory: `StoreFault`), a batch stops taking
requests and tries again from where its results stop, waiting longer each time (STORE_RETRY_S),
until the store works or the batch's completion window ends: no accepted batch is lost, and a
request whose result could not be stored is answered again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, BinaryIO, Callable

from service import api_native
from service.engine import Engine
from service.errors import Overloaded, PayloadTooLarge, ServiceError, Unprocessable
from service.jobs import (ACTIVE, FINISHED, STATUSES, Batch, FileMeta, JobStore, JobsUnavailable, SqliteJobStore,
                          StoreEvents, StoreFault, new_id)
from service.metrics import Metrics
from service.models import Loaded, Models, UnknownModel, split_ref
from service.settings import Settings

log = logging.getLogger("limoe.service")

# The routes a batch may name, and what answers one request of it: (status, body), as the route would.
ENDPOINTS: dict[str, Callable[[Engine, Any], Awaitable[tuple[int, dict[str, Any]]]]] = {
    "/v1/classify": api_native.classify_job_request,
}
MAX_LISTED_ERRORS = 100  # validation problems listed in a failed batch's `errors`
STORE_RETRY_S = (0.25, 15.0)  # a batch whose store fails tries again after this, doubling up to the second
READ_AHEAD = 16  # requests parsed per trip to the reading thread


class TooManyBatches(Overloaded):
    code = "too_many_batches"
    headers = {"Retry-After": "60"}


class EmptyFile(Unprocessable):
    code = "empty_file"


class FileTooLarge(PayloadTooLarge):
    code = "file_too_large"


@dataclass
class Line:
    """One request line of an input file."""

    line: int  # 0-based line number in the file (blank lines are skipped, but counted)
    custom_id: str | None
    body: Any  # the JSON body to send to the endpoint
    size: int  # bytes of the line


def line_problem(raw: bytes, endpoint: str, seen: set[str]) -> tuple[str, str, str | None] | None:
    """Why one input line is not a request of a batch for `endpoint` (code, message, param), or
    None. `seen`: the custom_ids so far (this line's is added). The body is not checked here:
    a body the endpoint refuses is that request's own error, in the error file."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return "invalid_json_line", "this line is not valid JSON", None
    if not isinstance(obj, dict):
        return "invalid_json_line", "each line must be a JSON object", None
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "missing_custom_id", "each line needs a non-empty string custom_id", "custom_id"
    if custom_id in seen:
        return "duplicate_custom_id", f"custom_id {custom_id!r} is used by an earlier line", "custom_id"
    seen.add(custom_id)
    if obj.get("method") != "POST":
        return "invalid_method", "method must be POST", "method"
    if obj.get("url") != endpoint:
        return "mismatched_endpoint", f"url must be the batch's endpoint, {endpoint}", "url"
    if "body" not in obj:
        return "missing_body", "each line needs a body", "body"
    return None


def validate_input(f: BinaryIO, endpoint: str, max_lines: int) -> tuple[int, list[dict[str, Any]]]:
    """(requests, problems) of an input file: each problem names its line (1-based). Blocking."""
    seen: set[str] = set()
    problems: list[dict[str, Any]] = []
    total = 0
    for number, raw in enumerate(f):
        if not raw.strip():
            continue
        total += 1
        if total > max_lines:
            return total, [{"code": "too_many_lines", "message": f"more than {max_lines} requests in the file "
                            "(LIMOE_JOBS_MAX_LINES)", "line": number + 1, "param": None}]
        problem = line_problem(raw, endpoint, seen)
        if problem is not None and len(problems) < MAX_LISTED_ERRORS:
            code, message, param = problem
            problems.append({"code": code, "message": message, "line": number + 1, "param": param})
    if total == 0:
        problems.append({"code": "empty_file", "message": "the file holds no requests", "line": None,
                         "param": None})
    return total, problems


def read_requests(lines, skip: set[int], n: int) -> list[Line]:
    """The next `n` requests of `lines` (enumerate over a validated input file) not in `skip`. Blocking."""
    out: list[Line] = []
    for number, raw in lines:
        if number in skip or not raw.strip():
            continue
        obj = json.loads(raw)
        out.append(Line(number, obj["custom_id"], obj["body"], len(raw)))
        if len(out) == n:
            break
    return out


@dataclass
class Job:
    batch: Batch
    task: asyncio.Task | None = None
    stop: str | None = None  # "cancelled" or "expired": stop taking requests, then finish with that status
    lines: set[asyncio.Task] = field(default_factory=set)  # requests in flight
    pins: dict[str, Loaded] = field(default_factory=dict)  # model name -> the version this batch holds
    fault: StoreFault | None = None  # a result could not be stored: stop taking requests, try again

    def release(self) -> None:
        for loaded in self.pins.values():
            loaded.release()
        self.pins.clear()

    def halt(self, status: str) -> None:
        self.stop = self.stop or status
        for t in self.lines:
            t.cancel()  # a request cut short leaves no result: it is in neither file


class JobRunner:
    """The batch jobs of one server: their lifecycle, the TTL cleanup, the metrics. Event loop only."""

    def __init__(self, store: JobStore, models: Models, settings: Settings, metrics: Metrics):
        self.store, self.models, self.settings, self.metrics = store, models, settings, metrics
        self.jobs: dict[str, Job] = {}
        self._cleaner: asyncio.Task | None = None
        self.clean_every_s = min(60.0, max(0.2, settings.jobs_ttl_s / 4))

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Take up every unfinished batch where it stopped; start the cleanup."""
        for batch in await self.store.active_batches():
            log.info("batch %s: resuming (%s)", batch.id, batch.status)
            self.submit(batch)
        await self.count()
        self._cleaner = asyncio.ensure_future(self._clean())

    async def stop(self) -> None:
        """Stop every job where it is (what has a result stays; the rest runs after a restart)."""
        tasks = [j.task for j in self.jobs.values() if j.task] + ([self._cleaner] if self._cleaner else [])
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.store.close()

    def submit(self, batch: Batch) -> None:
        if batch.id not in self.jobs:
            job = self.jobs[batch.id] = Job(batch)
            job.task = asyncio.ensure_future(self._run(job))

    def cancel(self, batch_id: str) -> None:
        if (job := self.jobs.get(batch_id)) is not None:
            job.halt("cancelled")

    async def count(self) -> None:
        """Set limoe_batch_jobs{status} from the store."""
        counts = await self.store.count_by_status()
        for status in STATUSES:
            self.metrics.batch_jobs.labels(status).set(counts.get(status, 0))

    async def active_count(self) -> int:
        counts = await self.store.count_by_status()
        return sum(counts.get(s, 0) for s in ACTIVE)

    # -- files ----------------------------------------------------------------------------------------------
    async def add_file(self, source: BinaryIO, filename: str, owner: str) -> FileMeta:
        """Store an uploaded input file (copied from `source`, which is on disk already)."""
        cap = self.settings.jobs_max_file_bytes
        staged = self.store.staging()

        def copy() -> int:
            with open(staged, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
                out.flush()
                return out.tell()

        try:
            try:
                size = await asyncio.to_thread(copy)
            except OSError as e:
                raise self.store.report(e) from e
            if size == 0:
                raise EmptyFile("the file is empty")
            if size > cap:
                raise FileTooLarge(f"the file is {size} bytes; the limit is {cap} (LIMOE_JOBS_MAX_FILE_BYTES)")
            now = time.time()
            meta = FileMeta(new_id("file-"), owner, "batch", filename, size, now, now + self.settings.jobs_ttl_s)
            await self.store.put_file(meta, staged)
            return meta
        finally:
            staged.unlink(missing_ok=True)

    # -- one batch ------------------------------------------------------------------------------------------
    async def _set(self, job: Job, status: str, **changes: Any) -> None:
        now = time.time()
        changes = {"status": status, **changes}
        if status != "validating":
            changes[f"{status}_at"] = now
        if status in FINISHED:
            changes["ended_at"] = now
        await self.store.update_batch(job.batch.id, **changes)
        job.batch = replace(job.batch, **changes)
        await self.count()

    async def _run(self, job: Job) -> None:
        b = job.batch
        delay = STORE_RETRY_S[0]
        try:
            while True:
                try:
                    await self._advance(job)
                    return
                except StoreFault as e:
                    log.warning("batch %s: %s; trying again in %.2f s", b.id, e.message, delay)
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, STORE_RETRY_S[1])
        except asyncio.CancelledError:  # the server stops: the batch stays as it is, for the restart
            raise
        except Exception:
            log.exception("batch %s failed", b.id)
            try:
                await self._set(job, "failed", errors=[{"code": "internal", "message": "the batch failed on the "
                                                        "server", "line": None, "param": None}])
            except StoreFault:  # stays as stored: a restart takes it up again
                log.error("batch %s: could not be marked failed", b.id)
        finally:
            job.release()
            self.jobs.pop(b.id, None)

    async def _advance(self, job: Job) -> None:
        """Take the batch from the status it has to a finished one. Each step starts from what
        is stored, so after a StoreFault it is run again from the top."""
        b = job.batch
        if job.batch.status == "validating":
            total, problems = await asyncio.to_thread(self._validate, b)
            if problems:
                log.info("batch %s: input file refused (%s)", b.id, problems[0]["message"])
                await self._set(job, "failed", errors=problems)
                return
            if not job.stop:
                await self._set(job, "in_progress", total=total)
        if job.batch.status == "in_progress" and not job.stop:
            await self._wait_warm()
            await self._process(job)
        if job.stop == "cancelled" or job.batch.status == "cancelling":
            await self._finish(job, "cancelled")
        elif job.stop == "expired":
            await self._finish(job, "expired")
        else:
            if job.batch.status != "finalizing":
                await self._set(job, "finalizing")
            await self._finish(job, "completed")

    def _validate(self, b: Batch) -> tuple[int, list[dict[str, Any]]]:
        with self.store.open_file(b.input_file_id) as f:
            return validate_input(f, b.endpoint, self.settings.jobs_max_lines)

    async def _wait_warm(self) -> None:
        while not self.models.ready:
            await asyncio.sleep(0.05)

    async def _requests(self, b: Batch, skip: set[int]) -> AsyncIterator[Line]:
        f = await asyncio.to_thread(self.store.open_file, b.input_file_id)
        try:
            lines = enumerate(f)
            while chunk := await asyncio.to_thread(read_requests, lines, skip, READ_AHEAD):
                for request in chunk:
                    yield request
        finally:
            f.close()

    async def _process(self, job: Job) -> None:
        """Answer the batch's requests that have no result yet, `jobs_concurrency` at a time."""
        b = job.batch
        room = asyncio.Semaphore(self.settings.jobs_concurrency)
        done = await self.store.done_lines(b.id)
        try:
            async with aclosing(self._requests(b, done)) as requests:
                async for request in requests:
                    await room.acquire()
                    if job.stop or job.fault:
                        room.release()
                        break
                    task = asyncio.ensure_future(self._answer(job, request))
                    job.lines.add(task)
                    task.add_done_callback(lambda t: (job.lines.discard(t), room.release()))
            await asyncio.gather(*job.lines, return_exceptions=True)
        finally:
            for t in job.lines:
                t.cancel()
        if (fault := job.fault) is not None:
            job.fault = None
            raise fault

    async def _engine(self, job: Job, payload: Any) -> Engine:
        """The engine of the model a request names, at the version the batch pinned for it (see
        the module's doc): pinned on first use, held until the batch ends, and recorded."""
        ref = payload.get("model") if isinstance(payload, dict) else None
        name, version = split_ref(ref if isinstance(ref, str) else None)
        name = name or self.models.default
        if version is not None:  # the request pins a version itself
            return self.models.resolve(name, version).engine
        if (loaded := job.pins.get(name)) is not None:
            return loaded.engine
        recorded = (job.batch.model_versions or {}).get(name)
        if recorded is not None:
            try:
                loaded = self.models.resolve(name, recorded)
            except UnknownModel:
                raise UnknownModel(f"this batch started on model {name!r} version {recorded!r}, which is no longer "
                                   "loaded") from None
        else:
            loaded = self.models.resolve(name)
        if name in job.pins:  # another request pinned it meanwhile
            return job.pins[name].engine
        loaded.acquire()
        job.pins[name] = loaded
        if recorded is None:
            versions = {**(job.batch.model_versions or {}), name: loaded.version}
            job.batch = replace(job.batch, model_versions=versions)
            await self.store.update_batch(job.batch.id, model_versions=versions)
        return loaded.engine

    async def _answer(self, job: Job, request: Line) -> None:
        """Answer one request and store its output record."""
        b = job.batch
        try:
            if request.size > self.settings.max_body_bytes:
                status, body = 413, {"error": f"request body over {self.settings.max_body_bytes} bytes",
                                     "code": "body_too_large"}
            else:
                engine = await self._engine(job, request.body)
                status, body = await ENDPOINTS[b.endpoint](engine, request.body)
        except ServiceError as e:
            status, body = e.status, e.body()
        except Exception:
            log.exception("batch %s line %d failed", b.id, request.line + 1)
            status, body = 500, {"error": "internal server error", "code": "internal"}
        ok = 200 <= status < 300
        record = {"id": f"batch_req_{b.id.removeprefix('batch_')}_{request.line}", "custom_id": request.custom_id,
                  "response": {"status_code": status, "body": body},
                  "error": None if ok else {"code": body.get("code"), "message": body.get("error")}}
        try:
            stored = await self.store.put_result(b.id, request.line, request.custom_id, ok, json.dumps(record).encode())
        except StoreFault as e:  # no result: the line is answered again when the batch tries again
            job.fault = job.fault or e
            return
        if stored:
            self.metrics.batch_lines.labels("completed" if ok else "failed").inc()

    async def _finish(self, job: Job, status: str) -> None:
        """Write the output and error files (the stored results, in input order) and end the batch."""
        b, now = job.batch, time.time()
        changes: dict[str, Any] = {"status": status, f"{status}_at": now, "ended_at": now}
        files: list[tuple[FileMeta, Path]] = []
        for ok, kind in ((True, "output"), (False, "error")):
            staged = self.store.staging()
            n = await self.store.export_results(b.id, ok, staged)
            changes["completed" if ok else "failed"] = n
            if n:
                meta = FileMeta(f"file-{b.id.removeprefix('batch_')}-{kind}", b.owner, "batch_output",
                                f"{b.id}_{kind}.jsonl", staged.stat().st_size, now, now + self.settings.jobs_ttl_s)
                files.append((meta, staged))
                changes[f"{kind}_file_id"] = meta.id
            else:
                staged.unlink(missing_ok=True)
        await self.store.finish(b.id, changes, files)
        job.batch = replace(b, **changes)
        log.info("batch %s %s: %d completed, %d failed", b.id, status, changes["completed"], changes["failed"])
        await self.count()

    # -- expiry ---------------------------------------------------------------------------------------------
    async def _clean(self) -> None:
        """Every `clean_every_s`: expire the batches past their completion window, delete what
        has outlived LIMOE_JOBS_TTL_S."""
        while True:
            await asyncio.sleep(self.clean_every_s)
            try:
                now = time.time()
                for batch in await self.store.active_batches():
                    if batch.expires_at < now and (job := self.jobs.get(batch.id)) is not None:
                        job.halt("expired")
                files, batches = await self.store.expire(now)
                if files or batches:
                    log.info("jobs cleanup: %d files and %d batches past LIMOE_JOBS_TTL_S deleted", files, batches)
                    await self.count()
            except Exception:  # never let the cleanup die
                log.exception("jobs cleanup failed")


async def start_jobs(state, models: Models) -> JobRunner | None:
    """The app's job runner (`state`: app.state, with its settings and metrics), started; None,
    with the reason in `state.jobs_off`, when jobs are disabled or LIMOE_JOBS_DIR cannot be used
    (the rest of the server runs; the batch routes answer 503 with that reason)."""
    settings: Settings = state.settings
    if not settings.jobs_enabled:
        state.jobs_off = "LIMOE_JOBS_ENABLED is false"
        return None
    metrics = state.metrics
    metrics.jobs_store_healthy.set(1)
    events = StoreEvents(fault=lambda reason: (metrics.jobs_store_faults.labels(reason).inc(),
                                               metrics.jobs_store_healthy.set(0)),
                         ok=lambda: metrics.jobs_store_healthy.set(1),
                         recovered=lambda reason: metrics.jobs_store_recovered.labels(reason).inc())
    try:
        store = await asyncio.to_thread(SqliteJobStore.open, settings.jobs_dir, settings.jobs_ttl_s, events)
    except JobsUnavailable as e:
        state.jobs_off = str(e)
        log.warning("batch jobs are off: %s", e)
        return None
    runner = JobRunner(store, models, settings, state.metrics)
    await runner.start()
    return runner
