"""Fixtures: a real Mosquitto and a real influxd per test session, a fresh gateway per test.

Each test gets its own database, gateway client id, API port and clinic ids, so tests sharing
the servers cannot see each other's data.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from device_sim.local_etcd import LocalEtcdCluster
from device_sim.local_stack import LocalInflux, LocalMosquitto, free_port
from tests.helpers import RunningGateway, gateway_settings, running_gateway


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMosquitto]:
    server = LocalMosquitto("mosquitto", tmp_path_factory.mktemp("mosquitto"), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def influx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalInflux]:
    server = LocalInflux("influxd", tmp_path_factory.mktemp("influxd"), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def gateway(mosquitto: LocalMosquitto, influx: LocalInflux) -> AsyncIterator[RunningGateway]:
    async with running_gateway(gateway_settings(mosquitto, influx), influx) as gw:
        yield gw


@pytest.fixture
def own_influx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalInflux]:
    """An influxd for one test, free to be paused, killed and restarted."""
    server = LocalInflux("influxd", tmp_path_factory.mktemp("influxd-own"), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[LocalEtcdCluster]:
    """A fresh 3-member etcd cluster: tests kill and restart its members."""
    cluster = LocalEtcdCluster(tmp_path / "etcd").start()
    yield cluster
    cluster.stop()
