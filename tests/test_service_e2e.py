"""End to end: `limoe serve` (real uvicorn, the shipped ONNX model) driven by the real clients
users have: huggingface_hub's InferenceClient, tritonclient, and a real Prometheus."""

import base64
import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from servers import ROOT, free_port, serve_fails, serve_process
from tools import BLOCK_TORCH

from limoe.runtime.model_store import ModelStore
from limoe.runtime.onnx_encoder import OnnxEncoders
from limoe.runtime.preprocess import open_image, preprocess_image
from limoe.runtime.zeroshot import build_zero_shot_classifier, softmax

LABELS = ["red circle", "blue square", "green triangle"]


def png(color, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def live():
    with serve_process(model="limoe-tiny", max_batch_wait_ms=2) as (base, proc):
        yield base, proc


def expected_scores(image: bytes, labels=LABELS) -> dict[str, float]:
    """The same computation done locally with the torch-free encoders."""
    enc = OnnxEncoders(ModelStore(ROOT / "model_store").load("limoe-tiny"))
    pixels = preprocess_image(open_image(image), enc.preprocess)[None]
    img = enc.encode_images(pixels).embeddings[0]
    w = build_zero_shot_classifier(lambda ids: enc.encode_tokens(ids).embeddings, enc.tokenizer, labels,
                                   enc.manifest.templates)
    return dict(zip(labels, softmax(enc.logit_scale * img @ w).tolist()))


def test_native_api_matches_the_local_computation(live):
    base, _ = live
    image = png((200, 30, 30))
    r = httpx.post(f"{base}/v1/classify", files=[("images", ("x.png", image, "image/png"))],
                   data={"labels": LABELS}, timeout=30)
    assert r.status_code == 200
    got = {x["label"]: x["score"] for x in r.json()["results"][0]["labels"]}
    assert got == pytest.approx(expected_scores(image), abs=1e-5)


def test_huggingface_inference_client(live):
    from huggingface_hub import InferenceClient

    base, _ = live
    image = png((30, 30, 200))
    expected = expected_scores(image)
    for client in (InferenceClient(model=f"{base}/models/limoe-tiny"), InferenceClient(base_url=base)):
        out = client.zero_shot_image_classification(image, candidate_labels=LABELS)
        assert [o.label for o in out] == sorted(expected, key=expected.get, reverse=True)
        assert {o.label: o.score for o in out} == pytest.approx(expected, abs=1e-5)


def test_huggingface_hypothesis_template(live):
    from huggingface_hub import InferenceClient

    base, _ = live
    image = png((30, 200, 30))
    out = InferenceClient(base_url=base).zero_shot_image_classification(
        image, candidate_labels=LABELS, hypothesis_template="an icon of {}.")
    enc_expected = expected_scores(image)  # default templates: a different ensemble
    assert sum(o.score for o in out) == pytest.approx(1.0, abs=1e-5)
    assert {o.label: o.score for o in out} != pytest.approx(enc_expected, abs=1e-7)


def test_tritonclient_http(live):
    import tritonclient.http as triton

    base, _ = live
    client = triton.InferenceServerClient(base.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("limoe-tiny")
    meta = client.get_model_metadata("limoe-tiny")
    assert [i["name"] for i in meta["inputs"]] == ["IMAGE", "LABELS"]
    assert meta["outputs"][0] == {"name": "SCORES", "datatype": "FP32", "shape": [-1, -1]}

    images = [png((200, 30, 30)), png((30, 30, 200))]
    for binary in (True, False):
        image_in = triton.InferInput("IMAGE", [2], "BYTES")
        if binary:
            image_in.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)
        else:  # JSON mode: images travel as base64 strings
            image_in.set_data_from_numpy(np.array([base64.b64encode(i) for i in images], dtype=object),
                                         binary_data=False)
        labels_in = triton.InferInput("LABELS", [3], "BYTES")
        labels_in.set_data_from_numpy(np.array([s.encode() for s in LABELS], dtype=object), binary_data=binary)
        result = client.infer("limoe-tiny", [image_in, labels_in],
                              outputs=[triton.InferRequestedOutput("SCORES", binary_data=binary),
                                       triton.InferRequestedOutput("EXPERTS", binary_data=binary)])
        scores = result.as_numpy("SCORES")
        assert scores.shape == (2, 3) and scores.dtype == np.float32
        for row, image in zip(scores, images):
            np.testing.assert_allclose(row, list(expected_scores(image).values()), atol=1e-5)
        experts = result.as_numpy("EXPERTS")
        assert experts.shape[0] == 2 and experts.min() >= -1
    # all outputs, binary, when none are named (tritonclient's default)
    image_in = triton.InferInput("IMAGE", [1], "BYTES")
    image_in.set_data_from_numpy(np.array(images[:1], dtype=object))
    labels_in = triton.InferInput("LABELS", [3], "BYTES")
    labels_in.set_data_from_numpy(np.array([s.encode() for s in LABELS], dtype=object))
    result = client.infer("limoe-tiny", [image_in, labels_in])
    assert result.as_numpy("SCORES").shape == (1, 3) and result.as_numpy("EXPERTS") is not None


def test_a_dropless_model_drops_nothing_and_routes_every_layer(live):
    """The served limoe-tiny is a dropless entry: after real traffic /metrics shows tokens routed in
    every MoE layer, for images and texts, and not one dropped token choice."""
    base, _ = live
    for color in ((250, 10, 10), (10, 250, 10), (10, 10, 250)):
        r = httpx.post(f"{base}/v1/classify", files=[("images", ("x.png", png(color), "image/png"))],
                       data={"labels": ["a dog", "a very long label about a red bicycle in the rain", "sun"]},
                       timeout=30)
        assert r.status_code == 200
    text = httpx.get(f"{base}/metrics", timeout=10).text
    routed: dict[tuple[str, str], float] = {}
    for layer, modality, value in re.findall(
            r'^limoe_expert_tokens_total\{expert="\d+",layer="(\d+)",modality="(\w+)",model="limoe-tiny",version="1"\} '
            r'([0-9.e+]+)$', text, re.M):
        routed[layer, modality] = routed.get((layer, modality), 0) + float(value)
    layers = ModelStore(ROOT / "model_store").load("limoe-tiny").data["moe"]["layers"]
    assert {(str(layer), m) for layer in layers for m in ("image", "text")} <= {k for k, v in routed.items() if v > 0}
    dropped = re.findall(r"^limoe_expert_tokens_dropped_total\{.*\} ([0-9.e+]+)$", text, re.M)
    assert sum(float(v) for v in dropped) == 0


def test_real_prometheus_scrapes_metrics(live, tmp_path):
    base, _ = live
    httpx.post(f"{base}/v1/classify", json={"images": [base64.b64encode(png((1, 2, 3))).decode()],
                                             "labels": LABELS}, timeout=30)
    prometheus = shutil.which("prometheus")
    assert prometheus, "the Debian package 'prometheus' must be installed (make test does it)"
    target = base.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n"
        f"  - job_name: limoe\n    static_configs:\n      - targets: ['{target}']\n")
    port = free_port()
    proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        api = f"http://127.0.0.1:{port}/api/v1/query"
        deadline, found = time.monotonic() + 30, {}
        while time.monotonic() < deadline:
            try:
                up = httpx.get(api, params={"query": 'up{job="limoe"}'}).json()["data"]["result"]
                tokens = httpx.get(api, params={"query": "sum by (modality) (limoe_expert_tokens_total)"}).json()
                found = {r["metric"]["modality"]: float(r["value"][1]) for r in tokens["data"]["result"]}
                if up and up[0]["value"][1] == "1" and {"image", "text"} <= set(found):
                    break
            except (httpx.HTTPError, KeyError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        assert up and up[0]["value"][1] == "1", "Prometheus never scraped the service successfully"
        assert found.get("image", 0) > 0 and found.get("text", 0) > 0
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_serve_path_needs_no_torch(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TORCH)
    import os

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(tmp_path) + (os.pathsep + old if old else "")
    try:
        with serve_process(model="limoe-tiny") as (base, _):
            r = httpx.post(f"{base}/v1/classify", json={"images": [base64.b64encode(png((9, 9, 9))).decode()],
                                                         "labels": LABELS}, timeout=30)
            assert r.status_code == 200
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def test_damaged_model_is_refused_at_start(tmp_path):
    store = tmp_path / "store"
    shutil.copytree(ROOT / "model_store" / "limoe-tiny", store / "limoe-tiny")
    onnx = store / "limoe-tiny" / "1" / "image_encoder.onnx"
    data = bytearray(onnx.read_bytes())
    data[100] ^= 0xFF
    onnx.write_bytes(bytes(data))
    code, err = serve_fails({"LIMOE_MODEL_STORE": str(store), "LIMOE_MODEL": "limoe-tiny"})
    assert code != 0
    assert "image_encoder.onnx: wrong sha256" in err


def test_invalid_settings_fail_with_the_variable_named():
    code, err = serve_fails({"LIMOE_MAX_BATCH_SIZE": "0"})
    assert code == 2 and "LIMOE_MAX_BATCH_SIZE" in err
    code, err = serve_fails({"LIMOE_DEVICE": "tpu"})
    assert code == 2 and "LIMOE_DEVICE" in err
    code, err = serve_fails({"LIMOE_MODEL": "no-such-model"})
    assert code != 0 and "no model named 'no-such-model'" in err
    # the shipped default holds int8 ONNX graphs only: other backends are refused in one line
    code, err = serve_fails({"LIMOE_BACKEND": "torchscript"})
    assert code == 1 and "the torchscript backend needs torchscript, which this entry does not have" in err
    code, err = serve_fails({"LIMOE_QUANTIZED": "false"})
    assert code == 1 and "needs image_onnx, text_onnx" in err and "Traceback" not in err
    # a device the backend cannot reach is refused before loading, also in one line
    code, err = serve_fails({"LIMOE_DEVICE": "cuda:64", "LIMOE_BACKEND": "torchscript", "LIMOE_MODEL": "limoe-tiny"})
    assert code == 1 and "error: LIMOE_DEVICE=cuda:64, but torch sees" in err and "Traceback" not in err
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        code, err = serve_fails({"LIMOE_DEVICE": "cuda"})
        assert code == 1 and "error: LIMOE_DEVICE=cuda, but this onnxruntime has no CUDA provider" in err
        assert "Traceback" not in err


def test_default_store_is_the_repository_one():
    from service.settings import Settings

    assert Path(Settings().model_store).resolve() == (ROOT / "model_store").resolve()


def test_torchscript_backend_agrees_with_onnx():
    image = png((120, 60, 200))
    with serve_process(model="limoe-tiny", backend="torchscript", device="cpu") as (base, _):
        models = httpx.get(f"{base}/v1/models").json()["models"][0]
        assert models["backend"] == "torchscript" and models["device"] == "cpu"
        r = httpx.post(f"{base}/v1/classify", json={"images": [base64.b64encode(image).decode()], "labels": LABELS},
                       timeout=30)
        got = {x["label"]: x["score"] for x in r.json()["results"][0]["labels"]}
    assert got == pytest.approx(expected_scores(image), abs=1e-4)
