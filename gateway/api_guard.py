"""The API's gate, in front of FastAPI: who may talk, what they may do, and how much they may
send, all decided before a byte of the body is parsed.

FastAPI reads and parses a request's JSON body before its dependencies run, and sets no size
limit. A large body from anyone who can reach the port then holds the event loop, and with it
the watchdog; and a role check in a dependency would come after the parse. So this ASGI
middleware answers first, from the method, the path and the headers alone:
  * 401 for a call without a valid bearer token (any route but the public ones of
    gateway/api_users.py::ROUTES: /health and the API documentation);
  * 404 / 405 for a path or method the route table does not know: nothing unlisted is reachable;
  * 403, with the reason, for a known user whose role may not call the route;
  * 413 for a body over `api.max_body_bytes`, by its Content-Length or, without one, as soon
    as the bytes received pass the limit (the rest is never read).
Every refusal is counted (`GET /api/v1/stats`, `api_refused`) and logged at most once per
client (401) or user (403) per `reject_log_interval_s`. A 401 is nobody: it is counted, never
an audit record; a 403 on an audited action (start, stop, vent, alarm ack) is a refused one.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from gateway.api_users import Authenticator, Principal, RouteRule, RouteTable, role_names

log = logging.getLogger("gateway.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PRINCIPAL_KEY = "api_principal"  # request.state.api_principal in the routes
OnForbidden = Callable[[Principal, RouteRule, dict[str, str]], None]


class ApiCounters:
    """Refusals by kind, shared by the gate and the app (validation errors, 422)."""

    def __init__(self) -> None:
        self.refused: Counter[str] = Counter()


class _Throttle:
    """At most one log line per key and interval; counts the ones held back."""

    def __init__(self, interval_s: float, monotonic: Callable[[], float]) -> None:
        self.interval_s = interval_s
        self._monotonic = monotonic
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def __call__(self, key: str) -> int | None:
        """None: stay quiet; else log now, with this many held back since the last line."""
        now = self._monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._held[key] += 1
            return None
        if len(self._last) > 10_000:  # many clients: forget, do not grow
            self._last.clear()
            self._held.clear()
        self._last[key] = now
        return self._held.pop(key, 0)


async def _answer(send: Send, status: int, detail: str,
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class ApiGuard:
    def __init__(self, app: ASGIApp, *, authenticator: Authenticator, max_body_bytes: int,
                 counters: ApiCounters, routes: RouteTable | None = None,
                 on_forbidden: OnForbidden | None = None, log_interval_s: float = 60.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.auth = authenticator
        self.routes = routes or RouteTable()
        self.max_body_bytes = max_body_bytes
        self.counters = counters
        self.on_forbidden = on_forbidden
        self._throttle = _Throttle(log_interval_s, monotonic)

    def _refuse(self, kind: str, key: str, msg: str, **fields: object) -> None:
        self.counters.refused[kind] += 1
        held = self._throttle(f"{kind}:{key}")
        if held is not None:
            log.warning(msg, extra={**fields, "suppressed_since_last": held})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        method = scope.get("method", "GET")
        path = scope.get("path", "")
        client = (scope.get("client") or ("?", 0))[0]
        match = self.routes.match(method, path)
        rule = match.rule if match else None
        principal: Principal | None = None
        if rule is None or rule.roles is not None:
            principal = self.auth.authenticate(headers.get(b"authorization"))
            if principal is None and (match is not None or path.startswith("/api/")):
                # Templates only in the log line: the path itself is the caller's text.
                self._refuse("unauthorized", client, "API call without a valid token",
                             client=client, method=method[:10],
                             route=rule.path if rule else "unknown")
                await _answer(send, 401, "missing or wrong bearer token",
                              [(b"www-authenticate", b"Bearer")])
                return
        if match is None:
            self.counters.refused["not_found"] += 1
            await _answer(send, 404, "Not Found")
            return
        if rule is None:
            self.counters.refused["method_not_allowed"] += 1
            await _answer(send, 405, "Method Not Allowed",
                          [(b"allow", ", ".join(match.allowed_methods).encode())])
            return
        if rule.roles is not None:
            assert principal is not None
            if principal.role not in rule.roles:
                reason = (f"user {principal.name!r} (role {principal.role.value}) may not "
                          f"{rule.method} {rule.path}; it needs {role_names(rule.roles)}")
                self._refuse("forbidden", principal.name, "API call refused: role",
                             user=principal.name, role=principal.role.value,
                             method=rule.method, route=rule.path)
                if self.on_forbidden is not None and rule.action is not None:
                    self.on_forbidden(principal, rule, match.params)
                await _answer(send, 403, reason)
                return
            scope["state"] = {**(scope.get("state") or {}), PRINCIPAL_KEY: principal}
        await self._bounded(scope, receive, send, headers)

    async def _bounded(self, scope: Scope, receive: Receive, send: Send,
                       headers: dict[bytes, bytes]) -> None:
        length = headers.get(b"content-length")
        limit = self.max_body_bytes
        if length is not None:
            try:
                too_large = int(length) > limit
            except ValueError:
                self.counters.refused["bad_request"] += 1
                await _answer(send, 400, "bad Content-Length")
                return
            if too_large:
                self.counters.refused["too_large"] += 1
                await _answer(send, 413, f"body larger than {limit} bytes")
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
                self.counters.refused["too_large"] += 1
                await _answer(send, 413, f"body larger than {limit} bytes")
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
