"""An imported OpenCLIP entry (the tiny fixture architecture, `limoe import open-clip`) served by
the real `limoe serve` and used through every API, as a user who brought a CLIP would: native
classify and embed, the Hugging Face client, tritonclient (OIP v2), the openai client's batch jobs,
the web page, and `limoe classify` offline (issue 26)."""

import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from servers import serve_process
from test_batch_jobs import wait_finished

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "openclip"
sys.path.insert(0, str(FIXTURE))

LABELS = ["a photo of a cat", "café au lait", "rocket 🚀"]


def png(color, size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(sum(color))
    arr = np.clip(np.array(color)[None, None] + rng.integers(-60, 60, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_clip):
    tmp = tmp_path_factory.mktemp("clip-store")
    checkpoint, entry = tiny_clip
    shutil.copytree(entry, tmp / "store" / "tiny-clip" / "1")
    shutil.copy(checkpoint, tmp / "tiny.pt")
    for argv in (["upcycle", str(tmp / "tiny.pt"), "--arch", str(FIXTURE / "configs" / "limoe-tiny-clip.json"),
                  "--experts", "4", "--top-k", "2", "--moe-every", "1", "--out", str(tmp / "moe.safetensors")],
                 ["import", "open-clip", "--checkpoint", str(tmp / "moe.safetensors"), "--name", "tiny-clip-moe",
                  "--license", "MIT (test weights)", "--store", str(tmp / "store"), "--no-int8"]):
        out = subprocess.run([sys.executable, "-m", "limoe", *argv], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
    return tmp / "store"


@pytest.fixture(scope="module")
def live(store):  # the imported CLIP (the default) and its upcycled sparse copy
    with serve_process(models="tiny-clip,tiny-clip-moe", model_store=str(store), jobs_dir=str(store.parent / "jobs"),
                       max_batch_wait_ms=2) as (base, _):
        deadline = time.monotonic() + 120  # ready means the default is; wait for the second model too
        while httpx.get(f"{base}/v2/models/tiny-clip-moe/ready", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "tiny-clip-moe never became ready"
            time.sleep(0.2)
        yield base


def expected(store, image: bytes) -> dict[str, float]:
    from limoe.runtime.model_store import ModelStore
    from limoe.runtime.onnx_encoder import OnnxEncoders
    from limoe.runtime.preprocess import open_image, preprocess_image
    from limoe.runtime.zeroshot import build_zero_shot_classifier, softmax

    enc = OnnxEncoders(ModelStore(store).load("tiny-clip"))
    img = enc.encode_images(preprocess_image(open_image(image), enc.preprocess)[None]).embeddings[0]
    w = build_zero_shot_classifier(lambda ids: enc.encode_tokens(ids).embeddings, enc.tokenizer, LABELS,
                                   enc.manifest.templates)
    return dict(zip(LABELS, softmax(enc.logit_scale * img @ w).tolist()))


def test_native_classify_and_embed(live, store):
    image = png((200, 30, 30))
    r = httpx.post(f"{live}/v1/classify", files=[("images", ("x.png", image, "image/png"))],
                   data={"labels": LABELS}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "tiny-clip"
    got = {x["label"]: x["score"] for x in r.json()["results"][0]["labels"]}
    assert got == pytest.approx(expected(store, image), abs=1e-5)
    e = httpx.post(f"{live}/v1/embed", json={"texts": LABELS}, timeout=30)
    assert e.status_code == 200, e.text
    vectors = np.array([x["embedding"] for x in e.json()["texts"]])
    assert vectors.shape == (3, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    ready = httpx.get(f"{live}/readyz", timeout=10).json()
    assert ready["model"] == "tiny-clip" and ready["status"] == "ready"


def test_the_upcycled_sparse_clip_answers_as_the_dense_one_and_shows_its_routing(live, store):
    image = png((30, 30, 200))
    r = httpx.post(f"{live}/v1/classify", files=[("images", ("x.png", image, "image/png"))],
                   data={"labels": LABELS, "model": "tiny-clip-moe", "explain": "true"}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny-clip-moe"
    got = {x["label"]: x["score"] for x in body["results"][0]["labels"]}
    assert got == pytest.approx(expected(store, image), abs=1e-4)  # experts are copies of the MLPs: step 0
    routing = body["results"][0]["routing"]
    assert routing["num_experts"] == 4 and routing["grid"] == 4 and [x["layer"] for x in routing["layers"]] == [0, 1]
    for layer in routing["layers"]:
        assert sum(layer["tokens_per_expert"]) == 16 * 2 and layer["dropped"] == 0  # 16 patches, top-2, dropless
        assert len(layer["top1_expert"]) == 16 and all(0 <= e < 4 for e in layer["top1_expert"])
    prompts = body["label_routing"][0]["prompts"]
    assert prompts and all(len(p["routing"]["layers"]) == 2 for p in prompts)
    listed = {m["name"]: m for m in httpx.get(f"{live}/v1/models", timeout=10).json()["models"]}
    assert listed["tiny-clip-moe"]["ready"] and listed["tiny-clip"]["ready"]


def test_huggingface_and_triton_clients(live, store):
    import tritonclient.http as triton
    from huggingface_hub import InferenceClient

    image = png((30, 30, 200))
    want = expected(store, image)
    out = InferenceClient(model=f"{live}/models/tiny-clip").zero_shot_image_classification(image,
                                                                                          candidate_labels=LABELS)
    assert {o.label: o.score for o in out} == pytest.approx(want, abs=1e-5)
    client = triton.InferenceServerClient(live.removeprefix("http://"))
    assert client.is_model_ready("tiny-clip")
    image_in = triton.InferInput("IMAGE", [1], "BYTES")
    image_in.set_data_from_numpy(np.array([image], dtype=object))
    labels_in = triton.InferInput("LABELS", [3], "BYTES")
    labels_in.set_data_from_numpy(np.array([s.encode() for s in LABELS], dtype=object))
    scores = client.infer("tiny-clip", [image_in, labels_in]).as_numpy("SCORES")
    np.testing.assert_allclose(scores[0], list(want.values()), atol=1e-5)


def test_a_batch_job_with_the_openai_client(live):
    import base64

    import openai

    client = openai.OpenAI(base_url=live + "/v1", api_key="unused", max_retries=0)
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/classify",
                         "body": {"images": [base64.b64encode(png((40 * i, 90, 20))).decode()], "labels": LABELS}})
             for i in range(3)]
    uploaded = client.files.create(file=("requests.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/classify", completion_window="24h")
    assert wait_finished(live, batch.id)["status"] == "completed"  # polled over plain HTTP
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 3
    rows = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert all(r["response"]["status_code"] == 200 for r in rows)


def test_the_web_page_is_served(live):
    page = httpx.get(live + "/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


def test_offline_classify(store, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, color in enumerate(((200, 30, 30), (30, 200, 30))):
        (folder / f"{i}.png").write_bytes(png(color))
    out = subprocess.run([sys.executable, "-m", "limoe", "classify", str(folder), "--labels", ",".join(LABELS[:2]),
                          "--model", "tiny-clip", "--store", str(store), "--out", str(tmp_path / "r.jsonl")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(abs(sum(x["score"] for x in r["labels"]) - 1) < 1e-4 for r in rows)
    want = expected(store, (folder / "0.png").read_bytes())
    assert rows[0]["labels"][0]["label"] in want
