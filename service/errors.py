"""Typed errors and their HTTP mapping. Every error body is {"error": <message>, "code": <code>};
internal details are logged, never sent."""

from __future__ import annotations

from typing import Any, Sequence

from pydantic_core import PydanticCustomError


class ServiceError(Exception):
    status = 500
    code = "internal"
    headers: dict[str, str] = {}

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code

    def body(self) -> dict:
        return {"error": self.message, "code": self.code}


class BadRequest(ServiceError):
    status, code = 400, "bad_request"


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class PayloadTooLarge(ServiceError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, code = 415, "unsupported_media_type"


class Unprocessable(ServiceError):
    status, code = 422, "invalid_request"


class Overloaded(ServiceError):
    status, code = 429, "overloaded"
    headers = {"Retry-After": "1"}


class NotReady(ServiceError):
    status, code = 503, "not_ready"
    headers = {"Retry-After": "5"}


class Timeout(ServiceError):
    status, code = 504, "timeout"


class InvalidImage(BadRequest):
    """One image could not be used; reported per item where the API allows."""

    code = "invalid_image"


class ImageTooLarge(PayloadTooLarge):
    code = "image_too_large"


def refuse(code: str, message: str) -> PydanticCustomError:
    """For a pydantic validator: refuse a value with our error `code` (422) instead of
    invalid_request. Raise what it returns."""
    return PydanticCustomError(code, message, {"service_code": code})


def invalid_request(errors: Sequence[Any]) -> ServiceError:
    """The first of a request's validation errors (pydantic's, as FastAPI reports them), as ours:
    malformed JSON is 400 invalid_json; a value refused with `refuse` keeps its code; any other
    is 422 invalid_request naming the field."""
    err = errors[0] if errors else {}
    ctx = err.get("ctx") or {}
    if err.get("type") == "json_invalid":
        return BadRequest(f"malformed JSON: {ctx.get('error', err.get('msg'))}", "invalid_json")
    if "service_code" in ctx:
        return Unprocessable(err["msg"], ctx["service_code"])
    loc = list(err.get("loc", ()))
    where = ".".join(str(x) for x in (loc[1:] if loc[:1] == ["body"] else loc)) or "body"
    return Unprocessable(f"invalid request: {where}: {err.get('msg', 'invalid')}")
