"""Hugging Face zero-shot-image-classification compatible routes: POST / (the default model) and
POST /models/{name} (any model this server serves, as the HF Inference API addresses models;
name@version pins a version). The headers X-Model-Name and X-Model-Version say which answered.

    {"inputs": <base64 image>, "parameters": {"candidate_labels": [...], "hypothesis_template": "..."}}
    -> [{"label": ..., "score": ...}, ...] sorted by score

Older huggingface_hub versions sent labels as one comma-separated string, or
{"inputs": {"image": <base64>, "candidateLabels": "a,b"}}; both are accepted (service.schemas.HFRequest).
"""

from __future__ import annotations

from typing import Any, Iterator

from fastapi import APIRouter, Depends, Request, Response

from service.engine import Engine
from service.http import ServiceRoute, answer, b64decode, served_models, serving
from service.schemas import HFRequest, LabelScore, error_responses, ranked

router = APIRouter(tags=["huggingface"], route_class=ServiceRoute, strict_content_type=False,
                   responses=error_responses(400, 404, 413, 415, 422, 429, 503, 504))


def named(name: str, request: Request) -> Iterator[Engine]:
    """The engine of the model `name` (or name@version; 404 for one not served), once it is ready."""
    with served_models(request).use(name) as engine:
        yield engine


async def _classify(request: Request, engine: Engine, body: HFRequest, response: Response) -> list[dict[str, Any]]:
    response.headers["X-Model-Name"], response.headers["X-Model-Version"] = engine.backend.name, engine.backend.version
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
async def hf_root(body: HFRequest, request: Request, response: Response,
                  engine: Engine = Depends(serving)) -> list[LabelScore]:
    return await _classify(request, engine, body, response)


@router.post("/models/{name}", summary="Hugging Face Inference API URL pattern: the model `name` (or name@version)")
async def hf_model(body: HFRequest, request: Request, response: Response,
                   engine: Engine = Depends(named)) -> list[LabelScore]:
    return await _classify(request, engine, body, response)
