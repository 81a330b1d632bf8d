"""Security headers on every answer of the service.

The page writes every piece of case data as text (never as markup), so an id or a diagnosis written as HTML stays
text. The policy below backs that up: only the service's own scripts and styles run, images come from it or from the
page itself (``data:`` for the query as the model saw it, ``blob:`` for the chosen file's preview), nothing may frame
the page, and browsers do not guess a type other than the one stated (a case image served as JPEG stays an image).
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # frame-ancestors' older spelling, for browsers that predate it
    "Referrer-Policy": "no-referrer",  # case ids travel in image URLs
}


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                if headers.get("content-type", "").startswith("application/json"):
                    # case records, results and diagnoses: not to be kept by a proxy or the browser's disk cache
                    headers.setdefault("Cache-Control", "no-store")
            await send(message)

        await self.app(scope, receive, with_headers)
