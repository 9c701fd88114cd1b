"""A stateful model test of the gateway service: contract-following boots, any interleaving.

hypothesis drives three boots that follow docs/protocol.md (pressures from the simulator's
physics) through starts answered early, late or never, stops, hazards, clock steps both ways,
reboots, LWT drops and reconnects, lossy, duplicated and reordered telemetry, and gateway
restarts with retained state and the broker's queued QoS 1 messages. A boot's messages travel
on one connection: its telemetry may be lost, duplicated or reordered among itself, but what
it sent before a state, event or ack arrives before that. Time is the model's:
the gateway's clocks are injected and its tick runs every 0.1 s of model time.

The broker and InfluxDB are stand-ins that record and pass messages on: this test is about
the service's logic. The same code runs against real Mosquitto and influxd in the
integration tests.

Invariants, after every step:
* watched: a boot whose newest messages say it runs session X is watched in X (or being
  vented) by the gateway;
* every hazard (stuck valve, valve held open, telemetry stopping in a session, a drop in a
  session) gets a vent within its rule's bound;
* no vent without a hazard: not for late acks, clock steps, reboots, lost, duplicated or
  reordered samples, or restarts;
* a boot out of its session by its own messages is not shown in one after the grace;
* every session has at most one terminal outcome, and at the end exactly one;
* the fleet view and the stored session records agree.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from device_sim.physics import BootModel
from gateway.contract import TOPIC_ROOT, ProgramTiming, SessionProgram
from gateway.fleet import SessionStatus
from gateway.lineprotocol import Point
from gateway.service import Gateway
from gateway.settings import GatewaySettings, InfluxSettings, ProgramLimits

WALL0 = 1_767_261_600.0
TICK = 0.1
PERIOD = 0.5
HEARTBEAT_TIMEOUT = 6.0  # the boots' self-vent on heartbeat loss (protocol §7.2)
TERMINAL = {"completed", "stopped", "user_stop", "vented", "rejected", "failed", "lost"}
PROGRAM = SessionProgram(
    name="model", targets_mmhg=[60.0, 55.0], duration_s=20.0,
    timing=ProgramTiming(inflate_s=1.0, hold_s=1.0, deflate_s=1.0, pause_s=1.0),
)
# Bounds (model seconds from the hazard) within which the gateway must have vented.
BOUND = {
    "stuck": 6.0,  # over target by 3 samples / above the ceiling
    "held": 16.0,  # rule 3: limit 2x1+1+1+5 = 9 s after it went above 20 mmHg, plus a cycle
    "silence": 4.0,  # rule 5: 3 s, plus ticks and delivery
    "dropped": 1.0,  # rule 7: on the will
}
AFTERMATH = 30.0  # re-sent vents (rule 8) of an episode still belong to it


class Wire:
    """The gateway's MQTT link: what it publishes goes to the model's broker."""

    def __init__(self, deliver: Callable[[str, bytes, float | None], None]) -> None:
        self._deliver = deliver
        self.connected = asyncio.Event()
        self.connected.set()
        self.reconnects = 0

    def publish_nowait(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                       expiry_s: float | None = None) -> None:
        self._deliver(topic, payload, expiry_s)

    def publish_urgent(self, topic: str, payload: bytes, qos: int) -> bool:
        self._deliver(topic, payload, None)
        return True

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False,
                      expiry_s: float | None = None) -> None:
        self._deliver(topic, payload, expiry_s)


class Records:
    """InfluxDB: the points the gateway wrote, kept across its restarts."""

    storage_fault: str | None = None  # the model's InfluxDB has no disk to fail

    def __init__(self) -> None:
        self.points: list[Point] = []
        self.lines: list[bytes] = []

    def submit(self, point: Point) -> None:
        self.points.append(point)

    def submit_line(self, line: bytes, *, priority: bool) -> None:
        """An encoded point (the telemetry path's): the model reads only the other points."""
        self.lines.append(line)

    def sessions(self) -> dict[str, list[str]]:
        rows: dict[str, list[str]] = {}
        for p in self.points:
            if p.measurement == "session":
                rows.setdefault(str(p.fields["session_id"]), []).append(p.tags["outcome"])
        return rows


@dataclass
class InFlight:
    at: float
    order: int
    to_gateway: bool
    topic: str
    payload: bytes
    qos: int
    key: str  # the boot
    epoch: int = 0  # the boot's restarts so far: (epoch, seq) orders its samples


@dataclass
class Episode:
    kind: str
    at: float
    vented: bool = False
    required: bool = True  # False: a vent is explained by it, but not owed

    @property
    def deadline(self) -> float:
        return self.at + BOUND[self.kind]


@dataclass
class ModelBoot:
    """A boot written from docs/protocol.md; pressures from the simulator's physics."""

    clinic: str
    device: str
    rng: random.Random
    loss: float = 0.0
    dup: float = 0.0
    jitter: float = 0.05
    clock_offset: float = 0.0
    online: bool = True
    seq: int = 0
    epoch: int = 0
    session: tuple[str, str, float] | None = None  # session_id, cmd_id, true start time
    silent: bool = False
    process_delay: float = 0.0  # how long the boot takes to act on a start
    ack_start: bool = True  # False: never acks a start (but runs it)
    handled: dict[str, dict[str, Any]] = field(default_factory=dict)
    pending: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    next_sample: float = 0.0
    episodes: list[Episode] = field(default_factory=list)
    physics: BootModel = field(init=False)

    def __post_init__(self) -> None:
        self.physics = BootModel(2, 120.0, rng=self.rng, noise_mmhg=0.3)

    @property
    def key(self) -> str:
        return f"{self.clinic}/{self.device}"

    def clock(self, t: float) -> float:
        """The boot's wall clock at model time t: synchronised, until NTP steps it."""
        return WALL0 + t + self.clock_offset

    def topic(self, channel: str) -> str:
        return f"{TOPIC_ROOT}/{self.clinic}/{self.device}/{channel}"

    def state(self, online: bool, t: float) -> dict[str, Any]:
        body: dict[str, Any] = {
            "online": online, "firmware": "model-1", "chambers": 2, "zones": ["calf", "thigh"],
            "max_pressure_mmhg": 120.0, "telemetry_period_s": PERIOD, "ts": self.clock(t),
        }
        if online and self.session is not None:
            sid, cmd_id, started = self.session
            body["session"] = {"session_id": sid, "cmd_id": cmd_id,
                               "program": PROGRAM.model_dump(mode="json"),
                               "started_at": self.clock(started)}
        return body


class GatewayModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.t = 0.0
        self.order = 0
        self.records = Records()
        self.in_flight: list[InFlight] = []
        self.queued: list[InFlight] = []  # QoS 1 for the gateway while it is down
        self.retained: dict[str, bytes] = {}
        self.scratch = tempfile.TemporaryDirectory(prefix="model-gw-")
        self.journal = Path(self.scratch.name) / "sessions.jsonl"
        self.gw: Gateway | None = None
        self.down_since: float | None = None
        self.boots: dict[str, ModelBoot] = {}
        self.vents: list[tuple[float, str]] = []  # (time, boot key) of every vent sent
        self.starts_sent: set[str] = set()
        # what the gateway last heard from each boot
        self.shown: dict[str, str | None] = {}
        self.last_seq: dict[str, tuple[int, int]] = {}
        self.out_since: dict[str, float] = {}
        self.ended: dict[str, set[str | None]] = {}  # sessions whose terminal event arrived

    # ------------------------------------------------------------------ the world

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def make_gateway(self) -> Gateway:
        s = GatewaySettings(
            programs=ProgramLimits(min_duration_s=10, min_cycle_s=2, min_release_s=1,
                                   start_expiry_s=10),
            influx=InfluxSettings(spool_dir=None), command_ack_timeout_s=5,
            session_journal=self.journal,
        )

        async def build() -> Gateway:
            gw = Gateway(s, clock=lambda: WALL0 + self.t, monotonic=lambda: self.t)
            gw.link = Wire(self.from_gateway)  # type: ignore[assignment]
            gw.writer = self.records  # type: ignore[assignment]
            gw.recover()
            return gw
        return self.run(build())

    def send(self, boot: ModelBoot, channel: str, body: dict[str, Any], qos: int,
             delay: float | None = None) -> None:
        if not boot.online:
            return
        self.order += 1
        payload = json.dumps(body).encode()
        at = self.t + (0.02 if delay is None else delay)
        if channel == "state":
            self.retained[boot.key] = payload
        if qos == 1:
            # One connection: what the boot sent before reaches the gateway before this. Only
            # telemetry among itself may be reordered (and lost, and duplicated).
            at = max([at] + [m.at for m in self.in_flight if m.key == boot.key and m.to_gateway])
        self.in_flight.append(InFlight(at, self.order,
                                       True, boot.topic(channel), payload, qos, boot.key,
                                       boot.epoch))

    def from_gateway(self, topic: str, payload: bytes, expiry_s: float | None) -> None:
        parts = topic.split("/")
        if parts[2] == "_gateway" or parts[-1] != "cmd":
            return
        key = f"{parts[2]}/{parts[3]}"
        cmd = json.loads(payload)
        if cmd["kind"] == "vent":
            self.vents.append((self.t, key))
        if cmd["kind"] == "start":
            self.starts_sent.add(cmd["session_id"])
        self.order += 1
        self.in_flight.append(InFlight(self.t + 0.02, self.order, False, topic, payload, 1, key))

    def deliver_due(self) -> None:
        due = sorted((m for m in self.in_flight if m.at <= self.t), key=lambda m: (m.at, m.order))
        self.in_flight = [m for m in self.in_flight if m.at > self.t]
        for m in due:
            if m.to_gateway:
                self.to_gateway(m)
            else:
                boot = self.boots[m.key]
                if boot.online:  # clean start: a command to an offline boot is lost
                    self.on_command(boot, json.loads(m.payload))

    def to_gateway(self, m: InFlight) -> None:
        if self.gw is None:
            if m.qos == 1:
                self.queued.append(m)  # the broker keeps it for the gateway's session
            return
        self.note_heard(m)
        self.gw.handle_message(m.topic, m.payload)

    def note_heard(self, m: InFlight) -> None:
        """What the gateway now knows the boot says about its session (protocol §4)."""
        channel = m.topic.rsplit("/", 1)[1]
        body = json.loads(m.payload)
        key = m.key
        if channel == "state" and body["online"]:
            session = body.get("session")
            self.set_shown(key, session["session_id"] if session else None)
        elif channel == "state":
            self.set_shown(key, None)
        elif channel == "telemetry":
            last = self.last_seq.get(key)
            if last is None or (m.epoch, body["seq"]) > last:  # the newest the boot sent
                self.last_seq[key] = (m.epoch, body["seq"])
                running = body.get("session_id") is not None and body["phase"] not in (
                    "idle", "vent")
                if running and body["session_id"] in self.ended.get(key, ()):
                    return  # sent before the boot's own word that the session is over
                self.set_shown(key, body["session_id"] if running else None)
        elif channel == "event" and body["kind"] in (
                "session_completed", "session_stopped", "user_stop", "vented"):
            self.ended.setdefault(key, set()).add(body.get("session_id"))
            if self.shown.get(key) == body.get("session_id"):
                self.set_shown(key, None)

    def set_shown(self, key: str, session_id: str | None) -> None:
        if session_id is None and self.shown.get(key) is not None:
            self.out_since[key] = self.t
        if session_id is not None:
            self.out_since.pop(key, None)
        self.shown[key] = session_id

    def on_command(self, boot: ModelBoot, cmd: dict[str, Any]) -> None:
        cmd_id = cmd["cmd_id"]
        if cmd_id in boot.handled:  # a duplicate: re-send the last ack (protocol §6.1)
            self.send(boot, "ack", boot.handled[cmd_id], 1)
            return
        if cmd["kind"] == "start":
            boot.pending.append((self.t + boot.process_delay, cmd))
            return
        if cmd["kind"] == "vent":
            boot.physics.vent(self.t)
            boot.silent = False
            self.end_boot_session(boot, "vented", cmd.get("reason") or "vent command")
        elif cmd["kind"] == "stop":
            boot.physics.stop(self.t)
            self.end_boot_session(boot, "session_stopped", "stop command")
        self.ack(boot, cmd_id, "done")

    def ack(self, boot: ModelBoot, cmd_id: str, status: str, reason: str | None = None) -> None:
        body: dict[str, Any] = {"cmd_id": cmd_id, "status": status,
                                "ts": boot.clock(self.t)}
        if reason:
            body["reason"] = reason
        boot.handled[cmd_id] = body
        self.send(boot, "ack", body, 1)

    def process_start(self, boot: ModelBoot, cmd: dict[str, Any]) -> None:
        now_boot = boot.clock(self.t)
        if cmd["expires_at"] < now_boot:
            self.ack(boot, cmd["cmd_id"], "rejected", "expired")
        elif boot.session is not None:
            self.ack(boot, cmd["cmd_id"], "rejected", "busy")
        else:
            boot.session = (cmd["session_id"], cmd["cmd_id"], self.t)
            boot.physics.start(SessionProgram.model_validate(cmd["program"]), self.t)
            if boot.ack_start:
                self.ack(boot, cmd["cmd_id"], "accepted")
            self.send(boot, "event", {"kind": "session_started", "ts": now_boot,
                                      "session_id": cmd["session_id"]}, 1)
            self.send(boot, "state", boot.state(True, self.t), 1)

    @staticmethod
    def hazards_over(boot: ModelBoot) -> None:
        """The boot's session ended another way (stop, completion, reboot, its own vent): a
        hazard not yet vented is gone with it, so no vent is owed for it any more."""
        for ep in boot.episodes:
            if not ep.vented:
                ep.required = False

    def end_boot_session(self, boot: ModelBoot, kind: str, detail: str) -> None:
        if boot.session is None:
            return
        sid, cmd_id, _ = boot.session
        boot.session = None
        boot.silent = False
        if kind != "vented" or detail == "gateway heartbeat lost":
            self.hazards_over(boot)
        self.send(boot, "event", {"kind": kind, "ts": boot.clock(self.t),
                                  "session_id": sid, "detail": detail}, 1)
        self.send(boot, "state", boot.state(True, self.t), 1)
        if kind == "session_completed":
            boot.handled[cmd_id] = {"cmd_id": cmd_id, "status": "done",
                                    "ts": boot.clock(self.t)}
            self.send(boot, "ack", boot.handled[cmd_id], 1)

    def boot_step(self, boot: ModelBoot) -> None:
        for at, cmd in [p for p in boot.pending if p[0] <= self.t]:
            boot.pending.remove((at, cmd))
            self.process_start(boot, cmd)
        if boot.session is not None and self.down_since is not None and (
                self.t - self.down_since > HEARTBEAT_TIMEOUT):
            boot.physics.vent(self.t)  # protocol §7.2: self-vent on heartbeat loss
            self.end_boot_session(boot, "vented", "gateway heartbeat lost")
        phase, pressures = boot.physics.step(self.t)
        if boot.physics.poll_completed():
            self.end_boot_session(boot, "session_completed", "")
        if self.t + 1e-9 < boot.next_sample:
            return
        boot.next_sample += PERIOD
        if boot.silent or not boot.online:
            return
        body: dict[str, Any] = {"seq": boot.seq, "ts": boot.clock(self.t),
                                "phase": phase.value, "pressures": pressures}
        boot.seq += 1
        if boot.session is not None:
            body["session_id"] = boot.session[0]
            body["session_elapsed_s"] = round(self.t - boot.session[2], 3)
        if boot.rng.random() < boot.loss:
            return
        delay = 0.02 + boot.rng.random() * boot.jitter
        self.send(boot, "telemetry", body, 0, delay)
        if boot.rng.random() < boot.dup:
            self.send(boot, "telemetry", body, 0, delay + boot.rng.random() * 0.3)

    def advance(self, seconds: float) -> None:
        """Run model time on, inside the event loop as the gateway's callbacks are."""
        async def run() -> None:
            self._advance(seconds)
        self.run(run())

    def _advance(self, seconds: float) -> None:
        end = self.t + seconds
        while self.t < end - 1e-9:
            self.t = round(self.t + TICK, 6)
            for boot in self.boots.values():
                self.boot_step(boot)
            self.deliver_due()
            if self.gw is not None:
                self.gw.tick(self.t)
            self.check_bounds()

    # ------------------------------------------------------------------ rules

    @initialize(seed=st.integers(0, 2**32 - 1),
                net=st.lists(st.tuples(st.sampled_from([0.0, 0.1]), st.sampled_from([0.0, 0.1]),
                                       st.sampled_from([0.05, 0.3])), min_size=3, max_size=3))
    def setup(self, seed: int, net: list[tuple[float, float, float]]) -> None:
        rng = random.Random(seed)
        for i, (loss, dup, jitter) in enumerate(net):
            boot = ModelBoot("clinic-m", f"boot-{i}", random.Random(rng.random()), loss=loss,
                             dup=dup, jitter=jitter)
            boot.next_sample = rng.random() * PERIOD
            self.boots[boot.key] = boot
        self.gw = self.make_gateway()
        for boot in self.boots.values():
            self.send(boot, "state", boot.state(True, self.t), 1)
        self.advance(1.0)

    boot_key = st.sampled_from([f"clinic-m/boot-{i}" for i in range(3)])

    @rule(seconds=st.floats(0.2, 6.0))
    def wait(self, seconds: float) -> None:
        self.advance(seconds)

    @precondition(lambda self: self.gw is not None)
    @rule(key=boot_key, delay=st.sampled_from([0.0, 0.3, 6.0, 9.0]), ack=st.booleans())
    def start(self, key: str, delay: float, ack: bool) -> None:
        """A front desk starts a session; the boot acts on it early or late, acks or not."""
        boot = self.boots[key]
        boot.process_delay, boot.ack_start = delay, ack
        assert self.gw is not None
        clinic, device = key.split("/")
        self.run(self.gw.start_session(clinic, device, PROGRAM, wait=False))
        self.advance(0.2)

    @precondition(lambda self: self.gw is not None)
    @rule(key=boot_key)
    def stop(self, key: str) -> None:
        assert self.gw is not None
        clinic, device = key.split("/")
        self.run(self.gw.stop_session(clinic, device, wait=False))
        self.advance(0.2)

    @rule(key=boot_key, kind=st.sampled_from(["stuck", "held", "silence"]))
    def hazard(self, key: str, kind: str) -> None:
        boot = self.boots[key]
        if boot.session is None or not boot.online or self.gw is None or (
                PROGRAM.duration_s - (self.t - boot.session[2]) < BOUND[kind] + 1):
            return  # a hazard needs a session that lasts long enough to show it
        if kind == "stuck":
            boot.physics.stuck_valve(0)
        elif kind == "held":
            boot.physics.hold_valve(0)
        else:
            boot.silent = True
        boot.episodes.append(Episode(kind, self.t))
        self.advance(0.1)

    @rule(key=boot_key, step=st.sampled_from([-60.0, -30.0, -5.0, 5.0, 30.0]),
          back_after=st.sampled_from([None, 3.0, 25.0]))
    def clock_step(self, key: str, step: float, back_after: float | None) -> None:
        """NTP steps the boot's clock, and perhaps steps it back later: never a hazard."""
        boot = self.boots[key]
        boot.clock_offset += step
        if back_after is not None:
            self.advance(back_after)
            boot.clock_offset -= step

    @rule(key=boot_key)
    def reboot(self, key: str) -> None:
        """The firmware restarts without dropping the broker connection: its session is gone,
        its seq starts at 0, it publishes its state again."""
        boot = self.boots[key]
        if not boot.online:
            return
        boot.physics = BootModel(2, 120.0, rng=boot.rng, noise_mmhg=0.3)
        boot.session, boot.silent, boot.seq, boot.pending = None, False, 0, []
        boot.epoch += 1
        self.hazards_over(boot)
        self.send(boot, "state", boot.state(True, self.t), 1)
        self.advance(0.1)

    @rule(key=boot_key, away=st.sampled_from([0.5, 3.0, 10.0]))
    def drop(self, key: str, away: float) -> None:
        """The connection drops: the broker publishes the will; the boot vents itself in a
        session (§7.2), reconnects later and reports the vent."""
        boot = self.boots[key]
        if not boot.online:
            return
        watched = self.gw is not None and (gw_boot := self.gw.fleet.boots.get(key)) is not None \
            and gw_boot.watch.in_session
        if boot.session is not None or boot.pending or watched:
            # owed when the boot runs a session by its own account (its messages may not have
            # reached the gateway yet: then it is owed once they have, which the bound covers)
            boot.episodes.append(Episode("dropped", self.t, required=watched and (
                boot.session is not None or bool(boot.pending))))
        self.send(boot, "state", boot.state(False, self.t), 1)  # the will
        boot.online = False
        ended = boot.session
        if ended is not None:
            boot.physics.vent(self.t)
            boot.session = None
            for ep in boot.episodes[:-1]:  # its own vent ends the other hazards
                if not ep.vented:
                    ep.required = False
        boot.pending = []
        self.advance(away)
        boot.online, boot.seq = True, 0
        boot.epoch += 1
        self.send(boot, "state", boot.state(True, self.t), 1)
        if ended is not None:
            self.send(boot, "event", {"kind": "vented", "ts": boot.clock(self.t),
                                      "session_id": ended[0],
                                      "detail": "mqtt connection lost"}, 1)
        self.advance(0.1)

    @precondition(lambda self: self.gw is not None)
    @rule(down=st.sampled_from([0.5, 3.0, 12.0]))
    def restart_gateway(self, down: float) -> None:
        """The gateway stops (SIGTERM) and starts again: retained state, then queued QoS 1."""
        assert self.gw is not None
        self.gw.journal.close()
        self.gw = None
        self.down_since = self.t
        self.advance(down)
        self.gw = self.make_gateway()
        self.down_since = None
        for boot in self.boots.values():  # the new gateway can only judge from its start
            for ep in boot.episodes:
                if not ep.vented:
                    ep.at = max(ep.at, self.t)
        self.shown.clear()
        self.last_seq.clear()
        self.out_since.clear()
        replay = [InFlight(self.t, 0, True, self.boots[key].topic("state"), payload, 1, key)
                  for key, payload in self.retained.items()]
        replay += self.queued
        self.queued = []

        async def reconnect() -> None:
            for m in replay:
                self.to_gateway(m)
        self.run(reconnect())
        self.gw.begin_reconcile()
        self.advance(0.1)

    # ------------------------------------------------------------------ invariants

    def check_bounds(self) -> None:
        if self.gw is None:
            return  # nobody can vent: the bounds run again from the restart
        for boot in self.boots.values():
            for ep in boot.episodes:
                if not ep.vented and any(k == boot.key and ep.at <= t for t, k in self.vents):
                    ep.vented = True
                assert ep.vented or not ep.required or self.t <= ep.deadline, (
                    f"{boot.key}: {ep.kind} at {ep.at:.1f} s not vented by {ep.deadline:.1f} s")

    @invariant()
    def no_vent_without_a_hazard(self) -> None:
        for t, key in self.vents:
            episodes = self.boots[key].episodes
            assert any(ep.at - 0.5 <= t <= ep.deadline + AFTERMATH for ep in episodes), (
                f"{key}: vent at {t:.1f} s with no hazard (hazards: "
                f"{[(e.kind, round(e.at, 1)) for e in episodes]})")

    @invariant()
    def a_boot_in_a_session_is_watched(self) -> None:
        if self.gw is None:
            return
        for key, session_id in self.shown.items():
            boot = self.gw.fleet.boots.get(key)
            if session_id is None or boot is None:
                continue
            assert boot.watch.venting or boot.watch.session_id == session_id, (
                f"{key} says it runs {session_id}; the gateway watches "
                f"{boot.watch.session_id}")

    @invariant()
    def a_boot_out_of_its_session_is_not_shown_in_it(self) -> None:
        if self.gw is None:
            return
        grace = self.gw.settings.session_end_grace_s + 2 * TICK
        for key, since in self.out_since.items():
            boot = self.gw.fleet.boots.get(key)
            if boot is None or boot.session is None or self.t - since <= grace:
                continue
            assert boot.session.status is SessionStatus.STARTING or (
                self.shown.get(key) == boot.session.session_id), (
                f"{key} left its session at {since:.1f} s; the gateway still shows "
                f"{boot.session.session_id} at {self.t:.1f} s")

    @invariant()
    def at_most_one_outcome_and_the_view_agrees(self) -> None:
        rows = self.records.sessions()
        for session_id, outcomes in rows.items():
            terminal = [o for o in outcomes if o in TERMINAL]
            assert len(terminal) <= 1, f"{session_id}: outcomes {outcomes}"
        if self.gw is None:
            return
        for boot in self.gw.fleet.boots.values():
            s = boot.session
            if s is not None and s.status is SessionStatus.RUNNING:
                assert not [o for o in rows.get(s.session_id, []) if o in TERMINAL], (
                    f"{boot.key} shows {s.session_id} running; stored {rows[s.session_id]}")

    def teardown(self) -> None:
        try:
            if self.gw is None:
                self.gw = self.make_gateway()
                self.gw.begin_reconcile()
                self.down_since = None
            self.advance(PROGRAM.duration_s + 45.0)  # every session runs out, is settled
            rows = self.records.sessions()
            for session_id in self.starts_sent | set(rows):
                terminal = [o for o in rows.get(session_id, []) if o in TERMINAL]
                assert len(terminal) == 1, (
                    f"{session_id}: outcomes {rows.get(session_id)} after every session ended")
        finally:
            if self.gw is not None:
                self.gw.journal.close()
            self.loop.close()
            self.scratch.cleanup()


GatewayModel.TestCase.settings = settings(
    max_examples=100, stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_gateway_model = GatewayModel.TestCase

