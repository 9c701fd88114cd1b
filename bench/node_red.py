"""Node-RED 4 as an ingest peer: installed with npm, loaded with the issue's flow, run headless.

The flow is what a Node-RED user would build for our telemetry (project issue 14):

    mqtt in (boots/v1/+/+/telemetry, the run's QoS)
      -> function (payload -> an InfluxDB point: the gateway's telemetry measurement)
      -> join (an array of 1,000 points, or whatever came within 1 s)
      -> influxdb batch (node-red-contrib-influxdb, InfluxDB 1.x, precision ms)

The MQTT link is v5, as the gateway's is: both peers then make the broker do the same work
(MQTT 5 PUBLISH framing, the same subscription options) and neither gains from a protocol the
other cannot use.

Each `NodeRed` is one process with its own user directory and flow file (one InfluxDB database
per trial); `node_modules` is shared from the npm prefix through a symlink in the user dir,
which is where Node-RED looks for extra nodes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

NODE_RED_PACKAGES = ("node-red@4", "node-red-contrib-influxdb")
TELEMETRY_FILTER = "boots/v1/+/+/telemetry"
JOIN_COUNT = 1000
JOIN_TIMEOUT_S = 1

# The function node: the same content as gateway/points.py telemetry() for an idle sample
# (tags clinic, device, phase; fields p1..pN, max_p, seq), at the boot's millisecond.
# Differences, on purpose and documented in the README: `seq` goes out as a float (the `influx`
# library writes every JS number so, without a schema), there are no session fields (the bench
# stream has none) and the time has no seq microseconds (Node-RED writes precision ms).
FUNCTION_JS = """\
const levels = msg.topic.split("/");
const s = msg.payload;
const fields = {seq: s.seq};
let max = -Infinity;
for (let i = 0; i < s.pressures.length; i++) {
    const p = s.pressures[i];
    fields["p" + (i + 1)] = p;
    if (p > max) { max = p; }
}
fields.max_p = max;
msg.payload = {
    measurement: "telemetry",
    tags: {clinic: levels[2], device: levels[3], phase: s.phase},
    fields: fields,
    timestamp: Math.round(s.ts * 1000),
};
return msg;
"""


class NodeRedError(RuntimeError):
    """Node-RED could not be installed or did not come up."""


def red_js(prefix: Path) -> Path:
    return prefix / "node_modules" / "node-red" / "red.js"


def install(prefix: Path, timeout_s: float = 600) -> Path:
    """`npm install --prefix` the two packages unless they are there; returns red.js."""
    contrib = prefix / "node_modules" / "node-red-contrib-influxdb" / "package.json"
    if red_js(prefix).exists() and contrib.exists():
        return red_js(prefix)
    npm = shutil.which("npm")
    if npm is None:
        raise NodeRedError("npm is not installed (Debian: apt-get install -y npm)")
    prefix.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund",
                           "--loglevel", "error", *NODE_RED_PACKAGES],
                          capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0 or not red_js(prefix).exists():
        raise NodeRedError(f"npm install failed ({done.returncode}): {done.stderr[-2000:]}")
    return red_js(prefix)


def version(prefix: Path) -> dict[str, str]:
    """The installed versions, for the bench's JSON: a peer's number means little without."""
    out = {}
    for pkg in ("node-red", "node-red-contrib-influxdb"):
        meta = prefix / "node_modules" / pkg / "package.json"
        if meta.exists():
            out[pkg] = json.loads(meta.read_text()).get("version", "?")
    return out


def flow(broker_port: int, qos: int, influx_port: int, database: str) -> list[dict[str, object]]:
    """The flows.json of the issue's flow, against the bench's broker and database."""
    return [
        {"id": "bench-tab", "type": "tab", "label": "telemetry to influx"},
        {"id": "bench-broker", "type": "mqtt-broker", "name": "bench", "broker": "127.0.0.1",
         "port": str(broker_port), "clientid": f"node-red-bench-{os.getpid()}",
         "autoConnect": True, "usetls": False, "protocolVersion": "5", "keepalive": "60",
         "cleansession": True, "autoUnsubscribe": True, "sessionExpiry": "",
         "birthTopic": "", "closeTopic": "", "willTopic": ""},
        {"id": "bench-in", "type": "mqtt in", "z": "bench-tab", "name": "telemetry",
         "topic": TELEMETRY_FILTER, "qos": str(qos), "datatype": "json",
         "broker": "bench-broker", "nl": False, "rap": True, "rh": 0, "inputs": 0,
         "wires": [["bench-fn"]]},
        {"id": "bench-fn", "type": "function", "z": "bench-tab", "name": "to point",
         "func": FUNCTION_JS, "outputs": 1, "timeout": 0, "noerr": 0, "initialize": "",
         "finalize": "", "libs": [], "wires": [["bench-join"]]},
        {"id": "bench-join", "type": "join", "z": "bench-tab", "name": "batch",
         "mode": "custom", "build": "array", "property": "payload", "propertyType": "msg",
         "key": "topic", "joiner": "\\n", "joinerType": "str", "useparts": False,
         "accumulate": False, "timeout": str(JOIN_TIMEOUT_S), "count": str(JOIN_COUNT),
         "reduceRight": False, "wires": [["bench-influx"]]},
        {"id": "bench-influx", "type": "influxdb batch", "z": "bench-tab", "name": "store",
         "influxdb": "bench-influxdb", "precision": "ms", "retentionPolicy": "",
         "database": "", "precisionV18FluxV20": "ms", "retentionPolicyV18Flux": "",
         "org": "", "bucket": "", "wires": []},
        {"id": "bench-influxdb", "type": "influxdb", "hostname": "127.0.0.1",
         "port": str(influx_port), "protocol": "http", "database": database, "name": "bench",
         "usetls": False, "tls": "", "influxdbVersion": "1.x", "url": "",
         "rejectUnauthorized": False},
    ]


def settings_js(user_dir: Path, ui_port: int) -> str:
    """Headless: no editor, no admin or HTTP-in routes, loopback only, nothing phoned home."""
    return (
        "module.exports = {\n"
        f"  userDir: {json.dumps(str(user_dir))},\n"
        '  flowFile: "flows.json",\n'
        "  credentialSecret: false,\n"
        '  uiHost: "127.0.0.1",\n'
        f"  uiPort: {ui_port},\n"
        "  httpAdminRoot: false,\n"
        "  httpNodeRoot: false,\n"
        "  disableEditor: true,\n"
        "  diagnostics: { enabled: false },\n"
        "  runtimeState: { enabled: false },\n"
        "  telemetry: { enabled: false, updateNotification: false },\n"
        "  externalModules: { autoInstall: false },\n"
        "  logging: { console: { level: 'info', metrics: false, audit: false } },\n"
        "};\n"
    )


class NodeRed:
    """One headless Node-RED process running the flow; `pid` is the node process itself."""

    def __init__(self, prefix: Path, user_dir: Path, broker_port: int, qos: int,
                 influx_port: int, database: str, ui_port: int) -> None:
        self.prefix = prefix
        self.user_dir = user_dir
        self.log_path = user_dir / "node-red.log"
        user_dir.mkdir(parents=True, exist_ok=True)
        modules = user_dir / "node_modules"
        if not modules.exists():
            modules.symlink_to(prefix / "node_modules", target_is_directory=True)
        (user_dir / "flows.json").write_text(
            json.dumps(flow(broker_port, qos, influx_port, database), indent=1))
        (user_dir / "settings.js").write_text(settings_js(user_dir, ui_port))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 60) -> NodeRed:
        """Start and wait for the broker connection (the subscription follows at once)."""
        node = shutil.which("node")
        if node is None:
            raise NodeRedError("node is not installed")
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [node, str(red_js(self.prefix)), "--settings", str(self.user_dir / "settings.js"),
                 "--userDir", str(self.user_dir)],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.user_dir)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NodeRedError(f"node-red exited ({self.proc.returncode}); "
                                   f"see {self.log_path}")
            if "Connected to broker" in self.log_path.read_text(errors="replace"):
                return self
            time.sleep(0.1)
        raise NodeRedError(f"node-red did not connect to the broker; see {self.log_path}")

    def problems(self) -> list[str]:
        """The log's error and warning lines (influx write failures show here), deduplicated."""
        seen: dict[str, int] = {}
        for line in self.log_path.read_text(errors="replace").splitlines():
            if re.search(r"\[(error|warn)\]", line):
                key = re.sub(r"^\d+ \w+ [\d:]+ - ", "", line)[:200]
                seen[key] = seen.get(key, 0) + 1
        return [f"{n}x {key}" for key, n in seen.items()]

    def stop(self, timeout_s: float = 15) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout_s)
