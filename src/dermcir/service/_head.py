"""HEAD answered wherever GET is, as HTTP requires (RFC 9110 §9.3.2).

FastAPI's ``@app.get`` routes accept GET only, so a HEAD probe (uptime monitors, proxies and caches checking a case
image) would get 405. This ASGI middleware runs a HEAD request as a GET and passes on its status and headers
(``Content-Length`` and ``ETag`` included) without the body. A route that has no GET (``POST /search``) still
answers 405 with its ``Allow`` header.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return  # a streamed body's chunks are dropped; its last message ends the response
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)
