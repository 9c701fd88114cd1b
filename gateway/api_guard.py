"""The API's gate, in front of FastAPI: who may talk, and how much, before anything is parsed.

FastAPI reads and parses a request's JSON body before its dependencies (the token check) run,
and sets no size limit. A large body from anyone who can reach the port then holds the event
loop, and with it the watchdog. This ASGI middleware answers first:
  * 401 for a call under `/api/` without the configured bearer token, before the body is read;
  * 413 for a body over `api.max_body_bytes`, by its Content-Length or, without one, as soon
    as the bytes received pass the limit (the rest is never read).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _answer(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]]
                  ) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *headers]})
    await send({"type": "http.response.body", "body": body})


class ApiGuard:
    def __init__(self, app: ASGIApp, token: Callable[[], str | None], max_body_bytes: int
                 ) -> None:
        self.app = app
        self._token = token  # read per request: the settings object is the one in force
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        token = self._token()
        if token is not None and scope.get("path", "").startswith("/api/"):
            given = headers.get(b"authorization", b"")
            expected = b"Bearer " + token.encode()
            if not secrets.compare_digest(given, expected):
                await _answer(send, 401, "missing or wrong bearer token",
                              [(b"www-authenticate", b"Bearer")])
                return
        length = headers.get(b"content-length")
        limit = self.max_body_bytes
        if length is not None:
            try:
                too_large = int(length) > limit
            except ValueError:
                await _answer(send, 400, "bad Content-Length", [])
                return
            if too_large:
                await _answer(send, 413, f"body larger than {limit} bytes", [])
                return
        # Read the body here, bounded, and hand it on whole: what passes is at most `limit`
        # bytes, and a larger one is answered without reading the rest.
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                await _answer(send, 413, f"body larger than {limit} bytes", [])
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
