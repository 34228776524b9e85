"""The web console: static HTML, CSS and JavaScript served at ``/`` by the HTTP server.

The page only ever talks to the service that served it: the Content-Security-Policy
allows nothing from any other origin, and the QR codes are ``data:`` images.
"""

from __future__ import annotations

import os
from pathlib import Path

from starlette.responses import Response
from starlette.routing import Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC = Path(__file__).parent / "static"

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)

HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on every load, so a new release of the service is never mixed with an old page.
    "Cache-Control": "no-cache",
}


class ConsoleFiles(StaticFiles):
    """The console's files, each sent with the console's security headers."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(HEADERS)
        return response


def console_routes() -> list[Route]:
    """The console at ``/`` and each of its files at ``/<name>``, for GET and HEAD only.

    Exact paths, not a catch-all mount: every other path and method keeps the API's own
    answers (404 for an unknown route, 405 with the route's ``Allow`` for a wrong method).
    """
    files = ConsoleFiles(directory=STATIC, html=True)
    paths = ["/", *sorted(f"/{path.name}" for path in STATIC.iterdir())]
    return [
        Route(path, files, methods=["GET"], name=f"console:{path}", include_in_schema=False)
        for path in paths
    ]
