"""Side by side: the gateway, Node-RED 4 and the broker's own ceiling, on one telemetry stream.

Project issue 14. One command, one run, on loopback: a private Mosquitto and influxd, Node-RED
installed with npm into a temporary folder and loaded with the issue's flow (bench/node_red.py),
and the same pre-encoded telemetry stream (bench/mqtt_blast.py, its own process) driven into
each contender in turn:

    ceiling    mosquitto_sub counting what the broker delivers; stores nothing
    node-red   mqtt in -> function -> join (1,000 or 1 s) -> influxdb batch
    gateway    `python -m gateway`, its own process, as bench/common.py configures it
    storage    influxd /write alone, batches of 5,000 (no MQTT): the storage ceiling

For each contender and QoS the bench looks for the highest rate with zero loss: a ladder that
doubles from a start rate, then bisection, each trial `--seconds` long against a fresh
contender process and a fresh InfluxDB database. A trial has zero loss when every message
published is stored (`SELECT count(seq) FROM telemetry`; for the ceiling: received) within
`--drain-s` of the end of the stream. The result is the achieved publish rate of the best such
trial, not its target. See README.md, "Peers bench", for how to read the table.

    .venv/bin/python bench/peers.py                     # everything, both QoS (~15-20 min)
    .venv/bin/python bench/peers.py --only gateway --qos 0 --seconds 5

`run_trial()` runs one contender at one rate and returns the trial's numbers. Two phases build
on the gateway's result (issue 14's other targets, measured in the same run):

    reaction   probe boots in this process spike one chamber above the ceiling, one after the
               other, and time spike -> vent, with no stream ("quiet") and under a QoS 0
               stream at 80 % of the gateway's zero-loss maximum (target: p99 < 10 ms)
    soak       the gateway under such a stream for --soak-s (600 for the target), its VmRSS
               every 10 s (target: flat within +-10 % of the value at 60 s)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import node_red
from bench.common import cpu_seconds, rss_mb
from bench.mqtt_blast import (
    CLINIC,
    MqttConnection,
    MqttError,
    boot_state,
    publish_frame,
    telemetry_period,
    varint,
)
from device_sim.local_stack import (
    LocalInflux,
    LocalMosquitto,
    count,
    find_binary,
    free_port,
)
from gateway.contract import Ack, AckStatus, Channel, Phase, Telemetry, TopicAddress, topic

ROOT = Path(__file__).resolve().parent.parent
CONTENDERS = ("ceiling", "node-red", "gateway", "storage")
MQTT_CONTENDERS = ("ceiling", "node-red", "gateway")
# Where each ladder starts: below every plausible result, so the ladder's first trial passes
# and doubling finds the upper bound in two or three steps (msg/s).
START_RATES = {"ceiling": 40_000.0, "node-red": 8_000.0, "gateway": 4_000.0}
GATEWAY_CLIENT_ID = "boot-gateway"  # the gateway's default `mqtt.client_id`
PROBE_CLINIC = "probe"  # readiness probes: counted apart from the stream (clinic tag)
NOISY_CORES = 0.25  # a failed trial with more of the machine busy elsewhere is repeated once
PACED = 0.97  # a trial whose publisher reached less of its target rate was slowed down
QUIET_S = 2.0  # the stored count has stopped growing when it has not moved for this long
MAX_WAIT_S = 60.0  # after the stream: give up on a contender that still trickles
# The broker must never be what drops: no queue or in-flight limits, no persistence work.
BROKER_CONF = (
    "max_queued_messages 0\n"
    "max_queued_bytes 0\n"
    "max_inflight_messages 0\n"
    "max_inflight_bytes 0\n"
    "persistence false\n"
)
# The reaction phase (issue 14: vent reaction p99 < 10 ms at 80 % of the gateway's maximum).
REACTION_CLINIC = "reaction"  # probe boots q<i> (quiet run) and r<i> (under the stream)
LOAD_SHARE = 0.8  # the phases' default stream: this share of the gateway's QoS 0 maximum
PROBE_IDLE_SAMPLES = 3  # normal samples before a probe's spike: the boot is live and watched
PROBE_IDLE = [0.5, 0.6, 0.4, 0.3]
SPIKE_MMHG = 150.0  # above the 100 mmHg ceiling (rule 1), below rule 6's 250 (plausible)
VENT_WAIT_S = 2.0  # a spike without its vent this long after is "not vented"
REACTION_LEAD_S = 1.5  # the stream runs this long before the first spike (steady state)
# A fresh gateway's first second holds one-off work (900 retained states, the first writes):
# seen as a 38 ms reaction and a 55 ms loop lag in the quiet run without this pause.
REACTION_SETTLE_S = 2.0
REACTION_TARGET_MS = 10.0
PREBUILD_MAX = 2_000_000  # a longer stream is built in segments while it is sent
SEGMENT_S = 5.0
# The soak (issue 14: RSS flat within +-10 % over 10 minutes at 80 % load).
SOAK_SAMPLE_S = 10.0
SOAK_WARMUP_S = 60.0
SOAK_TARGET_PERCENT = 10.0


def telemetry_count(clinic: str) -> str:
    return f"SELECT count(seq) FROM telemetry WHERE clinic = '{clinic}'"


def machine_busy_s() -> float:
    """CPU seconds all cores spent running something since boot (/proc/stat: user, nice,
    system, irq, softirq; not idle, iowait or the hypervisor's steal)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _cpu(pid: int | None) -> float:
    try:
        return cpu_seconds(pid) if pid else 0.0
    except (FileNotFoundError, ProcessLookupError):
        return 0.0


def git_revision(path: Path) -> str:
    """The checkout's commit, `+dirty` when its gateway/ differs: a number needs its code."""
    try:
        rev = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--",
                                "gateway"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "unknown") + ("+dirty" if dirty.strip() else "")


def _own_cpu() -> float:
    """This process's CPU seconds (its polling of InfluxDB and the API)."""
    t = os.times()
    return t.user + t.system


# ---------------------------------------------------------------- the shared run


# --safety-priority: where the gateway shares a machine with influxd,
# the safety path (the contender and the broker) is scheduled before the database's writes
# and compactions. Every contender gets the same, so the throughput rows stay comparable.
SAFETY_NICE = -10
STORAGE_NICE = 10


def renice(pid: int, nice: int) -> None:
    """Every thread of `pid` (setpriority on a pid moves its first thread only; the threads
    a thread starts later inherit its value). Lowering a nice value needs root."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)


@dataclass
class Bench:
    """What one run shares: the broker, influxd, the options; trials number themselves here."""

    work: Path
    broker: LocalMosquitto
    influx: LocalInflux
    boots: int
    seconds: float
    drain_s: float
    node_red_prefix: Path | None = None
    gateway_python: str = sys.executable
    gateway_pythonpath: Path = ROOT
    trial_no: int = 0
    seq_next: int = 0  # every boot's seq continues across trials: never a restart
    probe_seq: int = 0
    safety_priority: bool = False  # --safety-priority: contenders and broker first

    def prioritize(self, pid: int, nice: int = SAFETY_NICE) -> None:
        """With --safety-priority, `pid`'s threads at `nice` (the contender's and the broker's
        SAFETY_NICE, influxd's STORAGE_NICE); otherwise nothing."""
        if self.safety_priority:
            renice(pid, nice)

    @property
    def broker_pid(self) -> int:
        assert self.broker.proc is not None, "the broker is started by servers()"
        return self.broker.proc.pid

    @property
    def influx_pid(self) -> int:
        assert self.influx.proc is not None, "influxd is started by servers()"
        return self.influx.proc.pid

    def next_trial(self) -> tuple[int, Path]:
        self.trial_no += 1
        d = self.work / f"trial-{self.trial_no:03d}"
        d.mkdir(parents=True, exist_ok=True)
        return self.trial_no, d

    def announce(self, rate: float, extra: Iterable[tuple[str, str]] = ()) -> None:
        """Retained online states with the period the rate implies, before a contender
        starts: the gateway then knows every boot (telemetry of a boot without state is
        stored but not watched, and counted as rejected `unknown_boot_telemetry`). `extra`:
        more (clinic, device) boots, e.g. the reaction phase's probes (4 chambers, 120 mmHg,
        a 1 s period)."""
        period = telemetry_period(self.boots, rate)
        conn = MqttConnection("127.0.0.1", self.broker.port, "bench-announce")
        try:
            for i in range(self.boots):
                conn.publish(topic(CLINIC, f"b{i}", Channel.STATE), boot_state(period), qos=1,
                             retain=True)
            conn.publish(topic(PROBE_CLINIC, "p0", Channel.STATE), boot_state(1.0), qos=1,
                         retain=True)
            for clinic, device in extra:
                conn.publish(topic(clinic, device, Channel.STATE), boot_state(1.0), qos=1,
                             retain=True)
        finally:
            conn.close()

    def probe_until(self, seen: Callable[[], int], what: str, timeout_s: float = 60) -> None:
        """Probe telemetry (its own clinic) every 0.3 s until the contender shows one: the
        whole path works and the subscription is in place before the timed stream starts."""
        conn = MqttConnection("127.0.0.1", self.broker.port, "bench-probe")
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                self.probe_seq += 1
                sample = Telemetry(seq=self.probe_seq, ts=time.time(), phase=Phase.IDLE,
                                   pressures=[0.5, 0.5, 0.5, 0.5])
                conn.publish(topic(PROBE_CLINIC, "p0", Channel.TELEMETRY), sample.to_payload())
                time.sleep(0.3)
                if seen() > 0:
                    return
        finally:
            conn.close()
        raise RuntimeError(f"{what}: no probe message arrived within {timeout_s:g} s")


class Running(Protocol):
    """A contender process, up and subscribed, counting what it stored of the stream."""

    pid: int

    def stored(self) -> int: ...

    def notes(self) -> dict[str, object]: ...

    def stop(self) -> None: ...


class CeilingRun:
    """mosquitto_sub printing one byte per message into a file: received = the file's size."""

    def __init__(self, bench: Bench, qos: int, d: Path) -> None:
        binary = find_binary("mosquitto_sub")
        if binary is None:
            raise RuntimeError("mosquitto_sub missing (apt-get install -y mosquitto-clients)")
        self.out = d / "received.bin"
        with self.out.open("wb") as out, (d / "mosquitto_sub.log").open("wb") as err:
            self.proc = subprocess.Popen(
                [binary, "-h", "127.0.0.1", "-p", str(bench.broker.port), "-V", "mqttv5",
                 "-q", str(qos), "-t", node_red.TELEMETRY_FILTER, "-F", "x", "-N"],
                stdout=out, stderr=err)
        self.pid = self.proc.pid
        bench.prioritize(self.pid)
        try:
            bench.probe_until(self._size, "mosquitto_sub")
        except BaseException:
            self.stop()
            raise
        time.sleep(0.5)  # a probe still on its way must not count as stream
        self.baseline = self._size()

    def _size(self) -> int:
        return self.out.stat().st_size

    def stored(self) -> int:
        return self._size() - self.baseline

    def notes(self) -> dict[str, object]:
        return {}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:  # seen: stuck in its disconnect under a backlog
            self.proc.kill()
            self.proc.wait(5)


class NodeRedRun:
    """Node-RED with the issue's flow, writing to this trial's database."""

    def __init__(self, bench: Bench, qos: int, d: Path, database: str) -> None:
        assert bench.node_red_prefix is not None
        self.influx, self.database = bench.influx, database
        self.nr = node_red.NodeRed(bench.node_red_prefix, d / "node-red", bench.broker.port,
                                   qos, bench.influx.port, database, free_port()).start()
        self.pid = self.nr.pid
        bench.prioritize(self.pid)
        try:
            bench.probe_until(
                lambda: count(self.influx, database, telemetry_count(PROBE_CLINIC)), "node-red")
        except BaseException:
            self.stop()
            raise

    def stored(self) -> int:
        return count(self.influx, self.database, telemetry_count(CLINIC))

    def notes(self) -> dict[str, object]:
        return {"log_problems": self.nr.problems()}

    def stop(self) -> None:
        self.nr.stop()


class GatewayRun:
    """`python -m gateway` (or another checkout's, --gateway-python/--gateway-pythonpath),
    configured by environment as bench/common.py's stack does, with its production MQTT
    session (persistent, `mqtt.session_expiry_s`)."""

    def __init__(self, bench: Bench, qos: int, d: Path, database: str) -> None:
        self.influx, self.database = bench.influx, database
        self.broker_port = bench.broker.port
        self.token = secrets.token_urlsafe(32)
        self.api_port = free_port()
        self.log_path = d / "gateway.log"
        env = {
            **os.environ,
            "PYTHONPATH": str(bench.gateway_pythonpath),
            "BOOTGW_MQTT__PORT": str(bench.broker.port),
            "BOOTGW_INFLUX__URL": bench.influx.url,
            "BOOTGW_INFLUX__DATABASE": database,
            "BOOTGW_INFLUX__SPOOL_DIR": str(d / "spool"),
            "BOOTGW_SESSION_JOURNAL": str(d / "sessions.jsonl"),
            "BOOTGW_API__PORT": str(self.api_port),
            "BOOTGW_API__TOKEN": self.token,
            "BOOTGW_LOG_LEVEL": "WARNING",
            "BOOTGW_CONFIG_FILE": str(d / "none.toml"),
        }
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen([bench.gateway_python, "-m", "gateway"], env=env,
                                         cwd=bench.gateway_pythonpath, stdout=log,
                                         stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        bench.prioritize(self.pid)
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{self.api_port}", timeout=10,
                                headers={"Authorization": f"Bearer {self.token}"})
        try:
            self._wait_up()
            bench.probe_until(
                lambda: count(self.influx, database, telemetry_count(PROBE_CLINIC)), "gateway")
        except BaseException:
            self.stop()
            raise

    def _wait_up(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited ({self.proc.returncode}); see {self.log_path}")
            try:
                if self.api.get("/health").json().get("mqtt_connected"):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not come up; see {self.log_path}")
            time.sleep(0.2)

    def stored(self) -> int:
        return count(self.influx, self.database, telemetry_count(CLINIC))

    def stats(self) -> dict[str, object]:
        """/api/v1/stats now ({} when the API does not answer: the caller reports what it has)."""
        try:
            st = self.api.get("/api/v1/stats").json()
        except (httpx.HTTPError, ValueError):
            return {}
        return st if isinstance(st, dict) else {}

    def notes(self) -> dict[str, object]:
        """What the gateway itself says: rejected or invalid input, drops, vents, its logs."""
        out: dict[str, object] = {}
        try:
            st = self.api.get("/api/v1/stats").json()
            out = {k: st.get(k) for k in (
                "messages", "rejected", "vents_sent", "safety_events", "points_written",
                "points_dropped", "points_refused", "points_spooled", "write_errors",
                "mqtt_reconnects", "loop_lag_max_ms", "gc_pause_max_ms")}
        except (httpx.HTTPError, ValueError) as exc:
            out["stats_error"] = str(exc)
        seen: dict[str, int] = {}
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
                key = f"{rec.get('level', '?')}: {rec.get('message', rec.get('msg', line))}"
            except ValueError:
                key = line
            seen[key[:200]] = seen.get(key[:200], 0) + 1
        out["log"] = [f"{n}x {k}" for k, n in seen.items()]
        return out

    def stop(self) -> None:
        self.api.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # The broker keeps the gateway's persistent session and would queue the next trial's
        # retained states (and hand over any backlog of this one) to the next gateway: a
        # clean-start connect with its client id ends that session.
        MqttConnection("127.0.0.1", self.broker_port, GATEWAY_CLIENT_ID).close()


def start_contender(bench: Bench, name: str, qos: int, d: Path, database: str) -> Running:
    if name == "ceiling":
        return CeilingRun(bench, qos, d)
    if name == "node-red":
        return NodeRedRun(bench, qos, d, database)
    if name == "gateway":
        return GatewayRun(bench, qos, d, database)
    raise ValueError(f"unknown contender {name!r}")


# ---------------------------------------------------------------- one trial


@dataclass
class Trial:
    """One contender at one rate: what was sent, what arrived in time, what it cost."""

    contender: str
    qos: int
    target_rate: float  # 0: unpaced, as fast as the chain takes it
    achieved_rate: float  # the publisher's: messages / seconds from first to last write
    sent: int
    stored: int  # within drain_s of the end of the stream
    stored_final: int  # when the count stopped growing (late ones included)
    zero_loss: bool
    paced: bool  # the publisher reached >= 97 % of the target: the chain did not slow it
    stream_s: float
    drain_s: float | None  # from the end of the stream to the last message stored
    cpu_s: float  # the contender process, stream start to drained
    cpu_us_per_msg: float
    cpu_percent: float  # of one core, over the stream
    peak_rss_mb: float  # VmHWM: a fresh process per trial, so this trial's peak
    broker_us_per_msg: float
    influxd_us_per_msg: float
    publisher_cpu_s: float
    others_cores: float  # cores busy with processes not in this bench, on average
    publisher: dict[str, object] = field(default_factory=dict)
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """A pass that lets the search go higher."""
        return self.zero_loss and self.paced

    @property
    def borderline(self) -> bool:
        """Failed by little (>= 90 % stored in time and of the target rate reached): worth
        running again when other load may have made the difference."""
        return (self.stored >= 0.9 * self.sent
                and (self.target_rate == 0 or self.achieved_rate >= 0.9 * self.target_rate))


def _blaster(bench: Bench, rate: float, qos: int, count_: int | None,
             seconds: float | None = None, segment_s: float = 0.0) -> subprocess.Popen[str]:
    """The stream in its own process; `segment_s` > 0: built in segments while it is sent (a
    long stream would not fit in memory pre-built)."""
    cmd = [sys.executable, "-m", "bench.mqtt_blast", "--port", str(bench.broker.port),
           "--boots", str(bench.boots), "--rate", str(rate),
           "--seconds", str(seconds if seconds is not None else bench.seconds),
           "--qos", str(qos), "--seq-base", str(bench.seq_next)]
    if count_:
        cmd += ["--count", str(count_)]
    if segment_s > 0:
        cmd += ["--segment-s", str(segment_s)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)


def _events(proc: subprocess.Popen[str]) -> Iterator[dict[str, object]]:
    assert proc.stdout is not None
    for line in proc.stdout:
        yield json.loads(line)
    if proc.wait() != 0:
        raise RuntimeError(f"the publisher failed (exit {proc.returncode})")


def run_trial(bench: Bench, name: str, rate: float, qos: int,
              count_: int | None = None) -> Trial:
    """Run `name` at `rate` msg/s (0: unpaced) for bench.seconds, or `count_` messages.

    A fresh contender process and a fresh database per trial: no backlog of the previous
    trial, and VmHWM is this trial's peak.
    """
    no, d = bench.next_trial()
    database = f"peers_{no:03d}"
    bench.influx.query("", f'CREATE DATABASE "{database}"')
    bench.announce(rate or 1e6)
    running = start_contender(bench, name, qos, d, database)
    pub = _blaster(bench, rate, qos, count_)
    try:
        cpu0 = broker0 = influx0 = busy0 = 0.0
        result: dict[str, object] = {}
        for ev in _events(pub):
            if ev["event"] == "start":
                time.sleep(max(0.0, float(ev["at"]) - time.time()))  # type: ignore[arg-type]
                cpu0, busy0, own0 = _cpu(running.pid), machine_busy_s(), _own_cpu()
                pub0 = _cpu(pub.pid)
                broker0, influx0 = _cpu(bench.broker_pid), _cpu(bench.influx_pid)
                t_start = time.monotonic()
            elif ev["event"] == "done":
                result = ev
                pub_cpu = _cpu(pub.pid) - pub0  # the stream's share, not the build's
        t_end = time.monotonic()
        sent = int(result["sent"])  # type: ignore[call-overload]
        bench.seq_next += sent // bench.boots + 1
        stored, in_time, all_at = _drain(running, sent, t_end, bench.drain_s)
        t_done = time.monotonic()
        cpu = _cpu(running.pid) - cpu0
        broker = _cpu(bench.broker_pid) - broker0
        influx = _cpu(bench.influx_pid) - influx0
        others = (machine_busy_s() - busy0 - cpu - broker - influx - pub_cpu
                  - (_own_cpu() - own0))
        peak = rss_mb(running.pid)
        notes = running.notes()
    finally:
        if pub.poll() is None:  # an error or an interrupt mid-stream
            pub.kill()
            pub.wait()
        running.stop()
        bench.influx.query("", f'DROP DATABASE "{database}"')
    stream_s = t_end - t_start
    achieved = float(result["achieved_rate"])  # type: ignore[arg-type]
    per = 1e6 / max(1, stored)
    return Trial(
        contender=name, qos=qos, target_rate=rate, achieved_rate=achieved, sent=sent,
        stored=in_time, stored_final=stored, zero_loss=in_time == sent,
        paced=rate == 0 or achieved >= PACED * rate, stream_s=round(stream_s, 2),
        drain_s=None if all_at is None else round(all_at - t_end, 2),
        cpu_s=round(cpu, 2), cpu_us_per_msg=round(cpu * per, 2),
        cpu_percent=round(100 * cpu / max(1e-9, t_done - t_start), 1),
        peak_rss_mb=round(peak, 1), broker_us_per_msg=round(broker * per, 2),
        influxd_us_per_msg=round(influx * per, 2), publisher_cpu_s=round(pub_cpu, 2),
        others_cores=round(max(0.0, others) / max(1e-9, t_done - t_start), 2),
        publisher={k: v for k, v in result.items() if k != "event"}, notes=notes)


def _drain(running: Running, sent: int, t_end: float,
           drain_s: float) -> tuple[int, int, float | None]:
    """Poll the stored count until all arrived or it stops growing (bounded).

    Returns (final count, count within drain_s of the end, when all had arrived or None).
    """
    last, moved_at, in_time = -1, time.monotonic(), 0
    while True:
        n = running.stored()
        now = time.monotonic()
        if n != last:
            last, moved_at = n, now
        if now - t_end <= drain_s:
            in_time = n
        if n >= sent:
            return n, in_time if now - t_end > drain_s else n, now
        if now - moved_at >= QUIET_S or now - t_end > MAX_WAIT_S:
            return n, in_time, None
        time.sleep(0.25)


# ---------------------------------------------------------------- the search


@dataclass
class Search:
    contender: str
    qos: int
    best: Trial | None  # the zero-loss trial with the highest achieved rate
    trials: list[Trial]


def search(bench: Bench, name: str, qos: int, start_rate: float, max_trials: int,
           resolution: float = 0.05, log: Callable[[str], None] = print,
           earlier: list[Trial] | None = None, retries: int = 2) -> Search:
    """Double from start_rate until a trial fails, then bisect between the best pass and the
    lowest failure; stops after max_trials or when they are within `resolution`.

    On a shared machine another process can take the cores a contender needs: a trial that
    failed by little (`Trial.borderline`) while more than NOISY_CORES were busy elsewhere is
    run again at the same rate (at most `retries` times per search; not counted against
    max_trials). `earlier` trials of the
    same contender and QoS (the ceiling's unpaced run) count for the best result but not
    against max_trials.
    """
    trials: list[Trial] = list(earlier or [])
    lo: float | None = None
    hi: float | None = None
    rate = start_rate
    repeated = 0
    while len(trials) - len(earlier or []) - repeated < max_trials:
        t = run_trial(bench, name, rate, qos)
        trials.append(t)
        if not t.ok and t.others_cores > NOISY_CORES and t.borderline and repeated < retries:
            repeated += 1
            t.notes["repeated"] = f"others busy {t.others_cores} cores: run again"
            log(f"  {name} qos {qos}: target {rate:,.0f} failed with {t.others_cores:.2f} "
                "cores busy elsewhere; again")
            continue
        log(f"  {name} qos {qos}: target {rate:,.0f} achieved {t.achieved_rate:,.0f} msg/s, "
            f"stored {t.stored:,}/{t.sent:,}"
            + (f" (finally {t.stored_final:,})" if t.stored_final != t.stored else "")
            + f", drain {t.drain_s if t.drain_s is not None else '-'} s, "
            f"cpu {t.cpu_percent:.0f} %, others {t.others_cores:.2f} cores"
            f" -> {'ok' if t.ok else 'FAIL'}")
        if t.ok:
            lo = rate if lo is None else max(lo, rate)
        else:
            hi = rate if hi is None else min(hi, rate)
        if hi is None:
            rate *= 2
        elif lo is None:
            rate /= 2
        elif hi / lo <= 1 + resolution:
            break
        else:
            rate = (lo + hi) / 2
        rate = float(f"{rate:.3g}")
    passed = [t for t in trials if t.zero_loss]
    best = max(passed, key=lambda t: t.achieved_rate) if passed else None
    return Search(name, qos, best, trials)


# ---------------------------------------------------------------- the storage ceiling


def storage_ceiling(bench: Bench, points: int, batch: int = 5000) -> dict[str, object]:
    """influxd /write alone: the gateway's telemetry lines, batches of `batch`, one at a time
    over one keep-alive connection (as the gateway's writer does), as fast as influxd takes."""
    from gateway import points as gw_points  # the gateway's own encoding, for the check

    no, _ = bench.next_trial()
    database = f"peers_{no:03d}"
    bench.influx.query("", f'CREATE DATABASE "{database}"')
    t0 = time.time()
    lines = []
    for j in range(points):
        boot, k = j % bench.boots, j // bench.boots
        ts = round(t0 + j * 1e-5, 6)
        line = (f"telemetry,clinic={CLINIC},device=b{boot},phase=idle p1=0.4,p2=0.6,p3=0.5,"
                f"p4=0.3,max_p=0.6,seq={k}i {round(ts * 1000) * 1000 + k % 1000}")
        if j % 9973 == 0:
            sample = Telemetry(seq=k, ts=ts, phase=Phase.IDLE, pressures=[0.4, 0.6, 0.5, 0.3])
            expected = gw_points.telemetry(TopicAddress(CLINIC, f"b{boot}", Channel.TELEMETRY),
                                           sample).encode()
            if line != expected:
                raise AssertionError(f"line drifted from the gateway's: {line!r} != {expected!r}")
        lines.append(line)
    bodies = ["\n".join(lines[i:i + batch]).encode() for i in range(0, points, batch)]
    del lines
    conn = http.client.HTTPConnection("127.0.0.1", bench.influx.port, timeout=60)
    path = f"/write?db={database}&precision=u"
    pid = bench.influx_pid
    cpu0, busy0, own0, t_start = _cpu(pid), machine_busy_s(), _own_cpu(), time.monotonic()
    errors = 0
    for body in bodies:
        conn.request("POST", path, body=body)
        resp = conn.getresponse()
        resp.read()
        errors += resp.status != 204
    elapsed = time.monotonic() - t_start
    cpu = _cpu(pid) - cpu0
    busy = machine_busy_s() - busy0 - (_own_cpu() - own0)
    conn.close()
    stored = count(bench.influx, database, telemetry_count(CLINIC))
    bench.influx.query("", f'DROP DATABASE "{database}"')
    return {"points": points, "batch": batch, "stored": stored, "write_errors": errors,
            "seconds": round(elapsed, 2), "points_per_s": round(stored / elapsed, 1),
            "influxd_us_per_point": round(cpu * 1e6 / max(1, stored), 2),
            "influxd_cpu_percent": round(100 * cpu / elapsed, 1),
            "writer_cpu_s": round(_own_cpu() - own0, 2),
            "others_cores": round(max(0.0, busy - cpu) / elapsed, 2)}


# ---------------------------------------------------------------- the publisher's own max


def publisher_max(bench: Bench, qos: int, messages: int) -> tuple[dict[str, object], Trial]:
    """The publisher unpaced, twice: into the broker with mosquitto_sub reading (the chain's
    ceiling) and into the broker with nobody subscribed (what the broker takes in)."""
    with_sub = run_trial(bench, "ceiling", 0, qos, count_=messages)
    pub = _blaster(bench, 0, qos, messages)
    broker0 = _cpu(bench.broker_pid)
    alone: dict[str, object] = {}
    for ev in _events(pub):
        if ev["event"] == "done":
            alone = {k: v for k, v in ev.items() if k != "event"}
    broker = _cpu(bench.broker_pid) - broker0
    return {"qos": qos, "messages": messages,
            "to_mosquitto_sub": {"achieved_rate": with_sub.achieved_rate,
                                 "received": with_sub.stored_final, "sent": with_sub.sent,
                                 "publisher_cpu_s": with_sub.publisher_cpu_s,
                                 "broker_us_per_msg": with_sub.broker_us_per_msg},
            "no_subscriber": {"achieved_rate": alone.get("achieved_rate"),
                              "acked": alone.get("acked"),
                              "broker_cpu_s": round(broker, 2)}}, with_sub


# ---------------------------------------------------------------- reaction and soak


SUBSCRIBE = 0x82  # packet type 8 with the flags MQTT requires (0b0010)
SUBACK = 0x90
PUBLISH = 0x30


class ProbeLink:
    """The probe boots' side, in this process: one raw MQTT v5 connection and a reader thread.

    Not paho: with loop_start, paho's own thread writes what another thread publishes (a
    socketpair wake-up and a GIL hand-off), and on a loaded 2-core machine that delay would
    be counted as the gateway's. Here a spike goes into the kernel from the caller's thread
    right after its timestamp, and the reader, blocked in recv(), stamps a vent the moment it
    is woken: what is left is what any boot on this machine would see.

    Each vent is answered as a boot would: ack `done` with its cmd_id and a sample in phase
    vent with every chamber near 0 (a fresh seq), so the gateway confirms the vent (rule 8
    stays quiet: no re-send, no unanswered command).
    """

    def __init__(self, port: int, clinic: str) -> None:
        self.clinic = clinic
        self.conn = MqttConnection("127.0.0.1", port, f"bench-reaction-{os.getpid()}")
        self.sock = self.conn.sock
        self.sock.settimeout(None)
        self._send_lock = threading.Lock()
        self._next_id = 1
        self.seq: dict[str, int] = {}
        self.vents: dict[str, list[float]] = {}  # device -> arrival of each vent (monotonic)
        self.other_cmds: list[str] = []  # anything but a vent: reported, never expected
        self.error: str | None = None
        self._suback = threading.Event()
        self._suback_code = 0
        self._reader = threading.Thread(target=self._read, daemon=True, name="probe-reader")
        self._reader.start()
        self._subscribe(f"boots/v1/{clinic}/+/cmd")

    def _packet_id(self) -> int:
        pid = self._next_id
        self._next_id = pid % 65535 + 1
        return pid

    def _subscribe(self, topic_filter: str) -> None:
        """Subscribe (QoS 1) and wait for the SUBACK: a vent before it would be missed."""
        raw = topic_filter.encode()
        with self._send_lock:
            body = (self._packet_id().to_bytes(2, "big") + b"\x00"
                    + len(raw).to_bytes(2, "big") + raw + b"\x01")
            self.sock.sendall(bytes([SUBSCRIBE]) + varint(len(body)) + body)
        if not self._suback.wait(10):
            raise MqttError(f"no SUBACK for {topic_filter} ({self.error or 'timeout'})")
        if self._suback_code >= 0x80:
            raise MqttError(f"subscription {topic_filter} refused: {self._suback_code:#x}")

    def _read(self) -> None:
        buf = bytearray()
        try:
            while True:
                data = self.sock.recv(1 << 16)
                now = time.monotonic()  # every packet in this read arrived by now
                if not data:
                    self.error = "connection closed by the broker"
                    return
                buf += data
                pos = 0
                while pos < len(buf):
                    length, body = 0, pos + 1
                    for shift in range(0, 28, 7):  # the remaining length (varint)
                        if body >= len(buf):
                            body = -1
                            break
                        byte = buf[body]
                        body += 1
                        length |= (byte & 0x7F) << shift
                        if not byte & 0x80:
                            break
                    if body < 0 or body + length > len(buf):
                        break
                    try:
                        self._handle(buf[pos], bytes(buf[body:body + length]), now)
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        # One odd packet must not end the reader: every later vent would
                        # then count as "not vented". Reported with the phase.
                        self.other_cmds.append(f"unhandled packet {buf[pos]:#x}: {exc!r}")
                    pos = body + length
                del buf[:pos]
        except OSError as exc:
            if self.error is None:
                self.error = str(exc)
        finally:
            self._suback.set()

    def _handle(self, first: int, body: bytes, now: float) -> None:
        kind = first & 0xF0
        if kind == SUBACK:
            props = body[2]  # a short property list: one length byte
            self._suback_code = body[3 + props] if len(body) > 3 + props else 0x80
            self._suback.set()
            return
        if kind != PUBLISH:
            return  # PUBACKs of our acks, PINGRESP
        qos = (first >> 1) & 3
        n = int.from_bytes(body[:2], "big")
        name = body[2:2 + n].decode()
        pos = 2 + n
        if qos:
            pid = body[pos:pos + 2]
            pos += 2
            with self._send_lock:
                self.sock.sendall(b"\x40\x02" + pid)  # PUBACK, success
        props, shift = 0, 0
        while True:  # the property length (varint), then skip the properties
            byte = body[pos]
            pos += 1
            props |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        payload = body[pos + props:]
        device = name.split("/")[3]
        try:
            cmd = json.loads(payload)
        except ValueError:
            self.other_cmds.append(f"{device}: unparsable {payload[:80]!r}")
            return
        if cmd.get("kind") != "vent":
            self.other_cmds.append(f"{device}: {cmd.get('kind')}")
            return
        self.vents.setdefault(device, []).append(now)
        ack = Ack(cmd_id=cmd["cmd_id"], status=AckStatus.DONE, ts=time.time()).to_payload()
        self._publish(topic(self.clinic, device, Channel.ACK), ack, qos=1)
        self.sample(device, [0.5] * len(PROBE_IDLE), Phase.VENT)

    def _publish(self, topic_name: str, payload: bytes, qos: int = 0) -> float:
        with self._send_lock:
            frame = publish_frame(topic_name, payload, qos, self._packet_id() if qos else 0)
            at = time.monotonic()  # just before the write; lock waits are not counted
            self.sock.sendall(frame)
        return at

    def sample(self, device: str, pressures: list[float], phase: Phase = Phase.IDLE) -> float:
        """One telemetry sample of `device` (next seq, ts now); returns its monotonic send time."""
        seq = self.seq.get(device, -1) + 1
        self.seq[device] = seq
        payload = Telemetry(seq=seq, ts=time.time(), phase=phase,
                            pressures=pressures).to_payload()
        return self._publish(topic(self.clinic, device, Channel.TELEMETRY), payload)

    def close(self) -> None:
        self.conn.close()  # the reader's recv() ends with the socket
        self._reader.join(2)


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q % of them at or below it (p99 of 200
    is the 198th, so the two worst probes are above it)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def distribution(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"p50": round(percentile(values, 50), 2), "p90": round(percentile(values, 90), 2),
            "p99": round(percentile(values, 99), 2), "max": round(max(values), 2),
            "min": round(min(values), 2)}


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


def probe_sequence(link: ProbeLink, devices: list[str],
                   interval_s: float) -> tuple[dict[str, object], tuple[float, float]]:
    """Per probe boot, one every `interval_s`: a few idle samples, half an interval later the
    spike (one chamber at SPIKE_MMHG, rule 1); then up to VENT_WAIT_S for the last vents.

    One spike per boot: a boot already in a vent episode is not vented again, so a second
    spike would measure nothing. Reactions are spike publish -> vent received, in ms; a
    vent later than VENT_WAIT_S counts as not vented. Also returns the monotonic times of the
    first and the last spike (to check the stream covered them).
    """
    spikes: dict[str, float] = {}
    spike = [SPIKE_MMHG, *PROBE_IDLE[1:]]
    begin = time.monotonic()
    for i, device in enumerate(devices):
        slot = begin + i * interval_s
        _sleep_until(slot)
        for _ in range(PROBE_IDLE_SAMPLES):
            link.sample(device, PROBE_IDLE)
        _sleep_until(slot + interval_s / 2)
        if device in link.vents:
            raise RuntimeError(f"probe {device} was vented before its spike: check the bench")
        spikes[device] = link.sample(device, spike)
    last = max(spikes.values())
    while time.monotonic() < last + VENT_WAIT_S and not all(d in link.vents for d in devices):
        time.sleep(0.02)
    per_probe: list[float | None] = []
    for device in devices:
        arrivals = link.vents.get(device, [])
        ms = (arrivals[0] - spikes[device]) * 1000 if arrivals else None
        per_probe.append(round(ms, 3) if ms is not None and ms <= VENT_WAIT_S * 1000 else None)
    reactions = [r for r in per_probe if r is not None]
    worst = sorted(((r, i) for i, r in enumerate(per_probe) if r is not None), reverse=True)[:5]
    return {
        "count": len(devices), "vented": len(reactions),
        "not_vented_in_2s": len(devices) - len(reactions),
        "reaction_ms": distribution(reactions),
        "repeated_vents": sum(max(0, len(link.vents.get(d, [])) - 1) for d in devices),
        # The five slowest: probe index and its spike's time from the sequence's start, to
        # line up with the stream, a GC pause or a storage flush.
        "slowest": [{"probe": i, "at_s": round(spikes[devices[i]] - begin, 3), "ms": r}
                    for r, i in worst],
        "per_probe_ms": per_probe, "seconds": round(time.monotonic() - begin, 2),
    }, (min(spikes.values()), last)


def _gateway_gauges(gw: GatewayRun) -> dict[str, object]:
    st = gw.stats()
    msgs = st.get("messages")
    return {"loop_lag_max_ms": st.get("loop_lag_max_ms"),
            "gc_pause_max_ms": st.get("gc_pause_max_ms"), "vents_sent": st.get("vents_sent"),
            "vents_confirmed": st.get("vents_confirmed"),
            "acks": msgs.get("ack") if isinstance(msgs, dict) else None,
            "rejected": st.get("rejected")}


@dataclass
class Stream:
    """A stream run next to a phase: the blaster's numbers and what the gateway stored."""

    target_rate: float
    achieved_rate: float
    sent: int
    stored: int  # within drain_s of its end
    stored_final: int
    started: float  # monotonic, first write
    ended: float  # monotonic, last write
    gateway_cpu_percent: float
    others_cores: float
    publisher: dict[str, object]

    @property
    def lost_nothing(self) -> bool:
        return self.stored == self.sent


def _start_stream(bench: Bench, rate: float, seconds: float) -> tuple[
        subprocess.Popen[str], Iterator[dict[str, object]], float]:
    """Start the QoS 0 stream; returns once its first write is due (monotonic time of it)."""
    segment = SEGMENT_S if rate * seconds > PREBUILD_MAX else 0.0
    pub = _blaster(bench, rate, 0, None, seconds=seconds, segment_s=segment)
    events = _events(pub)
    for ev in events:
        if ev["event"] == "start":
            wait = float(ev["at"]) - time.time()  # type: ignore[arg-type]
            _sleep_until(time.monotonic() + wait)
            return pub, events, time.monotonic()
    raise RuntimeError("the publisher ended before its stream started")


def _finish_stream(bench: Bench, gw: GatewayRun, rate: float, pub: subprocess.Popen[str],
                   events: Iterator[dict[str, object]], started: float,
                   counters: tuple[float, float, float, float, float, float]) -> Stream:
    """Wait for the publisher's `done`, then for the gateway to store it all (or stop)."""
    result: dict[str, object] = {}
    for ev in events:
        if ev["event"] == "done":
            result = ev
    t_end = time.monotonic()
    sent = int(result["sent"])  # type: ignore[call-overload]
    bench.seq_next += sent // bench.boots + 1
    stored, in_time, _ = _drain(gw, sent, t_end, bench.drain_s)
    gw0, busy0, own0, pub0, broker0, influx0 = counters
    elapsed = max(1e-9, time.monotonic() - started)
    gw_cpu = _cpu(gw.pid) - gw0
    others = (machine_busy_s() - busy0 - gw_cpu - (_cpu(bench.broker_pid) - broker0)
              - (_cpu(bench.influx_pid) - influx0) - (_cpu(pub.pid) - pub0)
              - (_own_cpu() - own0))
    return Stream(target_rate=rate, achieved_rate=float(result["achieved_rate"]),  # type: ignore[arg-type]
                  sent=sent, stored=in_time, stored_final=stored, started=started,
                  ended=started + float(result["seconds"]),  # type: ignore[arg-type]
                  gateway_cpu_percent=round(100 * gw_cpu / elapsed, 1),
                  others_cores=round(max(0.0, others) / elapsed, 2),
                  publisher={k: v for k, v in result.items() if k != "event"})


def _counters(bench: Bench, gw: GatewayRun,
              pub: subprocess.Popen[str]) -> tuple[float, float, float, float, float, float]:
    return (_cpu(gw.pid), machine_busy_s(), _own_cpu(), _cpu(pub.pid), _cpu(bench.broker_pid),
            _cpu(bench.influx_pid))


def _stream_summary(st: Stream) -> dict[str, object]:
    return {"target_rate": st.target_rate, "achieved_rate": st.achieved_rate, "sent": st.sent,
            "stored": st.stored, "stored_final": st.stored_final,
            "lost_nothing": st.lost_nothing, "seconds": round(st.ended - st.started, 2),
            "gateway_cpu_percent": st.gateway_cpu_percent, "others_cores": st.others_cores,
            "publisher_segments": st.publisher.get("segments"),
            "publisher_builder_wait_s": st.publisher.get("builder_wait_s"),
            "publisher_ts_lag_s": st.publisher.get("ts_lag_s")}


def reaction_phase(bench: Bench, rate: float, basis: str, probes: int, interval_s: float,
                   log: Callable[[str], None] = print) -> dict[str, object]:
    """Spike -> vent for `probes` probe boots, first with no stream, then under a QoS 0 stream
    at `rate`, in one gateway process (the quiet run's boots are q<i>, the loaded run's r<i>:
    every probe boot gets exactly one spike)."""
    no, d = bench.next_trial()
    database = f"peers_{no:03d}"
    bench.influx.query("", f'CREATE DATABASE "{database}"')
    quiet_devs = [f"q{i}" for i in range(probes)]
    load_devs = [f"r{i}" for i in range(probes)]
    bench.announce(rate, extra=[(REACTION_CLINIC, dv) for dv in quiet_devs + load_devs])
    gw = GatewayRun(bench, 0, d, database)
    link: ProbeLink | None = None
    pub: subprocess.Popen[str] | None = None
    try:
        link = ProbeLink(bench.broker.port, REACTION_CLINIC)
        time.sleep(REACTION_SETTLE_S)
        quiet, _ = probe_sequence(link, quiet_devs, interval_s)
        quiet["gateway"] = _gateway_gauges(gw)
        log(f"  reaction quiet: {_reaction_line(quiet)}")
        seconds = REACTION_LEAD_S + probes * interval_s + VENT_WAIT_S + 1.0
        pub, events, started = _start_stream(bench, rate, seconds)
        counters = _counters(bench, gw, pub)
        _sleep_until(started + REACTION_LEAD_S)
        loaded, (first_spike, last_spike) = probe_sequence(link, load_devs, interval_s)
        stream = _finish_stream(bench, gw, rate, pub, events, started, counters)
        loaded["stream_covered_all_probes"] = stream.ended >= last_spike
        loaded["first_spike_after_stream_start_s"] = round(first_spike - started, 2)
        loaded["stream"] = _stream_summary(stream)
        loaded["gateway"] = _gateway_gauges(gw)
        log(f"  reaction at {stream.achieved_rate:,.0f} msg/s: {_reaction_line(loaded)}")
        notes = gw.notes()
        extra = {"other_commands": link.other_cmds, "link_error": link.error}
    finally:
        if link is not None:
            link.close()
        if pub is not None and pub.poll() is None:
            pub.kill()
            pub.wait()
        gw.stop()
        bench.influx.query("", f'DROP DATABASE "{database}"')
    p99 = loaded["reaction_ms"].get("p99")  # type: ignore[attr-defined]
    return {"rate": rate, "rate_basis": basis, "probes": probes, "probe_interval_s": interval_s,
            "spike_mmhg": SPIKE_MMHG, "target_p99_ms": REACTION_TARGET_MS,
            "target_met": bool(p99 is not None and p99 < REACTION_TARGET_MS
                               and loaded["not_vented_in_2s"] == 0
                               and loaded["stream"]["lost_nothing"]),  # type: ignore[index]
            "quiet": quiet, "loaded": loaded, "gateway_notes": notes, **extra}


def soak_phase(bench: Bench, rate: float, basis: str, seconds: float,
               log: Callable[[str], None] = print) -> dict[str, object]:
    """The gateway under a QoS 0 stream at `rate` for `seconds`, VmRSS every SOAK_SAMPLE_S.

    The stream is built in segments while it is sent (a 10-minute one would not fit in
    memory). Growth is measured from the value after the warm-up (SOAK_WARMUP_S, or half the
    soak if shorter): the first minute holds the allocator's and the caches' one-off growth.
    """
    no, d = bench.next_trial()
    database = f"peers_{no:03d}"
    bench.influx.query("", f'CREATE DATABASE "{database}"')
    bench.announce(rate)
    gw = GatewayRun(bench, 0, d, database)
    pub: subprocess.Popen[str] | None = None
    series: list[tuple[float, float]] = []
    # With each RSS sample, the gateway's storage queue: RSS that follows the queue is a
    # backlog (the gateway fell behind for a while), not a leak.
    queues: list[object] = []
    try:
        pub = _blaster(bench, rate, 0, None, seconds=seconds, segment_s=SEGMENT_S)
        events = _events(pub)
        started = 0.0
        for ev in events:
            if ev["event"] == "start":
                _sleep_until(time.monotonic() + float(ev["at"]) - time.time())  # type: ignore[arg-type]
                started = time.monotonic()
                break
        counters = _counters(bench, gw, pub)
        next_at = started
        while pub.poll() is None:
            now = time.monotonic()
            if now >= next_at:
                series.append((round(now - started, 1), round(rss_mb(gw.pid, peak=False), 2)))
                queues.append(gw.stats().get("storage_queue"))
                if len(series) % 6 == 1:
                    log(f"  soak t={series[-1][0]:.0f} s: RSS {series[-1][1]:.1f} MB, storage "
                        f"queue {queues[-1]}")
                next_at += SOAK_SAMPLE_S
            time.sleep(min(0.5, max(0.0, next_at - time.monotonic())))
        series.append((round(time.monotonic() - started, 1), round(rss_mb(gw.pid, peak=False), 2)))
        queues.append(gw.stats().get("storage_queue"))
        stream = _finish_stream(bench, gw, rate, pub, events, started, counters)
        peak = rss_mb(gw.pid)
        gauges = _gateway_gauges(gw)
        notes = gw.notes()
    finally:
        if pub is not None and pub.poll() is None:
            pub.kill()
            pub.wait()
        gw.stop()
        bench.influx.query("", f'DROP DATABASE "{database}"')
    warm_t = min(SOAK_WARMUP_S, seconds / 2)
    after = [(t, r) for t, r in series if t >= warm_t - 1] or series[-1:]
    base_t, base = after[0]
    rss = [r for _, r in after]
    slope = None
    if len(after) >= 3:  # least squares over the samples after warm-up, MB per minute
        mt = sum(t for t, _ in after) / len(after)
        mr = sum(rss) / len(rss)
        var = sum((t - mt) ** 2 for t, _ in after)
        slope = round(60 * sum((t - mt) * (r - mr) for t, r in after) / var, 3) if var else None
    to_max = round(100 * (max(rss) - base) / base, 1) if rss else None
    to_end = round(100 * (series[-1][1] - base) / base, 1)
    to_min = round(100 * (min(rss) - base) / base, 1) if rss else None
    flat = all(v is not None and abs(v) <= SOAK_TARGET_PERCENT for v in (to_max, to_end, to_min))
    return {"rate": rate, "rate_basis": basis, "seconds": seconds,
            "sample_every_s": SOAK_SAMPLE_S, "warmup_s": base_t,
            "series": [{"t": t, "rss_mb": r, "storage_queue": q}
                       for (t, r), q in zip(series, queues, strict=True)],
            "rss_at_warmup_mb": base, "rss_min_after_warmup_mb": min(rss) if rss else None,
            "rss_max_after_warmup_mb": max(rss) if rss else None,
            "rss_end_mb": series[-1][1], "change_to_max_percent": to_max,
            "change_to_min_percent": to_min, "change_to_end_percent": to_end,
            "slope_mb_per_min_after_warmup": slope, "peak_rss_mb": round(peak, 1),
            "target_percent": SOAK_TARGET_PERCENT,
            "target_met": bool(flat and stream.lost_nothing and seconds >= 600),
            "flat_within_target": flat, "stream": _stream_summary(stream),
            "gateway": gauges, "gateway_notes": notes}


def _reaction_line(r: dict[str, object]) -> str:
    ms = r.get("reaction_ms") or {}
    gw = r.get("gateway") or {}
    text = (f"{r['vented']}/{r['count']} vented ({r['not_vented_in_2s']} not in 2 s), "
            + (", ".join(f"{k} {ms[k]:.2f}" for k in ("p50", "p90", "p99", "max"))  # type: ignore[index]
               + " ms" if ms else "no reactions"))
    if isinstance(gw, dict):
        text += f"; gateway loop lag max {gw.get('loop_lag_max_ms')} ms"
    st = r.get("stream")
    if isinstance(st, dict):
        text += (f"; stream {st['achieved_rate']:,.0f} msg/s, stored {st['stored']:,}/"
                 f"{st['sent']:,}" + (" (lost nothing)" if st["lost_nothing"] else " (LOSS)")
                 + _others(st))
    return text


def _others(stream: dict[str, object]) -> str:
    """Cores busy outside the bench during a phase's stream; `*` when the machine was shared
    (a test suite started next to a soak once made the gateway fall behind and grow 30 %)."""
    cores = float(stream["others_cores"])  # type: ignore[arg-type]
    return f", others {cores:.2f} cores" + ("*" if cores > NOISY_CORES else "")


def phases_text(report: dict[str, object]) -> list[str]:
    """The reaction and soak phases, for under the table."""
    lines: list[str] = []
    r = report.get("reaction")
    if isinstance(r, dict):
        if "skipped" in r:
            lines.append(f"reaction: skipped ({r['skipped']})")
        else:
            lines.append(f"reaction (probe boots, one chamber at {r['spike_mmhg']:g} mmHg -> "
                         f"vent; {r['probes']} probes every {r['probe_interval_s']:g} s; "
                         f"stream {r['rate']:,.0f} msg/s = {r['rate_basis']}):")
            lines.append(f"  quiet:  {_reaction_line(r['quiet'])}")
            lines.append(f"  loaded: {_reaction_line(r['loaded'])}")
            slow = ", ".join(f"#{s['probe']} at {s['at_s']:.2f} s: {s['ms']:.1f} ms"
                             for s in r["loaded"]["slowest"][:3])
            lines.append(f"  slowest under load: {slow or '-'}")
            lines.append(f"  target p99 < {r['target_p99_ms']:g} ms at 80 % load, all vented, "
                         f"stream lossless: {'met' if r['target_met'] else 'NOT met'}")
    s = report.get("soak")
    if isinstance(s, dict):
        if "skipped" in s:
            lines.append(f"soak: skipped ({s['skipped']})")
        else:
            st = s["stream"]
            lines.append(
                f"soak {s['seconds']:g} s at {st['achieved_rate']:,.0f} msg/s "
                f"({s['rate_basis']}): RSS {s['rss_at_warmup_mb']:.1f} MB at "
                f"{s['warmup_s']:g} s, then {s['rss_min_after_warmup_mb']:.1f}-"
                f"{s['rss_max_after_warmup_mb']:.1f} MB, to max {s['change_to_max_percent']:+.1f}"
                f" %, to end {s['change_to_end_percent']:+.1f} % "
                f"(slope {s['slope_mb_per_min_after_warmup']} MB/min); stored "
                f"{st['stored']:,}/{st['sent']:,}"
                + (" (lost nothing)" if st["lost_nothing"] else " (LOSS)") + _others(st))
            lines.append("  RSS MB (storage queue): " + " ".join(
                f"{p['t']:.0f}:{p['rss_mb']:.1f}({p.get('storage_queue')})" for p in s["series"]))
            lines.append(f"  target within +-{s['target_percent']:g} % over 600 s: "
                         + ("met" if s["target_met"] else
                            "flat" if s["flat_within_target"] and s["seconds"] < 600
                            and st["lost_nothing"] else "NOT met")
                         + (" (shorter than the target's 600 s)" if s["seconds"] < 600 else ""))
    return lines


# ---------------------------------------------------------------- the report


def ratios(searches: list[Search]) -> dict[str, float | None]:
    best = {(s.contender, s.qos): s.best.achieved_rate if s.best else None for s in searches}
    out: dict[str, float | None] = {}
    for qos in sorted({s.qos for s in searches}):
        gw = best.get(("gateway", qos))
        for peer in ("node-red", "ceiling"):
            other = best.get((peer, qos))
            if gw is not None and other:
                out[f"gateway/{peer} qos {qos}"] = round(gw / other, 3)
    return out


def gateway_summary(report: dict[str, object]) -> str:
    """What the gateway itself counted over every trial: anything but zeros needs a look."""
    rejected: dict[str, int] = {}
    totals = {"vents_sent": 0, "safety_events": 0, "points_dropped": 0, "write_errors": 0,
              "points_spooled": 0, "mqtt_reconnects": 0}
    logs: set[str] = set()
    trials = 0
    for s in report["searches"]:  # type: ignore[attr-defined]
        if s["contender"] != "gateway":
            continue
        for t in s["trials"]:
            trials += 1
            notes = t["notes"]
            for k, v in (notes.get("rejected") or {}).items():
                rejected[k] = rejected.get(k, 0) + v
            for k in totals:
                totals[k] += notes.get(k) or 0
            logs.update(m.split("x ", 1)[-1] for m in notes.get("log", []))
    if not trials:
        return ""
    parts = [f"{trials} trials", f"rejected {rejected or 0}"]
    parts += [f"{k} {v}" for k, v in totals.items()]
    parts.append(f"log lines: {sorted(logs) if logs else 'none'}")
    return ", ".join(parts)


def table(report: dict[str, object]) -> str:
    """The result as text: one row per contender and QoS, then the ratios."""
    rows = [("contender", "qos", "msg/s", "µs/msg", "cpu %", "peak RSS MB", "broker µs",
             "influxd µs", "drain s", "others", "zero-loss")]
    for s in report["searches"]:  # type: ignore[attr-defined]
        b = s["best"]
        trials = f"{sum(t['zero_loss'] for t in s['trials'])}/{len(s['trials'])} trials"
        if b is None:
            rows.append((s["contender"], str(s["qos"]), "none", "", "", "", "", "", "", "",
                         trials))
            continue
        rows.append((s["contender"], str(s["qos"]), f"{b['achieved_rate']:,.0f}",
                     f"{b['cpu_us_per_msg']:.1f}", f"{b['cpu_percent']:.0f}",
                     f"{b['peak_rss_mb']:.0f}", f"{b['broker_us_per_msg']:.1f}",
                     f"{b['influxd_us_per_msg']:.1f}",
                     "-" if b["drain_s"] is None else f"{b['drain_s']:.1f}",
                     f"{b['others_cores']:.2f}" + ("*" if b["others_cores"] > NOISY_CORES
                                                   else ""), trials))
    st = report.get("storage")
    if isinstance(st, dict):
        rows.append(("storage (/write)", "-", f"{st['points_per_s']:,.0f}", "", "", "", "",
                     f"{st['influxd_us_per_point']:.1f}", "", f"{st['others_cores']:.2f}",
                     "1 run"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    for key, value in report["ratios"].items():  # type: ignore[attr-defined]
        lines.append(f"{key}: {value:.2f}")
    if any(s["best"] and s["best"]["others_cores"] > NOISY_CORES
           for s in report["searches"]):  # type: ignore[attr-defined]
        lines.append(f"* more than {NOISY_CORES} cores busy outside the bench during that "
                     "trial: the number may be low; run again on a quiet machine")
    gw = gateway_summary(report)
    if gw:
        lines.append(f"gateway over all its trials: {gw}")
    for p in report.get("publisher", []):  # type: ignore[attr-defined]
        lines.append(f"publisher qos {p['qos']} unpaced: "
                     f"{p['no_subscriber']['achieved_rate']:,.0f} msg/s into the broker alone, "
                     f"{p['to_mosquitto_sub']['achieved_rate']:,.0f} msg/s with mosquitto_sub "
                     f"({p['to_mosquitto_sub']['received']:,}/{p['to_mosquitto_sub']['sent']:,}"
                     " received)")
    lines += phases_text(report)
    return "\n".join(lines)


@contextmanager
def servers(work: Path) -> Iterator[tuple[LocalMosquitto, LocalInflux]]:
    broker = LocalMosquitto("mosquitto", work / "mosquitto", free_port(),
                            extra_conf=BROKER_CONF).start()
    try:
        influx = LocalInflux("influxd", work / "influxdb", free_port()).start()
        try:
            yield broker, influx
        finally:
            influx.stop()
    finally:
        broker.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--qos", type=int, choices=(0, 1), action="append",
                   help="repeat for both (default: 0 and 1)")
    p.add_argument("--only", default="ceiling,node-red,gateway,storage",
                   help=f"comma-separated, of {','.join(CONTENDERS)}")
    p.add_argument("--boots", type=int, default=500)
    p.add_argument("--seconds", type=float, default=10.0, help="stream length per trial")
    p.add_argument("--max-trials", type=int, default=6, help="per contender and QoS")
    p.add_argument("--drain-s", type=float, default=3.0,
                   help="after the stream, how long a contender may take to store the rest")
    p.add_argument("--start-rate", action="append", default=[], metavar="NAME=MSG_PER_S",
                   help=f"where a ladder starts (defaults {START_RATES})")
    p.add_argument("--publisher-messages", type=int, default=1_000_000,
                   help="messages of the publisher's unpaced runs (0: skip them)")
    p.add_argument("--storage-points", type=int, default=1_000_000)
    p.add_argument("--node-red-dir", type=Path,
                   help="an npm prefix with Node-RED installed (or to install into), kept")
    p.add_argument("--gateway-python", default=sys.executable)
    p.add_argument("--gateway-pythonpath", type=Path, default=ROOT,
                   help="the checkout the gateway runs from (e.g. a git worktree)")
    p.add_argument("--out", type=Path, default=ROOT / "run" / "peers.json")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs per trial)")
    p.add_argument("--reaction", action=argparse.BooleanOptionalAction, default=None,
                   help="the vent-reaction phase (default: on when the gateway is a contender)")
    p.add_argument("--reaction-rate", type=float, metavar="MSG_PER_S",
                   help=f"its stream (default: {LOAD_SHARE * 100:.0f} %% of the gateway's QoS 0 "
                        "zero-loss max of this run, or of --start-rate gateway=... without "
                        "a QoS 0 search, e.g. with --max-trials 0)")
    p.add_argument("--probes", type=int, default=200, help="probe boots per reaction run")
    p.add_argument("--probe-interval-s", type=float, default=0.05,
                   help="between two probes' spikes")
    p.add_argument("--soak-s", type=float, default=0.0,
                   help="the RSS soak's length (600 for the issue's target; 0: no soak)")
    p.add_argument("--soak-rate", type=float, metavar="MSG_PER_S",
                   help="its stream (default as --reaction-rate)")
    p.add_argument("--safety-priority", action="store_true",
                   help=f"each contender and the broker at nice {SAFETY_NICE}, influxd at "
                   f"{STORAGE_NICE}, the publisher as it is (needs root)")
    args = p.parse_args(argv)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = set(only) - set(CONTENDERS)
    if unknown:
        p.error(f"unknown contender(s): {', '.join(sorted(unknown))}")
    qos_list = args.qos or [0, 1]
    starts = dict(START_RATES)
    for item in args.start_rate:
        name, _, value = item.partition("=")
        starts[name] = float(value)
    given_starts = {item.partition("=")[0] for item in args.start_rate}
    do_reaction = args.reaction if args.reaction is not None else "gateway" in only

    began, load0 = time.monotonic(), os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    nr_prefix = args.node_red_dir or work / "node-red-npm"
    print(f"work dir {work}", flush=True)
    report: dict[str, object] = {}
    try:
        meta: dict[str, object] = {
            "boots": args.boots, "seconds": args.seconds, "drain_s": args.drain_s,
            "safety_priority": args.safety_priority,
            "max_trials": args.max_trials, "cpus": os.cpu_count(), "load_before": load0,
            "gateway_python": args.gateway_python,
            "gateway_pythonpath": str(args.gateway_pythonpath),
            "gateway_revision": git_revision(args.gateway_pythonpath),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if "node-red" in only:
            t = time.monotonic()
            node_red.install(nr_prefix)
            meta["node_red"] = {**node_red.version(nr_prefix),
                                "install_s": round(time.monotonic() - t, 1)}
            print(f"node-red ready: {meta['node_red']}", flush=True)
        with servers(work) as (broker, influx):
            bench = Bench(work, broker, influx, args.boots, args.seconds, args.drain_s,
                          nr_prefix, args.gateway_python, args.gateway_pythonpath.resolve(),
                          safety_priority=args.safety_priority)
            bench.prioritize(bench.broker_pid, SAFETY_NICE)
            bench.prioritize(bench.influx_pid, STORAGE_NICE)
            pubs, unpaced = [], {}
            if args.publisher_messages and "ceiling" in only:
                for qos in qos_list:
                    summary, unpaced[qos] = publisher_max(bench, qos, args.publisher_messages)
                    pubs.append(summary)
                    print(f"publisher qos {qos}: {summary}", flush=True)
            searches = []
            for name in [c for c in MQTT_CONTENDERS if c in only and args.max_trials > 0]:
                for qos in qos_list:
                    print(f"{name} qos {qos}:", flush=True)
                    earlier = [unpaced[qos]] if name == "ceiling" and qos in unpaced else []
                    searches.append(search(bench, name, qos, starts[name], args.max_trials,
                                           earlier=earlier))
            storage = None
            if "storage" in only:
                storage = storage_ceiling(bench, args.storage_points)
                print(f"storage: {storage}", flush=True)
            gw_max = next((s.best.achieved_rate for s in searches
                           if s.contender == "gateway" and s.qos == 0 and s.best), None)
            if gw_max is not None:
                basis_rate: float | None = gw_max
                basis = f"{LOAD_SHARE:.0%} of the QoS 0 max {gw_max:,.0f} msg/s of this run"
            elif "gateway" in given_starts:
                basis_rate = starts["gateway"]
                basis = f"{LOAD_SHARE:.0%} of --start-rate gateway={basis_rate:,.0f}"
            else:
                basis_rate, basis = None, ""
            phases: dict[str, dict[str, object] | None] = {"reaction": None, "soak": None}
            for phase, wanted, given in (("reaction", do_reaction, args.reaction_rate),
                                         ("soak", args.soak_s > 0, args.soak_rate)):
                if not wanted:
                    continue
                if given is None and basis_rate is None:
                    phases[phase] = {"skipped": "no rate: no QoS 0 gateway search passed; give "
                                     f"--{phase}-rate or --start-rate gateway=..."}
                    print(f"{phase}: {phases[phase]['skipped']}", flush=True)  # type: ignore[index]
                    continue
                rate = given if given is not None else round(LOAD_SHARE * basis_rate, -1)  # type: ignore[operator]
                why = "given" if given is not None else basis
                print(f"{phase} at {rate:,.0f} msg/s ({why}):", flush=True)
                if phase == "reaction":
                    phases[phase] = reaction_phase(bench, rate, why, args.probes,
                                                   args.probe_interval_s)
                else:
                    phases[phase] = soak_phase(bench, rate, why, args.soak_s)
        meta["load_after"] = os.getloadavg()
        # Another change to the checkout during the run shows here (each trial starts a
        # fresh gateway process, so the trials after the change ran the new code).
        meta["gateway_revision_after"] = git_revision(args.gateway_pythonpath)
        meta["run_s"] = round(time.monotonic() - began, 1)
        report = {"meta": meta, "searches": [asdict(s) for s in searches],
                  "ratios": ratios(searches), "publisher": pubs, "storage": storage,
                  **phases}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print()
        print(table(report))
        print(f"\n{meta['run_s']:.0f} s; JSON in {args.out}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
