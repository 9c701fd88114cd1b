"""The fault switches of a simulated boot: each makes it misbehave in one specific way.

Every rule of the gateway's safety watchdog needs a boot that breaks it on demand: a stuck or
held valve, an overrun, a broken vent valve, a firmware hang that ignores vents, spikes and
dead sensors, a wrong chamber count, silence, a skewed or stepped wall clock, a pulled cable,
garbage on the telemetry topic. The switches live here in one place, and each acts where it
would on a real boot: valve and timer faults on the physics model, a skewed or stepped wall
clock, a hang that ignores vents and silence on the firmware (`BootFirmware` in
device_sim/firmware.py), spikes, dead sensors and a missing chamber on the readings as the link
(device_sim/boot.py) puts them on the wire, a pulled cable and garbage on the link itself;
`clear_faults()` undoes them all. `device_sim.faults` drives them from a scenario's fault plan
and records each one with `record_fault`. `SimBoot` inherits this mixin.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, get_args

import aiomqtt

from device_sim.firmware import BootFirmware
from device_sim.physics import BootModel
from gateway.contract import SENSOR_MIN_MMHG, Channel
from gateway.mqtt_internals import paho_of

log = logging.getLogger(__name__)

# Garbage a boot can put on its telemetry topic (`publish_malformed`). The gateway must drop
# each one as bad input (a device_fault point), never act on it.
MalformedKind = Literal["not_json", "wrong_type", "null_pressure", "too_large"]
MALFORMED_KINDS: tuple[MalformedKind, ...] = get_args(MalformedKind)
# Above the contract's 16384-byte payload limit, below the broker's max_packet_size (1 MiB).
TOO_LARGE_BYTES = 20_000


def malformed_telemetry(kind: MalformedKind, chambers: int, seq: int, ts: float) -> bytes:
    """Bytes that look like telemetry from a broken firmware but break the contract."""
    good = {"seq": seq, "ts": ts, "phase": "inflate", "pressures": [42.0] * chambers}
    if kind == "not_json":  # a buffer cut off mid-write, with junk behind it
        return json.dumps(good).encode()[:24] + b"\xff\xfe\x00"
    if kind == "wrong_type":
        return json.dumps({**good, "seq": "twelve", "pressures": "high"}).encode()
    if kind == "null_pressure":  # JSON null is not a number (NaN would be: rule 6's job)
        return json.dumps({**good, "pressures": [None] * chambers}).encode()
    if kind == "too_large":
        return json.dumps({**good, "debug": "x" * TOO_LARGE_BYTES}).encode()
    raise ValueError(f"unknown malformed kind {kind!r}; one of {MALFORMED_KINDS}")


class BootFaults:
    """The switches and the inject_*/set_* methods; the boot they act on is declared here."""

    key: str
    chambers: int
    fw: BootFirmware
    clock: Callable[[], float]
    telemetry_qos: int
    _client: aiomqtt.Client | None
    connections_dropped: int
    malformed_sent: int
    faults_injected: list[tuple[float, str]]
    faults_cleared: list[tuple[float, str]]

    if TYPE_CHECKING:  # provided by SimBoot and BootProbes; declared only for the type checker
        @property
        def model(self) -> BootModel: ...

        def _notify(self) -> None: ...

        def device_time(self, now: float | None = None) -> float: ...

        async def publish_raw(
            self, channel: Channel, payload: bytes, qos: int = 1, *, retain: bool = False
        ) -> None: ...

    def _init_faults(self) -> None:
        """Every switch off; called once by SimBoot.__init__ (clear_faults() resets them).

        The firmware's own switches (`fw.silent`, `fw.ignore_vents`, `fw.clock_skew_s`: the
        offset of the wall clock that every `ts` and the expiry check use, while the timers
        and session_elapsed_s run on the monotonic `clock`) start off in BootFirmware."""
        # Faults on the readings as they go out (applied by SimBoot._publish_telemetry).
        self._count_mismatch = False
        self._spikes: dict[int, float] = {}
        self._dropouts: dict[int, float] = {}  # chamber -> what its dead sensor reads
        # After drop_connection(): no reconnect before this clock time (reconnect_now ends it).
        self._offline_until = 0.0
        self._reconnect_wake = asyncio.Event()

    @property
    def silent(self) -> bool:
        return self.fw.silent

    @property
    def sensor_dropouts(self) -> dict[int, float]:
        """Chamber (0-based) -> the reading its dead sensor reports."""
        return dict(self._dropouts)

    @property
    def offline_until(self) -> float:
        """Clock time before which a dropped connection is not re-established."""
        return self._offline_until

    def inject_stuck_valve(self, chamber: int) -> None:
        """Fault: one chamber keeps inflating during any session until the boot is vented."""
        self.model.stuck_valve(chamber)
        log.info("stuck valve injected", extra={"boot": self.key, "chamber": chamber})

    def inject_hold_valve(self, chamber: int) -> None:
        """Fault: one chamber stays at its target all session (only "held too long" sees it)."""
        self.model.hold_valve(chamber)
        log.info("hold valve injected", extra={"boot": self.key, "chamber": chamber})

    def inject_overrun(self) -> None:
        """Fault: sessions never complete by themselves; they cycle on until stopped or vented."""
        self.model.overrun()
        log.info("overrun injected", extra={"boot": self.key})

    def inject_vent_broken(self) -> None:
        """Fault: a vent is acked DONE and VENTED is sent, but the pressure does not fall."""
        self.model.vent_valve_broken()
        log.info("broken vent valve injected", extra={"boot": self.key})

    def set_ignore_vents(self, on: bool) -> None:
        """Fault (firmware hang): vent commands are received and counted, never executed,
        acked or answered with an event."""
        self.fw.ignore_vents = on
        log.info("ignore vents fault", extra={"boot": self.key, "ignore_vents": on})

    def inject_spike(self, chamber: int, value: float) -> None:
        """Fault: the next published telemetry sample carries `value` (NaN, inf, -50, 500...)
        for `chamber`; its publish time goes to `spikes_published_at` for reaction timing."""
        if not 0 <= chamber < self.chambers:
            raise ValueError(f"chamber {chamber} out of range 0..{self.chambers - 1}")
        self._spikes[chamber] = float(value)
        log.info("spike injected", extra={"boot": self.key, "chamber": chamber,
                                          "value": repr(float(value))})

    def inject_chamber_count_mismatch(self, on: bool) -> None:
        """Fault: telemetry carries one pressure fewer than the announced chamber count."""
        if on and self.chambers < 2:
            raise ValueError("a one-chamber boot cannot send one pressure fewer")
        self._count_mismatch = on
        log.info("chamber count mismatch fault", extra={"boot": self.key, "on": on})

    def set_silent(self, on: bool) -> None:
        """Fault: telemetry stops (connection stays up, commands are still obeyed)."""
        self.fw.silent = on
        log.info("silent fault", extra={"boot": self.key, "silent": on})

    def set_clock_skew(self, skew_s: float) -> None:
        """Fault: the boot's wall clock is off by `skew_s` (ahead when positive). It shows in
        every `ts` and `started_at` the boot sends and in its start-expiry check, not in its
        timers. Set from one moment to the next, as an NTP step would."""
        if not math.isfinite(skew_s):
            raise ValueError(f"clock skew must be finite, got {skew_s}")
        self.fw.clock_skew_s = float(skew_s)
        log.info("clock skew set", extra={"boot": self.key, "skew_s": skew_s})

    def step_clock(self, step_s: float) -> None:
        """Fault: an NTP step of the boot's wall clock by `step_s` (negative: backward) from
        one sample to the next, on top of any skew; `step_clock(-step_s)` steps it back. Like
        a skew it shows in every `ts` the boot sends (telemetry, acks, events, state) and in
        its expiry check; its timers and `session_elapsed_s` run on the monotonic `clock` and
        do not move."""
        if not math.isfinite(step_s):
            raise ValueError(f"clock step must be finite, got {step_s}")
        self.fw.clock_skew_s += float(step_s)
        log.info("clock stepped", extra={"boot": self.key, "step_s": step_s,
                                         "offset_s": self.fw.clock_skew_s})

    def set_sensor_dropout(self, chamber: int, reading: float = SENSOR_MIN_MMHG) -> None:
        """Fault: this chamber's transducer is dead and reports `reading` on every sample
        (default the bottom of its range, what an open circuit reads) until cleared.
        The chamber's real pressure is untouched: a sensor fault is not a physics fault."""
        if not 0 <= chamber < self.chambers:
            raise ValueError(f"chamber {chamber} out of range 0..{self.chambers - 1}")
        self._dropouts[chamber] = float(reading)
        log.info("sensor dropout injected", extra={"boot": self.key, "chamber": chamber,
                                                   "reading": repr(float(reading))})

    def clear_sensor_dropout(self, chamber: int | None = None) -> None:
        """The sensor of `chamber` (None: every sensor) reads the real pressure again."""
        if chamber is None:
            self._dropouts.clear()
        else:
            self._dropouts.pop(chamber, None)

    def drop_connection(self, offline_s: float = 0.0) -> None:
        """Fault: the TCP connection dies without an MQTT DISCONNECT (cable pulled, Wi-Fi
        gone), so the broker publishes the LWT at once. The boot reacts as to any connection
        loss (self-vent in session, protocol §7.2) and reconnects no sooner than `offline_s`
        from now (nor sooner than its usual backoff); `reconnect_now()` ends that early."""
        client = self._client
        if client is None:
            raise aiomqtt.MqttError(f"{self.key} is not connected")
        if not (math.isfinite(offline_s) and offline_s >= 0):
            raise ValueError(f"offline_s must be finite and >= 0, got {offline_s}")
        # aiomqtt offers no abrupt close; paho's socket is the only handle on the TCP link.
        sock = paho_of(client).socket()
        if not isinstance(sock, socket.socket):
            raise RuntimeError(f"{self.key}: no TCP socket to drop ({type(sock).__name__})")
        self._offline_until = self.clock() + offline_s
        self._reconnect_wake.clear()
        self.connections_dropped += 1
        log.info("connection dropped", extra={"boot": self.key, "offline_s": offline_s})
        # shutdown, not close: paho still owns the descriptor and sees EOF on its next read.
        sock.shutdown(socket.SHUT_RDWR)

    def reconnect_now(self) -> None:
        """End the offline hold of `drop_connection` (no effect on a connected boot)."""
        self._offline_until = 0.0
        if self._client is None:  # waiting to reconnect: cut the wait short
            self._reconnect_wake.set()

    async def publish_malformed(self, kind: MalformedKind) -> bytes:
        """Fault: put contract-breaking bytes on the telemetry topic; returns what was sent.
        Normal telemetry goes on as before, so the gateway must not take the boot for silent."""
        payload = malformed_telemetry(kind, self.chambers, self.fw.seq, self.device_time())
        await self.publish_raw(Channel.TELEMETRY, payload, qos=self.telemetry_qos)
        self.malformed_sent += 1
        return payload

    def record_fault(self, kind: str, *, cleared: bool = False, at: float | None = None) -> None:
        """Note a fault going in (or out) at `at` (default now, true clock), for the report."""
        record = self.faults_cleared if cleared else self.faults_injected
        record.append((self.clock() if at is None else at, kind))
        self._notify()

    def clear_faults(self) -> None:
        """Undo every injected fault (model and firmware); a pending spike is dropped."""
        self.model.clear_faults()
        self.fw.silent = self.fw.ignore_vents = self._count_mismatch = False
        self._spikes.clear()
        self._dropouts.clear()
        self.fw.clock_skew_s = 0.0
        self.reconnect_now()
        log.info("faults cleared", extra={"boot": self.key})
