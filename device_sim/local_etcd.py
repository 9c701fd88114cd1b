"""A private etcd cluster on loopback for tests and benches: own ports, own data dirs.

Several gateways coordinate through etcd (gateway/coordination.py); its tests need a real
cluster of three members to kill one of them, or two (quorum lost), and bring them back.
"""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from device_sim.local_stack import Server, StackError, find_binary, free_port

log = logging.getLogger(__name__)

DEBIAN_PACKAGE = "etcd-server"  # etcd 3.4 on Debian 12/13: the v3 JSON gateway at /v3/


@dataclass
class EtcdMember(Server):
    peer_port: int = 0
    cluster: str = ""  # --initial-cluster, the same for every member
    token: str = "bootgw-test"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> EtcdMember:
        binary = find_binary("etcd")
        if binary is None:
            raise StackError(f"etcd is not installed (Debian package {DEBIAN_PACKAGE!r})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        peer = f"http://127.0.0.1:{self.peer_port}"
        data = self.workdir / "data"
        # A restarted member rejoins with its own data dir; "new" is read only at the first.
        args = [
            binary, "--name", self.name, "--data-dir", str(data),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", self.cluster, "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new",
            # A leader lost is replaced within 0.5-1 s, inside what a gateway's 2 s lease
            # tolerates (docs/deploy.md §4: the same for a LAN cluster).
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--logger", "zap", "--log-level", "warn",
        ]
        self.logfile = self.workdir / "etcd.log"
        with self.logfile.open("ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=out)
        log.info("etcd member started", extra={"member": self.name, "port": self.port})
        return self

    def healthy(self) -> bool:
        """Whether this member answers and the cluster has a leader (quorum)."""
        try:
            r = httpx.get(f"{self.url}/health", timeout=1)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and r.json().get("health") == "true"


@dataclass
class LocalEtcdCluster:
    """Three (or `size`) members on free loopback ports under `workdir`."""

    workdir: Path
    size: int = 3
    members: list[EtcdMember] = field(default_factory=list)

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def start(self, timeout: float = 30.0) -> LocalEtcdCluster:
        if not self.members:
            peers = [(f"m{i + 1}", free_port(), free_port()) for i in range(self.size)]
            cluster = ",".join(f"{n}=http://127.0.0.1:{pp}" for n, _, pp in peers)
            self.members = [EtcdMember(name=n, workdir=self.workdir / n, port=cp, peer_port=pp,
                                       cluster=cluster) for n, cp, pp in peers]
        for m in self.members:
            m.start()
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until a running member reports a leader (the cluster has quorum)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = [m for m in self.members if m.proc is not None and m.proc.poll() is None]
            if any(m.healthy() for m in running):
                return
            time.sleep(0.1)
        logs = [m.logfile for m in self.members]
        raise StackError(f"etcd cluster not healthy within {timeout:g} s; see {logs}")

    def leader(self) -> EtcdMember:
        """The member that leads now (asked of each running member in turn)."""
        for m in self.members:
            if m.proc is None or m.proc.poll() is not None:
                continue
            try:
                r = httpx.post(f"{m.url}/v3/maintenance/status", json={}, timeout=1).json()
            except httpx.HTTPError:
                continue
            if r.get("leader") and r.get("leader") == r.get("header", {}).get("member_id"):
                return m
        raise StackError("no etcd member says it leads")

    def stop(self) -> None:
        for m in self.members:
            m.stop()
