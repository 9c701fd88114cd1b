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

`run_trial()` runs one contender at one rate and returns the trial's numbers: the piece a
vent-reaction phase (a probe boot at 80 % of the gateway's maximum) or an RSS soak builds on.
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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import node_red
from bench.common import cpu_seconds, rss_mb
from bench.mqtt_blast import CLINIC, MqttConnection, boot_state, telemetry_period
from device_sim.local_stack import (
    LocalInflux,
    LocalMosquitto,
    count,
    find_binary,
    free_port,
)
from gateway.contract import Channel, Phase, Telemetry, TopicAddress, topic

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

    def announce(self, rate: float) -> None:
        """Retained online states with the period the rate implies, before a contender
        starts: the gateway then knows every boot (telemetry of a boot without state is
        stored but not watched, and counted as rejected `unknown_boot_telemetry`)."""
        period = telemetry_period(self.boots, rate)
        conn = MqttConnection("127.0.0.1", self.broker.port, "bench-announce")
        try:
            for i in range(self.boots):
                conn.publish(topic(CLINIC, f"b{i}", Channel.STATE), boot_state(period), qos=1,
                             retain=True)
            conn.publish(topic(PROBE_CLINIC, "p0", Channel.STATE), boot_state(1.0), qos=1,
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


def _blaster(bench: Bench, rate: float, qos: int, count_: int | None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "bench.mqtt_blast", "--port", str(bench.broker.port),
           "--boots", str(bench.boots), "--rate", str(rate), "--seconds", str(bench.seconds),
           "--qos", str(qos), "--seq-base", str(bench.seq_next)]
    if count_:
        cmd += ["--count", str(count_)]
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

    began, load0 = time.monotonic(), os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    nr_prefix = args.node_red_dir or work / "node-red-npm"
    print(f"work dir {work}", flush=True)
    report: dict[str, object] = {}
    try:
        meta: dict[str, object] = {
            "boots": args.boots, "seconds": args.seconds, "drain_s": args.drain_s,
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
                          nr_prefix, args.gateway_python, args.gateway_pythonpath.resolve())
            pubs, unpaced = [], {}
            if args.publisher_messages and "ceiling" in only:
                for qos in qos_list:
                    summary, unpaced[qos] = publisher_max(bench, qos, args.publisher_messages)
                    pubs.append(summary)
                    print(f"publisher qos {qos}: {summary}", flush=True)
            searches = []
            for name in [c for c in MQTT_CONTENDERS if c in only]:
                for qos in qos_list:
                    print(f"{name} qos {qos}:", flush=True)
                    earlier = [unpaced[qos]] if name == "ceiling" and qos in unpaced else []
                    searches.append(search(bench, name, qos, starts[name], args.max_trials,
                                           earlier=earlier))
            storage = None
            if "storage" in only:
                storage = storage_ceiling(bench, args.storage_points)
                print(f"storage: {storage}", flush=True)
        meta["load_after"] = os.getloadavg()
        # Another change to the checkout during the run shows here (each trial starts a
        # fresh gateway process, so the trials after the change ran the new code).
        meta["gateway_revision_after"] = git_revision(args.gateway_pythonpath)
        meta["run_s"] = round(time.monotonic() - began, 1)
        report = {"meta": meta, "searches": [asdict(s) for s in searches],
                  "ratios": ratios(searches), "publisher": pubs, "storage": storage}
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
