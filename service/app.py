"""The FastAPI application: `create_app(settings)` builds it; uvicorn runs it.

    uvicorn --factory service.app:create_app      (settings from LIMOE_* variables)
    limoe serve                                    (the same, plus a friendly start-up check, a header
                                                    deadline and JSON 400s for unparseable HTTP)

Start-up loads and verifies the models (LIMOE_MODELS, or LIMOE_MODEL; a damaged or missing artifact
stops the server with a message naming the file), starts one batcher per encoder and model, then
warms every batch size up in the background: /healthz answers at once, /readyz (the default
model) and the inference routes answer 503 until warm. service/models.py loads and unloads
versions while the server runs (the repository API, behind LIMOE_ADMIN_KEYS).
Shutdown drains (`Drain`, driven by service/cli.py on SIGTERM; docs/SHUTDOWN.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import limoe
from service import api_batch, api_hf, api_native, api_repository, api_v2, web
from service.backends import Backend
from service.errors import ServiceError, invalid_request
from service.http import BodyBudget, BodyLimitMiddleware, ClientGone, check_admin_key, check_api_key
from service.job_runner import start_jobs
from service.metrics import Metrics
from service.models import Models, Opener, open_ref
from service.settings import Settings

log = logging.getLogger("limoe.service")

HEALTH_PATHS = {"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"}
UNCOUNTED_PATHS = HEALTH_PATHS | {"/metrics"}  # not in limoe_inflight_requests
OPEN_PATHS = {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
DOCS_ASSETS = "/docs/assets"  # Swagger UI and ReDoc files, served from the fastapi-offline package (no CDN)


class Gatekeeper:
    """Pure ASGI middleware: API-key check, then request count and latency by route template."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    def _needs_key(self, path: str, method: str) -> bool:
        s = self.settings
        if path.startswith(api_repository.PREFIX):
            return False  # admin keys, checked in __call__
        if not s.api_keys or path in OPEN_PATHS or path.startswith((DOCS_ASSETS + "/", web.ASSETS + "/")):
            return False
        if path == web.PAGE and method in ("GET", "HEAD"):  # the web page; POST / is the Hugging Face route
            return False
        if path in HEALTH_PATHS:
            return s.protect_health
        if path == "/metrics":
            return s.protect_metrics
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            try:
                if scope["path"].startswith(api_repository.PREFIX):
                    check_admin_key(Request(scope), self.settings.admin_keys, self.settings.api_keys)
                elif self._needs_key(scope["path"], scope["method"]):
                    check_api_key(Request(scope), self.settings.api_keys)
            except ServiceError as e:  # 401, 403
                return await JSONResponse(e.body(), e.status, headers=e.headers)(scope, receive, send_status)
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(path, scope["method"], str(status)).inc()
            self.metrics.request_seconds.labels(path).observe(time.perf_counter() - started)


class ShuttingDown(ServiceError):
    status, code = 503, "shutting_down"
    headers = {"Retry-After": "1", "Connection": "close"}


class Drain:
    """A graceful shutdown as the app sees it (the server in service/cli.py takes the steps):
    - `begin`: readiness answers 503 so that load balancers stop sending, but requests are still
      served; every answer carries `Connection: close`, so clients reconnect (to another
      replica, once the load balancer has caught up) instead of reusing this one's connections;
    - `refuse`: new requests get 503 shutting_down; those in flight carry on;
    - `abort`: those in flight are cancelled and answered 503 shutting_down (unless their answer
      has begun); returns how many there were.
    `requests` are the tasks of the requests in flight (`DrainMiddleware`). Event loop only."""

    def __init__(self, state, metrics: Metrics):
        self.state, self.metrics = state, metrics  # app.state: the lifespan puts the models there
        self.draining = self.refusing = self.aborting = False
        self.requests: set[asyncio.Task] = set()

    def begin(self) -> None:
        self.draining = True
        if self.state.models is not None:
            self.state.models.drain()

    def refuse(self) -> None:
        self.refusing = True

    def abort(self) -> int:
        self.aborting = True
        for task in self.requests:
            task.cancel()
        return len(self.requests)


class DrainMiddleware:
    """Pure ASGI middleware: tracks the requests in flight for `drain` (and the
    limoe_inflight_requests gauge) and applies its steps to them."""

    def __init__(self, app: ASGIApp, drain: Drain):
        self.app, self.drain = app, drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        drain = self.drain
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if drain.refusing:
            return await _shutting_down(scope, receive, send)
        task = asyncio.current_task()
        counted = scope["path"] not in UNCOUNTED_PATHS
        drain.requests.add(task)
        if counted:
            drain.metrics.inflight.inc()
        started = False

        async def send_closing(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = message.get("headers", [])
                if drain.draining and not any(k.lower() == b"connection" for k, _ in headers):
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, receive, send_closing)
        except asyncio.CancelledError:
            if not drain.aborting or started:
                raise
            task.uncancel()  # cancelled by `abort`: answer instead
            await _shutting_down(scope, receive, send_closing)
        finally:
            drain.requests.discard(task)
            if counted:
                drain.metrics.inflight.dec()


async def _shutting_down(scope: Scope, receive: Receive, send: Send) -> None:
    e = ShuttingDown("the server is shutting down; retry (another replica)")
    await JSONResponse(e.body(), e.status, headers=e.headers)(scope, receive, send)


def create_app(settings: Settings | None = None, backend: Backend | None = None,
               backends: list[Backend] | None = None, opener: Opener = open_ref) -> FastAPI:
    """The app. `backend` (or several `backends`, the first the default) replaces the models of
    the settings (tests pass FakeBackends); `opener` opens the versions the repository API loads."""
    settings = settings or Settings()
    metrics = Metrics()
    given = backends if backends is not None else [backend] if backend is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        models = Models(settings, metrics, app.state, opener)
        await models.open(given)
        app.state.models = models
        models.start()
        app.state.jobs = await start_jobs(app.state, models)  # batch jobs (docs/BATCH.md); None when off
        for v in models.all():
            log.info("serving %s version %s on %s%s", v.name, v.version, v.engine.backend.device,
                     " (the default)" if v.name == models.default else "")
        try:
            yield
        finally:
            if app.state.jobs is not None:  # first: jobs stop where they are, and resume on restart
                await app.state.jobs.stop()
            await models.stop()

    app = FastAPIOffline(  # a FastAPI app whose /docs and /redoc load their assets from this server
        static_url=DOCS_ASSETS,
        title="LIMoE Serve",
        version=limoe.__version__,
        description="Zero-shot image classification with LIMoE, the Language-Image Mixture of Experts. "
                    "Native API under /v1, Hugging Face compatible routes at / and /models/{name}, "
                    "Open Inference Protocol v2 under /v2, Prometheus metrics at /metrics.",
        lifespan=lifespan,
    )
    app.state.settings, app.state.metrics, app.state.engine, app.state.models = settings, metrics, None, None
    app.state.jobs, app.state.jobs_off = None, "the server is starting"
    app.state.body_budget = BodyBudget(settings.max_inflight_bytes, metrics.body_bytes.set)
    app.state.drain = Drain(app.state, metrics)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes, budget=app.state.body_budget,
                       to_disk={"/v1/files": settings.jobs_max_file_bytes + 2 ** 16},  # + the multipart framing
                       timeout_s=settings.body_timeout_s)
    app.add_middleware(DrainMiddleware, drain=app.state.drain)
    app.add_middleware(Gatekeeper, settings=settings, metrics=metrics)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, e: ServiceError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; counted in metrics as nginx does

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return await service_error(request, invalid_request(e.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return JSONResponse({"error": str(e.detail), "code": codes.get(e.status_code, "http_error")},
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal server error", "code": "internal"}, status_code=500)

    @app.get("/healthz", tags=["health"], summary="Liveness: the batch workers are running")
    async def healthz(request: Request) -> JSONResponse:
        models = request.app.state.models
        alive = models is None or models.alive  # still loading counts as alive
        return JSONResponse({"status": "ok" if alive else "dead"}, status_code=200 if alive else 503)

    @app.get("/readyz", tags=["health"], summary="Readiness: the default model answered a warm-up forward pass")
    async def readyz(request: Request) -> JSONResponse:
        models, engine = request.app.state.models, request.app.state.engine
        ready = models is not None and models.ready
        body = {"status": "ready" if ready else "shutting down" if engine is not None and engine.draining
                else "not ready"}
        if engine is not None:
            body.update(model=engine.backend.name, version=engine.backend.version, device=engine.backend.device)
            if engine.stuck:
                body.update(status="not ready", stuck_passes=engine.stuck)
        return JSONResponse(body, status_code=200 if ready else 503, headers=None if ready else {"Retry-After": "5"})

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response,
             responses={200: {"description": "the Prometheus text exposition format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus(request: Request) -> Response:
        models = request.app.state.models
        for v in models.all() if models is not None else ():
            if not v.retiring:
                for b in (v.engine.image_batcher, v.engine.text_batcher):
                    v.engine.metrics.queue_depth.labels(b.name).set(b.depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    for router in (api_native.router, api_hf.router, api_v2.router, api_repository.router, api_batch.router):
        app.include_router(router)
    app.include_router(web.router)
    app.mount(web.ASSETS, web.assets(), name="web")
    return app


def describe_settings(settings: Settings) -> str:
    public = settings.model_dump(exclude={"api_keys", "admin_keys"})
    public["api_keys"] = f"{len(settings.api_keys)} configured"
    public["admin_keys"] = f"{len(settings.admin_keys)} configured"
    return json.dumps(public, default=str)
