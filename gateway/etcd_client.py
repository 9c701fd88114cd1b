"""etcd v3 over its JSON gateway (`/v3/...`), with httpx: the calls coordination needs.

etcd serves every v3 RPC as JSON over HTTP on its client port (keys and values base64,
64-bit numbers as strings), so the gateway needs no gRPC stack: leases, conditional
transactions, ranges and watches are enough for partition ownership.

The client knows every cluster member's endpoint and moves to the next one when a request
cannot reach the one it is using, so one member down changes nothing; a request that etcd
answers with an error (no quorum, a lease not found) is not retried here.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

log = logging.getLogger(__name__)


class EtcdError(RuntimeError):
    """etcd could not be reached on any endpoint, or answered with an error."""


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(data: str | None) -> bytes:
    return base64.b64decode(data) if data else b""


def prefix_end(prefix: str) -> bytes:
    """The range end that makes [prefix, end) every key starting with prefix."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\x00"


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    lease: int
    mod_revision: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    deleted: bool
    kv: KeyValue


def _kv(raw: dict[str, Any]) -> KeyValue:
    return KeyValue(key=_unb64(raw.get("key")).decode(errors="replace"),
                    value=_unb64(raw.get("value")), lease=int(raw.get("lease", 0)),
                    mod_revision=int(raw.get("mod_revision", raw.get("modRevision", 0))))


class EtcdClient:
    """The v3 JSON gateway of a cluster; `endpoints` are its members' client URLs."""

    def __init__(self, endpoints: Sequence[str], *, timeout_s: float,
                 client: httpx.AsyncClient | None = None) -> None:
        if not endpoints:
            raise ValueError("etcd needs at least one endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._at = 0  # the endpoint in use
        self.timeout_s = timeout_s
        self._http = client or httpx.AsyncClient(timeout=timeout_s)

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._at]

    def _next_endpoint(self) -> None:
        self._at = (self._at + 1) % len(self.endpoints)

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST one request, trying each endpoint once from the one in use."""
        last: Exception | None = None
        for _ in range(len(self.endpoints)):
            url = f"{self.endpoint}/v3/{path}"
            try:
                resp = await self._http.post(url, json=body)
            except httpx.HTTPError as exc:
                last = exc
                self._next_endpoint()
                continue
            data = _decode(resp)
            if resp.status_code >= 500 and _unavailable(data):
                # This member has no leader (cut off, or the cluster lost quorum): another
                # member may still have one.
                last = EtcdError(_message(data))
                self._next_endpoint()
                continue
            if resp.status_code != 200 or "error" in data:
                raise EtcdError(f"{path}: {_message(data)}")
            return data.get("result", data)
        raise EtcdError(f"{path}: no etcd endpoint answered ({type(last).__name__}: {last})")

    # ------------------------------------------------------------------ leases

    async def grant(self, ttl_s: int) -> tuple[int, int]:
        """A new lease: (id, the TTL etcd granted)."""
        r = await self.call("lease/grant", {"TTL": ttl_s})
        return int(r["ID"]), int(r["TTL"])

    async def keepalive(self, lease: int) -> int:
        """Refresh the lease; its remaining TTL (0: the lease is gone)."""
        r = await self.call("lease/keepalive", {"ID": lease})
        return int(r.get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        await self.call("lease/revoke", {"ID": lease})

    # ------------------------------------------------------------------ keys

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> None:
        await self.call("kv/put", {"key": _b64(key), "value": _b64(value), "lease": lease})

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> bool:
        """Put the key only if it does not exist: whether this call created it."""
        r = await self.call("kv/txn", {
            "compare": [{"target": "CREATE", "result": "EQUAL", "key": _b64(key),
                         "create_revision": 0}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value),
                                         "lease": lease}}],
        })
        return bool(r.get("succeeded"))

    async def delete_if(self, key: str, value: bytes) -> bool:
        """Delete the key only if it holds `value`: whether this call deleted it."""
        r = await self.call("kv/txn", {
            "compare": [{"target": "VALUE", "result": "EQUAL", "key": _b64(key),
                         "value": _b64(value)}],
            "success": [{"request_delete_range": {"key": _b64(key)}}],
        })
        return bool(r.get("succeeded"))

    async def range_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under prefix, and the revision the answer is at."""
        r = await self.call("kv/range", {"key": _b64(prefix),
                                         "range_end": _b64(prefix_end(prefix))})
        rev = int(r.get("header", {}).get("revision", 0))
        return [_kv(kv) for kv in r.get("kvs", [])], rev

    async def watch_prefix(self, prefix: str, start_revision: int
                           ) -> AsyncIterator[list[WatchEvent]]:
        """Changes under prefix from start_revision on, a batch per etcd message, until the
        stream breaks (EtcdError: the caller reads the range again and re-watches)."""
        body = {"create_request": {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
                                   "start_revision": start_revision}}
        url = f"{self.endpoint}/v3/watch"
        try:
            # No read timeout: a quiet prefix sends nothing for as long as it stays quiet.
            async with self._http.stream("POST", url, json=body,
                                         timeout=httpx.Timeout(self.timeout_s, read=None)
                                         ) as resp:
                async for line in resp.aiter_lines():
                    if not line.strip():
                        continue
                    data = json.loads(line)
                    if "error" in data:
                        raise EtcdError(f"watch: {_message(data)}")
                    result = data.get("result", {})
                    if result.get("canceled"):
                        raise EtcdError(f"watch canceled: {result.get('cancel_reason', '')}")
                    events = [WatchEvent(deleted=e.get("type") == "DELETE", kv=_kv(e["kv"]))
                              for e in result.get("events", [])]
                    if events:
                        yield events
        except httpx.HTTPError as exc:
            self._next_endpoint()
            raise EtcdError(f"watch: {type(exc).__name__}: {exc}") from exc
        self._next_endpoint()
        raise EtcdError("watch: the stream ended")


def _decode(resp: httpx.Response) -> dict[str, Any]:
    try:
        data = resp.json()
    except ValueError:
        return {"error": {"message": resp.text[:200]}}
    return data if isinstance(data, dict) else {"error": {"message": str(data)[:200]}}


def _message(data: dict[str, Any]) -> str:
    err = data.get("error", data)
    if isinstance(err, dict):
        return str(err.get("message") or err.get("error") or err)[:200]
    return str(err)[:200]


def _unavailable(data: dict[str, Any]) -> bool:
    msg = _message(data).lower()
    return "leader" in msg or "unavailable" in msg or "timed out" in msg
