"""InfluxDB over HTTPS with a username and password, from the outside: a real influxd serving
HTTPS only (a test CA made by trustme) with authentication on.

The contract (docs/storage.md §5, README settings): the right CA and password store the
points; a wrong CA or password is refused, counted, logged (without the secret) and spooled,
so nothing is lost once the configuration is fixed; plain http to a host that is not loopback
is refused at startup; the credentials travel in a header, never in a URL.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from device_sim.local_stack import LocalInflux, count, free_port
from gateway.lineprotocol import Point
from gateway.settings import InfluxSettings
from gateway.storage import InfluxWriter
from tests.helpers import wait_for

trustme = pytest.importorskip("trustme")

PASSWORD = "Adm1n-" + secrets.token_hex(6)
WRONG = "Wr0ng-" + secrets.token_hex(6)
pytestmark = pytest.mark.integration


class Pki:
    def __init__(self, directory: Path) -> None:
        ca, other = trustme.CA(), trustme.CA()
        self.ca_file, self.other_ca = directory / "ca.pem", directory / "other-ca.pem"
        self.server = directory / "server.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        other.cert_pem.write_to_path(str(self.other_ca))
        ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(
            str(self.server))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure_influx(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[LocalInflux]:
    server = LocalInflux("influxd", tmp_path_factory.mktemp("influxd-tls"), free_port(),
                         https_cert=pki.server, ca_file=pki.ca_file,
                         admin=("admin", PASSWORD), http_log=True)
    server.start()
    yield server
    server.stop()


def settings_for(server: LocalInflux, tmp_path: Path, **over: object) -> InfluxSettings:
    base: dict[str, object] = dict(
        url=server.url, database=f"tls_{secrets.token_hex(4)}", username="admin",
        password=SecretStr(PASSWORD), ca_file=server.ca_file, flush_interval_s=0.05,
        retry_min_s=0.05, retry_max_s=0.2, timeout_s=5.0, spool_dir=tmp_path / "spool")
    base.update(over)
    return InfluxSettings(**base)  # type: ignore[arg-type]


def points(n: int) -> list[Point]:
    return [Point("tls_test", {"boot": "b1"}, {"v": float(i)}, 1_000_000 + i) for i in range(n)]


def secrets_in_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    return [s for s in (PASSWORD, WRONG) if s in text]


async def write_all(settings: InfluxSettings, n: int) -> InfluxWriter:
    writer = InfluxWriter(settings)
    await writer.ensure_database()
    writer.start()
    try:
        for p in points(n):
            writer.submit(p)
        assert await writer.flush(10)
    finally:
        await writer.close()
    return writer


async def test_right_ca_and_password_store_the_points(
    secure_influx: LocalInflux, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = settings_for(secure_influx, tmp_path)
    assert settings.url.startswith("https://")
    writer = await write_all(settings, 50)
    assert count(secure_influx, settings.database, "SELECT count(v) FROM tls_test") == 50
    assert writer.stats.points_written == 50
    assert (writer.stats.tls_errors, writer.stats.auth_errors) == (0, 0)
    assert not secrets_in_logs(caplog)
    # Nothing reached influxd's request log with the password in it (it logs each URL).
    assert PASSWORD not in secure_influx.logfile.read_text()  # type: ignore[union-attr]


@pytest.mark.parametrize("fault", ["wrong_ca", "no_ca", "wrong_password"])
async def test_a_wrong_ca_or_password_is_refused_counted_logged_and_spooled(
    secure_influx: LocalInflux, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    good = settings_for(secure_influx, tmp_path)
    bad = good.model_copy(update={
        "wrong_ca": {"ca_file": pki.other_ca},
        "no_ca": {"ca_file": None},  # the system trust store does not know the test CA
        "wrong_password": {"password": SecretStr(WRONG)},
    }[fault])
    good_writer = InfluxWriter(good)
    await good_writer.ensure_database()  # the database exists; only the writer is wrong
    await good_writer.close()

    writer = InfluxWriter(bad)
    writer.start()
    try:
        for p in points(30):
            writer.submit(p)
        await wait_for(lambda: writer.spool_points == 30, 10, "the refused points spooled")
        assert writer.task_alive and writer.stats.points_written == 0
        counters = writer.health_counters()
        if fault == "wrong_password":
            assert counters["influx_auth_errors"] >= 1 and counters["influx_tls_errors"] == 0
            msg = "influxdb refused the credentials; spooling and retrying"
        else:
            assert counters["influx_tls_errors"] >= 1 and counters["influx_auth_errors"] == 0
            msg = "influxdb TLS handshake failed; spooling and retrying"
        logged = [r for r in caplog.records if r.getMessage() == msg]
        assert len(logged) == 1 and logged[0].levelno == logging.ERROR  # once a minute
        reason = logged[0].reason  # type: ignore[attr-defined]
        assert ("401" in reason) if fault == "wrong_password" else ("CERTIFICATE" in reason)
    finally:
        await writer.close()
    assert count(secure_influx, good.database, "SELECT count(v) FROM tls_test") == 0

    # Configuration fixed, gateway restarted on the same spool: nothing was lost.
    fixed = InfluxWriter(good)
    fixed.start()
    try:
        assert await fixed.flush(10)
    finally:
        await fixed.close()
    assert fixed.stats.points_replayed == 30
    assert count(secure_influx, good.database, "SELECT count(v) FROM tls_test") == 30
    assert not secrets_in_logs(caplog)


async def test_credentials_travel_as_basic_auth_never_in_the_url(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """What the writer really sends, as a server on the wire sees it."""
    caplog.set_level(logging.DEBUG)
    requests: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        requests.append(head)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = InfluxSettings(url=f"http://127.0.0.1:{port}", database="wire", username="gw",
                              password=SecretStr(PASSWORD), flush_interval_s=0.05,
                              spool_dir=None)
    writer = InfluxWriter(settings)
    writer.start()
    try:
        writer.submit(points(1)[0])
        assert await writer.flush(5)
    finally:
        await writer.close()
        server.close()
    (head,) = requests
    request_line = head.split(b"\r\n")[0]
    assert request_line.startswith(b"POST /write?") and PASSWORD.encode() not in request_line
    assert b"&p=" not in request_line and b"?u=" not in request_line
    headers = dict(line.split(b": ", 1) for line in head.strip().split(b"\r\n")[1:])
    headers = {k.lower(): v for k, v in headers.items()}
    assert headers[b"authorization"] == b"Basic " + base64.b64encode(f"gw:{PASSWORD}".encode())
    assert not secrets_in_logs(caplog)


async def test_verify_tls_off_is_a_warning_and_still_encrypts(
    secure_influx: LocalInflux, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway")
    settings = settings_for(secure_influx, tmp_path, ca_file=None, verify_tls=False)
    await write_all(settings, 5)
    assert count(secure_influx, settings.database, "SELECT count(v) FROM tls_test") == 5
    assert [r for r in caplog.records if r.levelno == logging.WARNING
            and "verification is off" in r.getMessage()]


@pytest.mark.parametrize("url", ["http://influxdb:8086", "http://10.0.0.7:8086",
                                 "http://influx.example.org", "http://[2001:db8::1]:8086"])
def test_plain_http_to_a_remote_host_is_refused_at_startup(url: str) -> None:
    with pytest.raises(ValidationError) as err:
        InfluxSettings(url=url, username="gw", password=SecretStr(PASSWORD))
    text = str(err.value)
    assert "allow_plaintext" in text and "https://" in text
    assert PASSWORD not in text  # the refusal does not print the settings it refused
    InfluxSettings(url=url.replace("http://", "https://"))  # https: fine
    InfluxSettings(url=url, allow_plaintext=True)  # opted in


def test_plaintext_opt_in_is_logged_as_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway")
    InfluxWriter(InfluxSettings(url="http://influxdb:8086", allow_plaintext=True))
    assert [r for r in caplog.records if "plain http" in r.getMessage()]


@pytest.mark.parametrize("url", ["http://127.0.0.1:8086", "http://localhost:8086",
                                 "http://[::1]:8086"])
def test_plain_http_on_loopback_stays_allowed(url: str) -> None:
    assert InfluxSettings(url=url).url == url


def test_bad_credentials_settings_are_refused_at_startup(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"username and influx\.password"):
        InfluxSettings(username="gw")
    with pytest.raises(ValidationError, match="both set"):
        InfluxSettings(username="gw", password=SecretStr("x"), token=SecretStr("t"))
    with pytest.raises(ValidationError, match="no such file"):
        InfluxSettings(url="https://influx:8086", ca_file=tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ValidationError, match="no usable PEM"):
        InfluxSettings(url="https://influx:8086", ca_file=junk)
    with pytest.raises(ValidationError, match="verify_tsl"):
        InfluxSettings.model_validate({"verify_tsl": False})  # a typo is no silent default
