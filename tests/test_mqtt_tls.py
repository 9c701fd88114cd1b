"""MQTT over TLS, for the gateway and the simulated boots, against a real TLS-only Mosquitto.

Written from the attacker's and the operator's side: a broker that cannot show a certificate
from our CA, or one for another name, is never talked to; a client without a certificate does
not get onto a broker that requires one; plain TCP to a broker off loopback is refused at
startup unless explicitly allowed; a whole session runs over TLS. The CA is made at test time
with trustme; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import aiomqtt
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from pydantic import ValidationError

from device_sim.__main__ import _mqtt_settings, _parser
from device_sim.__main__ import main as sim_main
from device_sim.boot import SimBoot
from device_sim.local_stack import LocalInflux, LocalMosquitto, MosquittoTls, free_port
from gateway.aio import cancel_and_wait
from gateway.mqtt_link import MqttLink
from gateway.mqtt_tls import TLS_MIN_VERSION, client_security, mqtt_password, tls_context
from gateway.settings import GatewaySettings, MqttSettings, is_loopback_host
from tests.helpers import gateway_settings, running_gateway, short_program, wait_for

# ---------------------------------------------------------------------------- certificates


class Pki:
    """A test CA, a second CA nobody trusts, and PEM files on disk as the settings want them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = trustme.CA()
        self.rogue = trustme.CA()
        self.ca_file = self._write("ca.pem", self.ca.cert_pem.bytes())
        self.rogue_ca_file = self._write("rogue-ca.pem", self.rogue.cert_pem.bytes())

    def _write(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path

    def issue(self, name: str, *hosts: str, ca: trustme.CA | None = None) -> tuple[Path, Path]:
        """(certificate chain, key) files for a leaf certificate naming `hosts`."""
        cert = (ca or self.ca).issue_cert(*hosts)
        chain = b"".join(p.bytes() for p in cert.cert_chain_pems)
        return (self._write(f"{name}.crt", chain),
                self._write(f"{name}.key", cert.private_key_pem.bytes()))

    def tls(self, name: str, *hosts: str, require_certificate: bool = False) -> MosquittoTls:
        cert, key = self.issue(name, *hosts)
        return MosquittoTls(cafile=self.ca_file, certfile=cert, keyfile=key,
                            require_certificate=require_certificate)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def _tls_broker(tmp_path_factory: pytest.TempPathFactory, tls: MosquittoTls,
                name: str) -> Iterator[LocalMosquitto]:
    # TLS only: no plain listener anywhere on this broker.
    server = LocalMosquitto(name, tmp_path_factory.mktemp(name), free_port(), plain=False,
                            tls=tls)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[LocalMosquitto]:
    """Server certificate for 127.0.0.1, the address every client here dials."""
    yield from _tls_broker(tmp_path_factory, pki.tls("broker", "127.0.0.1"), "mosq-tls")


@pytest.fixture(scope="module")
def other_name_broker(tmp_path_factory: pytest.TempPathFactory,
                      pki: Pki) -> Iterator[LocalMosquitto]:
    """A valid certificate from our CA, but for another host name."""
    yield from _tls_broker(tmp_path_factory, pki.tls("other", "mqtt.other.example"),
                           "mosq-other-name")


@pytest.fixture(scope="module")
def mtls_broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[LocalMosquitto]:
    yield from _tls_broker(
        tmp_path_factory, pki.tls("mtls", "127.0.0.1", require_certificate=True), "mosq-mtls")


def tls_settings(broker: LocalMosquitto, ca_file: Path, **over: object) -> MqttSettings:
    return MqttSettings.model_validate(
        {"host": "127.0.0.1", "port": broker.port, "tls": True, "ca_file": ca_file,
         "client_id": f"t-{secrets.token_hex(4)}", **over})


async def connect_error(mqtt: MqttSettings, timeout: float = 5) -> str | None:
    """None if a client with these settings gets a CONNACK and a round trip through the
    broker; else the error that stopped it (the client never got a session).

    A refusal by the broker in the handshake reaches aiomqtt only as "Operation timed out":
    paho logs the broker's TLS alert (logger "mqtt") and drops the socket. So such a refusal
    is judged by that alert (`broker_refused`), and a short `timeout` keeps those cases fast.
    """
    topic = f"tls-test/{secrets.token_hex(4)}"
    try:
        async with aiomqtt.Client(mqtt.host, mqtt.port, **client_security(mqtt),
                                  identifier=mqtt.client_id, timeout=timeout,
                                  protocol=aiomqtt.ProtocolVersion.V5) as client:
            await client.subscribe(topic, qos=1)
            await client.publish(topic, b"ping", qos=1)
            async with asyncio.timeout(5):
                async for message in client.messages:
                    assert message.payload == b"ping"
                    return None
    except aiomqtt.MqttError as exc:
        return str(exc) or type(exc).__name__
    raise AssertionError("unreachable")


class LogWaiter(logging.Handler):
    """Records log records and wakes a waiter when one matches: the gateway's own reports."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._changed.set()

    async def wait(self, match: Callable[[logging.LogRecord], bool],
                   timeout: float) -> logging.LogRecord:
        async with asyncio.timeout(timeout):
            while True:
                found = next((r for r in self.records if match(r)), None)
                if found:
                    return found
                self._changed.clear()
                await self._changed.wait()


def paho_error(text: str) -> Callable[[logging.LogRecord], bool]:
    """paho's report of a socket the broker closed on us, with `text` in the reason."""
    return lambda r: (r.name == "mqtt" and "failed to receive on socket" in r.getMessage()
                      and text in r.getMessage())


async def broker_refused(mqtt: MqttSettings, logs: LogWaiter, reason: str) -> None:
    """The client never gets a session, and the broker said why (TLS alert or reset)."""
    assert await connect_error(mqtt, timeout=1) is not None
    await logs.wait(paho_error(reason), timeout=10)


@pytest.fixture
def logs() -> Iterator[LogWaiter]:
    handler = LogWaiter()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old_level)


# ---------------------------------------------------------------------------- end to end

@pytest.mark.integration
async def test_session_runs_end_to_end_over_tls(
    tls_broker: LocalMosquitto, influx: LocalInflux, pki: Pki
) -> None:
    """Gateway and boot both on the TLS-only broker: start through the API, telemetry in
    InfluxDB, a vent from the API reaches the boot."""
    base = gateway_settings(tls_broker, influx)
    settings = base.model_copy(update={"mqtt": tls_settings(
        tls_broker, pki.ca_file, client_id=base.mqtt.client_id)})
    async with running_gateway(settings, influx) as gw:
        assert gw.gw.link.settings.tls
        clinic, device = gw.clinic(), "tls-boot"
        boot = SimBoot(clinic, device, tls_settings(tls_broker, pki.ca_file),
                       telemetry_period_s=0.1, seed=11)
        task = asyncio.create_task(boot.run())
        try:
            await boot.wait_until(lambda: boot.connected, timeout=10)
            key = f"{clinic}/{device}"
            await wait_for(lambda: key in gw.gw.fleet.boots and gw.gw.fleet.boots[key].online,
                           10, "the gateway to see the boot online over TLS")
            resp = await gw.api.post(f"/api/v1/boots/{clinic}/{device}/session", json={
                "custom": short_program(duration_s=20.0).model_dump(mode="json")})
            assert resp.status_code == 202, resp.text
            assert resp.json()["outcome"] == "accepted"
            await boot.wait_until(lambda: boot.in_session and boot.telemetry_sent >= 10,
                                  timeout=10)
            await wait_for(lambda: gw.gw.stats.messages["telemetry"] >= 10, 10,
                           "telemetry to reach the gateway")
            await gw.flush()
            stored = gw.count(f"SELECT count(seq) FROM telemetry WHERE device = '{device}' "
                              f"AND clinic = '{clinic}'")
            assert stored >= 10

            resp = await gw.api.post(f"/api/v1/boots/{clinic}/{device}/vent",
                                     json={"reason": "tls test"})
            assert resp.status_code < 300, resp.text
            await boot.wait_for_vent(timeout=10)
        finally:
            await cancel_and_wait([task])


# ---------------------------------------------------------------------------- refusals


@pytest.mark.integration
async def test_broker_with_a_certificate_from_another_ca_is_never_talked_to(
    tls_broker: LocalMosquitto, pki: Pki, logs: LogWaiter
) -> None:
    """A client trusting another CA (here: the broker is the impostor) never connects."""
    wrong = tls_settings(tls_broker, pki.rogue_ca_file)
    error = await connect_error(wrong)
    assert error is not None and "certificate verify failed" in error

    # The gateway's own client reports it and keeps retrying; it never counts as connected.
    link = MqttLink(wrong.model_copy(update={"reconnect_min_s": 0.1}), [], lambda t, p: None)
    task = asyncio.create_task(link.run())
    try:
        record = await logs.wait(
            lambda r: r.getMessage() == "mqtt connection lost"
            and "certificate verify failed" in getattr(r, "error", ""), timeout=10)
        assert record.levelno == logging.WARNING
        assert not link.connected.is_set()
    finally:
        await cancel_and_wait([task])


@pytest.mark.integration
async def test_plain_tcp_client_to_the_tls_port_is_refused(
    tls_broker: LocalMosquitto, logs: LogWaiter
) -> None:
    plain = MqttSettings(host="127.0.0.1", port=tls_broker.port, client_id="plain-probe")
    # The broker reads the MQTT CONNECT as a broken TLS handshake and resets the socket.
    await broker_refused(plain, logs, "Connection reset")


@pytest.mark.integration
async def test_boot_with_the_wrong_ca_stays_offline(
    tls_broker: LocalMosquitto, pki: Pki, logs: LogWaiter
) -> None:
    boot = SimBoot("c-tls", "rogue-ca", tls_settings(tls_broker, pki.rogue_ca_file))
    task = asyncio.create_task(boot.run())
    try:
        await logs.wait(lambda r: r.getMessage() == "mqtt connect failed"
                        and "certificate verify failed" in getattr(r, "error", ""), timeout=10)
        assert not boot.connected and boot.connections == 0
    finally:
        await cancel_and_wait([task])


@pytest.mark.integration
async def test_certificate_for_another_host_is_refused_unless_the_check_is_off(
    other_name_broker: LocalMosquitto, pki: Pki, logs: LogWaiter
) -> None:
    checked = tls_settings(other_name_broker, pki.ca_file)
    error = await connect_error(checked)
    assert error is not None and "mismatch" in error

    unchecked = tls_settings(other_name_broker, pki.ca_file, tls_check_hostname=False)
    assert await connect_error(unchecked) is None
    warning = next(r for r in logs.records if "host-name check is off" in r.getMessage())
    assert warning.levelno == logging.WARNING
    assert warning.broker == f"127.0.0.1:{other_name_broker.port}"

    # Even with the name check off, the chain is still verified.
    rogue = tls_settings(other_name_broker, pki.rogue_ca_file, tls_check_hostname=False)
    rogue_error = await connect_error(rogue)
    assert rogue_error is not None and "certificate verify failed" in rogue_error


@pytest.mark.integration
async def test_mutual_tls_needs_a_client_certificate_from_the_ca(
    mtls_broker: LocalMosquitto, pki: Pki, logs: LogWaiter
) -> None:
    await broker_refused(tls_settings(mtls_broker, pki.ca_file), logs, "certificate required")

    cert, key = pki.issue("boot-client", "boot-7")
    with_cert = tls_settings(mtls_broker, pki.ca_file, cert_file=cert, key_file=key)
    assert await connect_error(with_cert) is None

    rogue_cert, rogue_key = pki.issue("rogue-client", "boot-7", ca=pki.rogue)
    rogue = tls_settings(mtls_broker, pki.ca_file, cert_file=rogue_cert, key_file=rogue_key)
    await broker_refused(rogue, logs, "unknown ca")


@pytest.mark.integration
async def test_simulated_boot_connects_with_a_client_certificate(
    mtls_broker: LocalMosquitto, pki: Pki
) -> None:
    cert, key = pki.issue("sim-client", "sim-c-tls-d1")
    boot = SimBoot("c-tls", "d1", tls_settings(mtls_broker, pki.ca_file, cert_file=cert,
                                               key_file=key), self_vent=False)
    task = asyncio.create_task(boot.run())
    try:
        await boot.wait_until(lambda: boot.connected, timeout=10)
        assert boot.state_publishes >= 1
    finally:
        await cancel_and_wait([task])


# ---------------------------------------------------------------------------- settings


@pytest.mark.parametrize("host", [
    "broker.example", "10.0.0.5", "192.168.1.20", "2001:db8::1", "::ffff:10.0.0.1",
    "localhost.evil.example", "127.0.0.1.nip.io", "0.0.0.0",
])
def test_plain_tcp_to_a_broker_off_loopback_is_refused(host: str) -> None:
    with pytest.raises(ValidationError, match=re.escape("not loopback and mqtt.tls is false")):
        MqttSettings(host=host)
    # Allowed only when said so explicitly.
    assert MqttSettings(host=host, allow_plaintext=True).host == host


@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost", "LocalHost", "::ffff:127.0.0.1",
])
def test_plain_tcp_to_loopback_stays_allowed(host: str) -> None:
    assert is_loopback_host(host)
    assert MqttSettings(host=host).tls is False


def test_the_refusal_stops_the_gateway_at_startup(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("BOOTGW_CONFIG_FILE", str(tmp_path / "none.toml"))
    monkeypatch.setenv("BOOTGW_MQTT__HOST", "mqtt.clinic.example")
    with pytest.raises(ValidationError) as err:
        GatewaySettings()
    assert "mqtt.allow_plaintext=true" in str(err.value)
    monkeypatch.setenv("BOOTGW_MQTT__ALLOW_PLAINTEXT", "true")
    assert GatewaySettings().mqtt.allow_plaintext


def test_tls_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                  pki: Pki) -> None:
    monkeypatch.setenv("BOOTGW_CONFIG_FILE", str(tmp_path / "none.toml"))
    monkeypatch.setenv("BOOTGW_MQTT__HOST", "mqtt.clinic.example")
    monkeypatch.setenv("BOOTGW_MQTT__TLS", "true")
    monkeypatch.setenv("BOOTGW_MQTT__CA_FILE", str(pki.ca_file))
    mqtt = GatewaySettings().mqtt
    assert (mqtt.tls, mqtt.port, mqtt.ca_file) == (True, 8883, pki.ca_file)
    monkeypatch.setenv("BOOTGW_MQTT__PORT", "18883")
    assert GatewaySettings().mqtt.port == 18883


def test_a_misspelt_mqtt_setting_is_an_error_not_a_silent_plaintext_link(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(ValidationError, match="tsl"):
        MqttSettings(tsl=True)  # type: ignore[call-arg]
    monkeypatch.setenv("BOOTGW_CONFIG_FILE", str(tmp_path / "none.toml"))
    monkeypatch.setenv("BOOTGW_MQTT__TSL", "true")
    with pytest.raises(ValidationError, match="tsl"):
        GatewaySettings()


def test_context_is_strict(pki: Pki) -> None:
    ctx = tls_context(MqttSettings(tls=True, ca_file=pki.ca_file))
    assert ctx is not None
    assert ctx.minimum_version >= TLS_MIN_VERSION >= ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert tls_context(MqttSettings()) is None
    # The system trust store when no CA file is given: still verified.
    system = tls_context(MqttSettings(tls=True))
    assert system is not None and system.verify_mode == ssl.CERT_REQUIRED


def test_shared_context_is_built_once_per_configuration(pki: Pki) -> None:
    a = MqttSettings(tls=True, ca_file=pki.ca_file, client_id="a")
    b = MqttSettings(tls=True, ca_file=pki.ca_file, client_id="b")
    assert tls_context(a, shared=True) is tls_context(b, shared=True)
    assert tls_context(a) is not tls_context(a)  # the gateway's: fresh at every connect


def test_allowed_plaintext_off_loopback_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    mqtt = MqttSettings(host="10.0.0.5", allow_plaintext=True, password="s3cret-pw")
    with caplog.at_level(logging.WARNING, logger="gateway.mqtt_tls"):
        security = client_security(mqtt)
    assert security["tls_context"] is None and security["password"] == "s3cret-pw"
    assert any("without TLS" in r.getMessage() for r in caplog.records)
    assert "s3cret-pw" not in caplog.text


def test_client_certificate_needs_both_files(pki: Pki) -> None:
    cert, key = pki.issue("pair", "client")
    with pytest.raises(ValidationError, match=re.escape("cert_file is set without mqtt.key_file")):
        MqttSettings(tls=True, cert_file=cert)
    with pytest.raises(ValidationError, match=re.escape("key_file is set without mqtt.cert_file")):
        MqttSettings(tls=True, key_file=key)
    both = MqttSettings(tls=True, ca_file=pki.ca_file, cert_file=cert, key_file=key)
    assert tls_context(both) is not None


def test_a_combined_pem_may_be_given_as_both(pki: Pki, tmp_path: Path) -> None:
    cert, key = pki.issue("combined", "client")
    combined = tmp_path / "combined.pem"
    combined.write_bytes(cert.read_bytes() + key.read_bytes())
    assert tls_context(MqttSettings(tls=True, cert_file=combined, key_file=combined))


def test_tls_files_without_tls_are_refused(pki: Pki) -> None:
    with pytest.raises(ValidationError, match=re.escape("ca_file is set but mqtt.tls is false")):
        MqttSettings(ca_file=pki.ca_file)


def test_unusable_tls_files_are_refused_at_startup(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="no such file"):
        MqttSettings(tls=True, ca_file=tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValidationError, match="no usable PEM certificate"):
        MqttSettings(tls=True, ca_file=junk)
    cert, _ = pki.issue("mismatch-a", "client")
    _, other_key = pki.issue("mismatch-b", "client")
    with pytest.raises(ValidationError, match="not a certificate and its matching key"):
        MqttSettings(tls=True, cert_file=cert, key_file=other_key)


def test_an_encrypted_key_is_refused_without_prompting(pki: Pki, tmp_path: Path) -> None:
    """OpenSSL would ask for the pass phrase on the terminal: a service would hang."""
    cert, key = pki.issue("encrypted", "client")
    loaded = serialization.load_pem_private_key(key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(loaded.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pass phrase")))
    with pytest.raises(ValidationError, match="is encrypted"):
        MqttSettings(tls=True, cert_file=cert, key_file=encrypted)


def test_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "mqtt-password"
    secret.write_text("Sup3r-secret\n")
    mqtt = MqttSettings(username="gateway", password_file=secret)
    assert client_security(mqtt)["password"] == "Sup3r-secret"
    secret.write_text("rotated-secret")  # re-read at every connect
    assert mqtt_password(mqtt) == "rotated-secret"

    both = re.escape("password and mqtt.password_file are both set")
    with pytest.raises(ValidationError, match=both):
        MqttSettings(password="x", password_file=secret)
    with pytest.raises(ValidationError, match="cannot be read"):
        MqttSettings(password_file=tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValidationError, match="is empty"):
        MqttSettings(password_file=empty)


@pytest.mark.parametrize("env", [
    {"BOOTGW_MQTT__HOST": "mqtt.clinic.example"},  # refused: plaintext off loopback
    {"BOOTGW_MQTT__PASWORD": "Hunter2-secret"},  # refused: misspelt, and holds the secret
    {"BOOTGW_MQTT__PORT": "not-a-port"},
])
def test_a_refused_mqtt_setting_never_echoes_the_password(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """pydantic puts the input into its errors; for the mqtt section that is the password,
    and the error goes to the startup log."""
    monkeypatch.setenv("BOOTGW_CONFIG_FILE", str(tmp_path / "none.toml"))
    monkeypatch.setenv("BOOTGW_MQTT__PASSWORD", "Hunter2-secret")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as err:
        GatewaySettings()
    assert "mqtt" in str(err.value) and "Hunter2" not in str(err.value)
    with pytest.raises(ValidationError) as err:
        MqttSettings(host="mqtt.clinic.example", password="Hunter2-secret")
    assert "Hunter2" not in str(err.value)


def test_password_file_errors_never_show_the_content(tmp_path: Path) -> None:
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfeHunter2-secret")
    with pytest.raises(ValidationError) as err:
        MqttSettings(password_file=binary)
    assert "Hunter2" not in str(err.value) and "cannot be read" in str(err.value)


# ---------------------------------------------------------------------------- simulator CLI


def _cli(*argv: str) -> MqttSettings:
    p = _parser()
    return _mqtt_settings(p, p.parse_args(["run", *argv]))


def test_simulator_cli_tls_flags(pki: Pki) -> None:
    cert, key = pki.issue("cli", "boot")
    mqtt = _cli("--mqtt-host", "mqtt.clinic.example", "--mqtt-tls", "--mqtt-ca",
                str(pki.ca_file), "--mqtt-cert", str(cert), "--mqtt-key", str(key),
                "--mqtt-insecure-skip-hostname-check")
    assert (mqtt.host, mqtt.port, mqtt.tls) == ("mqtt.clinic.example", 8883, True)
    assert (mqtt.ca_file, mqtt.cert_file, mqtt.key_file) == (pki.ca_file, cert, key)
    assert mqtt.tls_check_hostname is False
    # A CA alone means TLS; an explicit port wins.
    implied = _cli("--mqtt-host", "h.example", "--mqtt-ca", str(pki.ca_file),
                   "--mqtt-port", "9883")
    assert (implied.tls, implied.port, implied.tls_check_hostname) == (True, 9883, True)
    assert _cli().port == 1883 and not _cli().tls


def test_simulator_cli_refuses_plaintext_off_loopback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        sim_main(["run", "--mqtt-host", "mqtt.clinic.example"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "not loopback" in err and "allow_plaintext" in err
    plain = _cli("--mqtt-host", "mqtt.clinic.example", "--mqtt-allow-plaintext")
    assert plain.allow_plaintext and not plain.tls
