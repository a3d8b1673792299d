"""The native API: /v1/classify, /v1/classify/bulk, /v1/embed, /v1/models."""

from __future__ import annotations

import asyncio
import math
from functools import partial
from typing import Any, Sequence

import numpy as np
from fastapi import APIRouter, Request, Response
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from limoe.runtime.zeroshot import fill_templates
from service.batcher import Permit
from service.engine import Engine, Routing, Scores
from service.errors import BadRequest, ServiceError, Unprocessable
from service.http import (
    ServiceRoute,
    answer,
    b64decode,
    deadline_s,
    forget_body,
    json_response,
    media_type,
    raw_body,
    served_models,
    validate,
)
from service.schemas import (
    ClassifyForm,
    ClassifyRequest,
    ClassifyResponse,
    EmbedRequest,
    EmbedResponse,
    ModelsResponse,
    error_responses,
    form_body,
    ranked,
)
from service.settings import Settings

router = APIRouter(prefix="/v1", tags=["native"], route_class=ServiceRoute, strict_content_type=False)
ERRORS = error_responses(400, 401, 404, 413, 415, 422, 429, 503, 504)  # 404: an unknown `model`


# -- multipart/form-data -------------------------------------------------------------------------------

class _FormParser(MultiPartParser):
    """Starlette's multipart parser, counting the parts itself so that too many are refused with
    our codes: files are images, fields (labels, templates, options) are counted together."""

    def __init__(self, request: Request, max_images: int, max_fields: int):
        super().__init__(request.headers, request.stream(), max_files=math.inf, max_fields=math.inf)
        self.max_images, self.max_text_fields = max_images, max_fields
        self.images = self.text_fields = 0

    def on_part_end(self) -> None:
        super().on_part_end()
        if isinstance(self.items[-1][1], UploadFile):
            self.images += 1
            if self.images > self.max_images:
                raise Unprocessable(f"more than {self.max_images} images in one request", "too_many_images")
        else:
            self.text_fields += 1
            if self.text_fields > self.max_text_fields:
                raise Unprocessable(f"more than {self.max_text_fields} form fields (labels?)", "too_many_labels")


async def read_form(request: Request, max_images: int, max_labels: int) -> ClassifyForm:
    """A multipart/form-data classify request: read whole (under the body limit and the in-flight
    byte budget), refused as malformed when it does not end with its closing boundary (a
    truncated upload would otherwise lose its last part silently)."""
    boundary = request.headers.get("content-type", "").partition("boundary=")[2].split(";")[0].strip().strip('"')
    if not boundary:
        raise BadRequest("malformed multipart body: no boundary in the Content-Type", "invalid_multipart")
    body = await request.body()  # bounded by the body limit; the parser reads this copy
    if not body.rstrip(b"\r\n").endswith(b"--" + boundary.encode("latin-1") + b"--"):
        raise BadRequest("malformed multipart body: it ends before the closing boundary (truncated?)",
                         "invalid_multipart")
    del body
    try:
        form = await _FormParser(request, max_images, max_labels + 40).parse()
    except MultiPartException as e:
        raise BadRequest(f"malformed multipart body: {e.message}", "invalid_multipart") from None
    finally:
        forget_body(request)  # the parts hold it now
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
    if top_k is not None and top_k < 1:
        raise Unprocessable("top_k must be >= 1", "invalid_top_k")
    return validate(ClassifyForm, {
        "images": images, "labels": [str(v) for v in form.getlist("labels")],
        "templates": [str(v) for v in form.getlist("templates")] or None, "top_k": top_k,
        "explain": str(form.get("explain", "false")).lower() in ("1", "true", "yes"),
        "model": str(form["model"]) if form.get("model") not in (None, "") else None})


def is_multipart(request: Request) -> bool:
    return media_type(request) == "multipart/form-data"


# -- classify -------------------------------------------------------------------------------------------

NO_EXPERTS = "this model has no expert layers (a dense or two-tower baseline): nothing is routed"


def routing_summary(engine: Engine, routing: Routing, modality: str) -> dict[str, Any]:
    """A RoutingSummary: per MoE layer, tokens per expert, dropped choices and each token's top-1
    expert (for images a grid x grid patch map, row-major)."""
    layers = [{"layer": layer, "tokens_per_expert": routing.tokens_per_expert[m].tolist(),
               "dropped": int(routing.dropped[m]), "top1_expert": routing.top1[m].tolist()}
              for m, layer in enumerate(engine.moe_layers)]
    summary: dict[str, Any] = {"modality": modality, "num_experts": engine.num_experts, "layers": layers}
    if modality == "image":
        summary["grid"] = int(round(np.sqrt(routing.top1.shape[1])))
    if not layers:
        summary["note"] = NO_EXPERTS
    return summary


def label_routing(engine: Engine, labels: Sequence[str], templates: Sequence[str],
                  prompts: Sequence[Routing]) -> list[dict[str, Any]]:
    """LabelRoutings: `prompts` (label-major, as `Engine.prompt_routing` returns them) grouped by label."""
    n = len(templates)
    return [{"label": label,
             "prompts": [{"prompt": prompt, "routing": routing_summary(engine, r, "text")}
                         for prompt, r in zip(fill_templates([label], templates), prompts[i * n:(i + 1) * n])]}
            for i, label in enumerate(labels)]


def check_classify(engine: Engine, images: Sequence[str | bytes], body: ClassifyRequest | ClassifyForm,
                   bulk: bool) -> tuple[list[str], tuple[str, ...]]:
    """A classify body checked against the settings: its (labels, templates)."""
    s = engine.settings
    limit = s.max_bulk_images if bulk else s.max_images_per_request
    if not images:
        raise Unprocessable("give at least one image", "no_images")
    if len(images) > limit:
        hint = "per bulk request" if bulk else "per request (use /v1/classify/bulk for more)"
        raise Unprocessable(f"{len(images)} images; at most {limit} {hint}", "too_many_images")
    return engine.check_labels(body.labels), engine.check_templates(body.templates)


def decode_images(images: Sequence[str | bytes]) -> list[bytes]:
    return [b64decode(v, f"images[{i}]") if isinstance(v, str) else v for i, v in enumerate(images)]


async def _classify(request: Request, engine: Engine, images: Sequence[str | bytes],
                    body: ClassifyRequest | ClassifyForm, bulk: bool) -> Response:
    """Either body (base64 images from JSON, files from a form): check it against the settings,
    take queue places, decode, classify, shape."""
    s = engine.settings
    labels, templates = check_classify(engine, images, body, bulk)
    with engine.admit(len(images), bulk) as permit:  # 429 here, before any decoding
        data = decode_images(images)
        work = engine.classify(data, labels, templates, bulk=bulk, permit=permit, explain=body.explain)
        scores = await answer(request, work, deadline_s(s.request_timeout_s, len(data), s.max_batch_size, bulk))
    return json_response(*classify_response(engine, scores, labels, templates, body))


def classify_response(engine: Engine, scores: Scores, labels: Sequence[str], templates: Sequence[str],
                      body: ClassifyRequest | ClassifyForm) -> tuple[ClassifyResponse, int]:
    """The classify answer for the engine's `scores`, and its status: 200 when at least one image
    was classified; otherwise the first image's error status. Batch jobs answer with it too."""
    results: list[dict[str, Any]] = []
    for i, (error, routing) in enumerate(zip(scores.errors, scores.routing)):
        if error is not None:
            results.append({"index": i, **error.body()})
            continue
        item: dict[str, Any] = {"index": i, "labels": ranked(scores.probs[i], labels, body.top_k)}
        if body.explain:
            item["routing"] = routing_summary(engine, routing, "image")
        results.append(item)
    answer_body: dict[str, Any] = {"model": engine.backend.name, "version": engine.backend.version,
                                   "results": results}
    if scores.prompts is not None:
        answer_body["label_routing"] = label_routing(engine, labels, templates, scores.prompts)
    failures = [e for e in scores.errors if e is not None]
    if len(failures) == len(scores.errors):
        answer_body.update(failures[0].body())
        return ClassifyResponse.model_validate(answer_body), failures[0].status
    return ClassifyResponse.model_validate(answer_body), 200


async def classify_form(request: Request, bulk: bool) -> Response:
    s: Settings = request.app.state.settings
    form = await read_form(request, s.max_bulk_images if bulk else s.max_images_per_request, s.max_labels)
    with served_models(request).use(form.model) as engine:
        return await _classify(request, engine, form.images, form, bulk)


@router.post("/classify", summary="Zero-shot classify one or more images", response_model=ClassifyResponse,
             responses=ERRORS, openapi_extra=form_body(ClassifyForm))
@raw_body(is_multipart, partial(classify_form, bulk=False))
async def classify(body: ClassifyRequest, request: Request) -> Response:
    """Ranked labels per image, or that image's error. JSON with base64 images, or
    multipart/form-data with image files. `model` picks the model (default: the server's)."""
    with served_models(request).use(body.model) as engine:
        return await _classify(request, engine, body.images, body, bulk=False)


@router.post("/classify/bulk", summary="Classify many images against one label set", response_model=ClassifyResponse,
             responses=ERRORS, openapi_extra=form_body(ClassifyForm))
@raw_body(is_multipart, partial(classify_form, bulk=True))
async def classify_bulk(body: ClassifyRequest, request: Request) -> Response:
    """Per-image results in input order. Bulk images wait for queue room instead of being refused,
    and the deadline grows with the number of batches they fill."""
    with served_models(request).use(body.model) as engine:
        return await _classify(request, engine, body.images, body, bulk=True)


# -- embed, models --------------------------------------------------------------------------------------

@router.post("/embed", summary="Image and/or text embeddings", response_model=EmbedResponse, responses=ERRORS)
async def embed(body: EmbedRequest, request: Request) -> Response:
    """Embeddings from the model `model` names (default: the server's)."""
    with served_models(request).use(body.model) as engine:
        return await _embed(request, engine, body)


async def _embed(request: Request, engine: Engine, body: EmbedRequest) -> Response:
    s = engine.settings
    if not body.images and not body.texts:
        raise Unprocessable("give images and/or texts", "empty_request")
    if len(body.images) > s.max_images_per_request or len(body.texts) > s.max_labels:
        raise Unprocessable(f"at most {s.max_images_per_request} images and {s.max_labels} texts per request",
                            "too_many_items")
    if body.texts:
        engine.check_labels(body.texts)

    async def work(images: list[bytes], permit: Permit) -> tuple[list, list]:
        async with engine.turn():
            img = await asyncio.gather(*(engine.encode_image(d, permit=permit) for d in images),
                                       return_exceptions=True)
            txt = await engine.encode_texts(body.texts) if body.texts else []
        return img, txt

    with engine.admit(len(body.images)) if body.images else Permit() as permit:  # 429 here, before any decoding
        images = [b64decode(v, f"images[{i}]") for i, v in enumerate(body.images)]
        img, txt = await answer(request, work(images, permit), s.request_timeout_s)

    def item(i: int, r: Any, modality: str) -> dict[str, Any]:
        if isinstance(r, ServiceError):
            return {"index": i, **r.body()}
        if isinstance(r, BaseException):
            raise r
        out: dict[str, Any] = {"index": i, "embedding": r.embedding.tolist()}
        if body.explain:
            out["routing"] = routing_summary(engine, engine.routing(r), modality)
        return out

    return json_response(EmbedResponse.model_validate({
        "model": engine.backend.name, "version": engine.backend.version,
        "images": [item(i, r, "image") for i, r in enumerate(img)],
        "texts": [item(i, r, "text") for i, r in enumerate(txt)]}))


@router.get("/models", summary="The loaded models, their versions and manifests")
async def models(request: Request) -> ModelsResponse:
    served = served_models(request)
    listed = []
    for v in served.all():
        b = v.engine.backend
        listed.append({"name": b.name, "version": b.version, "backend": v.engine.settings.backend, "device": b.device,
                       "ready": v.engine.ready and not v.retiring, "default": b.name == served.default,
                       "current": served.current(b.name) is v, "state": v.state, "memory_bytes": v.memory_bytes,
                       "loaded_at": v.loaded_at, "manifest": b.manifest.data})
    return ModelsResponse.model_validate({"default": served.default, "models": listed})


# -- batch jobs -----------------------------------------------------------------------------------------

async def classify_job_request(engine: Engine, payload: Any) -> tuple[int, dict[str, Any]]:
    """(status, body) that POST /v1/classify answers for the JSON body `payload`, computed at low
    priority and without a deadline: one request of a batch job (service/job_runner.py)."""
    try:
        body = validate(ClassifyRequest, payload)
        labels, templates = check_classify(engine, body.images, body, bulk=False)
        scores = await engine.classify(decode_images(body.images), labels, templates, explain=body.explain, low=True)
        answer_body, status = classify_response(engine, scores, labels, templates, body)
        return status, answer_body.model_dump(mode="json", exclude_none=True)
    except ServiceError as e:
        return e.status, e.body()
