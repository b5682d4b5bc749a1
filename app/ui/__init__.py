"""The operator page (`/ui/`): static files, and the small ASGI app the Router mounts at
`/ui` to serve them (`operator_page()`).

The files carry no secret (the page asks for the admin token and sends it only to the
token-protected admin API), so they are served without a token. Only the names in `FILES`
are served: a request names a file, never a path, so nothing outside `static/` can be read.
Every answer says `Cache-Control: no-cache` (a new release's page is never a stale mix of
old and new files) and a Content-Security-Policy that lets the page load nothing from
anywhere but this origin: it works offline and a compromised CDN cannot read the token.

A mount, not routes of the Router's own: its requests never reach the inference path, so
they are not counted in the request metrics nor as rollout evidence, and they are not public
API routes of the OpenAPI document. Errors are raised as HTTPException, so the app the page
is mounted in answers them in its own error format (the Router's `{"error": ...}` JSON).
"""

from __future__ import annotations

from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, Router

__all__ = ["FILES", "STATIC_DIR", "operator_page", "ui_response"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
# name -> content type: the whole page. Anything else is a 404.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
HEADERS = {
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}


def ui_response(name: str) -> Response:
    """The page's file `name` (`""` is the page itself), or a 404 (raised, so the Router's
    error handler answers it as JSON like every other error)."""
    name = name or "index.html"
    content_type = FILES.get(name)
    if content_type is None:
        raise HTTPException(
            404, f"no file {name!r} in the operator page (files: {', '.join(FILES)})"
        )
    body = (STATIC_DIR / name).read_bytes()
    return Response(body, headers={**HEADERS, "content-type": content_type})


async def _page(request: Request) -> Response:
    return ui_response(request.path_params.get("name", ""))


def operator_page() -> Router:
    """The ASGI app to mount at `/ui`: `/ui/` is the page, `/ui/<file>` its files (GET and
    HEAD; a name, never a path: `{name}` matches no `/`)."""
    return Router(routes=[Route("/", _page, methods=["GET"]),
                          Route("/{name}", _page, methods=["GET"])])  # fmt: skip
