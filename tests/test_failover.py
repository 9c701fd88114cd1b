"""Several gateways, one fleet: real gateway processes, a real 3-member etcd, Mosquitto, influxd.

Written from issue 15 and protocol §5.1 / §7.2, from the clinic's side: simulated boots of
protocol revision 2 time out on their clinic's heartbeat only, so a boot vents itself the
moment nobody watches its clinic. The gateways find the clinics, share them out, and when
one is killed (SIGKILL) or stopped (SIGTERM) the others take its clinics over before any
boot's heartbeat timeout runs out, and resume the sessions there.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from device_sim.boot import SELF_VENT_HEARTBEAT, SimBoot
from device_sim.fleet import SimFleet
from device_sim.local_etcd import LocalEtcdCluster
from device_sim.local_stack import LocalInflux, LocalMosquitto, free_port
from gateway.contract import EventKind
from tests.helpers import mqtt_of, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
CLINICS = [f"fo-c{i}" for i in range(6)]
BOOTS_PER_CLINIC = 10


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[LocalMosquitto]:
    """A broker of this test's own: the gateways find clinics in every retained state, and
    the session-wide broker holds those of every earlier test."""
    server = LocalMosquitto("mosquitto", tmp_path / "mosquitto", free_port()).start()
    yield server
    server.stop()


@dataclass
class GatewayProc:
    name: str
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    api: str = ""
    killed_at: float | None = None  # wall clock of its SIGKILL: it acted for nothing after

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=ROOT,
                                         env=self.env, stdout=out, stderr=out)
        self.api = f"http://127.0.0.1:{self.env['BOOTGW_API__PORT']}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def health(self) -> dict[str, object] | None:
        try:
            return httpx.get(f"{self.api}/health", timeout=1).json()  # type: ignore[no-any-return]
        except (httpx.HTTPError, ValueError):
            return None

    def clinics(self) -> list[str]:
        h = self.health() if self.alive() else None
        return list(h.get("clinics") or []) if h else []  # type: ignore[call-overload]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.alive():
            assert self.proc is not None
            if sig == signal.SIGKILL:
                self.killed_at = time.time()
            self.proc.send_signal(sig)
            self.proc.wait(30)


@dataclass
class Deployment:
    gateways: dict[str, GatewayProc] = field(default_factory=dict)

    def owners(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {c: [] for c in CLINICS}
        for g in self.gateways.values():
            for c in g.clinics():
                if c in out:
                    out[c].append(g.name)
        return out

    def settled(self, alive: int) -> bool:
        """Every clinic watched by one gateway, the loads within one of each other; read
        twice, so that a handover between two /health reads does not pass for settled."""
        for _ in range(2):
            own = self.owners()
            live = [g for g in self.gateways.values() if g.alive()]
            loads = [sum(g.name in o for o in own.values()) for g in live]
            if not (all(len(o) == 1 for o in own.values()) and len(live) == alive
                    and max(loads) - min(loads) <= 1):
                return False
        return True

    def owner(self, clinic: str) -> GatewayProc:
        (name,) = self.owners()[clinic]
        return self.gateways[name]


def _env(name: str, tmp: Path, mosquitto: LocalMosquitto, influx: LocalInflux,
         etcd: LocalEtcdCluster, db: str) -> dict[str, str]:
    d = tmp / name
    d.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "BOOTGW_CONFIG_FILE": str(d / "none.toml"),
        "BOOTGW_GATEWAY_ID": name,
        "BOOTGW_MQTT__PORT": str(mosquitto.port),
        "BOOTGW_MQTT__CLIENT_ID": f"{name}-{os.getpid()}",
        "BOOTGW_INFLUX__URL": influx.url,
        "BOOTGW_INFLUX__DATABASE": db,
        "BOOTGW_INFLUX__FLUSH_INTERVAL_S": "0.2",
        "BOOTGW_INFLUX__SPOOL_DIR": str(d / "spool"),
        "BOOTGW_SESSION_JOURNAL": str(d / "sessions.jsonl"),
        "BOOTGW_API__PORT": str(free_port()),
        "BOOTGW_API__ALLOW_ANONYMOUS": "true",
        # Short programs (as tests/helpers.py's gateway_settings allows them).
        "BOOTGW_PROGRAMS__MIN_DURATION_S": "2", "BOOTGW_PROGRAMS__MIN_CYCLE_S": "1",
        "BOOTGW_PROGRAMS__MIN_RELEASE_S": "1", "BOOTGW_PROGRAMS__START_EXPIRY_S": "5",
        "BOOTGW_COORDINATION__ETCD_ENDPOINTS": json.dumps(etcd.endpoints),
        "BOOTGW_COORDINATION__PREFIX": f"/{db}",
        "BOOTGW_LOG_LEVEL": "INFO",
    }


@contextlib.asynccontextmanager
async def deployment(tmp: Path, mosquitto: LocalMosquitto, influx: LocalInflux,
                     etcd: LocalEtcdCluster, db: str) -> AsyncIterator[Deployment]:
    dep = Deployment()
    for i in range(3):
        name = f"gw-{i + 1}"
        g = GatewayProc(name, _env(name, tmp, mosquitto, influx, etcd, db), tmp / f"{name}.log")
        dep.gateways[name] = g
        g.start()
    try:
        yield dep
    finally:
        for g in dep.gateways.values():
            with contextlib.suppress(Exception):
                g.stop(signal.SIGKILL)


def _program(duration_s: float) -> dict[str, object]:
    return {"name": "failover", "mode": "sequential", "targets_mmhg": [60, 58, 56, 54],
            "duration_s": duration_s,
            "timing": {"inflate_s": 0.4, "hold_s": 0.8, "deflate_s": 0.8, "pause_s": 0.4}}


async def _start_all(dep: Deployment, fleet: SimFleet, duration_s: float) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        for boot in fleet.boots.values():
            owner = dep.owner(boot.clinic)
            r = await http.post(f"{owner.api}/api/v1/boots/{boot.clinic}/{boot.device}/session",
                                json={"custom": _program(duration_s)})
            assert r.status_code == 202, (boot.key, r.status_code, r.text)


def _log(g: GatewayProc) -> list[dict[str, object]]:
    out = []
    for line in g.log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def _at(rec: dict[str, object]) -> float:
    return datetime.fromisoformat(str(rec["ts"]).replace("Z", "+00:00")).timestamp()


def check_one_commander(dep: Deployment) -> int:
    """From the gateways' own logs: the spans in which each watched each clinic never
    overlap between two gateways, and every start a gateway sent lies in its own span.
    Returns how many starts were checked."""
    spans: dict[str, list[tuple[float, float, str]]] = {}
    starts: list[tuple[float, str, str]] = []
    for g in dep.gateways.values():
        opened: dict[str, float] = {}
        end = g.killed_at or time.time()
        for rec in _log(g):
            msg, clinic = rec.get("msg"), str(rec.get("clinic", ""))
            if msg == "watching a clinic":
                opened[clinic] = _at(rec)
            elif msg == "stopped watching a clinic" and clinic in opened:
                spans.setdefault(clinic, []).append((opened.pop(clinic), _at(rec), g.name))
            elif msg == "session start sent":
                starts.append((_at(rec), str(rec["device"]).split("/")[0], g.name))
        for clinic, t in opened.items():  # still watching, or killed while watching
            spans.setdefault(clinic, []).append((t, end, g.name))
    for clinic, ss in spans.items():
        ss.sort()
        for (a0, a1, ga), (b0, _b1, gb) in itertools.pairwise(ss):
            assert ga == gb or a1 <= b0, (clinic, ga, (a0, a1), gb, b0)
    for t, clinic, g in starts:
        assert any(s0 <= t <= s1 for s0, s1, who in spans[clinic] if who == g), (clinic, g, t)
    return len(starts)


async def _all_in_session(dep: Deployment, fleet: SimFleet, duration_s: float) -> None:
    """The boots up, the clinics shared out among three gateways, every boot in session."""
    await fleet.start()
    await wait_for(lambda: dep.settled(3), 30, "the gateways to share the clinics out")
    await _start_all(dep, fleet, duration_s)
    await wait_for(lambda: all(b.session_id for b in fleet.boots.values()), 15,
                   "every boot in session")


def _completed(boot: SimBoot) -> bool:
    return any(e.kind is EventKind.SESSION_COMPLETED for e in boot.events_sent)


@pytest.mark.timeout(240)
async def test_sigkill_of_an_owner_its_clinics_move_and_no_boot_vents(
        mosquitto: LocalMosquitto, own_influx: LocalInflux, etcd: LocalEtcdCluster,
        tmp_path: Path) -> None:
    members = [(c, f"{c}-b{j:02d}") for c in CLINICS for j in range(BOOTS_PER_CLINIC)]
    fleet = SimFleet(members, mqtt_of(mosquitto), telemetry_period_s=0.2, telemetry_qos=1,
                     seed=3)
    async with deployment(tmp_path, mosquitto, own_influx, etcd, "failover") as dep:
        await fleet.start()
        await wait_for(lambda: dep.settled(3), 30, "the gateways to share the clinics out")
        assert sorted(len(g.clinics()) for g in dep.gateways.values()) == [2, 2, 2]
        await _start_all(dep, fleet, duration_s=25)
        await wait_for(lambda: all(b.session_id for b in fleet.boots.values()), 15,
                       "every boot in session")
        victim = dep.gateways["gw-1"]
        moved = victim.clinics()
        mark = _mark(fleet)
        killed_at = time.monotonic()
        victim.stop(signal.SIGKILL)
        # A stuck valve right after the kill, on a boot of a clinic nobody watches yet.
        stuck = fleet.boots[f"{moved[0]}/{moved[0]}-b00"]
        stuck_at = stuck.clock()
        stuck.inject_stuck_valve(0)
        await wait_for(lambda: dep.settled(2), 10, "the others to take the clinics over")
        took_over_s = time.monotonic() - killed_at
        await wait_for(lambda: stuck.vent_received_at is not None, 30, "the stuck valve vented")
        others = [b for b in fleet.boots.values() if b is not stuck]
        await wait_for(lambda: all(_completed(b) for b in others), 60,
                       "every other session to complete")
        self_vents = {b.key: b.self_vents_at for b in fleet.boots.values() if b.self_vents}
        assert stuck.vent_received_at is not None
        vented_after_s = stuck.vent_received_at - stuck_at
        starts = check_one_commander(dep)
        sent, lost = await _loss(own_influx, "failover", fleet, mark)
    await fleet.stop()
    # Not asserted yet (docs/deploy.md §4.4): what the killed gateway had acknowledged to the
    # broker but not yet written is lost.
    print(f"fail-over: clinics {moved} owned again {took_over_s:.2f} s after the SIGKILL; "
          f"the stuck valve injected then vented after {vented_after_s:.2f} s; "
          f"telemetry lost: {lost} of {sent}")
    assert took_over_s < 4.0, took_over_s  # TTL 2 s + etcd's 0.5 s expiry check + takeover
    assert self_vents == {}
    assert starts == len(members)


async def _loss(influx: LocalInflux, db: str, fleet: SimFleet,
                mark: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """_lost_since once the gateways have written what they hold (a few flushes)."""
    deadline = time.monotonic() + 5
    while True:
        sent, lost = _lost_since(influx, db, fleet, mark)
        if lost == 0 or time.monotonic() > deadline:
            return sent, lost
        await asyncio.sleep(0.5)


def _mark(fleet: SimFleet) -> dict[str, tuple[int, int]]:
    """Per boot: the seq of its next sample, and how many it has sent so far."""
    return {b.key: (b.fw.seq, b.telemetry_sent) for b in fleet.boots.values()}


def _lost_since(influx: LocalInflux, db: str, fleet: SimFleet,
                mark: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(samples sent since the mark, of them not in InfluxDB), counted per boot by seq."""
    sent = lost = 0
    for b in fleet.boots.values():
        seq0, sent0 = mark[b.key]
        n = b.telemetry_sent - sent0
        series = influx.query(db, f"SELECT count(seq) FROM telemetry WHERE device = "
                                  f"'{b.device}' AND seq >= {seq0}")
        stored = int(series[0]["values"][0][1]) if series else 0
        sent, lost = sent + n, lost + max(0, n - stored)
    return sent, lost


@pytest.mark.timeout(300)
async def test_rolling_restart_with_sigterm_interrupts_no_session(
        mosquitto: LocalMosquitto, own_influx: LocalInflux, etcd: LocalEtcdCluster,
        tmp_path: Path) -> None:
    """An upgrade: each gateway in turn stopped (SIGTERM) and started again, while every boot
    is in session. Its clinics are handed over at once and come back when the fleet
    rebalances; no session is interrupted, no boot vents itself."""
    members = [(c, f"{c}-b{j:02d}") for c in CLINICS for j in range(BOOTS_PER_CLINIC)]
    fleet = SimFleet(members, mqtt_of(mosquitto), telemetry_period_s=0.2, telemetry_qos=1,
                     seed=5)
    async with deployment(tmp_path, mosquitto, own_influx, etcd, "rolling") as dep:
        await _all_in_session(dep, fleet, duration_s=60)
        mark = _mark(fleet)  # every clinic watched: from here on, nothing may be lost
        handovers = []
        for g in dep.gateways.values():
            t0 = time.monotonic()
            await asyncio.to_thread(g.stop, signal.SIGTERM)
            assert g.proc is not None and g.proc.returncode == 0
            await wait_for(lambda: dep.settled(2), 10, "the others to take its clinics")
            handovers.append(time.monotonic() - t0)
            g.start()
            await wait_for(lambda: dep.settled(3), 30, "the restarted one to take its share")
        assert all(b.session_id for b in fleet.boots.values()), "a session was interrupted"
        await wait_for(lambda: all(_completed(b) for b in fleet.boots.values()), 90,
                       "every session to complete")
        self_vents = {b.key: b.self_vents_at for b in fleet.boots.values() if b.self_vents}
        vents = {b.key: b.vents_received for b in fleet.boots.values() if b.vents_received}
        starts = check_one_commander(dep)
        sent, lost = await _loss(own_influx, "rolling", fleet, mark)
    await fleet.stop()
    print(f"rolling restart: SIGTERM to the others watching {[f'{h:.2f}' for h in handovers]} s;"
          f" telemetry lost in the handovers: {lost} of {sent}")
    assert self_vents == {} and vents == {}
    assert starts == len(members)
    # Each clinic's MQTT session moves with it: what the boots sent between two owners was
    # queued by the broker for the next one (341 of 20,854 lost with one session per
    # gateway). Not yet none: 0-3 of ~18,000 in runs so far (docs/deploy.md §4.4).
    assert lost * 1000 <= sent, (lost, sent)


@pytest.mark.timeout(240)
async def test_etcd_member_lost_changes_nothing_quorum_lost_fails_safe_and_recovers(
        mosquitto: LocalMosquitto, own_influx: LocalInflux, etcd: LocalEtcdCluster,
        tmp_path: Path) -> None:
    """One etcd member killed (the leader): no session notices. A second one killed (quorum
    lost): the owners stop their clinic heartbeats when their leases run out, so every boot
    in session vents itself (fail safe), as the protocol asks of a boot nobody watches. Quorum
    back: every clinic is watched again and sessions start."""
    members = [(c, f"{c}-q{j}") for c in CLINICS for j in range(2)]
    fleet = SimFleet(members, mqtt_of(mosquitto), telemetry_period_s=0.2, telemetry_qos=1,
                     seed=8)
    async with deployment(tmp_path, mosquitto, own_influx, etcd, "quorum") as dep:
        await _all_in_session(dep, fleet, duration_s=120)
        leader = etcd.leader()
        leader.kill()
        await asyncio.sleep(8)  # observing: longer than a boot's heartbeat timeout (6 s)
        assert all(b.session_id for b in fleet.boots.values())
        assert not any(b.self_vents for b in fleet.boots.values())
        assert dep.settled(3)

        survivor = next(m for m in etcd.members if m is not leader)
        for m in etcd.members:
            if m is not survivor and m is not leader:
                m.kill()
        lost_at = time.time()
        await wait_for(lambda: all(b.self_vents for b in fleet.boots.values()), 20,
                       "every boot to vent itself")
        first = min(t for b in fleet.boots.values() for t, _ in b.self_vents_at) - lost_at
        details = {d for b in fleet.boots.values() for _, d in b.self_vents_at}
        assert all(o == [] for o in dep.owners().values())  # nobody watches anything

        for m in etcd.members:
            if m is not survivor:
                m.start()
        etcd.wait_healthy()
        await wait_for(lambda: dep.settled(3), 30, "every clinic watched again")
        await _start_all(dep, fleet, duration_s=3)
        await wait_for(lambda: all(_completed(b) for b in fleet.boots.values()), 30,
                       "the new sessions to complete")
    await fleet.stop()
    print(f"quorum lost: the first boot vented itself {first:.2f} s later")
    assert details == {SELF_VENT_HEARTBEAT}
    # Not before the boots' 6 s timeout counted from the last clinic heartbeat, which went
    # out at most one interval (2 s) before the fences closed (at least 1.75 s after the
    # last renewal etcd answered).
    assert first >= 5.0, first
