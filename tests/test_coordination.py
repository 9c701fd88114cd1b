"""Clinic ownership on a real 3-member etcd cluster (issue 15's coordination half).

Each test runs gateways' coordinators in this process against the cluster; a sampler checks
every 5 ms that no clinic has two coordinators that may command it. A "crash" stops a
coordinator's tasks without a word to etcd (what SIGKILL leaves behind); a gateway "cut off"
from etcd gets its requests refused at its own HTTP transport, as a broken network would.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import pytest

from device_sim.local_etcd import LocalEtcdCluster
from gateway.coordination import Coordinator
from gateway.etcd_client import EtcdClient
from gateway.settings import CoordinationSettings
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

CLINICS = [f"clinic-{i}" for i in range(6)]


class Cuttable(httpx.AsyncBaseTransport):
    """A network link that can be cut: requests fail to connect while `cut`."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.cut = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.cut:
            raise httpx.ConnectError("link cut", request=request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class Gw:
    name: str
    coord: Coordinator
    link: Cuttable
    log: list[tuple[float, str, str]] = field(default_factory=list)  # (t, watch|unwatch, c)
    alive: bool = True


@dataclass
class Fleet:
    etcd: LocalEtcdCluster
    gws: dict[str, Gw] = field(default_factory=dict)
    overlaps: list[tuple[str, list[str]]] = field(default_factory=list)

    def settings(self) -> CoordinationSettings:
        return CoordinationSettings(etcd_endpoints=self.etcd.endpoints, prefix="/t",
                                    lease_ttl_s=2, request_timeout_s=0.5)

    async def add(self, name: str) -> Gw:
        link = Cuttable()
        s = self.settings()
        log: list[tuple[float, str, str]] = []
        coord = Coordinator(
            s, name,
            on_watch=lambda c: log.append((time.monotonic(), "watch", c)),
            on_unwatch=lambda c, why: log.append((time.monotonic(), "unwatch", c)),
            etcd=EtcdClient(s.etcd_endpoints, timeout_s=s.request_timeout_s,
                            client=httpx.AsyncClient(transport=link, timeout=0.5)))
        gw = Gw(name, coord, link, log)
        self.gws[name] = gw
        await coord.start()
        return gw

    def live(self) -> list[Gw]:
        return [g for g in self.gws.values() if g.alive]

    def owners(self) -> dict[str, list[str]]:
        return {c: [g.name for g in self.live() if g.coord.may_command(c)] for c in CLINICS}

    def settled(self, members: int) -> bool:
        """Every clinic commanded by exactly one gateway, loads within one of each other."""
        own = self.owners()
        loads = [sum(g.name in o for o in own.values()) for g in self.live()]
        return (all(len(o) == 1 for o in own.values()) and len(self.live()) == members
                and max(loads) - min(loads) <= 1)

    async def sample(self) -> None:
        while True:
            for c, who in self.owners().items():
                if len(who) > 1:
                    self.overlaps.append((c, who))
            await asyncio.sleep(0.005)

    async def crash(self, gw: Gw) -> None:
        """SIGKILL as etcd sees it: the keep-alives stop, nothing is released."""
        gw.alive = False
        for t in gw.coord._tasks:  # the coordinator's own tasks, nothing else
            t.cancel()
        for t in gw.coord._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await gw.coord.etcd.aclose()


@contextlib.asynccontextmanager
async def fleet_of(etcd: LocalEtcdCluster, n: int) -> AsyncIterator[Fleet]:
    fleet = Fleet(etcd)
    sampler = asyncio.create_task(fleet.sample())
    try:
        for i in range(n):
            await fleet.add(f"gw-{i + 1}")
        for c in CLINICS:
            await fleet.live()[0].coord.discovered(c)
        await wait_for(lambda: fleet.settled(n), 10, "the clinics shared out")
        yield fleet
    finally:
        sampler.cancel()
        for g in fleet.live():
            with contextlib.suppress(Exception):
                await g.coord.stop()
    assert fleet.overlaps == []


async def test_three_gateways_share_six_clinics_two_each(etcd: LocalEtcdCluster) -> None:
    async with fleet_of(etcd, 3) as fleet:
        own = fleet.owners()
        commanders = [who for o in own.values() for who in o]
        assert sorted(commanders) == ["gw-1"] * 2 + ["gw-2"] * 2 + ["gw-3"] * 2


async def test_a_gateway_joining_takes_a_fair_share(etcd: LocalEtcdCluster) -> None:
    async with fleet_of(etcd, 2) as fleet:
        assert sorted(len(g.coord.watching) for g in fleet.live()) == [3, 3]
        await fleet.add("gw-3")
        await wait_for(lambda: fleet.settled(3), 5, "the newcomer to take its share")
        assert len(fleet.gws["gw-3"].coord.watching) == 2


async def test_a_crashed_owners_clinics_are_taken_within_the_lease_ttl(
        etcd: LocalEtcdCluster) -> None:
    async with fleet_of(etcd, 3) as fleet:
        victim = fleet.gws["gw-1"]
        lost = set(victim.coord.watching)
        assert len(lost) == 2
        t0 = time.monotonic()
        await fleet.crash(victim)
        await wait_for(lambda: fleet.settled(2), 10, "the others to take its clinics")
        took = max(t for g in fleet.live() for t, kind, c in g.log
                   if kind == "watch" and c in lost) - t0
        print(f"crash: its clinics watched again after {took:.2f} s")
        # TTL 2 s, etcd checks expiry every 0.5 s; nobody watched them for that long.
        assert 1.5 <= took < 3.5, took


async def test_sigterm_hands_the_clinics_over_at_once(etcd: LocalEtcdCluster) -> None:
    async with fleet_of(etcd, 3) as fleet:
        leaving = fleet.gws["gw-2"]
        moved = set(leaving.coord.watching)
        t0 = time.monotonic()
        leaving.alive = False
        await leaving.coord.stop()
        await wait_for(lambda: fleet.settled(2), 5, "the others to take its clinics")
        took = max(t for g in fleet.live() for t, kind, c in g.log
                   if kind == "watch" and c in moved) - t0
        print(f"sigterm: its clinics watched again after {took:.3f} s")
        assert took < 0.5, took  # no lease to wait for


async def test_a_gateway_cut_off_from_etcd_stops_commanding_before_another_starts(
        etcd: LocalEtcdCluster) -> None:
    async with fleet_of(etcd, 3) as fleet:
        cut = fleet.gws["gw-3"]
        theirs = set(cut.coord.watching)
        cut.link.cut = True
        t0 = time.monotonic()
        await wait_for(lambda: not any(cut.coord.may_command(c) for c in theirs), 5,
                       "the cut-off gateway's fence to close")
        closed = time.monotonic() - t0
        print(f"cut off: fence closed after {closed:.2f} s")
        assert closed < 2.0, closed  # before the TTL: nobody else can own them yet
        # The others take the clinics once etcd expires the lease (the sampler checks that
        # no clinic ever had two commanders); the cut-off one keeps running, fenced.
        await wait_for(lambda: all(len(fleet.owners()[c]) == 1 for c in theirs), 10,
                       "the others to take its clinics")
        cut.link.cut = False  # it comes back: a new lease, a fair share again
        await wait_for(lambda: fleet.settled(3), 10, "the fleet to settle with it back")


async def test_one_etcd_member_killed_changes_nothing(etcd: LocalEtcdCluster) -> None:
    async with fleet_of(etcd, 3) as fleet:
        before = fleet.owners()
        marks = {g.name: len(g.log) for g in fleet.live()}
        leader = etcd.leader()
        leader.kill()  # the worst one: until a new leader is elected no lease is kept alive
        await asyncio.sleep(3 * 2)  # observing: three lease TTLs must change nothing
        assert fleet.owners() == before
        assert {g.name: len(g.log) for g in fleet.live()} == marks


async def test_quorum_lost_owners_stop_at_their_lease_then_recover(
        etcd: LocalEtcdCluster) -> None:
    async with fleet_of(etcd, 3) as fleet:
        survivor = etcd.leader()
        for m in etcd.members:
            if m is not survivor:
                m.kill()
        t0 = time.monotonic()
        await wait_for(lambda: all(o == [] for o in fleet.owners().values()), 5,
                       "every gateway to stop commanding")
        stopped = time.monotonic() - t0
        # The old leader keeps renewing leases on its own until it notices it has lost its
        # followers (about an election timeout, 0.5-1 s); from its last renewal the fence
        # holds TTL minus the margin (1.75 s).
        print(f"quorum lost: every fence closed after {stopped:.2f} s")
        assert stopped < 3.0, stopped
        for m in etcd.members:
            if m is not survivor:
                m.start()
        etcd.wait_healthy()
        await wait_for(lambda: fleet.settled(3), 15, "ownership to come back")
