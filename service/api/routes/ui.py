"""The web page at ``/``: classify an image, see the cost report drawn, read the model card.

Plain files in ``service/static`` (package data), no build step and no third-party script: the
page calls the public API from its own origin, so it shows nothing the API does not offer. This
router comes last in ``ROUTERS`` and adds no middleware, so the inference routes never pass
through it.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

from service.settings import Settings

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
#: Scripts, styles, images and connections from this origin only; blob: for the preview of
#: the picked image. The page never needs inline code, so none is allowed.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

# StaticFiles for its conditional requests (ETag, 304) and path checks; called from routes
# rather than mounted, so the files answer the same on every FastAPI version we allow.
_files = StaticFiles(directory=STATIC_DIR)


class PageConfig(BaseModel):
    """What the page cannot learn from the API itself."""

    dashboard_url: str
    docs_url: str
    version: str


async def _file(request: Request, name: str) -> Response:
    # Normalised as StaticFiles does for a mount; it refuses anything outside its directory.
    response = await _files.get_response(os.path.normpath(name), request.scope)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@router.api_route("/", methods=["GET", "HEAD"])
async def page(request: Request) -> Response:
    response = await _file(request, "index.html")
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    # The page is small and changes with the package: always revalidate (a 304 is cheap).
    response.headers["Cache-Control"] = "no-cache"
    return response


@router.api_route("/static/{name:path}", methods=["GET", "HEAD"])
async def static(request: Request, name: str) -> Response:
    response = await _file(request, name)
    response.headers["Cache-Control"] = "no-cache"
    return response


@router.api_route("/favicon.ico", methods=["GET", "HEAD"])
async def favicon(request: Request) -> Response:
    # Browsers ask for /favicon.ico whatever the page says; an SVG answers it in every one
    # that renders SVG icons, and saves a 404 in the others' logs.
    response = await _file(request, "favicon.svg")
    response.headers["Cache-Control"] = "max-age=86400"
    return response


@router.get("/ui/config")
async def page_config(request: Request) -> PageConfig:
    settings: Settings = request.app.state.settings
    return PageConfig(
        dashboard_url=settings.dashboard_url,
        docs_url=request.app.docs_url or "",
        version=request.app.version,
    )
