"""Batch jobs (docs/BATCH.md): /v1/files and /v1/batches in the OpenAI Batch API's shapes, over
real uvicorn. Most tests run the app on the deterministic fake backend in this process; the
SIGKILL test and the benchmark's smoke run `limoe serve` on limoe-tiny in a subprocess.

Deadlines are generous and nothing asserts how fast anything is; the slow servers only make
sure that a job is still running when the test acts on it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from servers import ROOT, Server, uvicorn_thread
from service.app import create_app
from service.backends import FakeBackend
from service.settings import Settings

LABELS = ["red", "green", "blue"]
COLORS = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (200, 200, 20), (20, 200, 200)]


def png(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def request_line(custom_id: str, body: dict, url: str = "/v1/classify") -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def classify_body(i: int) -> dict:
    return {"images": [png(COLORS[i % len(COLORS)])], "labels": LABELS, "top_k": 2}


def upload(base: str, data: bytes, key: str | None = None, purpose: str = "batch") -> httpx.Response:
    return httpx.post(f"{base}/v1/files", files={"file": ("requests.jsonl", data)}, data={"purpose": purpose},
                      headers=auth(key), timeout=30)


def create(base: str, file_id: str, key: str | None = None, **extra) -> httpx.Response:
    return httpx.post(f"{base}/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/classify",
                                                  "completion_window": "24h", **extra}, headers=auth(key), timeout=30)


def auth(key: str | None) -> dict:
    return {"authorization": f"Bearer {key}"} if key else {}


def get_batch(base: str, batch_id: str, key: str | None = None) -> dict:
    r = httpx.get(f"{base}/v1/batches/{batch_id}", headers=auth(key), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_finished(base: str, batch_id: str, key: str | None = None, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while (batch := get_batch(base, batch_id, key))["status"] not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, f"batch still {batch['status']} after {timeout:g}s"
        time.sleep(0.05)
    return batch


def records(base: str, file_id: str | None, key: str | None = None) -> list[dict]:
    if file_id is None:
        return []
    r = httpx.get(f"{base}/v1/files/{file_id}/content", headers=auth(key), timeout=30)
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines()]


def run_batch(base: str, lines: list[str], key: str | None = None, **extra) -> dict:
    r = upload(base, "\n".join(lines).encode() + b"\n", key)
    assert r.status_code == 200, r.text
    r = create(base, r.json()["id"], key, **extra)
    assert r.status_code == 200, r.text
    return wait_finished(base, r.json()["id"], key)


def metric_value(base: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.split()[-1])
    return 0.0


def on_loop(app, coro):
    """Run `coro` on the server's event loop (that of the app's job runner), from the test thread."""
    loop = app.state.jobs._cleaner.get_loop()
    return asyncio.run_coroutine_threadsafe(coro, loop).result(10)


def settings(tmp: Path, **kw) -> Settings:
    return Settings(**{"warmup": False, "max_batch_size": 8, "max_batch_wait_ms": 2, "jobs_dir": tmp,
                       "jobs_max_lines": 8, "jobs_max_file_bytes": 64 * 1024, **kw})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with uvicorn_thread(create_app(settings(tmp_path_factory.mktemp("jobs")), backend=FakeBackend())) as base:
        yield base


# -- the whole flow -----------------------------------------------------------------------------------------

def test_a_batch_answers_each_line_as_classify_would_and_failed_lines_go_to_the_error_file(server):
    base = server
    lines_before = {o: metric_value(base, "limoe_batch_job_lines_total", outcome=o) for o in ("completed", "failed")}
    lines = [request_line("a", classify_body(0)),
             request_line("b", {"images": ["not base64!"], "labels": LABELS}),  # 400 invalid_base64
             request_line("c", classify_body(1)),
             "",  # blank lines are skipped
             request_line("d", {"images": [png(COLORS[2])]}),  # 422: no labels
             request_line("e", {**classify_body(2), "labels": ["red", "red"]}),  # 422 invalid_labels
             request_line("f", classify_body(3))]
    batch = run_batch(base, lines, metadata={"project": "test"})
    assert batch["status"] == "completed" and batch["errors"] is None
    assert batch["request_counts"] == {"total": 6, "completed": 3, "failed": 3}
    assert batch["metadata"] == {"project": "test"}
    assert batch["created_at"] <= batch["in_progress_at"] <= batch["finalizing_at"] <= batch["completed_at"]

    output = records(base, batch["output_file_id"])
    assert [r["custom_id"] for r in output] == ["a", "c", "f"]  # input order
    for r, i in zip(output, (0, 1, 3)):
        direct = httpx.post(f"{base}/v1/classify", json=classify_body(i), timeout=30)
        assert r["response"] == {"status_code": 200, "body": direct.json()} and r["error"] is None
        assert r["id"].startswith("batch_req_")

    errors = records(base, batch["error_file_id"])
    assert [r["custom_id"] for r in errors] == ["b", "d", "e"]
    assert [r["response"]["status_code"] for r in errors] == [400, 422, 422]
    assert [r["error"]["code"] for r in errors] == ["invalid_base64", "invalid_request", "invalid_labels"]
    for r, body in zip(errors, (json.loads(lines[i])["body"] for i in (1, 4, 5))):  # each as /v1/classify answers
        direct = httpx.post(f"{base}/v1/classify", json=body, timeout=30)
        assert (r["response"]["status_code"], r["response"]["body"]) == (direct.status_code, direct.json())
        assert r["error"]["message"] == direct.json()["error"]

    out_file = httpx.get(f"{base}/v1/files/{batch['output_file_id']}", timeout=10).json()
    assert out_file["object"] == "file" and out_file["purpose"] == "batch_output"
    assert metric_value(base, "limoe_batch_job_lines_total", outcome="completed") == lines_before["completed"] + 3
    assert metric_value(base, "limoe_batch_job_lines_total", outcome="failed") == lines_before["failed"] + 3
    assert metric_value(base, "limoe_batch_jobs", status="completed") >= 1


def test_the_openai_client_runs_a_batch(server):
    # The official client, pointed at our base URL. Its `endpoint` parameter is typed as a
    # Literal of OpenAI's routes, but it sends what it is given: no raw request needed.
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    data = "\n".join(request_line(f"req-{i}", classify_body(i)) for i in range(3)).encode()
    uploaded = client.files.create(file=("requests.jsonl", data), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(data)
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/classify", completion_window="24h")
    assert batch.status == "validating" and batch.endpoint == "/v1/classify"
    deadline = time.monotonic() + 60
    while batch.status not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.request_counts.completed == 3
    lines = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert [r["custom_id"] for r in lines] == ["req-0", "req-1", "req-2"]
    assert all(r["response"]["status_code"] == 200 for r in lines)


# -- validation and limits ----------------------------------------------------------------------------------

def test_a_malformed_file_fails_at_validation_with_each_problem_named(server):
    lines = [request_line("ok", classify_body(0)),
             "{not json",
             json.dumps({"method": "POST", "url": "/v1/classify", "body": {}}),  # no custom_id
             request_line("ok", classify_body(1)),  # duplicate
             request_line("x", classify_body(0), url="/v1/embed"),
             json.dumps([1, 2])]
    batch = run_batch(server, lines)
    assert batch["status"] == "failed" and batch["failed_at"] is not None
    assert batch["output_file_id"] is None and batch["error_file_id"] is None
    assert [(e["line"], e["code"]) for e in batch["errors"]["data"]] == [
        (2, "invalid_json_line"), (3, "missing_custom_id"), (4, "duplicate_custom_id"), (5, "mismatched_endpoint"),
        (6, "invalid_json_line")]


def test_a_file_over_the_line_cap_fails_at_validation(server):
    batch = run_batch(server, [request_line(f"r{i}", classify_body(i)) for i in range(9)])  # the cap is 8
    assert batch["status"] == "failed"
    assert [e["code"] for e in batch["errors"]["data"]] == ["too_many_lines"]


def test_uploads_are_checked(server):
    assert upload(server, b"x" * (64 * 1024 + 1)).json()["code"] == "file_too_large"  # LIMOE_JOBS_MAX_FILE_BYTES
    assert upload(server, b"x" * (200 * 1024)).status_code == 413  # the body itself, before it is read
    r = upload(server, b"")
    assert (r.status_code, r.json()["code"]) == (422, "empty_file")
    r = upload(server, b"{}", purpose="fine-tune")
    assert (r.status_code, r.json()["code"]) == (422, "invalid_purpose")
    r = httpx.post(f"{server}/v1/files", json={"file": "x"}, timeout=10)
    assert r.status_code == 415
    r = create(server, "file-nothing")
    assert (r.status_code, r.json()["code"]) == (404, "file_not_found")
    file_id = upload(server, b"{}").json()["id"]
    r = httpx.post(f"{server}/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/embed",
                                                  "completion_window": "24h"}, timeout=10)
    assert r.status_code == 422 and r.json()["code"] == "invalid_request"
    assert httpx.get(f"{server}/v1/batches/batch_nothing", timeout=10).status_code == 404


def test_list_pages_newest_first(server):
    ids = [run_batch(server, [request_line("r", classify_body(i))])["id"] for i in range(3)]
    everything = httpx.get(f"{server}/v1/batches", params={"limit": 100}, timeout=10).json()
    assert everything["object"] == "list" and not everything["has_more"]
    all_ids = [b["id"] for b in everything["data"]]
    assert all_ids[:3] == ids[::-1]
    pages, after = [], None
    while True:
        page = httpx.get(f"{server}/v1/batches", params={"limit": 2, **({"after": after} if after else {})},
                         timeout=10).json()
        assert len(page["data"]) <= 2 and page["first_id"] == page["data"][0]["id"]
        pages.append([b["id"] for b in page["data"]])
        after = page["last_id"]
        if not page["has_more"]:
            break
    assert [i for p in pages for i in p] == all_ids and all(len(p) == 2 for p in pages[:-1])
    assert httpx.get(f"{server}/v1/batches", params={"limit": 101}, timeout=10).status_code == 422


# -- cancel, active cap, completion window (a slow fake model) ----------------------------------------------

@pytest.fixture
def slow(tmp_path):
    """One job at a time, one request at a time, 0.3 s per forward pass; cleanup every second."""
    app = create_app(settings(tmp_path, jobs_max_active=1, jobs_concurrency=1, jobs_ttl_s=4),
                     backend=FakeBackend(delay_s=0.3))
    with uvicorn_thread(app) as base:
        yield base, app


def test_cancel_keeps_what_was_answered_and_frees_the_active_slot(slow):
    base, _ = slow
    file_id = upload(base, "\n".join(request_line(f"r{i}", classify_body(i)) for i in range(8)).encode()).json()["id"]
    batch = create(base, file_id).json()
    r = create(base, file_id)  # LIMOE_JOBS_MAX_ACTIVE=1
    assert (r.status_code, r.json()["code"]) == (429, "too_many_batches")
    r = httpx.delete(f"{base}/v1/files/{file_id}", timeout=10)
    assert (r.status_code, r.json()["code"]) == (409, "file_in_use")
    r = httpx.post(f"{base}/v1/batches/{batch['id']}/cancel", timeout=10)
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
    batch = wait_finished(base, batch["id"])
    assert batch["status"] == "cancelled" and batch["cancelling_at"] is not None and batch["cancelled_at"] is not None
    counts = batch["request_counts"]
    assert counts["total"] in (0, 8) and counts["completed"] < 8  # cut short
    assert len(records(base, batch["output_file_id"])) == counts["completed"]
    r = httpx.post(f"{base}/v1/batches/{batch['id']}/cancel", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"  # cancelling again changes nothing
    assert create(base, file_id).status_code == 200  # its slot is free again


def test_a_file_no_batch_reads_can_be_deleted(server):
    file_id = upload(server, b"{}").json()["id"]
    r = httpx.delete(f"{server}/v1/files/{file_id}", timeout=10)
    assert r.json() == {"id": file_id, "object": "file", "deleted": True}
    assert httpx.get(f"{server}/v1/files/{file_id}", timeout=10).status_code == 404
    assert httpx.delete(f"{server}/v1/files/{file_id}", timeout=10).status_code == 404


def test_a_batch_past_its_completion_window_expires(slow):
    base, app = slow
    file_id = upload(base, "\n".join(request_line(f"r{i}", classify_body(i)) for i in range(8)).encode()).json()["id"]
    batch = create(base, file_id).json()
    on_loop(app, app.state.jobs.store.update_batch(batch["id"], expires_at=time.time() - 1))  # 24 h later
    batch = wait_finished(base, batch["id"])
    assert batch["status"] == "expired" and batch["expired_at"] is not None
    assert len(records(base, batch["output_file_id"])) == batch["request_counts"]["completed"] < 8


def test_files_and_batches_are_deleted_after_the_ttl(slow, tmp_path):
    base, _ = slow  # LIMOE_JOBS_TTL_S=4
    batch = run_batch(base, [request_line("r", classify_body(0))])
    assert batch["status"] == "completed"
    stored = sorted(p.name for p in (tmp_path / "files").iterdir() if p.is_file())
    assert stored == sorted([batch["input_file_id"], batch["output_file_id"]])
    deadline = time.monotonic() + 30
    while httpx.get(f"{base}/v1/batches/{batch['id']}", timeout=10).status_code != 404:
        assert time.monotonic() < deadline, "the batch outlived its TTL"
        time.sleep(0.2)
    for file_id in (batch["input_file_id"], batch["output_file_id"]):
        assert httpx.get(f"{base}/v1/files/{file_id}/content", timeout=10).status_code == 404
    assert not [p for p in (tmp_path / "files").iterdir() if p.is_file()]


# -- API keys -------------------------------------------------------------------------------------------------

def test_one_key_cannot_see_another_keys_files_or_batches(tmp_path):
    app = create_app(settings(tmp_path, api_keys="alice-key,bob-key"), backend=FakeBackend())
    with uvicorn_thread(app) as base:
        assert upload(base, b"{}").status_code == 401  # no key
        batch = run_batch(base, [request_line("r", classify_body(0))], key="alice-key")
        assert batch["status"] == "completed"
        for path in (f"/v1/batches/{batch['id']}", f"/v1/files/{batch['input_file_id']}",
                     f"/v1/files/{batch['output_file_id']}/content"):
            assert httpx.get(base + path, headers=auth("bob-key"), timeout=10).status_code == 404, path
            assert httpx.get(base + path, headers=auth("alice-key"), timeout=10).status_code == 200, path
        assert create(base, batch["input_file_id"], "bob-key").status_code == 404
        assert httpx.post(f"{base}/v1/batches/{batch['id']}/cancel", headers=auth("bob-key"),
                          timeout=10).status_code == 404
        assert httpx.get(f"{base}/v1/batches", headers=auth("bob-key"), timeout=10).json()["data"] == []
        assert [b["id"] for b in httpx.get(f"{base}/v1/batches", headers=auth("alice-key"),
                                           timeout=10).json()["data"]] == [batch["id"]]


# -- a real server killed in the middle of a job -------------------------------------------------------------

def test_a_server_killed_mid_job_finishes_it_after_restart_with_each_request_once(tmp_path):
    # limoe-tiny, two requests of the job in flight and a 50 ms batch wait: about 300 requests
    # take seconds, so the SIGKILL lands when some but not all have an answer. Every 25th line
    # has a broken image, so the error file takes part too.
    env = {"model": "limoe-tiny", "warmup": "false", "max_batch_wait_ms": 50, "jobs_concurrency": 2,
           "jobs_dir": tmp_path}
    n = 300
    lines = [request_line(f"id-{i}", {"images": ["aGVsbG8="], "labels": LABELS} if i % 25 == 7 else classify_body(i))
             for i in range(n)]
    with Server("first", **env) as first:
        first.wait_ready()
        file_id = upload(first.base, "\n".join(lines).encode()).json()["id"]
        batch_id = create(first.base, file_id).json()["id"]
        deadline = time.monotonic() + 60
        while (counts := get_batch(first.base, batch_id)["request_counts"])["completed"] < 20:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        first.proc.kill()  # SIGKILL: no shutdown code runs
        first.proc.wait(10)
    assert counts["completed"] + counts["failed"] < n, "the job ended before the kill: nothing to resume"
    with Server("restarted", **env) as second:
        second.wait_ready()
        batch = wait_finished(second.base, batch_id, timeout=120)
        output = records(second.base, batch["output_file_id"])
        errors = records(second.base, batch["error_file_id"])
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": n, "completed": n - 12, "failed": 12}
    ids = [r["custom_id"] for r in output + errors]
    assert sorted(ids) == sorted(f"id-{i}" for i in range(n))  # each exactly once
    assert [r["custom_id"] for r in errors] == [f"id-{i}" for i in range(n) if i % 25 == 7]
    assert {r["error"]["code"] for r in errors} == {"invalid_image"}
    assert [int(r["custom_id"][3:]) for r in output] == sorted(int(r["custom_id"][3:]) for r in output)  # input order


# -- the priority benchmark ----------------------------------------------------------------------------------

def test_the_priority_benchmark_reports_its_ratio(tmp_path):
    out = subprocess.run([sys.executable, "bench/batch_priority.py", "--model", "limoe-tiny", "--seconds", "2",
                          "--rate", "10", "--rounds", "1", "--warmup", "0.5", "--job-lines", "300",
                          "--jobs-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("ratio interactive p99 with job / without: ")
    assert float(last.rsplit(" ", 1)[1]) > 0
