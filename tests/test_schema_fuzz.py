"""Schema fuzzing with schemathesis: requests generated from the server's own /openapi.json, for
every operation, checked against what the spec promises (not_a_server_error,
status_code_conformance, content_type_conformance, response_schema_conformance), with the API key
(the admin key on the repository API), then stateful runs along the batch API's links. A bounded,
seeded pass on real uvicorn over the deterministic fake backend, so it fits CI; a longer one:

    LIMOE_FUZZ_EXAMPLES=200 LIMOE_FUZZ_SCENARIOS=200 python -m pytest tests/test_schema_fuzz.py
"""

from __future__ import annotations

import os
from collections import Counter

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from servers import uvicorn_thread

from service.app import create_app
from service.backends import FakeBackend
from service.settings import Settings

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = int(os.environ.get("LIMOE_FUZZ_EXAMPLES", "15"))  # per operation


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    settings = Settings(warmup=False, api_keys=["fuzz-key"], admin_keys=["fuzz-admin"], max_batch_wait_ms=1,
                        jobs_dir=tmp_path_factory.mktemp("jobs"), max_body_bytes=2 ** 20, max_image_bytes=2 ** 19,
                        max_inflight_bytes=2 ** 24)
    with uvicorn_thread(create_app(settings, backend=FakeBackend())) as base:
        yield schemathesis.openapi.from_url(base + "/openapi.json")


def fuzz(op, headers: dict[str, str]) -> str | None:
    """Run EXAMPLES generated cases of one operation; the first broken promise, or None."""

    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck),
                         phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
    @hypothesis.given(op.as_strategy())
    def run(case):
        case.call_and_validate(headers=headers, checks=CHECKS, timeout=30)

    try:
        run()
    except (AssertionError, BaseExceptionGroup, schemathesis.core.failures.Failure) as e:
        return str(e)[:2000]
    return None


def test_every_operation_keeps_the_promises_of_its_spec(schema):
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) >= 29  # every route but the web page and the docs
    failures = {}
    for op in operations:
        key = "fuzz-admin" if op.path.startswith("/v2/repository") else "fuzz-key"
        if (failure := fuzz(op, {"Authorization": f"Bearer {key}"})) is not None:
            failures[op.label] = failure
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())


SCENARIOS = int(os.environ.get("LIMOE_FUZZ_SCENARIOS", "20"))


def test_stateful_runs_follow_the_batch_links(schema):
    """Stateful: schemathesis follows the links the spec gives the batch API (upload -> create a
    batch -> get it -> read its input, output and error files; get, read, delete a file; cancel),
    each step under the same four checks; the run must really have gone from a created file and
    batch to their later calls (a 200 for an id it could only have had from an earlier answer)."""
    seen: list[tuple[str, str, int]] = []

    class Jobs(schema.include(tag="batch").as_state_machine()):
        def get_call_kwargs(self, case):
            return {"headers": {"Authorization": "Bearer fuzz-key"}, "timeout": 30}

        def after_call(self, response, case):
            seen.append((case.method.upper(), case.path, response.status_code))

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)

    Jobs.run(settings=hypothesis.settings(max_examples=SCENARIOS, stateful_step_count=8, deadline=None,
                                          derandomize=True, database=None,
                                          suppress_health_check=list(hypothesis.HealthCheck)))
    counts = sorted(Counter(seen).items())
    ok = {(method, path) for method, path, status in seen if status == 200}
    assert ("POST", "/v1/files") in ok and ("POST", "/v1/batches") in ok, counts
    assert ("GET", "/v1/batches/{batch_id}") in ok and ("GET", "/v1/files/{file_id}/content") in ok, counts
