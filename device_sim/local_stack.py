"""A private Mosquitto and InfluxDB 1.x for simulations and tests: own ports, own data dirs.

Used by the demo and by the pytest fixtures, so both run the real servers the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import httpx

log = logging.getLogger(__name__)

DEBIAN_PACKAGES = {"mosquitto": "mosquitto", "influxd": "influxdb"}
_SEARCH_PATH = ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]


class StackError(RuntimeError):
    pass


class InfluxSeries(TypedDict):
    """One series of an InfluxDB 1.x /query result (values: rows in `columns` order)."""

    name: NotRequired[str]
    tags: NotRequired[dict[str, str]]  # with GROUP BY tags
    columns: list[str]
    values: list[list[Any]]


class _HttpxOptions(TypedDict, total=False):
    """The httpx keyword arguments LocalInflux adds, typed so `**options` is checked."""

    verify: ssl.SSLContext
    auth: httpx.BasicAuth


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


@dataclass(frozen=True)
class MosquittoTls:
    """A TLS listener on 127.0.0.1 for LocalMosquitto: the broker's certificate and key, and
    the CA that client certificates must chain to (PEM files)."""

    cafile: Path
    certfile: Path
    keyfile: Path
    # None: the server's own port, for a TLS-only broker (LocalMosquitto(plain=False)).
    port: int | None = None
    # Mutual TLS: a client without a certificate from `cafile` is refused in the handshake.
    require_certificate: bool = False

    def conf(self, port: int) -> str:
        """The listener's lines; they must come last, as they apply to the listener above."""
        return (
            f"listener {port} 127.0.0.1\n"
            f"cafile {self.cafile}\ncertfile {self.certfile}\nkeyfile {self.keyfile}\n"
            "tls_version tlsv1.2\n"  # the minimum, as in the clients (gateway/mqtt_tls.py)
            + ("require_certificate true\n" if self.require_certificate else "")
        )


@dataclass
class LocalMosquitto(Server):
    # Tests of a locked-down broker: anonymous clients refused, and config lines of their own
    # (a TLS listener, the dynamic-security plugin) appended to the generated file.
    allow_anonymous: bool = True
    extra_conf: str = ""
    # The plain listener on `port`; off for a TLS-only broker (the TLS listener then takes
    # `port` unless its own is given).
    plain: bool = True
    tls: MosquittoTls | None = None

    @property
    def tls_port(self) -> int | None:
        if self.tls is None:
            return None
        return self.tls.port if self.tls.port is not None else self.port

    def start(self, timeout: float = 10.0) -> LocalMosquitto:
        binary = find_binary("mosquitto")
        if binary is None:
            raise StackError("mosquitto is not installed (Debian package 'mosquitto')")
        if not self.plain and self.tls is None:
            raise StackError("LocalMosquitto needs a listener: plain, tls or both")
        if self.plain and self.tls_port == self.port:
            raise StackError("the TLS listener needs its own port next to the plain one")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            (f"listener {self.port} 127.0.0.1\n" if self.plain else "")
            + f"allow_anonymous {'true' if self.allow_anonymous else 'false'}\n"
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
            # after extra_conf, so that a line there cannot end up in the TLS listener
            + ("\n" + self.tls.conf(self.tls_port) if self.tls and self.tls_port else "")
        )
        self.logfile = self.workdir / "mosquitto.log"
        with self.logfile.open("ab") as out:
            self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=out, stderr=out)
        ports = [self.port] if self.plain else []
        if self.tls_port is not None:
            ports.append(self.tls_port)
        for port in ports:
            _wait_port(port, self.proc, timeout, "mosquitto")
        log.info("mosquitto started", extra={"port": self.port if self.plain else None,
                                             "tls_port": self.tls_port, "dir": str(self.workdir)})
        return self


DYNSEC_PLUGIN_PATHS = ("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
                       "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
                       "/usr/lib/mosquitto_dynamic_security.so",
                       "/usr/local/lib/mosquitto_dynamic_security.so")


def dynsec_plugin() -> str | None:
    """Mosquitto's dynamic-security plugin (Debian ships it in the mosquitto package)."""
    return next((p for p in DYNSEC_PLUGIN_PATHS if Path(p).exists()), None)


def dynsec_conf(config_file: Path) -> str:
    """`extra_conf` lines for a LocalMosquitto whose accounts and ACLs are the plugin's
    (gateway/broker_admin.py writes the initial file); use with allow_anonymous=False."""
    plugin = dynsec_plugin()
    if plugin is None:
        raise StackError("mosquitto_dynamic_security.so not found (Debian package 'mosquitto')")
    return f"plugin {plugin}\nplugin_opt_config_file {config_file}\n"


@dataclass
class LocalInflux(Server):
    # Tests of a locked-down InfluxDB: HTTPS only (a PEM certificate chain and its key), and
    # authentication, with an admin user start() creates (the first user may be created
    # without credentials). ca_file is what this class's own requests (ping, query) trust.
    https_cert: Path | None = None
    https_key: Path | None = None
    ca_file: Path | None = None
    admin: tuple[str, str] | None = None  # (user, password): auth-enabled when set
    http_log: bool = False  # influxd logs every request line (what reached its URLs)

    @property
    def url(self) -> str:
        return f"{'https' if self.https_cert else 'http'}://127.0.0.1:{self.port}"

    def _client_options(self) -> _HttpxOptions:
        opts: _HttpxOptions = {}
        if self.ca_file is not None:
            opts["verify"] = ssl.create_default_context(cafile=str(self.ca_file))
        if self.admin is not None:
            opts["auth"] = httpx.BasicAuth(*self.admin)
        return opts

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
            f'[http]\n  bind-address = "127.0.0.1:{self.port}"\n'
            f"  log-enabled = {'true' if self.http_log else 'false'}\n"
            "  max-body-size = 0\n"
            + (f'  https-enabled = true\n  https-certificate = "{self.https_cert}"\n'
               f'  https-private-key = "{self.https_key or self.https_cert}"\n'
               if self.https_cert else "")
            + ("  auth-enabled = true\n" if self.admin else "")
            + "[continuous_queries]\n  enabled = false\n"
            '[logging]\n  level = "warn"\n'
        )
        self.logfile = d / "influxd.log"
        with self.logfile.open("ab") as out:
            self.proc = subprocess.Popen([binary, "-config", str(conf)], stdout=out, stderr=out)
        _wait_port(self.port, self.proc, timeout, "influxd")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ping", timeout=1,
                             verify=self._client_options().get("verify", True)
                             ).status_code == 204:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise StackError("influxd did not answer /ping")
        if self.admin is not None:
            user, password = self.admin
            # Allowed without credentials while there is no user; after a restart the user
            # is there already and this, sent with its credentials, changes nothing.
            httpx.post(f"{self.url}/query", timeout=10, params={
                "q": f"CREATE USER \"{user}\" WITH PASSWORD '{password}' WITH ALL PRIVILEGES"},
                **self._client_options())
        log.info("influxd started", extra={"port": self.port, "dir": str(self.workdir)})
        return self

    def query(self, db: str, q: str) -> list[InfluxSeries]:
        """Run InfluxQL; returns the series of the first statement (empty if none)."""
        resp = httpx.post(f"{self.url}/query", params={"db": db, "q": q, "epoch": "ms"},
                          timeout=30, **self._client_options())
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
