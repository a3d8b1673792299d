"""Hugging Face zero-shot-image-classification compatible routes: POST / and POST /models/{name}.

    {"inputs": <base64 image>, "parameters": {"candidate_labels": [...], "hypothesis_template": "..."}}
    -> [{"label": ..., "score": ...}, ...] sorted by score

Older huggingface_hub versions sent labels as one comma-separated string, or
{"inputs": {"image": <base64>, "candidateLabels": "a,b"}}; both are accepted.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.engine import Engine
from service.errors import NotFound, ServiceError, Unprocessable
from service.http import answer, b64decode, read_json

router = APIRouter(tags=["huggingface"])

_EXAMPLE = {"inputs": "<base64 image>", "parameters": {"candidate_labels": ["cat", "dog"],
                                                        "hypothesis_template": "a photo of a {}."}}
_DOC = {"requestBody": {"required": True, "content": {"application/json": {"example": _EXAMPLE}}}}
_RESPONSES = {200: {"content": {"application/json": {"example": [{"label": "cat", "score": 0.93},
                                                                 {"label": "dog", "score": 0.07}]}}}}


def _labels(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list):
        return value
    raise Unprocessable("candidate_labels must be a list of strings or a comma-separated string", "invalid_labels")


def parse_hf(body: Any) -> tuple[bytes, list[str], str | None]:
    if not isinstance(body, dict) or "inputs" not in body:
        raise Unprocessable("expected {\"inputs\": <base64 image>, \"parameters\": {\"candidate_labels\": [...]}}")
    inputs, params = body["inputs"], body.get("parameters") or {}
    if not isinstance(params, dict):
        raise Unprocessable("parameters must be an object")
    if isinstance(inputs, dict):  # the older shape
        image = inputs.get("image")
        labels = inputs.get("candidateLabels", inputs.get("candidate_labels", params.get("candidate_labels")))
    else:
        image, labels = inputs, params.get("candidate_labels", params.get("candidateLabels"))
    if labels is None:
        raise Unprocessable("parameters.candidate_labels is required", "invalid_labels")
    template = params.get("hypothesis_template")
    if template is not None and (not isinstance(template, str) or template.count("{}") != 1):
        raise Unprocessable("hypothesis_template must contain exactly one '{}'", "invalid_templates")
    return b64decode(image, "inputs"), _labels(labels), template


async def _classify(request: Request) -> JSONResponse:
    engine: Engine = request.app.state.engine
    engine.require_ready()
    image, labels, template = parse_hf(await read_json(request))
    [result] = await answer(request, engine.classify([image], labels, [template] if template else None),
                            engine.settings.request_timeout_s)
    if isinstance(result, ServiceError):
        raise result
    return JSONResponse(result.scores)


@router.post("/", summary="Hugging Face zero-shot-image-classification (the loaded model)",
             openapi_extra=_DOC, responses=_RESPONSES)
async def hf_root(request: Request) -> JSONResponse:
    return await _classify(request)


@router.post("/models/{name}", summary="Hugging Face Inference API URL pattern", openapi_extra=_DOC,
             responses=_RESPONSES)
async def hf_model(name: str, request: Request) -> JSONResponse:
    engine: Engine = request.app.state.engine
    if name != engine.backend.name:
        raise NotFound(f"model {name!r} is not served here (this server serves {engine.backend.name!r})")
    return await _classify(request)
