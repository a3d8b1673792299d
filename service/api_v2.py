"""Open Inference Protocol v2 (KServe / Triton), with Triton's binary tensor extension.

Model `{name}` (the store name) takes
    IMAGE   BYTES [N]  encoded image files (base64 strings in JSON; raw in binary data)
    LABELS  BYTES [C]  candidate labels
and returns
    SCORES  FP32  [N, C]     softmax over the labels, in LABELS order
    EXPERTS INT64 [N, M, T]  top-1 expert of every patch in each MoE layer (-1 = dropped)
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

import limoe
from service.engine import Engine
from service.errors import BadRequest, NotFound, ServiceError, Unprocessable
from service.http import answer, b64decode, parse_json

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])
HEADER = "Inference-Header-Content-Length"


def _engine(request: Request, name: str | None = None, version: str | None = None) -> Engine:
    engine: Engine = request.app.state.engine
    b = engine.backend
    if name is not None and name != b.name:
        raise NotFound(f"unknown model {name!r} (this server serves {b.name!r})")
    if version is not None and version != b.version:
        raise NotFound(f"model {name!r} has no version {version!r} loaded (serving {b.version!r})")
    return engine


@router.get("", summary="Server metadata")
async def server_metadata() -> dict:
    return {"name": "limoe-serve", "version": limoe.__version__, "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="Server live")
async def live(request: Request) -> Response:
    return Response(status_code=200 if request.app.state.engine.alive else 503)


@router.get("/health/ready", summary="Server ready")
async def ready(request: Request) -> Response:
    e = request.app.state.engine
    return Response(status_code=200 if e.ready and e.alive else 503)


def _metadata(engine: Engine) -> dict:
    b = engine.backend
    graphs = b.manifest["graphs"]
    return {
        "name": b.name, "versions": [b.version], "platform": f"limoe_{engine.settings.backend}",
        "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1]},
                   {"name": "LABELS", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "SCORES", "datatype": "FP32", "shape": [-1, -1]},
                    {"name": "EXPERTS", "datatype": "INT64",
                     "shape": [-1, len(engine.moe_layers), graphs["image"]["tokens"]]}],
    }


@router.get("/models/{name}", summary="Model metadata")
async def model_metadata(name: str, request: Request) -> dict:
    return _metadata(_engine(request, name))


@router.get("/models/{name}/versions/{version}", summary="Model version metadata")
async def model_version_metadata(name: str, version: str, request: Request) -> dict:
    return _metadata(_engine(request, name, version))


@router.get("/models/{name}/ready", summary="Model ready")
async def model_ready(name: str, request: Request) -> Response:
    e = _engine(request, name)
    return Response(status_code=200 if e.ready and e.alive else 503)


@router.get("/models/{name}/versions/{version}/ready", summary="Model version ready")
async def model_version_ready(name: str, version: str, request: Request) -> Response:
    e = _engine(request, name, version)
    return Response(status_code=200 if e.ready and e.alive else 503)


def _split_body(request: Request, body: bytes) -> tuple[dict, bytes]:
    """JSON header and the binary section that follows it (empty without the extension)."""
    length = request.headers.get(HEADER)
    if length is None:
        head, rest = body, b""
    else:
        try:
            n = int(length)
        except ValueError:
            raise BadRequest(f"{HEADER} must be an integer", "invalid_header") from None
        if not 0 <= n <= len(body):
            raise BadRequest(f"{HEADER} {n} does not fit a body of {len(body)} bytes", "invalid_header")
        head, rest = body[:n], body[n:]
    header = parse_json(head)
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise Unprocessable("the request needs an 'inputs' list")
    if not isinstance(header.get("parameters", {}), dict):
        raise Unprocessable("'parameters' must be an object")
    if not isinstance(header.get("outputs", []), list):
        raise Unprocessable("'outputs' must be a list")
    return header, rest


def _parameters(tensor: dict, what: str) -> dict:
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise Unprocessable(f"{what}: 'parameters' must be an object")
    return params


def _flag(value: Any) -> bool:
    """JSON true, or the string "true" (some clients stringify parameters)."""
    return value is True or (isinstance(value, str) and value.lower() == "true")


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


def _inputs(header: dict, binary: bytes) -> dict[str, list]:
    found, offset = {}, 0
    for tensor in header["inputs"]:
        if not isinstance(tensor, dict):
            raise Unprocessable("each input must be an object")
        name, dtype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if name not in ("IMAGE", "LABELS"):
            raise Unprocessable(f"unknown input {name!r}; this model takes IMAGE and LABELS")
        if dtype != "BYTES":
            raise Unprocessable(f"input {name} must have datatype BYTES, not {dtype!r}")
        if not (isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int) and shape[0] >= 0):
            raise Unprocessable(f"input {name} must have a 1-D shape [n]")
        if name in found:
            raise Unprocessable(f"input {name} is given twice")
        count = shape[0]
        size = _parameters(tensor, f"input {name}").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise BadRequest(f"input {name}: binary_data_size {size!r} runs past the body", "invalid_tensor")
            values = _decode_bytes_tensor(binary[offset:offset + size], count, name)
            offset += size
        else:
            data = tensor.get("data")
            if not isinstance(data, list) or len(data) != count:
                raise Unprocessable(f"input {name}: 'data' must be a list of {count} elements")
            values = [b64decode(v, f"IMAGE[{i}]") for i, v in enumerate(data)] if name == "IMAGE" else data
        found[name] = values
    if set(found) != {"IMAGE", "LABELS"}:
        raise Unprocessable("inputs IMAGE and LABELS are both required")
    try:
        labels = [v.decode("utf-8") if isinstance(v, bytes) else v for v in found["LABELS"]]
    except UnicodeDecodeError:
        raise Unprocessable("LABELS must be UTF-8 text", "invalid_labels") from None
    return {"IMAGE": found["IMAGE"], "LABELS": labels}


def _requested(header: dict) -> dict[str, bool]:
    """Output name -> binary? (all outputs, binary or not per the request, when none are named)."""
    default_binary = _flag(_parameters(header, "request").get("binary_data_output", False))
    outputs = header.get("outputs")
    if not outputs:
        return {"SCORES": default_binary, "EXPERTS": default_binary}
    wanted = {}
    for o in outputs:
        name = o.get("name") if isinstance(o, dict) else None
        if name not in ("SCORES", "EXPERTS"):
            raise Unprocessable(f"unknown output {name!r}; this model returns SCORES and EXPERTS")
        wanted[name] = _flag(_parameters(o, f"output {name}").get("binary_data", default_binary))
    return wanted


async def _infer(request: Request, engine: Engine) -> Response:
    engine.require_ready()
    header, binary = _split_body(request, await request.body())
    inputs = _inputs(header, binary)
    wanted = _requested(header)
    images, labels = inputs["IMAGE"], inputs["LABELS"]
    if not images:
        raise Unprocessable("IMAGE must hold at least one image", "no_images")
    if len(images) > engine.settings.max_bulk_images:
        raise Unprocessable(f"at most {engine.settings.max_bulk_images} images per request", "too_many_images")
    results = await answer(request, engine.classify(images, labels, bulk=len(images) > 1),
                           engine.settings.request_timeout_s)
    for i, r in enumerate(results):
        if isinstance(r, ServiceError):  # Triton fails the whole request
            r.message = f"IMAGE[{i}]: {r.message}"
            raise r
    order = {label: j for j, label in enumerate(engine.check_labels(labels))}
    scores = np.zeros((len(images), len(labels)), np.float32)
    for i, r in enumerate(results):
        for s in r.scores:
            scores[i, order[s["label"]]] = s["score"]
    experts = np.stack([np.where(r.routing.dropped[..., 0], -1, r.routing.expert_index[..., 0]) for r in results])
    tensors = {"SCORES": ("FP32", scores), "EXPERTS": ("INT64", experts.astype(np.int64))}

    outputs, chunks = [], []
    for name, binary_out in wanted.items():
        dtype, array = tensors[name]
        entry: dict[str, Any] = {"name": name, "datatype": dtype, "shape": list(array.shape)}
        if binary_out:
            raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.flatten().tolist()
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": engine.backend.name, "model_version": engine.backend.version,
                            "outputs": outputs}
    if "id" in header:
        body["id"] = header["id"]
    if not chunks:
        return JSONResponse(body)
    head = json.dumps(body).encode()
    return Response(head + b"".join(chunks), media_type="application/octet-stream",
                    headers={HEADER: str(len(head))})


_INFER_DOC = {"requestBody": {"required": True, "content": {"application/json": {"example": {
    "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["<base64 image>"]},
               {"name": "LABELS", "datatype": "BYTES", "shape": [2], "data": ["cat", "dog"]}],
    "outputs": [{"name": "SCORES"}]}}}}}


@router.post("/models/{name}/infer", summary="Inference (JSON or binary tensor extension)", openapi_extra=_INFER_DOC)
async def infer(name: str, request: Request) -> Response:
    return await _infer(request, _engine(request, name))


@router.post("/models/{name}/versions/{version}/infer", summary="Inference on a version", openapi_extra=_INFER_DOC)
async def infer_version(name: str, version: str, request: Request) -> Response:
    return await _infer(request, _engine(request, name, version))
