"""The model repository API (Open Inference Protocol's repository extension, as Triton serves it),
behind the admin keys (LIMOE_ADMIN_KEYS; service/app.py's Gatekeeper checks them):

    POST /v2/repository/index                    every version in the store and loaded, with its state
    POST /v2/repository/models/{name}/load       load the store's newest verified version of `name`
                                                 (or {"parameters": {"version": "2"}}), switch to it
    POST /v2/repository/models/{name}/unload     stop serving `name`; it is unloaded once idle

A load answers once the new version serves (the old one finishes its requests in the
background); a version that cannot be verified, opened or warmed up is refused with 400
model_load_failed and the versions serving go on. service/models.py does the work.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from service.errors import Unprocessable
from service.http import ServiceRoute, parse_json, served_models, validate
from service.schemas import error_responses

PREFIX = "/v2/repository"
router = APIRouter(prefix=PREFIX, tags=["model repository"], route_class=ServiceRoute, strict_content_type=False)
ADMIN = error_responses(401, 403, 422)


class IndexRequest(BaseModel):
    repository_name: str | None = Field(None, description="ignored: this server has one repository, the store")
    ready: bool | None = Field(None, description="true: only the versions that are ready")


class IndexEntry(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY, LOADING, UNLOADING or UNAVAILABLE")
    reason: str = Field(description="why it is UNAVAILABLE (not loaded, or the error its load got)")


class LoadParameters(BaseModel):
    version: str | None = Field(None, description="the store version to load; default: the newest", max_length=200)


class LoadRequest(BaseModel):
    parameters: LoadParameters = LoadParameters()


class LoadResponse(BaseModel):
    name: str
    version: str = Field(description="the version now serving")
    state: str


class UnloadResponse(BaseModel):
    name: str
    unloading: int = Field(description="versions that stop taking requests and unload once idle")


async def _optional(request: Request, model: type[BaseModel]) -> BaseModel:
    """An optional JSON body (Triton's clients send none, or {})."""
    raw = await request.body()
    return validate(model, parse_json(raw) if raw.strip() else {})


@router.post("/index", summary="Repository index: every model version and its state", response_model=list[IndexEntry],
             responses=ADMIN, openapi_extra={"requestBody": {"required": False, "content": {
                 "application/json": {"schema": IndexRequest.model_json_schema()}}}})
async def index(request: Request) -> JSONResponse:
    body = await _optional(request, IndexRequest)
    rows = served_models(request).index(ready_only=bool(body.ready))
    return JSONResponse([IndexEntry.model_validate(r).model_dump() for r in rows])


@router.post("/models/{name}/load", summary="Load the newest verified version of a model and switch to it",
             response_model=LoadResponse, responses=error_responses(400, 401, 403, 422, 503),
             openapi_extra={"requestBody": {"required": False, "content": {
                 "application/json": {"schema": LoadRequest.model_json_schema()}}}})
async def load(name: str, request: Request) -> JSONResponse:
    body = await _optional(request, LoadRequest)
    if not name or len(name) > 200:
        raise Unprocessable("a model name of 1 to 200 characters", "invalid_model")
    loaded = await served_models(request).load(name, body.parameters.version)
    return JSONResponse(LoadResponse(name=loaded.name, version=loaded.version, state=loaded.state).model_dump())


@router.post("/models/{name}/unload", summary="Stop serving a model; unloaded once its requests are done",
             response_model=UnloadResponse, responses=error_responses(401, 403, 404, 409, 422))
async def unload(name: str, request: Request) -> JSONResponse:
    n = await served_models(request).unload(name)
    return JSONResponse(UnloadResponse(name=name, unloading=n).model_dump())
