"""Open Inference Protocol v2 (KServe / Triton), with Triton's binary tensor extension.

Model `{name}` (the store name) takes
    IMAGE   BYTES [N]  encoded image files (base64 strings in JSON; raw in binary data)
    LABELS  BYTES [C]  candidate labels
and returns
    SCORES  FP32  [N, C]     softmax over the labels, in LABELS order
    EXPERTS INT64 [N, M, T]  top-1 expert of every patch in each MoE layer (-1 = dropped)

JSON requests are validated by FastAPI against service.schemas.InferRequest; a request with
binary tensors (an Inference-Header-Content-Length header) is split here and its JSON header
validated against the same model.
"""

from __future__ import annotations

import struct
from typing import Any, Iterator

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

import limoe
from service.engine import Engine
from service.errors import BadRequest, Unprocessable
from service.http import (
    ServiceRoute,
    answer,
    b64decode,
    deadline_s,
    json_response,
    media_type,
    parse_json,
    raw_body,
    served_models,
    validate,
)
from service.models import ModelLoading
from service.schemas import (
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
    error_responses,
)

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"], route_class=ServiceRoute,
                   strict_content_type=False)
HEADER = "Inference-Header-Content-Length"
NAMED = error_responses(404, 422)  # routes that name a model (and version)
# Health answers: the status says it (200 yes, 503 no), and the body too, as the protocol's
# {"live": bool} / {"ready": bool} / {"name", "ready"} (KServe's v2 client reads the body).
NO = {503: {"description": "no: the same body, with false"}}


def model(name: str, request: Request) -> Iterator[Engine]:
    """The engine of the current version of `name` (404 naming those served), held while the route runs."""
    with served_models(request).use(name, ready=False) as engine:
        yield engine


def model_version(name: str, version: str, request: Request) -> Iterator[Engine]:
    with served_models(request).use(name, version, ready=False) as engine:
        yield engine


def ready_model(name: str, request: Request) -> Iterator[Engine]:
    with served_models(request).use(name) as engine:
        yield engine


def ready_model_version(name: str, version: str, request: Request) -> Iterator[Engine]:
    with served_models(request).use(name, version) as engine:
        yield engine


@router.get("", summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="limoe-serve", version=limoe.__version__, extensions=["binary_tensor_data", "model_repository"])


def _health(**body: Any) -> JSONResponse:
    """A health answer: 200 when every boolean in `body` is true, else 503."""
    yes = all(v for v in body.values() if isinstance(v, bool))
    return JSONResponse(body, status_code=200 if yes else 503)


@router.get("/health/live", summary="Server live", response_model=ServerLive, responses=NO)
async def live(request: Request) -> JSONResponse:
    return _health(live=served_models(request).alive)


@router.get("/health/ready", summary="Server ready", response_model=ServerReady, responses=NO)
async def ready(request: Request) -> JSONResponse:
    return _health(ready=served_models(request).ready)


def _metadata(request: Request, engine: Engine) -> ModelMetadata:
    b = engine.backend
    versions = [v.version for v in served_models(request).loaded.get(b.name, ()) if not v.retiring]
    return ModelMetadata.model_validate({
        "name": b.name, "versions": versions or [b.version], "platform": f"limoe_{engine.settings.backend}",
        "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1]},
                   {"name": "LABELS", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "SCORES", "datatype": "FP32", "shape": [-1, -1]},
                    {"name": "EXPERTS", "datatype": "INT64",
                     "shape": [-1, len(engine.moe_layers), b.manifest.image_tokens]}],
    })


@router.get("/models/{name}", summary="Model metadata", responses=NAMED)
async def model_metadata(request: Request, engine: Engine = Depends(model)) -> ModelMetadata:
    return _metadata(request, engine)


@router.get("/models/{name}/versions/{version}", summary="Model version metadata", responses=NAMED)
async def model_version_metadata(request: Request, engine: Engine = Depends(model_version)) -> ModelMetadata:
    return _metadata(request, engine)


@router.get("/models/{name}/ready", summary="Model ready", response_model=ModelReady, responses={**NO, **NAMED})
async def model_ready(name: str, request: Request) -> JSONResponse:
    return _model_health(request, name, None)


@router.get("/models/{name}/versions/{version}/ready", summary="Model version ready", response_model=ModelReady,
            responses={**NO, **NAMED})
async def model_version_ready(name: str, version: str, request: Request) -> JSONResponse:
    return _model_health(request, name, version)


def _model_health(request: Request, name: str, version: str | None) -> JSONResponse:
    """{"name", "ready"}: 200 when that version is warm and serving; 503 while it loads (404 for a
    model not served)."""
    try:
        loaded = served_models(request).resolve(name, version)
    except ModelLoading:
        return _health(name=name, ready=False)
    e = loaded.engine
    return _health(name=e.backend.name, ready=e.ready and e.alive and not loaded.retiring)


# -- inference -----------------------------------------------------------------------------------------

def _split_body(request: Request, body: bytes) -> tuple[bytes, bytes]:
    """The JSON header and the binary section that follows it (empty without the extension)."""
    length = request.headers.get(HEADER)
    if length is None:
        return body, b""
    try:
        n = int(length)
    except ValueError:
        raise BadRequest(f"{HEADER} must be an integer", "invalid_header") from None
    if not 0 <= n <= len(body):
        raise BadRequest(f"{HEADER} {n} does not fit a body of {len(body)} bytes", "invalid_header")
    return body[:n], body[n:]


def _decode_bytes_tensor(raw: bytes, count: int, name: str) -> list[bytes]:
    """Triton's BYTES serialisation: each element is a little-endian uint32 length + the bytes."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BadRequest(f"input {name}: truncated element length", "invalid_tensor")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise BadRequest(f"input {name}: element of {size} bytes runs past the data", "invalid_tensor")
        out.append(raw[offset:offset + size])
        offset += size
    if len(out) != count:
        raise BadRequest(f"input {name}: shape says {count} elements, data holds {len(out)}", "invalid_tensor")
    return out


def _inputs(body: InferRequest, binary: bytes) -> tuple[list[str | bytes], list[str]]:
    """(IMAGE: base64 strings or raw files, LABELS) from the JSON data or the binary section, whose
    tensors follow the order of `inputs`."""
    found: dict[str, list] = {}
    offset = 0
    for tensor in body.inputs:
        size = tensor.parameters.binary_data_size
        if size is None:
            found[tensor.name] = list(tensor.data or [])
            continue
        if size < 0 or offset + size > len(binary):
            raise BadRequest(f"input {tensor.name}: binary_data_size {size} runs past the body", "invalid_tensor")
        found[tensor.name] = _decode_bytes_tensor(binary[offset:offset + size], tensor.shape[0], tensor.name)
        offset += size
    try:
        labels = [v.decode("utf-8") if isinstance(v, bytes) else v for v in found["LABELS"]]
    except UnicodeDecodeError:
        raise Unprocessable("LABELS must be UTF-8 text", "invalid_labels") from None
    return found["IMAGE"], labels


async def _infer(request: Request, engine: Engine, body: InferRequest, binary: bytes) -> Response:
    s = engine.settings
    images, labels = _inputs(body, binary)
    if not images:
        raise Unprocessable("IMAGE must hold at least one image", "no_images")
    if len(images) > s.max_bulk_images:
        raise Unprocessable(f"at most {s.max_bulk_images} images per request", "too_many_images")
    labels = engine.check_labels(labels)
    bulk = len(images) > 1  # like /v1/classify/bulk: waits for queue room, deadline per batch
    with engine.admit(len(images), bulk) as permit:  # 429 here, before any decoding
        data = [b64decode(v, f"IMAGE[{i}]") if isinstance(v, str) else v for i, v in enumerate(images)]
        scores = await answer(request, engine.classify(data, labels, engine.check_templates(None), bulk=bulk,
                                                       permit=permit),
                              deadline_s(s.request_timeout_s, len(data), s.max_batch_size, bulk))
    for i, error in enumerate(scores.errors):
        if error is not None:  # Triton fails the whole request
            error.message = f"IMAGE[{i}]: {error.message}"
            raise error
    tensors = {"SCORES": ("FP32", scores.probs),
               "EXPERTS": ("INT64", np.stack([r.top1 for r in scores.routing]))}  # (N, M, T)

    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, binary_out in body.wanted().items():
        dtype, array = tensors[name]
        entry: dict[str, Any] = {"name": name, "datatype": dtype, "shape": list(array.shape)}
        if binary_out:
            raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.flatten().tolist()
        outputs.append(entry)
    response = InferResponse.model_validate({"model_name": engine.backend.name,
                                             "model_version": engine.backend.version, "outputs": outputs,
                                             "id": body.id})
    if not chunks:
        return json_response(response)
    head = response.model_dump_json(exclude_none=True).encode()
    return Response(head + b"".join(chunks), media_type="application/octet-stream", headers={HEADER: str(len(head))})


def _not_json(request: Request) -> bool:
    """Binary tensors (the header names the JSON part's length), or a body not declared as JSON."""
    return HEADER in request.headers or media_type(request) not in ("application/json", "")


async def _infer_raw(request: Request) -> Response:
    with served_models(request).use(request.path_params["name"], request.path_params.get("version")) as engine:
        head, binary = _split_body(request, await request.body())
        return await _infer(request, engine, validate(InferRequest, parse_json(head)), binary)


INFER_DOC = "JSON, or Triton's binary tensor extension (an Inference-Header-Content-Length header)."


@router.post("/models/{name}/infer", summary="Inference", description=INFER_DOC, response_model=InferResponse,
             responses=error_responses(400, 404, 413, 422, 429, 503, 504))
@raw_body(_not_json, _infer_raw)
async def infer(body: InferRequest, request: Request, engine: Engine = Depends(ready_model)) -> Response:
    return await _infer(request, engine, body, b"")


@router.post("/models/{name}/versions/{version}/infer", summary="Inference on a version", description=INFER_DOC,
             response_model=InferResponse, responses=error_responses(400, 404, 413, 422, 429, 503, 504))
@raw_body(_not_json, _infer_raw)
async def infer_version(body: InferRequest, request: Request,
                        engine: Engine = Depends(ready_model_version)) -> Response:
    return await _infer(request, engine, body, b"")
