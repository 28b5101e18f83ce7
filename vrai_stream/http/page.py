"""`GET /`: one page to try the service from a browser (`page.html`: inline script and style,
nothing fetched from elsewhere).

It uploads a chosen or recorded file to `/v1/transcriptions` with `Accept: text/event-stream`
and shows the events as they come.  Its Content-Security-Policy allows only the page's own
inline script and style (by their hashes) and requests to this origin.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


@functools.cache
def _page() -> tuple[str, str]:
    """The page, and its Content-Security-Policy."""
    html = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for kind, body in _INLINE.findall(html):
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        hashes[kind].append(f"'sha256-{digest}'")
    policy = "; ".join(
        (
            "default-src 'none'",
            f"script-src {' '.join(hashes['script'])}",
            f"style-src {' '.join(hashes['style'])}",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )
    return html, policy


async def index(request: Request) -> Response:
    html, policy = _page()
    return HTMLResponse(
        html,
        headers={
            "Content-Security-Policy": policy,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        },
    )
