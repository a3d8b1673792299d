"""HTTP plumbing shared by the APIs: body limit, auth, JSON bodies, deadlines and client disconnects."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator, TypeVar

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.engine import Engine

if TYPE_CHECKING:
    from service.models import Models
from service.errors import (
    BadRequest,
    Forbidden,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    Timeout,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
    invalid_request,
)

T = TypeVar("T")


class BodyTooLarge(PayloadTooLarge):
    code = "body_too_large"


class BodiesInFlight(Overloaded):
    code = "too_many_bytes_in_flight"


class SlowClient(ServiceError):
    """The client did not send its request's headers or body in time."""

    status, code = 408, "body_timeout"
    headers = {"Connection": "close"}  # the rest may never come: do not wait on it


class BodyBudget:
    """The request-body bytes that all requests in flight may hold together. A body is memory
    until its request is answered (parsed into images, decoded, batched), so concurrent large
    uploads are bounded here rather than by the machine's RAM. Event-loop only: no locking."""

    def __init__(self, limit: int, on_change: Callable[[int], None] | None = None):
        self.limit, self.used, self.on_change = limit, 0, on_change

    def take(self, n: int) -> bool:
        if n > 0 and self.used + n > self.limit:
            return False
        self._set(self.used + n)
        return True

    def give(self, n: int) -> None:
        self._set(self.used - n)

    def _set(self, used: int) -> None:
        self.used = used
        if self.on_change:
            self.on_change(used)


class BodyLimitMiddleware:
    """Guards every request body as it is read:
    - over `limit` bytes: 413, by Content-Length up front, else by counting streamed chunks, so an
      oversized upload is never buffered whole;
    - with a `budget`: a body gets 429 and Retry-After when its declared length does not fit
      beside the bytes that requests in flight hold (before it is read), or when its bytes stop
      fitting as they arrive. A request holds only what it has sent, so connections that
      declare large bodies and send nothing cannot lock others out;
    - not complete `timeout_s` seconds after the request began: 408 (slow or stalled senders
      hold a connection and their bytes, so they cannot hold them for ever).
    `to_disk` maps paths whose bodies go to disk, not memory (batch input files) to their own
    limit; they are left out of the budget."""

    def __init__(self, app: ASGIApp, limit: int, budget: BodyBudget | None = None, timeout_s: float | None = None,
                 to_disk: dict[str, int] | None = None):
        self.app, self.limit, self.budget, self.timeout_s = app, limit, budget, timeout_s
        self.to_disk = to_disk or {}

    def _busy(self) -> BodiesInFlight:
        return BodiesInFlight(f"the server holds {self.budget.used} bytes of request bodies in flight (limit "
                              f"{self.budget.limit}); retry shortly, or send fewer or smaller images at once")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, budget = (self.to_disk[scope["path"]], None) if scope["path"] in self.to_disk else (self.limit,
                                                                                                  self.budget)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = 0
            if length > limit:
                return await _send_error(send, BodyTooLarge(f"request body over {limit} bytes"))
            if budget and budget.used + length > budget.limit:
                return await _send_error(send, self._busy())
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout_s is None else loop.time() + self.timeout_s
        seen = 0
        complete = False

        async def limited() -> Message:
            nonlocal seen, complete
            if complete or deadline is None:  # after the body only http.disconnect remains: no deadline
                message = await receive()
            else:
                try:
                    async with asyncio.timeout_at(deadline):  # no extra task, unlike wait_for
                        message = await receive()
                except TimeoutError:
                    raise SlowClient(f"the request body did not arrive within {self.timeout_s:g}s") from None
            if message["type"] == "http.request":
                chunk = len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen + chunk > limit:
                    raise BodyTooLarge(f"request body over {limit} bytes")
                if budget and not budget.take(chunk):
                    raise self._busy()
                seen += chunk
            return message

        try:
            await self.app(scope, limited, send)
        finally:
            if budget:
                budget.give(seen)


async def _send_error(send: Send, error: ServiceError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # the body was not read: the connection cannot be reused
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def bearer_token(request: Request) -> bytes:
    """The request's Bearer token, or b"" without one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" else b""


def check_api_key(request: Request, keys: list) -> None:
    """Bearer token against every configured key, in constant time."""
    if not keys:
        return
    if not _matches(bearer_token(request), keys):
        raise Unauthorized("missing or invalid API key (send 'Authorization: Bearer <key>')")


def check_admin_key(request: Request, admin_keys: list, api_keys: list) -> None:
    """The model repository API's key: 403 while no admin key is configured (the API is off) or
    for a key that is an API key but not an admin key; 401 for none or an unknown one."""
    if not admin_keys:
        raise Forbidden("the model repository API is off: set LIMOE_ADMIN_KEYS to use it", "repository_off")
    try:
        check_api_key(request, admin_keys)
    except Unauthorized:
        if api_keys and _matches(bearer_token(request), api_keys):
            raise Forbidden("an API key cannot use the model repository API; send an admin key "
                            "(LIMOE_ADMIN_KEYS)") from None
        raise Unauthorized("missing or invalid admin key (send 'Authorization: Bearer <admin key>')") from None


def _matches(given: bytes, keys: list) -> bool:
    ok = False
    for key in keys:  # no early exit: timing does not reveal which key matched
        ok |= hmac.compare_digest(given, key.get_secret_value().encode())
    return ok


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def answer(request: Request, work: Awaitable[T], timeout_s: float) -> T:
    """Await `work` unless the deadline passes (504) or the client disconnects first; either
    way `work` is cancelled, which drops the request's items from the batch queues. So it is
    when the request itself is cancelled (a drain cut short)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    if watcher in done:
        raise ClientGone()
    raise Timeout(f"no answer within {timeout_s:g}s; the server is busy, retry later")


def b64decode(value: Any, what: str = "image") -> bytes:
    if not isinstance(value, str):
        raise Unprocessable(f"{what} must be a base64 string")
    if value.startswith("data:"):  # data URLs: data:image/png;base64,....
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} is not valid base64", "invalid_base64") from None


def parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed JSON: {e}", "invalid_json") from None
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply", "invalid_json") from None


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def require_json(request: Request) -> None:
    """415 unless the body is declared as JSON (or not declared at all)."""
    ctype = media_type(request)
    if ctype not in ("application/json", ""):
        raise UnsupportedMediaType(f"send application/json, not {ctype!r}")


def forget_body(request: Request, placeholder: bytes = b"") -> None:
    """Drop the raw body Starlette keeps on the request until the response is sent, once it is
    parsed: a 30 MB upload is then held once (its parsed form), not twice, while it is classified.
    (The in-flight byte budget still counts it until the request ends.)"""
    request._body = placeholder  # Starlette's cache of `await request.body()`


class JSONRequest(Request):
    """A request whose JSON body is parsed once, with our errors (`parse_json`); the raw bytes
    are dropped once parsed (FastAPI then reads the parsed body: `json()` answers from it)."""

    async def json(self) -> Any:
        if not hasattr(self, "_parsed"):
            self._parsed = parse_json(await self.body())
            forget_body(self, b"{}")  # not empty: FastAPI reads a body only when there is one
        return self._parsed


RawHandler = Callable[[Request], Awaitable[Response]]


def raw_body(accepts: Callable[[Request], bool], handler: RawHandler):
    """Mark an endpoint: the requests `accepts` picks skip JSON parsing and validation and go to
    `handler`, for bodies whose raw handling is the point (multipart forms streamed under the
    in-flight byte budget, Triton's binary tensors). Put it below the route decorator."""
    def mark(endpoint):
        endpoint.raw_body = (accepts, handler)
        return endpoint
    return mark


class ServiceRoute(APIRoute):
    """The APIs' routes. A route with a body model reads and parses its body here, then FastAPI
    validates it against the model. Reading and parsing here keeps our errors: the body limits'
    413/429/408 and 400 invalid_json for malformed, non-UTF-8 or too deeply nested JSON (FastAPI
    turns any exception while it reads a body into a bare 400), and 415 for a media type other
    than JSON (FastAPI would validate the raw bytes as the model: 422). See also `raw_body`."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        validated = super().get_route_handler()
        raw: tuple[Callable[[Request], bool], RawHandler] | None = getattr(self.endpoint, "raw_body", None)
        if self.body_field is None and raw is None:
            return validated

        async def handle(request: Request) -> Response:
            if raw is not None and raw[0](request):
                return await raw[1](request)
            request = JSONRequest(request.scope, request.receive)
            require_json(request)
            await request.json()
            return await validated(request)

        return handle


def served_models(request: Request) -> "Models":
    """The server's models (service.models.Models)."""
    return request.app.state.models


def serving(request: Request) -> Iterator[Engine]:
    """The default model's engine, once it is ready to serve (503 until warm), held while the route
    runs (service.models.Models.use): the dependency of the routes that name no model."""
    with request.app.state.models.use() as engine:
        yield engine


def json_response(body: BaseModel, status: int = 200) -> Response:
    """`body` as JSON, leaving out fields that are None (absent rather than null)."""
    return Response(body.model_dump_json(exclude_none=True), status, media_type="application/json")


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: Any) -> M:
    """A raw body's JSON as `model`, refused as FastAPI's validation would be (one mapping)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise invalid_request(e.errors(include_url=False)) from None


def deadline_s(timeout_s: float, images: int, batch_size: int, bulk: bool) -> float:
    """How long a request may take: `timeout_s`, times the number of batches its images fill for
    bulk work (which waits for queue room instead of being refused, so it may take longer)."""
    return timeout_s * (-(-images // batch_size) if bulk else 1)


def http_protocol(base: type | None = None, header_timeout_s: float | None = None) -> type:
    """uvicorn's HTTP protocol `base` (default: httptools when installed, else h11, as uvicorn's
    "auto" picks) with two changes, both for requests that never reach the app:
    - one it cannot parse (bad request line, control bytes in a header) is answered in our JSON
      error shape (400 invalid_http) instead of plain text;
    - a connection must deliver a request's headers within `header_timeout_s` of opening, or of
      sending the request's first bytes: else it is closed (with a JSON 408 when part of a
      request came). uvicorn itself waits for headers for ever, so idle or trickling
      connections (slowloris) could pile up until the process runs out of file descriptors.
      Idle keep-alive connections between requests stay under uvicorn's own keep-alive timeout."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol as base

    class LimoeHTTPProtocol(base):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None
        _partial = False  # bytes of a request whose headers are not complete have arrived

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._awaiting_headers():
                self._partial = True
                self._arm()
            else:
                self._partial = False
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _awaiting_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if header_timeout_s is not None and self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if not self._awaiting_headers() or self.transport.is_closing():
                return
            if self._partial:
                self._send_json(408, "Request Timeout", SlowClient(
                    f"the request headers did not arrive within {header_timeout_s:g}s", "header_timeout"))
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            self._send_json(400, "Bad Request", BadRequest(
                "malformed HTTP request: the request line or a header could not be parsed", "invalid_http"))
            self.transport.close()

        def _send_json(self, status: int, reason: str, error: ServiceError) -> None:
            body = json.dumps(error.body()).encode()
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                                 b"connection: close\r\n\r\n" % (status, reason.encode(), len(body)) + body)

    return LimoeHTTPProtocol
