"""The web page at GET /: try the model and see how each image is routed through the experts.

Plain HTML, CSS and JavaScript from this package (service/web/), with no build step: the page
works offline, and its Content-Security-Policy lets it load from and talk to this server only.
It is a client of the public API like any other (/v1/models, /v1/classify with explain), so it
needs no key itself; the API calls it makes do, when the server requires keys.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

PAGE = "/"  # GET only: POST / is the Hugging Face route
ASSETS = "/web"  # the page's script, style sheet and sample images
DIRECTORY = Path(__file__).with_name("web")
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # revalidate (ETag), so an upgraded server's page shows at once
}

router = APIRouter(include_in_schema=False)


@router.api_route(PAGE, methods=["GET", "HEAD"])
async def page() -> FileResponse:
    return FileResponse(DIRECTORY / "index.html", headers=HEADERS)


def assets() -> StaticFiles:
    """The app to mount at ASSETS."""
    return StaticFiles(directory=DIRECTORY)
