"""Clinic ownership over etcd: the adapter around gateway/partitions.py's `Ownership`.

Keys, all under `coordination.prefix`:

- `members/{gateway_id}`: this gateway is alive; bound to its lease.
- `owners/{clinic}`: the gateway that watches the clinic; bound to the owner's lease, so a
  dead owner's clinics come free when its lease expires (TTL after its last keep-alive).
- `clinics/{clinic}`: a clinic some gateway has seen (a boot's retained state); no lease.

Three tasks: the keep-alive (every TTL/6, at most 0.5 s; each answer moves the fence's
deadline), the watch (the view of the three prefixes, read whole and then followed), and a
tick that lets the fence close on time when nothing else happens. Every decision is the pure
core's; this module only carries its actions out (conditional creates and deletes) and calls
the gateway's `on_watch` / `on_unwatch`. Steps are serialised by a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from gateway.etcd_client import EtcdClient, EtcdError, KeyValue, WatchEvent
from gateway.partitions import Action, Ownership
from gateway.settings import CoordinationSettings

log = logging.getLogger(__name__)

_RETRY_S = 0.1  # after a failed etcd call: short, the lease's margin is what it eats into
_LOG_EVERY_S = 10.0


class Coordinator:
    """One gateway's membership and clinic ownership in etcd."""

    def __init__(self, settings: CoordinationSettings, me: str, *,
                 on_watch: Callable[[str], None], on_unwatch: Callable[[str, str], None],
                 clock: Callable[[], float] = time.monotonic,
                 etcd: EtcdClient | None = None) -> None:
        self.settings = settings
        self.me = me
        self.own = Ownership(me, lease_margin_s=settings.lease_margin_s)
        self.etcd = etcd or EtcdClient(settings.etcd_endpoints,
                                       timeout_s=settings.request_timeout_s)
        self._on_watch, self._on_unwatch = on_watch, on_unwatch
        self._clock = clock
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.lease: int | None = None
        self._members: dict[str, int] = {}
        self._owners: dict[str, str] = {}
        self._clinics: set[str] = set()
        self._errors_logged_at = -_LOG_EVERY_S
        self.etcd_errors = 0
        self.view_revision = 0

    # ------------------------------------------------------------------ keys

    def _key(self, kind: str, name: str = "") -> str:
        return f"{self.settings.prefix}/{kind}/{name}"

    # ------------------------------------------------------------------ public

    def may_command(self, clinic: str) -> bool:
        """The fence: whether this gateway may act for the clinic at this moment."""
        return self.own.may_command(clinic, self._clock())

    @property
    def watching(self) -> frozenset[str]:
        return frozenset(self.own.watching)

    async def start(self) -> None:
        """Join: a lease, the member key, the first view; then the three tasks."""
        await self._join()
        await self._read_view()
        self._tasks = [asyncio.create_task(self._keepalive_loop(), name="etcd-keepalive"),
                       asyncio.create_task(self._watch_loop(), name="etcd-watch"),
                       asyncio.create_task(self._tick_loop(), name="etcd-tick")]
        await self._step()

    async def discovered(self, clinic: str) -> None:
        """A clinic seen on the broker: make it known to every gateway (once)."""
        if clinic in self._clinics:
            return
        try:
            await self.etcd.create(self._key("clinics", clinic), b"")
        except EtcdError as exc:
            self._etcd_failed("register a clinic", exc)

    async def stop(self) -> None:
        """SIGTERM: stop acting for every clinic, free every key, leave; at once, so that the
        other gateways take over without waiting for the lease to expire."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        async with self._lock:
            await self._apply(self.own.release_all())
            if self.lease is not None:
                try:
                    await self.etcd.revoke(self.lease)  # the member key goes with it
                except EtcdError as exc:
                    self._etcd_failed("revoke the lease", exc)
        await self.etcd.aclose()

    # ------------------------------------------------------------------ lease

    async def _join(self) -> None:
        sent = self._clock()
        lease, ttl = await self.etcd.grant(self.settings.lease_ttl_s)
        await self.etcd.put(self._key("members", self.me), b"", lease=lease)
        self.lease = lease
        self.own.on_lease(sent + ttl)
        log.info("joined the gateway cluster", extra={
            "gateway_id": self.me, "lease_ttl_s": ttl, "etcd": self.etcd.endpoint})

    async def _keepalive_loop(self) -> None:
        # Often, so that the fence's deadline stays well ahead: an etcd leader lost takes up
        # to about a second to replace (docs/deploy.md §4), and must not close the fence.
        period = min(0.5, self.settings.lease_ttl_s / 6)
        while True:
            sent = self._clock()
            try:
                if self.lease is None:
                    await self._join()
                else:
                    ttl = await self.etcd.keepalive(self.lease)
                    if ttl > 0:
                        self.own.on_lease(sent + ttl)
                    else:
                        log.warning("etcd lease expired; rejoining", extra={
                            "gateway_id": self.me, "watching": sorted(self.own.watching)})
                        self.own.lease_lost()
                        self.lease = None
                        await self._step()
                        continue
            except EtcdError as exc:
                self._etcd_failed("keep the lease alive", exc)
                await asyncio.sleep(_RETRY_S)
                continue
            await asyncio.sleep(max(0.0, period - (self._clock() - sent)))

    # ------------------------------------------------------------------ view

    async def _read_view(self) -> int:
        kvs, rev = await self.etcd.range_prefix(self.settings.prefix + "/")
        self._members, self._owners, self._clinics = {}, {}, set()
        for kv in kvs:
            self._take(kv, deleted=False)
        self.view_revision = rev
        self._publish_view()
        return rev

    def _take(self, kv: KeyValue, *, deleted: bool) -> None:
        kind, _, name = kv.key[len(self.settings.prefix) + 1:].partition("/")
        if not name:
            return
        if kind == "members":
            if deleted:
                self._members.pop(name, None)
            else:
                self._members[name] = kv.lease
        elif kind == "owners":
            if deleted:
                self._owners.pop(name, None)
            else:
                self._owners[name] = kv.value.decode(errors="replace")
        elif kind == "clinics":
            if deleted:
                self._clinics.discard(name)
            else:
                self._clinics.add(name)

    def _publish_view(self) -> None:
        self.own.on_view(self._members, self._clinics, self._owners)

    async def _watch_loop(self) -> None:
        rev = self.view_revision
        while True:
            try:
                async for batch in self.etcd.watch_prefix(self.settings.prefix + "/", rev + 1):
                    self._apply_events(batch)
                    rev = max(rev, *(e.kv.mod_revision for e in batch))
                    await self._step()
            except EtcdError as exc:
                self._etcd_failed("watch", exc)
                await asyncio.sleep(_RETRY_S)
                # Read it whole again: what changed while the watch was down is in it.
                with contextlib.suppress(EtcdError):
                    rev = await self._read_view()
                    await self._step()

    def _apply_events(self, batch: list[WatchEvent]) -> None:
        for e in batch:
            self._take(e.kv, deleted=e.deleted)
        self._publish_view()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(min(0.1, self.settings.lease_margin_s / 2))
            await self._step()

    # ------------------------------------------------------------------ actions

    async def _step(self) -> None:
        async with self._lock:
            await self._apply(self.own.step(self._clock()))

    async def _apply(self, actions: list[Action]) -> None:
        me = self.me.encode()
        for a in actions:
            if a.kind == "unwatch":
                log.info("stopped watching a clinic", extra={
                    "clinic": a.clinic, "reason": a.reason, "gateway_id": self.me})
                self._on_unwatch(a.clinic, a.reason)
            elif a.kind == "watch":
                log.info("watching a clinic", extra={"clinic": a.clinic, "gateway_id": self.me})
                self._on_watch(a.clinic)
            elif a.kind == "acquire" and self.lease is not None:
                try:
                    await self.etcd.create(self._key("owners", a.clinic), me, lease=self.lease)
                except EtcdError as exc:
                    self._etcd_failed("acquire a clinic", exc)
            elif a.kind == "release":
                try:
                    await self.etcd.delete_if(self._key("owners", a.clinic), me)
                except EtcdError as exc:
                    self._etcd_failed("release a clinic", exc)

    def _etcd_failed(self, what: str, exc: Exception) -> None:
        self.etcd_errors += 1
        now = self._clock()
        if now - self._errors_logged_at >= _LOG_EVERY_S:
            self._errors_logged_at = now
            log.warning("etcd request failed", extra={
                "what": what, "reason": str(exc), "errors": self.etcd_errors,
                "gateway_id": self.me, "lease_ok": self.own.lease_ok(now)})
