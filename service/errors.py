"""Typed errors and their HTTP mapping. Every error body is {"error": <message>, "code": <code>};
internal details are logged, never sent."""

from __future__ import annotations


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
