"""The OpenAPI schema the app generates from its pydantic models: valid OpenAPI (checked with
openapi-spec-validator, so CI catches a schema that tools would reject), and every route of the
three APIs documents its request and response models, with examples, and our error body."""

import pytest
from fastapi.testclient import TestClient
from openapi_spec_validator import validate

from service.app import create_app
from service.backends import FakeBackend
from service.settings import Settings

# (method, path) -> (JSON request model or None, 200 response model or None for an empty body);
# "[X]" is a JSON array of X.
ROUTES = {
    ("post", "/v1/classify"): ("ClassifyRequest", "ClassifyResponse"),
    ("post", "/v1/classify/bulk"): ("ClassifyRequest", "ClassifyResponse"),
    ("post", "/v1/embed"): ("EmbedRequest", "EmbedResponse"),
    ("get", "/v1/models"): (None, "ModelsResponse"),
    ("post", "/"): ("HFRequest", "[LabelScore]"),
    ("post", "/models/{name}"): ("HFRequest", "[LabelScore]"),
    ("get", "/v2"): (None, "ServerMetadata"),
    ("get", "/v2/health/live"): (None, "ServerLive"),
    ("get", "/v2/health/ready"): (None, "ServerReady"),
    ("get", "/v2/models/{name}"): (None, "ModelMetadata"),
    ("get", "/v2/models/{name}/versions/{version}"): (None, "ModelMetadata"),
    ("get", "/v2/models/{name}/ready"): (None, "ModelReady"),
    ("get", "/v2/models/{name}/versions/{version}/ready"): (None, "ModelReady"),
    ("post", "/v2/models/{name}/infer"): ("InferRequest", "InferResponse"),
    ("post", "/v2/models/{name}/versions/{version}/infer"): ("InferRequest", "InferResponse"),
}
API_TAGS = {"native", "huggingface", "open inference protocol v2"}


@pytest.fixture(scope="module")
def spec() -> dict:
    with TestClient(create_app(Settings(warmup=False), backend=FakeBackend())) as client:
        r = client.get("/openapi.json")
        assert r.status_code == 200
        return r.json()


def model_of(schema: dict) -> str:
    """The component a JSON schema names: "X" for a $ref to X, "[X]" for an array of them."""
    if schema.get("type") == "array":
        return f"[{model_of(schema['items'])}]"
    return schema["$ref"].removeprefix("#/components/schemas/")


def test_the_schema_is_valid_openapi(spec):
    assert spec["openapi"].startswith("3.")
    validate(spec)  # raises, naming the offending part


def test_every_api_route_documents_its_request_and_response_models(spec):
    operations = {(method, path): op for path, ops in spec["paths"].items() for method, op in ops.items()
                  if API_TAGS & set(op.get("tags", []))}
    assert set(operations) == set(ROUTES)
    components = spec["components"]["schemas"]
    for key, (request_model, response_model) in ROUTES.items():
        op = operations[key]
        if request_model is None:
            assert "requestBody" not in op, key
        else:
            body = op["requestBody"]
            assert body["required"], key
            assert model_of(body["content"]["application/json"]["schema"]) == request_model, key
            assert components[request_model]["examples"], f"{request_model} has no example"
        ok = op["responses"]["200"]
        if response_model is None:
            assert "content" not in ok, key
        else:
            assert model_of(ok["content"]["application/json"]["schema"]) == response_model, key
        for status, response in op["responses"].items():
            if status.startswith(("4", "5")) and "content" in response:
                assert model_of(response["content"]["application/json"]["schema"]) == "ErrorBody", (key, status)
    assert "HTTPValidationError" not in components  # every error, validation included, is {"error", "code"}


def test_classify_documents_the_multipart_form_too(spec):
    for path in ("/v1/classify", "/v1/classify/bulk"):
        form = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert form["title"] == "ClassifyForm" and form["required"] == ["images", "labels"]
        assert form["properties"]["images"]["items"] == {"type": "string", "format": "binary"}
