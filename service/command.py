"""`limoe serve` as a subcommand of the `limoe` CLI, registered through the `limoe.commands`
entry point group (pyproject.toml), so that the library never imports the service. Importing
this module needs nothing beyond the standard library: the server itself (uvicorn, FastAPI) is
imported only when the command runs."""

from __future__ import annotations

import argparse


def add_serve_parser(sub) -> None:
    """Adds `serve` to the `limoe` CLI's subparsers."""
    serve = sub.add_parser("serve", help="run the HTTP service (settings from LIMOE_* variables)")
    serve.add_argument("--host", help="bind address (LIMOE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (LIMOE_PORT, default 8000)")
    serve.add_argument("--model", help="model name in the store, or an entry directory (LIMOE_MODEL)")
    serve.add_argument("--version", help="model version (LIMOE_MODEL_VERSION, default latest)")
    serve.add_argument("--backend", choices=["onnx", "torchscript"], help="LIMOE_BACKEND (default onnx)")
    serve.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from service.cli import serve

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("model", args.model),
                                   ("model_version", args.version), ("backend", args.backend)) if v is not None}
    return serve(overrides)
