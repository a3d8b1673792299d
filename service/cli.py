"""`limoe serve`: check the settings and the model, then run uvicorn on the app, draining on
SIGTERM (`DrainingServer`, docs/SHUTDOWN.md)."""

from __future__ import annotations

import logging
import signal
import sys
import time

import uvicorn
from pydantic import ValidationError

log = logging.getLogger("limoe.service")


class DrainingServer(uvicorn.Server):
    """uvicorn, shutting down as Kubernetes expects. After the first SIGTERM (or SIGINT):
    1. readiness answers 503 and every answer carries `Connection: close`, but new requests are
       still served for `grace_s`, since load balancers take a moment to drop this replica
       (no grace after SIGINT: nothing routes to a server stopped with Ctrl-C);
    2. then the listening socket closes, and new requests on connections still open get 503
       shutting_down; the requests in flight, queued in the batchers or not, carry on;
    3. once none is left, uvicorn's own shutdown runs (idle connections closed, the engine
       stopped) and `limoe serve` exits 0.
    A second signal, or the budget `drain_s` from the first (less a reserve for answering and
    stopping), cuts step 3 short: the requests still in flight are answered 503 shutting_down,
    and `limoe serve` exits 1. The steps (`Drain` in service/app.py) run in uvicorn's main loop,
    every 0.1 s; the signal handler only notes the signal. uvicorn's own handler would close the
    socket at once, reset kept-alive connections, and end the process by the signal (143)."""

    def __init__(self, config: uvicorn.Config, drain, drain_s: float, grace_s: float):
        super().__init__(config)
        self.drain, self.drain_s, self.grace_s = drain, drain_s, grace_s
        self.reserve_s = min(1.0, drain_s / 4)  # of the budget: to answer 503s and stop the engine
        self.signalled_at: float | None = None
        self.hurry = False  # a second signal came
        self.aborted = 0  # requests cut short (answered 503)

    def handle_exit(self, sig: int, frame) -> None:
        if not self.started:  # still loading the model: stop as uvicorn does
            return super().handle_exit(sig, frame)
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()
            if sig != signal.SIGTERM:
                self.grace_s = 0.0
        else:
            self.hurry = True

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        return self.signalled_at is not None and self._drain_step(time.monotonic() - self.signalled_at)

    def _drain_step(self, elapsed: float) -> bool:
        """The drain's next steps, `elapsed` seconds after the first signal; True once uvicorn's
        shutdown may run."""
        drain = self.drain
        if not drain.draining:
            log.info("shutting down: readiness answers 503; new requests served for %gs more, then "
                     "refused; at most %gs until exit", self.grace_s, self.drain_s)
            drain.begin()
        if elapsed < self.grace_s and not self.hurry:
            return False
        if not drain.refusing:
            for server in self.servers:
                server.close()  # no new connections; new requests on open ones get 503
            drain.refuse()
        if drain.requests and not self.hurry and elapsed < self.drain_s - self.reserve_s:
            return False
        if drain.requests:
            self.aborted = drain.abort()
            log.warning("drain cut short by %s: %d requests in flight answered 503",
                        "a second signal" if self.hurry else f"LIMOE_DRAIN_S={self.drain_s:g}", self.aborted)
        # uvicorn's shutdown: idle connections closed, the others waited for, the engine stopped
        self.config.timeout_graceful_shutdown = max(0.1, self.drain_s - elapsed - self.reserve_s / 2)
        return True


def serve(argv_overrides: dict | None = None) -> int:
    from service.app import create_app, describe_settings
    from service.settings import Settings

    try:
        settings = Settings(**(argv_overrides or {}))
    except ValidationError as e:
        print("error: invalid settings:", file=sys.stderr)
        for err in e.errors():
            field = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            print(f"  LIMOE_{field.upper()}: {msg}" if field else f"  {msg}", file=sys.stderr)
        return 2
    from limoe.runtime.model_store import ModelStoreError
    from service.backends import DeviceError, check_device, load_manifest
    from service.models import ModelRef, fix_mmap_threshold, ref_settings

    try:  # fail before uvicorn starts, with one clear line instead of a lifespan traceback
        check_device(settings)
    except DeviceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for ref in settings.model_refs:
        try:
            load_manifest(ref_settings(settings, ModelRef.parse(ref)))
        except ModelStoreError as e:
            print(f"error: cannot serve model {ref!r}: {e}", file=sys.stderr)
            return 1
    if settings.mmap_threshold_bytes:
        fix_mmap_threshold(settings.mmap_threshold_bytes)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("limoe.service").info("settings: %s", describe_settings(settings))
    from service.http import http_protocol

    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.drain_s, timeout_keep_alive=settings.keep_alive_s,
                            http=http_protocol(header_timeout_s=settings.header_timeout_s))
    server = DrainingServer(config, app.state.drain, settings.drain_s, settings.drain_grace_s)
    server.run()
    # uvicorn exits quietly when the lifespan start-up fails (e.g. a damaged model); say so.
    return 0 if server.started and not server.aborted else 1
