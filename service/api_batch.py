"""Batch jobs over REST, in the OpenAI Batch API's shapes (docs/BATCH.md): upload a JSONL file of
requests (/v1/files), run it as a batch (/v1/batches), download the output and error files.

With API keys configured, files and batches belong to the key that created them (its sha256 is
stored): another key gets 404 for them.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Annotated, Iterator

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from service.errors import BadRequest, NotFound, ServiceError, Unprocessable, UnsupportedMediaType
from service.http import ServiceRoute, bearer_token, media_type
from service.job_runner import JobRunner, TooManyBatches
from service.jobs import Batch, FileMeta, new_id
from service.schemas import BatchCreate, BatchList, BatchObject, FileDeleted, FileObject, error_responses

router = APIRouter(prefix="/v1", tags=["batch"], route_class=ServiceRoute)
ERRORS = error_responses(400, 404, 409, 413, 415, 422, 429, 503)
WINDOWS_S = {"24h": 24 * 3600}


def links(**targets: tuple[str, str, dict]) -> dict[int | str, dict]:
    """ERRORS plus OpenAPI links on the 200 answer: name -> (path, method, what of the answer goes
    where). They tell a client (and schemathesis' stateful runs) how one call leads to the next:
    upload -> create a batch -> poll it -> read its files."""
    def ref(path: str, method: str) -> str:
        return "#/paths/" + path.replace("~", "~0").replace("/", "~1") + "/" + method

    return {**ERRORS, 200: {"description": "Successful Response", "links": {
        name: {"operationRef": ref(path, method), **fields} for name, (path, method, fields) in targets.items()}}}


def taking(param: str, field: str) -> dict:
    """A link's target parameter `param` (in the path) from the field `field` of this answer."""
    return {"parameters": {f"path.{param}": f"$response.body#/{field}"}}


FILE_LINKS = links(CreateBatch=("/v1/batches", "post", {"requestBody": {"input_file_id": "$response.body#/id"}}),
                   GetFile=("/v1/files/{file_id}", "get", taking("file_id", "id")),
                   GetFileContent=("/v1/files/{file_id}/content", "get", taking("file_id", "id")),
                   DeleteFile=("/v1/files/{file_id}", "delete", taking("file_id", "id")))
BATCH_LINKS = links(GetBatch=("/v1/batches/{batch_id}", "get", taking("batch_id", "id")),
                    CancelBatch=("/v1/batches/{batch_id}/cancel", "post", taking("batch_id", "id")),
                    GetInput=("/v1/files/{file_id}/content", "get", taking("file_id", "input_file_id")),
                    GetOutput=("/v1/files/{file_id}/content", "get", taking("file_id", "output_file_id")),
                    GetErrors=("/v1/files/{file_id}/content", "get", taking("file_id", "error_file_id")))


class JobsUnavailable(ServiceError):
    status, code = 503, "jobs_unavailable"


class Conflict(ServiceError):
    status, code = 409, "conflict"


def jobs(request: Request) -> JobRunner:
    """The job runner, or 503 saying why there is none (disabled, or LIMOE_JOBS_DIR unusable)."""
    runner = request.app.state.jobs
    if runner is None:
        raise JobsUnavailable(f"batch jobs are unavailable on this server: {request.app.state.jobs_off}")
    return runner


def owner(request: Request) -> str:
    """Whose files and batches: the sha256 of the caller's API key ("" when no keys are configured)."""
    return hashlib.sha256(bearer_token(request)).hexdigest() if request.app.state.settings.api_keys else ""


async def owned_file(runner: JobRunner, file_id: str, request: Request) -> FileMeta:
    meta = await runner.store.get_file(file_id)
    if meta is None or meta.owner != owner(request) or meta.expires_at < time.time():
        raise NotFound(f"no file {file_id!r}", "file_not_found")
    return meta


async def owned_batch(runner: JobRunner, batch_id: str, request: Request) -> Batch:
    batch = await runner.store.get_batch(batch_id)
    if batch is None or batch.owner != owner(request):
        raise NotFound(f"no batch {batch_id!r}", "batch_not_found")
    return batch


# -- files --------------------------------------------------------------------------------------------------

@router.post("/files", summary="Upload a batch input file (multipart: file, purpose=batch)",
             response_model=FileObject, responses=FILE_LINKS, openapi_extra={"requestBody": {"content": {
                 "multipart/form-data": {"schema": {"type": "object", "required": ["file", "purpose"], "properties": {
                     "file": {"type": "string", "format": "binary"},
                     "purpose": {"type": "string", "enum": ["batch"]}}}}}}})
async def upload(request: Request, runner: JobRunner = Depends(jobs)) -> JSONResponse:
    """The body streams to disk: up to LIMOE_JOBS_MAX_FILE_BYTES, outside the in-flight byte budget."""
    if media_type(request) != "multipart/form-data":
        raise UnsupportedMediaType("send multipart/form-data with the fields 'file' and 'purpose'")
    try:
        form = await MultiPartParser(request.headers, request.stream(), max_files=1, max_fields=8).parse()
    except MultiPartException as e:
        raise BadRequest(f"malformed multipart body: {e.message}", "invalid_multipart") from None
    try:
        if form.get("purpose") != "batch":
            raise Unprocessable("purpose must be 'batch'", "invalid_purpose")
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise Unprocessable("send the file in the multipart field 'file'", "missing_file")
        meta = await runner.add_file(file.file, file.filename or "input.jsonl", owner(request))
    finally:
        await form.close()
    return JSONResponse(meta.to_api())


@router.get("/files/{file_id}", summary="A file's details", response_model=FileObject, responses=ERRORS)
async def get_file(file_id: str, request: Request, runner: JobRunner = Depends(jobs)) -> JSONResponse:
    return JSONResponse((await owned_file(runner, file_id, request)).to_api())


@router.get("/files/{file_id}/content", summary="A file's content (JSONL)", responses=ERRORS,
            response_class=StreamingResponse)
async def file_content(file_id: str, request: Request, runner: JobRunner = Depends(jobs)) -> StreamingResponse:
    meta = await owned_file(runner, file_id, request)
    f = await asyncio.to_thread(runner.store.open_file, file_id)

    def chunks() -> Iterator[bytes]:  # read in a worker thread by StreamingResponse
        with f:
            while data := f.read(1 << 16):
                yield data

    return StreamingResponse(chunks(), media_type="application/jsonl", headers={"content-length": str(meta.bytes)})


@router.delete("/files/{file_id}", summary="Delete a file", response_model=FileDeleted, responses=ERRORS)
async def delete_file(file_id: str, request: Request, runner: JobRunner = Depends(jobs)) -> JSONResponse:
    await owned_file(runner, file_id, request)
    if await runner.store.file_in_use(file_id):
        raise Conflict("an unfinished batch reads this file; cancel it first", "file_in_use")
    await runner.store.delete_file(file_id)
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})


# -- batches ------------------------------------------------------------------------------------------------

@router.post("/batches", summary="Run the requests of an input file as a batch", response_model=BatchObject,
             responses=BATCH_LINKS)
async def create_batch(body: BatchCreate, request: Request, runner: JobRunner = Depends(jobs)) -> JSONResponse:
    meta = await owned_file(runner, body.input_file_id, request)
    if meta.purpose != "batch":
        raise Unprocessable("the input file must be one uploaded with purpose=batch", "invalid_input_file")
    limit = runner.settings.jobs_max_active
    if await runner.active_count() >= limit:
        raise TooManyBatches(f"{limit} batches are running on this server (LIMOE_JOBS_MAX_ACTIVE); retry later")
    now = time.time()
    batch = Batch(new_id("batch_"), owner(request), body.endpoint, body.input_file_id, body.completion_window,
                  "validating", now, now + WINDOWS_S[body.completion_window], metadata=body.metadata)
    await runner.store.create_batch(batch)
    runner.submit(batch)
    await runner.count()
    return JSONResponse(batch.to_api())


@router.get("/batches/{batch_id}", summary="A batch's status and request counts", response_model=BatchObject,
            responses=BATCH_LINKS)
async def get_batch(batch_id: str, request: Request, runner: JobRunner = Depends(jobs)) -> JSONResponse:
    return JSONResponse((await owned_batch(runner, batch_id, request)).to_api())


@router.post("/batches/{batch_id}/cancel", summary="Cancel a batch: what was answered is kept",
             response_model=BatchObject, responses=ERRORS)
async def cancel_batch(batch_id: str, request: Request, runner: JobRunner = Depends(jobs)) -> JSONResponse:
    batch = await owned_batch(runner, batch_id, request)
    if batch.status in ("validating", "in_progress"):
        await runner.store.update_batch(batch_id, status="cancelling", cancelling_at=time.time())
        runner.cancel(batch_id)
        await runner.count()
        batch = await runner.store.get_batch(batch_id)
    elif batch.status not in ("cancelling", "cancelled"):
        raise Conflict(f"a batch that is {batch.status} cannot be cancelled", "batch_not_cancellable")
    return JSONResponse(batch.to_api())


@router.get("/batches", summary="Batches, newest first", response_model=BatchList, responses=ERRORS)
async def list_batches(request: Request, runner: JobRunner = Depends(jobs),
                       after: Annotated[str | None, Query(description="the last id of the previous page")] = None,
                       limit: Annotated[int, Query(ge=1, le=100)] = 20) -> JSONResponse:
    page = await runner.store.list_batches(owner(request), after, limit + 1)
    data = [b.to_api() for b in page[:limit]]
    return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None, "has_more": len(page) > limit})
