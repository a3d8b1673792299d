"""The HTTP API on the deterministic fake backend, over real uvicorn on 127.0.0.1."""

import base64
import io
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from servers import uvicorn_thread

from service.app import create_app
from service.backends import FakeBackend
from service.settings import Settings


def png(color=(255, 0, 0), size=(24, 24), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (90, 30, 200)]
LABELS = ["cat", "dog", "bird", "red circle"]


def settings(**kw) -> Settings:
    return Settings(**{"max_batch_size": 8, "max_batch_wait_ms": 20, "warmup": False, **kw})


@pytest.fixture(scope="module")
def server():
    fake = FakeBackend()
    with uvicorn_thread(create_app(settings(), backend=fake)) as base:
        yield base, fake


def classify(base, images, labels=LABELS, **extra):
    return httpx.post(f"{base}/v1/classify", json={"images": [b64(i) for i in images], "labels": labels, **extra},
                      timeout=30)


def test_classify_json_ranks_labels(server):
    base, _ = server
    r = classify(base, [png(), png((0, 0, 255))])
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == "fake" and body["version"] == "1"
    assert [res["index"] for res in body["results"]] == [0, 1]
    for res in body["results"]:
        scores = [x["score"] for x in res["labels"]]
        assert sorted(x["label"] for x in res["labels"]) == sorted(LABELS)
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-5)
    assert body["results"][0]["labels"] != body["results"][1]["labels"]


def test_multipart_and_json_agree_and_top_k(server):
    base, _ = server
    files = [("images", ("a.png", png(), "image/png")), ("images", ("b.png", png((0, 255, 0)), "image/png"))]
    data = {"labels": LABELS, "top_k": "2"}
    multi = httpx.post(f"{base}/v1/classify", files=files, data=data, timeout=30).json()
    js = classify(base, [png(), png((0, 255, 0))], top_k=2).json()
    assert multi["results"] == js["results"]
    assert all(len(res["labels"]) == 2 for res in js["results"])


def test_scores_are_softmax_of_scaled_cosines(server):
    # Recompute from the fake encoders: softmax(logit_scale * image . ensemble(labels)).
    base, fake = server
    from limoe.runtime.preprocess import open_image, preprocess_image
    from limoe.runtime.zeroshot import build_zero_shot_classifier, softmax

    templates = ["{}", "a photo of a {}."]
    img = fake.encode_images(preprocess_image(open_image(png((10, 200, 30))), fake.preprocess)[None]).embeddings[0]
    w = build_zero_shot_classifier(lambda ids: fake.encode_tokens(ids).embeddings, fake.tokenizer, LABELS, templates)
    expected = softmax(fake.logit_scale * img @ w)
    got = classify(base, [png((10, 200, 30))], templates=templates).json()["results"][0]["labels"]
    assert {x["label"]: x["score"] for x in got} == pytest.approx(dict(zip(LABELS, expected.tolist())), abs=1e-5)


def test_explain_shows_routing_per_layer(server):
    base, fake = server
    res = classify(base, [png()], explain=True).json()["results"][0]
    routing = res["routing"]
    assert routing["modality"] == "image" and routing["num_experts"] == fake.moe.num_experts
    assert routing["grid"] ** 2 == fake.manifest.image_tokens
    assert [layer["layer"] for layer in routing["layers"]] == list(fake.moe.layers)
    for layer in routing["layers"]:
        assert sum(layer["tokens_per_expert"]) == fake.manifest.image_tokens
        assert len(layer["top1_expert"]) == fake.manifest.image_tokens
    assert "label_routing" not in classify(base, [png()]).json()  # only with explain


def test_explain_shows_the_label_prompts_routing(server):
    base, fake = server
    templates = ["{}", "a photo of a {}."]
    body = classify(base, [png()], explain=True, templates=templates).json()
    assert [entry["label"] for entry in body["label_routing"]] == LABELS
    prompts = [p for entry in body["label_routing"] for p in entry["prompts"]]
    assert [p["prompt"] for p in prompts] == [t.replace("{}", label) for label in LABELS for t in templates]
    for p in prompts:
        real_tokens = int((fake.tokenizer.encode([p["prompt"]])[0] != 0).sum())  # padding is never routed
        assert p["routing"]["modality"] == "text" and "grid" not in p["routing"]
        routed = [sum(layer["tokens_per_expert"]) for layer in p["routing"]["layers"]]
        assert routed == [real_tokens] * len(fake.moe.layers)
    # each prompt routed as /v1/embed routes the same text
    embedded = httpx.post(f"{base}/v1/embed", json={"texts": [p["prompt"] for p in prompts], "explain": True}).json()
    assert [p["routing"] for p in prompts] == [t["routing"] for t in embedded["texts"]]


def test_label_embeddings_are_cached(server):
    base, fake = server
    labels = ["unusual label one", "unusual label two"]
    before = sum(n for m, n in fake.calls if m == "text")
    classify(base, [png()], labels=labels)
    after_first = sum(n for m, n in fake.calls if m == "text")
    classify(base, [png((1, 2, 3))], labels=labels)
    after_second = sum(n for m, n in fake.calls if m == "text")
    templates = len(fake.manifest.templates)
    assert after_first - before == len(labels) * templates  # every prompt once
    assert after_second == after_first  # repeated label set: image encoder only
    metrics = httpx.get(f"{base}/metrics").text
    assert 'limoe_label_cache_total{model="fake",result="hit",version="1"}' in metrics


def test_concurrent_requests_get_their_own_results(server):
    base, _ = server
    alone = {c: classify(base, [png(c)]).json()["results"][0]["labels"] for c in COLORS}
    with ThreadPoolExecutor(len(COLORS) * 2) as pool:
        together = list(pool.map(lambda c: (c, classify(base, [png(c)]).json()), COLORS * 2))
    for color, body in together:
        assert body["results"][0]["labels"] == alone[color]


def test_concurrent_requests_share_forward_passes():
    fake = FakeBackend()
    n, b = 16, 8
    with uvicorn_thread(create_app(settings(max_batch_size=b, max_batch_wait_ms=1000), backend=fake)) as base:
        classify(base, [png()])  # label embeddings now cached
        fake.calls.clear()
        barrier = threading.Barrier(n)

        def one(i):
            barrier.wait()
            return classify(base, [png(COLORS[i % len(COLORS)])]).status_code

        with ThreadPoolExecutor(n) as pool:
            assert set(pool.map(one, range(n))) == {200}
    image_passes = [size for modality, size in fake.calls if modality == "image"]
    assert sum(image_passes) == n
    assert len(image_passes) <= math.ceil(n / b)


def test_bulk_keeps_input_order_and_isolates_bad_items(server):
    base, _ = server
    images = [png(COLORS[i % len(COLORS)]) for i in range(20)]
    images[7] = b"not an image"
    body = httpx.post(f"{base}/v1/classify/bulk", json={"images": [b64(i) for i in images], "labels": LABELS},
                      timeout=60).json()
    results = body["results"]
    assert [r["index"] for r in results] == list(range(20))
    assert results[7]["code"] == "invalid_image" and "labels" not in results[7]
    single = classify(base, [images[3]]).json()["results"][0]["labels"]
    assert results[3]["labels"] == single


def test_embed_images_and_texts(server):
    base, fake = server
    body = httpx.post(f"{base}/v1/embed", json={"images": [b64(png())], "texts": ["cat", "dog"], "explain": True}).json()
    assert len(body["images"]) == 1 and len(body["texts"]) == 2
    for item in body["images"] + body["texts"]:
        assert np.linalg.norm(item["embedding"]) == pytest.approx(1.0, abs=1e-5)
    assert body["texts"][0]["routing"]["modality"] == "text"


def test_models_and_openapi(server):
    base, fake = server
    models = httpx.get(f"{base}/v1/models").json()["models"]
    assert models[0]["name"] == "fake" and models[0]["manifest"]["embedding_size"] == fake.embed_dim
    spec = httpx.get(f"{base}/openapi.json").json()
    classify_doc = spec["paths"]["/v1/classify"]["post"]
    assert {"multipart/form-data", "application/json"} <= set(classify_doc["requestBody"]["content"])
    request_schema = classify_doc["requestBody"]["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
    assert spec["components"]["schemas"][request_schema]["examples"]  # generated from the model, with examples
    for path in ("/", "/models/{name}", "/v1/classify/bulk", "/v1/embed", "/v2/models/{name}/infer", "/metrics"):
        assert path in spec["paths"], path


def test_timeout_answers_504_and_the_server_recovers():
    fake = FakeBackend(delay_s=1.0)
    with uvicorn_thread(create_app(settings(request_timeout_s=0.3), backend=fake)) as base:
        r = classify(base, [png()])
        assert r.status_code == 504 and r.json()["code"] == "timeout"
        fake.delay_s = 0.0
        time.sleep(1.2)  # let the in-flight pass finish
        assert classify(base, [png()]).status_code == 200


def test_disconnected_clients_are_dropped_from_the_queue():
    fake = FakeBackend(delay_s=1.5)  # the blocker's forward pass outlasts the impatient client by far
    # One pass at a time: the blocker's holds the encoder, so the impatient client's image stays queued.
    app = create_app(settings(max_batch_size=1, max_batch_wait_ms=0, encoder_passes=1), backend=fake)
    with uvicorn_thread(app) as base:
        fake.delay_s = 0.0
        classify(base, [png()])  # label embeddings cached
        fake.delay_s = 1.5
        fake.calls.clear()
        blocker = threading.Thread(target=classify, args=(base, [png((0, 9, 9))]))
        blocker.start()
        deadline = time.monotonic() + 10
        while not any(m == "image" for m, _ in fake.calls) and time.monotonic() < deadline:
            time.sleep(0.01)  # until the blocker is inside its forward pass
        with pytest.raises(httpx.TimeoutException):  # this client gives up while queued
            httpx.post(f"{base}/v1/classify", json={"images": [b64(png((9, 9, 0)))], "labels": LABELS}, timeout=0.2)
        blocker.join()
        fake.delay_s = 0.0
        assert classify(base, [png((5, 5, 5))]).status_code == 200
    assert [n for m, n in fake.calls if m == "image"] == [1, 1]  # blocker and the last request only


def test_overload_answers_429_with_retry_after():
    fake = FakeBackend()
    with uvicorn_thread(create_app(settings(max_batch_size=1, queue_size=1, max_batch_wait_ms=0), backend=fake)) as base:
        classify(base, [png()])
        fake.delay_s = 0.5
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda i: classify(base, [png(COLORS[i])]), range(6)))
        fake.delay_s = 0.0
        statuses = [r.status_code for r in responses]
        assert 429 in statuses and 200 in statuses
        busy = next(r for r in responses if r.status_code == 429)
        assert busy.headers["retry-after"] == "1" and busy.json()["code"] == "overloaded"
        assert classify(base, [png()]).status_code == 200


def test_not_ready_until_warm():
    fake = FakeBackend(delay_s=0.3)
    app = create_app(settings(max_batch_size=3, warmup=True), backend=fake)
    with uvicorn_thread(app, ready_path="/healthz") as base:
        r = httpx.get(f"{base}/readyz")
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        c = classify(base, [png()])
        assert c.status_code == 503 and c.json()["code"] == "not_ready"
        # the v2 health answers carry the protocol's bodies (KServe's client reads them) besides the status
        v2 = httpx.get(f"{base}/v2/health/ready")
        assert (v2.status_code, v2.json()) == (503, {"ready": False})
        v2 = httpx.get(f"{base}/v2/models/fake/ready")
        assert (v2.status_code, v2.json()) == (503, {"name": "fake", "ready": False})
        assert httpx.get(f"{base}/v2/health/live").json() == {"live": True}
        assert httpx.get(f"{base}/healthz").status_code == 200
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(f"{base}/readyz").status_code == 200
        v2 = httpx.get(f"{base}/v2/health/ready")
        assert (v2.status_code, v2.json()) == (200, {"ready": True})
        assert httpx.get(f"{base}/v2/models/fake/versions/1/ready").json() == {"name": "fake", "ready": True}
    warm = [(m, n) for m, n in fake.calls]
    assert ("image", 3) in warm and ("text", 3) in warm  # every batch size was exercised


def test_api_keys():
    app = create_app(settings(api_keys="k1,secret-2", protect_metrics=True), backend=FakeBackend())
    with uvicorn_thread(app) as base:
        body = {"images": [b64(png())], "labels": LABELS}
        assert httpx.post(f"{base}/v1/classify", json=body).status_code == 401
        wrong = httpx.post(f"{base}/v1/classify", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert wrong.json()["code"] == "unauthorized"
        ok = httpx.post(f"{base}/v1/classify", json=body, headers={"Authorization": "Bearer secret-2"})
        assert ok.status_code == 200
        assert httpx.get(f"{base}/healthz").status_code == 200  # health stays open
        assert httpx.get(f"{base}/metrics").status_code == 401  # protect_metrics
        assert httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer k1"}).status_code == 200


def test_request_metrics_use_route_templates(server):
    base, _ = server
    httpx.get(f"{base}/v2/models/fake/ready")
    httpx.get(f"{base}/no/such/page")
    text = httpx.get(f"{base}/metrics").text
    assert 'limoe_requests_total{method="GET",route="/v2/models/{name}/ready",status="200"}' in text
    assert 'route="unmatched",status="404"' in text
    for name in ("limoe_queue_wait_seconds_bucket", "limoe_inference_seconds_bucket", "limoe_batch_size_bucket",
                 "limoe_preprocess_seconds_bucket", "limoe_queue_depth", 'limoe_expert_tokens_total{expert="0",layer="1",modality="image",model="fake",version="1"}',
                 'modality="text"', "limoe_model_info"):
        assert name in text, name


def test_the_engine_answers_in_arrays():
    """Engine.classify gives a request's (N, C) probabilities in label order, each image's error
    and its routing; the adapters sort and shape. Checked against the fake encoders directly."""
    import asyncio

    from limoe.runtime.preprocess import open_image, preprocess_image
    from limoe.runtime.zeroshot import build_zero_shot_classifier, softmax
    from service.engine import Engine
    from service.metrics import Metrics

    fake = FakeBackend()
    engine = Engine(fake, settings(), Metrics())
    labels = ["dog", "cat", "red circle"]

    async def run():
        await engine.start()
        try:
            return await engine.classify([png(), b"not an image"], labels, engine.check_templates(None))
        finally:
            await engine.stop()

    scores = asyncio.run(run())
    pixels = preprocess_image(open_image(png()), fake.preprocess)[None]
    image = fake.encode_images(pixels)
    w = build_zero_shot_classifier(lambda ids: fake.encode_tokens(ids).embeddings, fake.tokenizer, labels,
                                   fake.manifest.templates)
    assert scores.probs.shape == (2, 3) and scores.probs.dtype == np.float32
    assert scores.probs[0] == pytest.approx(softmax(fake.logit_scale * image.embeddings[0] @ w), abs=1e-6)
    assert scores.errors[0] is None and scores.errors[1].code == "invalid_image"
    assert not scores.probs[1].any() and scores.routing[1] is None
    routing = scores.routing[0]  # the fake routes every patch to one expert (K = 1), dropping none
    top1 = image.expert_index[0, ..., 0]  # (M, T)
    assert routing.top1.tolist() == top1.tolist() and routing.dropped.tolist() == [0] * len(fake.moe.layers)
    assert routing.tokens_per_expert.tolist() == [np.bincount(row, minlength=fake.moe.num_experts).tolist()
                                                  for row in top1]


def test_warm_up_sizes_grow_linearly():
    from service.engine import Engine
    from service.metrics import Metrics

    def sizes(top):
        return Engine(FakeBackend(), settings(max_batch_size=top), Metrics()).warm_up_sizes()

    assert sizes(3) == [1, 2, 3]
    assert sizes(32) == list(range(1, 33))
    assert sizes(100) == list(range(1, 33)) + [64, 100]
    assert len(sizes(1024)) == 32 + 5 + 0  # 64, 128, 256, 512, 1024


@pytest.mark.parametrize("protocol", ["h11", "httptools"])
def test_what_never_reaches_the_app_gets_json_with_either_parser(protocol):
    """limoe serve runs uvicorn's auto-chosen parser with service.http.http_protocol: both parsers
    answer unparseable requests and trickled headers in the JSON error shape."""
    import importlib
    import socket

    module, name = {"h11": ("uvicorn.protocols.http.h11_impl", "H11Protocol"),
                    "httptools": ("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol")}[protocol]
    base_cls = getattr(importlib.import_module(module), name)
    from service.http import http_protocol

    def exchange(address, raw: bytes) -> tuple[bytes, dict]:
        with socket.create_connection(address, timeout=10) as s:
            s.sendall(raw)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, payload = data.partition(b"\r\n\r\n")
        assert b"application/json" in head, data[:300]
        return head.split(b"\r\n")[0], json.loads(payload)

    app = create_app(settings(), backend=FakeBackend())
    with uvicorn_thread(app, http=http_protocol(base_cls, header_timeout_s=0.5)) as base:
        host, port = base.removeprefix("http://").split(":")
        status, body = exchange((host, int(port)), b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad\x01Header: 1\r\n\r\n")
        assert status == b"HTTP/1.1 400 Bad Request" and body["code"] == "invalid_http"
        status, body = exchange((host, int(port)), b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        assert status == b"HTTP/1.1 408 Request Timeout" and body["code"] == "header_timeout"
        assert httpx.get(base + "/healthz").status_code == 200


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_load_every_asset_from_the_server_itself(page):
    """/docs and /redoc work on an offline cluster: every script, stylesheet and icon they name is
    served by this server (from the fastapi-offline package), none from a CDN, also with API keys."""
    import re

    app = create_app(settings(api_keys="secret"), backend=FakeBackend())
    with uvicorn_thread(app) as base:
        html = httpx.get(f"{base}{page}", timeout=10)
        assert html.status_code == 200 and "text/html" in html.headers["content-type"]
        urls = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]+)['"]""", html.text)
        urls += re.findall(r"""url:\s*['"]([^'"]+)['"]""", html.text)  # Swagger UI's spec URL
        assert urls and not [u for u in urls if "://" in u or u.startswith("//")], urls
        assets = [u for u in urls if u.startswith("/docs/assets/")]
        assert any(u.endswith(".js") for u in assets)
        for url in set(urls):
            r = httpx.get(f"{base}{url}", timeout=10)
            assert r.status_code == 200 and len(r.content) > 0, url
