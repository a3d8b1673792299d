"""The native API: /v1/classify, /v1/classify/bulk, /v1/embed, /v1/models."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from service.engine import Classification, Engine
from service.errors import BadRequest, ServiceError, Unprocessable, UnsupportedMediaType
from service.http import answer, b64decode, media_type, parse_json, read_json

router = APIRouter(prefix="/v1", tags=["native"])

PNG_1PX = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"


class ClassifyJSON(BaseModel):
    images: list[str] = Field(..., description="base64-encoded image files (PNG, JPEG, GIF, WebP, BMP, TIFF)",
                              examples=[[PNG_1PX]])
    labels: list[str] = Field(..., description="candidate labels", examples=[["cat", "dog", "red circle"]])
    templates: list[str] | None = Field(None, description="prompt templates with one '{}'; default: the model's")
    top_k: int | None = Field(None, ge=1, description="return only the best k labels")
    explain: bool = Field(False, description="include how each image was routed through the experts")


class EmbedJSON(BaseModel):
    images: list[str] = Field(default_factory=list, description="base64-encoded image files")
    texts: list[str] = Field(default_factory=list, description="texts, embedded as given (no templates)")
    explain: bool = False


def _classify_body(max_images: int) -> dict:
    """OpenAPI request body for both content types, with examples."""
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["images", "labels"], "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "maxItems": max_images,
                       "description": "image files; repeat the field for several images"},
            "labels": {"type": "array", "items": {"type": "string"}, "description": "repeat the field per label"},
            "templates": {"type": "array", "items": {"type": "string"}},
            "top_k": {"type": "integer", "minimum": 1},
            "explain": {"type": "boolean"}}}},
        "application/json": {"schema": ClassifyJSON.model_json_schema(),
                             "example": {"images": [PNG_1PX], "labels": ["cat", "dog"], "top_k": 2}},
    }}}


_RESULTS_EXAMPLE = {"model": "limoe-small", "version": "1", "results": [
    {"index": 0, "labels": [{"label": "cat", "score": 0.91}, {"label": "dog", "score": 0.09}]},
    {"index": 1, "error": "cannot decode image: cannot identify image file", "code": "invalid_image"}]}


def _multipart_error(e: Exception) -> ServiceError:
    """Starlette's form parser reports limits and syntax errors as HTTP 400s; name them."""
    text = str(getattr(e, "detail", e))
    if "Too many files" in text:
        return Unprocessable(f"too many images in one request: {text}", "too_many_images")
    if "Too many fields" in text:
        return Unprocessable(f"too many form fields (labels?): {text}", "too_many_labels")
    return BadRequest(f"malformed multipart body: {text}", "invalid_multipart")


async def _read_form(request: Request, max_files: int, max_fields: int):
    boundary = request.headers.get("content-type", "").partition("boundary=")[2].split(";")[0].strip().strip('"')
    if not boundary:
        raise BadRequest("malformed multipart body: no boundary in the Content-Type", "invalid_multipart")
    body = await request.body()  # bounded by the body limit; the form parser reads this copy
    if not body.rstrip(b"\r\n").endswith(b"--" + boundary.encode("latin-1") + b"--"):
        raise BadRequest("malformed multipart body: it ends before the closing boundary (truncated?)",
                         "invalid_multipart")
    try:
        return await request.form(max_files=max_files, max_fields=max_fields)
    except (MultiPartException, HTTPException) as e:
        raise _multipart_error(e) from None


async def parse_classify(request: Request, max_images: int, max_labels: int) -> dict[str, Any]:
    """The request as {"images": [bytes], "labels", "templates", "top_k", "explain"}, from either
    multipart/form-data or JSON."""
    ctype = media_type(request)
    if ctype == "multipart/form-data":
        form = await _read_form(request, max_images, max_labels + 40)
        images = []
        try:
            for f in form.getlist("images"):
                if not isinstance(f, UploadFile):
                    raise Unprocessable("'images' must be file parts", "invalid_images")
                images.append(await f.read())
        finally:
            await form.close()  # free the parts' buffers now, not when the response is sent
        top_k = form.get("top_k")
        try:
            top_k = int(top_k) if top_k not in (None, "") else None
        except ValueError:
            raise Unprocessable("top_k must be an integer", "invalid_top_k") from None
        return {"images": images, "labels": [str(v) for v in form.getlist("labels")],
                "templates": [str(v) for v in form.getlist("templates")] or None, "top_k": top_k,
                "explain": str(form.get("explain", "false")).lower() in ("1", "true", "yes")}
    if ctype in ("application/json", ""):
        body = parse_json(await request.body())
        try:
            req = ClassifyJSON.model_validate(body)
        except ValueError as e:
            raise Unprocessable(f"invalid request: {_first_error(e)}") from None
        return {"images": [b64decode(v, f"images[{i}]") for i, v in enumerate(req.images)], "labels": req.labels,
                "templates": req.templates, "top_k": req.top_k, "explain": req.explain}
    raise UnsupportedMediaType(f"send multipart/form-data or application/json, not {ctype!r}")


def _first_error(e: Exception) -> str:
    errors = getattr(e, "errors", lambda: [])()
    if errors:
        err = errors[0]
        return f"{'.'.join(map(str, err.get('loc', ())))}: {err.get('msg')}"
    return str(e)


def results_body(engine: Engine, results: list, explain: bool) -> list[dict]:
    out = []
    for i, r in enumerate(results):
        if isinstance(r, Classification):
            item: dict = {"index": i, "labels": r.scores}
            if explain:
                item["routing"] = engine.routing_summary(r.routing)
        else:
            item = {"index": i, **r.body()}
        out.append(item)
    return out


def respond(engine: Engine, results: list, explain: bool) -> JSONResponse:
    """200 when at least one image was classified; otherwise the first item's 4xx/5xx."""
    body = {"model": engine.backend.name, "version": engine.backend.version,
            "results": results_body(engine, results, explain)}
    failures = [r for r in results if isinstance(r, ServiceError)]
    if results and len(failures) == len(results):
        body.update(failures[0].body())
        return JSONResponse(body, status_code=failures[0].status)
    return JSONResponse(body)


async def _classify(request: Request, bulk: bool) -> JSONResponse:
    engine: Engine = request.app.state.engine
    s = engine.settings
    engine.require_ready()
    limit = s.max_bulk_images if bulk else s.max_images_per_request
    req = await parse_classify(request, limit, s.max_labels)
    if not req["images"]:
        raise Unprocessable("give at least one image", "no_images")
    if len(req["images"]) > limit:
        hint = "per bulk request" if bulk else "per request (use /v1/classify/bulk for more)"
        raise Unprocessable(f"{len(req['images'])} images; at most {limit} {hint}", "too_many_images")
    # Bulk work may take longer than one request's deadline: scale it by the number of batches.
    batches = -(-len(req["images"]) // s.max_batch_size) if bulk else 1
    results = await answer(request, engine.classify(req["images"], req["labels"], req["templates"], req["top_k"],
                                                    bulk=bulk), s.request_timeout_s * batches)
    return respond(engine, results, req["explain"])


@router.post("/classify", summary="Zero-shot classify one or more images",
             openapi_extra=_classify_body(16),
             responses={200: {"description": "ranked labels per image, or that image's error",
                              "content": {"application/json": {"example": _RESULTS_EXAMPLE}}}})
async def classify(request: Request) -> JSONResponse:
    return await _classify(request, bulk=False)


@router.post("/classify/bulk", summary="Classify many images against one label set",
             openapi_extra=_classify_body(256),
             responses={200: {"description": "per-image results in input order",
                              "content": {"application/json": {"example": _RESULTS_EXAMPLE}}}})
async def classify_bulk(request: Request) -> JSONResponse:
    return await _classify(request, bulk=True)


@router.post("/embed", summary="Image and/or text embeddings",
             responses={200: {"content": {"application/json": {"example": {
                 "model": "limoe-small", "version": "1", "images": [{"index": 0, "embedding": [0.1, -0.2]}],
                 "texts": [{"index": 0, "embedding": [0.3, 0.0]}]}}}}})
async def embed(request: Request) -> JSONResponse:
    engine: Engine = request.app.state.engine
    s = engine.settings
    engine.require_ready()
    body = await read_json(request)
    try:
        req = EmbedJSON.model_validate(body)
    except ValueError as e:
        raise Unprocessable(f"invalid request: {_first_error(e)}") from None
    if not req.images and not req.texts:
        raise Unprocessable("give images and/or texts", "empty_request")
    if len(req.images) > s.max_images_per_request or len(req.texts) > s.max_labels:
        raise Unprocessable(f"at most {s.max_images_per_request} images and {s.max_labels} texts per request",
                            "too_many_items")
    engine.check_labels(req.texts) if req.texts else None
    images = [b64decode(v, f"images[{i}]") for i, v in enumerate(req.images)]

    async def work() -> tuple[list, list]:
        img = await asyncio.gather(*(engine.encode_image(d) for d in images), return_exceptions=True)
        txt = await engine.encode_texts(req.texts) if req.texts else []
        return img, txt

    img, txt = await answer(request, work(), s.request_timeout_s)

    def item(i: int, r: Any, modality: str) -> dict:
        if isinstance(r, ServiceError):
            return {"index": i, **r.body()}
        if isinstance(r, BaseException):
            raise r
        out = {"index": i, "embedding": r.embedding.tolist()}
        if req.explain:
            out["routing"] = engine.routing_summary(r, modality)
        return out

    return JSONResponse({"model": engine.backend.name, "version": engine.backend.version,
                         "images": [item(i, r, "image") for i, r in enumerate(img)],
                         "texts": [item(i, r, "text") for i, r in enumerate(txt)]})


@router.get("/models", summary="The loaded model and its manifest")
async def models(request: Request) -> dict:
    engine: Engine = request.app.state.engine
    b = engine.backend
    return {"models": [{"name": b.name, "version": b.version, "backend": engine.settings.backend,
                        "device": b.device, "ready": engine.ready, "manifest": b.manifest}]}
