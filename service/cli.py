"""`limoe serve`: check the settings and the model, then run uvicorn on the app factory."""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError


def serve(argv_overrides: dict | None = None) -> int:
    import uvicorn

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
    from limoe.model_store import ModelStoreError
    from service.backends import DeviceError, check_device, load_manifest

    try:  # fail before uvicorn starts, with one clear line instead of a lifespan traceback
        check_device(settings)
        load_manifest(settings)
    except DeviceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ModelStoreError as e:
        print(f"error: cannot serve model {settings.model!r}: {e}", file=sys.stderr)
        return 1
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("limoe.service").info("settings: %s", describe_settings(settings))
    from service.http import http_protocol

    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                            log_level=settings.log_level, timeout_graceful_shutdown=10,
                            timeout_keep_alive=settings.keep_alive_s,
                            http=http_protocol(header_timeout_s=settings.header_timeout_s))
    server = uvicorn.Server(config)
    server.run()
    # uvicorn exits quietly when the lifespan start-up fails (e.g. a damaged model); say so.
    return 0 if server.started else 1
