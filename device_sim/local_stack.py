"""A private Mosquitto and InfluxDB 1.x for simulations and tests: own ports, own data dirs.

Used by the demo and by the pytest fixtures, so both run the real servers the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

DEBIAN_PACKAGES = {"mosquitto": "mosquitto", "influxd": "influxdb"}
_SEARCH_PATH = ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]


class StackError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in _SEARCH_PATH:
        p = Path(d) / name
        if p.exists():
            return str(p)
    return None


def missing_packages() -> list[str]:
    return [pkg for binary, pkg in DEBIAN_PACKAGES.items() if find_binary(binary) is None]


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise StackError(f"{what} did not open port {port} within {timeout:g} s")


@dataclass
class Server:
    name: str
    workdir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    logfile: Path | None = None
    extra_ports: dict[str, int] = field(default_factory=dict)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)  # in case a test paused it
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: the crash a clean shutdown test cannot show."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


@dataclass
class LocalMosquitto(Server):
    # Tests of a locked-down broker: anonymous clients refused, and config lines of their own
    # (a TLS listener, the dynamic-security plugin) appended to the generated file.
    allow_anonymous: bool = True
    extra_conf: str = ""

    def start(self, timeout: float = 10.0) -> LocalMosquitto:
        binary = find_binary("mosquitto")
        if binary is None:
            raise StackError("mosquitto is not installed (Debian package 'mosquitto')")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            # As root mosquitto drops to user 'mosquitto', which cannot write its database
            # in our directory: sessions and retained state would not survive a restart.
            + ("user root\n" if os.geteuid() == 0 else "")
            + "max_queued_messages 100000\n"
            "max_inflight_messages 100\n"
            "set_tcp_nodelay true\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\n"
            + self.extra_conf
        )
        self.logfile = self.workdir / "mosquitto.log"
        with self.logfile.open("ab") as out:
            self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=out, stderr=out)
        _wait_port(self.port, self.proc, timeout, "mosquitto")
        log.info("mosquitto started", extra={"port": self.port, "dir": str(self.workdir)})
        return self


class LocalInflux(Server):
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> LocalInflux:
        binary = find_binary("influxd")
        if binary is None:
            raise StackError("influxd is not installed (Debian package 'influxdb')")
        self.workdir.mkdir(parents=True, exist_ok=True)
        rpc = self.extra_ports.setdefault("rpc", free_port())
        d = self.workdir
        conf = d / "influxdb.conf"
        conf.write_text(
            "reporting-disabled = true\n"
            f'bind-address = "127.0.0.1:{rpc}"\n'
            f'[meta]\n  dir = "{d}/meta"\n'
            f'[data]\n  dir = "{d}/data"\n  wal-dir = "{d}/wal"\n'
            "  query-log-enabled = false\n"
            "[monitor]\n  store-enabled = false\n"
            f'[http]\n  bind-address = "127.0.0.1:{self.port}"\n  log-enabled = false\n'
            "  max-body-size = 0\n"
            "[continuous_queries]\n  enabled = false\n"
            '[logging]\n  level = "warn"\n'
        )
        self.logfile = d / "influxd.log"
        with self.logfile.open("ab") as out:
            self.proc = subprocess.Popen([binary, "-config", str(conf)], stdout=out, stderr=out)
        _wait_port(self.port, self.proc, timeout, "influxd")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ping", timeout=1).status_code == 204:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise StackError("influxd did not answer /ping")
        log.info("influxd started", extra={"port": self.port, "dir": str(self.workdir)})
        return self

    def query(self, db: str, q: str) -> list[dict[str, object]]:
        """Run InfluxQL; returns the series of the first statement (empty if none)."""
        resp = httpx.post(f"{self.url}/query", params={"db": db, "q": q, "epoch": "ms"},
                          timeout=30)
        resp.raise_for_status()
        result = resp.json()["results"][0]
        if "error" in result:
            raise StackError(f"query failed: {result['error']}")
        return result.get("series", [])


def count(influx: LocalInflux, db: str, q: str) -> int:
    """The single number a `SELECT count(...)` returns, 0 when there are no rows."""
    series = influx.query(db, q)
    if not series:
        return 0
    return int(sum(row[1] for s in series for row in s["values"]))
