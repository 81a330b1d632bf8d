"""Request-body limits, enforced before the multipart parser spools an upload to disk: its size, and how long it may
stall."""

from __future__ import annotations

import json

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class UploadTooLarge(Exception):
    """The request body went over the configured limit while it was being read."""


class UploadStalled(Exception):
    """No part of the request body arrived for the configured time."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no part of the request body arrived for {seconds:g} s")
        self.seconds = seconds


#: How long a request body may send nothing before it is given up (408). A stalled upload holds a connection and
#: its spooled part on disk; twenty clients that sent 9 MB of 10 and went silent held 180 MB for as long as they liked.
DEFAULT_BODY_TIMEOUT_S = 30.0


class BodySizeLimit:
    """ASGI middleware: answer 413 when ``Content-Length`` declares too much, and stop reading a body that grows past
    the limit without declaring it (chunked uploads), by raising :class:`UploadTooLarge` into the app; and stop waiting
    for a body that sends nothing for ``body_timeout_s`` (:class:`UploadStalled`). Once the body is complete, reads
    (a wait for the client's disconnect) are not timed.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, body_timeout_s: float | None = DEFAULT_BODY_TIMEOUT_S) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        seen, complete = 0, False

        async def limited() -> Message:
            nonlocal seen, complete
            if complete or self.body_timeout_s is None:
                message = await receive()
            else:
                try:
                    with anyio.fail_after(self.body_timeout_s):
                        message = await receive()
                except TimeoutError:
                    raise UploadStalled(self.body_timeout_s) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_bytes:
                    raise UploadTooLarge
            return message

        await self.app(scope, limited, send)

    async def _reject(self, send: Send) -> None:
        body = json.dumps({"detail": f"request body over the limit of {self.max_bytes:,} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
