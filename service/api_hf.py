"""Hugging Face zero-shot-image-classification compatible routes: POST / and POST /models/{name}.

    {"inputs": <base64 image>, "parameters": {"candidate_labels": [...], "hypothesis_template": "..."}}
    -> [{"label": ..., "score": ...}, ...] sorted by score

Older huggingface_hub versions sent labels as one comma-separated string, or
{"inputs": {"image": <base64>, "candidateLabels": "a,b"}}; both are accepted (service.schemas.HFRequest).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from service.engine import Engine
from service.errors import NotFound
from service.http import ServiceRoute, answer, b64decode, serving
from service.schemas import HFRequest, LabelScore, error_responses, ranked

router = APIRouter(tags=["huggingface"], route_class=ServiceRoute, strict_content_type=False,
                   responses=error_responses(400, 404, 413, 415, 422, 429, 503, 504))


def named(name: str, request: Request) -> Engine:
    """The engine when it serves the model `name` (404 otherwise), once it is ready."""
    engine: Engine = request.app.state.engine
    if name != engine.backend.name:
        raise NotFound(f"model {name!r} is not served here (this server serves {engine.backend.name!r})")
    return serving(request)


async def _classify(request: Request, engine: Engine, body: HFRequest) -> list[dict[str, Any]]:
    labels = engine.check_labels(body.labels)
    templates = engine.check_templates([body.template] if body.template is not None else None)
    with engine.admit(1) as permit:  # 429 here, before any decoding
        image = b64decode(body.image, "inputs")
        scores = await answer(request, engine.classify([image], labels, templates, permit=permit),
                              engine.settings.request_timeout_s)
    if scores.errors[0] is not None:
        raise scores.errors[0]
    return ranked(scores.probs[0], labels)


@router.post("/", summary="Hugging Face zero-shot-image-classification (the loaded model)")
async def hf_root(body: HFRequest, request: Request, engine: Engine = Depends(serving)) -> list[LabelScore]:
    return await _classify(request, engine, body)


@router.post("/models/{name}", summary="Hugging Face Inference API URL pattern")
async def hf_model(body: HFRequest, request: Request, engine: Engine = Depends(named)) -> list[LabelScore]:
    return await _classify(request, engine, body)
