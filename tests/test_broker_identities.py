"""One identity per boot, enforced by a real Mosquitto 2.0 with the dynamic-security plugin.

Written from the attacker's side: boots A (clinic 1) and B (clinic 2) are provisioned with the
provisioning command (`gateway.provision.run`, the code behind `boot-gateway boots add`), then B
tries everything a compromised boot would: forge A's messages, publish under A's clinic,
forge the gateway's heartbeat or a command, read A's commands or the whole fleet, take A's
client id (the takeover that disconnected A, fired its Last Will and made it vent).

"Cannot publish" is seen by an observer that may read everything: the forbidden message is
followed by an allowed control message from the same connection, and the check waits for the
control, so the forbidden one, had it been accepted, would have arrived first (per-connection
order at the same QoS). Nothing passes by timing out. The matrix (who, what, expected, seen) is
printed with the failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import io
import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest

from device_sim.boot import SimBoot
from device_sim.local_stack import LocalInflux, LocalMosquitto, dynsec_conf, free_port
from gateway import provision
from gateway.aio import cancel_and_wait
from gateway.boot_credentials import BootCredentials, load_credentials
from gateway.broker_admin import BrokerAdmin, BrokerAdminError
from gateway.contract import (
    HEARTBEAT_TOPIC,
    BootState,
    Channel,
    CommandKind,
    clinic_heartbeat_topic,
    topic,
)
from gateway.settings import BrokerAdminSettings, GatewaySettings, InfluxSettings, MqttSettings
from tests.helpers import gateway_settings, running_gateway, short_program, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 5.0  # every wait is bounded by this (or a multiple)
OBSERVER = "test-observer"
GATEWAY_USER = "boot-gateway"
GATEWAY_CLIENT_ID = "gw-identity-test"


@dataclass
class DynsecBroker:
    server: LocalMosquitto
    settings: GatewaySettings  # the provisioning side: broker, admin, InfluxDB for the audit
    gateway_password: str
    observer_password: str
    workdir: Path

    @property
    def port(self) -> int:
        return self.server.port

    def gateway_mqtt(self, **over: object) -> MqttSettings:
        fields = {"host": "127.0.0.1", "port": self.port, "username": GATEWAY_USER,
                  "password": self.gateway_password, "client_id": GATEWAY_CLIENT_ID, **over}
        return MqttSettings.model_validate(fields)


def _create_database(influx: LocalInflux, db: str) -> None:
    import httpx

    httpx.post(f"{influx.url}/query", params={"q": f'CREATE DATABASE "{db}"'}, timeout=10)


@pytest.fixture(scope="module")
def dynsec(tmp_path_factory: pytest.TempPathFactory, influx: LocalInflux
           ) -> Iterator[DynsecBroker]:
    """A broker whose accounts and ACLs are the plugin's, its file made by `broker init`."""
    work = tmp_path_factory.mktemp("dynsec")
    port = free_port()
    db = f"audit_{secrets.token_hex(4)}"
    _create_database(influx, db)
    settings = GatewaySettings(
        mqtt=MqttSettings(host="127.0.0.1", port=port, username=GATEWAY_USER,
                          client_id=GATEWAY_CLIENT_ID),
        broker_admin=BrokerAdminSettings(password_file=work / "admin.pw", timeout_s=WAIT_S),
        influx=InfluxSettings(url=influx.url, database=db),
    )
    err = io.StringIO()
    rc = asyncio.run(provision.run(
        ["broker", "init", str(work / "dynsec.json"), "--gateway-password-file",
         str(work / "gateway.pw")], settings, stderr=err))
    assert rc == 0, err.getvalue()
    for name in ("dynsec.json", "admin.pw", "gateway.pw"):
        assert (work / name).stat().st_mode & 0o777 == 0o600, name
    server = LocalMosquitto("mosquitto-dynsec", work, port, allow_anonymous=False,
                            extra_conf=dynsec_conf(work / "dynsec.json"))
    server.start()
    observer_pw = secrets.token_urlsafe(24)

    async def add_observer() -> None:
        # Test-only: an identity that may read every topic, to see what got through.
        async with BrokerAdmin.from_settings(settings) as admin:
            await admin.command(
                {"command": "createRole", "rolename": OBSERVER, "acls": [
                    {"acltype": t, "topic": "#", "allow": True}
                    for t in ("subscribePattern", "publishClientReceive", "unsubscribePattern")]},
                {"command": "createClient", "username": OBSERVER, "password": observer_pw,
                 "clientid": OBSERVER, "roles": [{"rolename": OBSERVER}]})

    asyncio.run(add_observer())
    try:
        yield DynsecBroker(server, settings, (work / "gateway.pw").read_text().strip(),
                           observer_pw, work)
    finally:
        server.stop()


async def provision_boot(d: DynsecBroker, clinic: str, device: str, *extra: str
                         ) -> BootCredentials:
    """`boot-gateway boots add`, the credentials through --credentials-out."""
    creds_file = d.workdir / f"creds-{secrets.token_hex(4)}.json"
    out, err = io.StringIO(), io.StringIO()
    rc = await provision.run(["boots", "add", clinic, device, "--credentials-out",
                              str(creds_file), "--actor", "test-ops", *extra], d.settings,
                             stdout=out, stderr=err)
    assert rc == 0, err.getvalue()
    assert out.getvalue() == "", "the password went to a file: nothing on stdout"
    assert creds_file.stat().st_mode & 0o777 == 0o600
    return load_credentials(creds_file)[f"{clinic}/{device}"]


# ---------------------------------------------------------------- raw MQTT clients


def _client(d: DynsecBroker, client_id: str, username: str | None, password: str | None,
            will: aiomqtt.Will | None = None) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", d.port, identifier=client_id, username=username,
                          password=password, protocol=aiomqtt.ProtocolVersion.V5, will=will,
                          timeout=WAIT_S)


@dataclass
class Session:
    """A connected raw client and everything it received, in order."""

    name: str
    client: aiomqtt.Client
    received: list[aiomqtt.Message] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        try:
            async for message in self.client.messages:
                self.received.append(message)
                self._arrived.set()
        except aiomqtt.MqttError:
            pass
        finally:
            self.closed.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._read())

    def payloads(self, topic_name: str) -> list[bytes]:
        return [bytes(m.payload) for m in self.received  # type: ignore[arg-type]
                if m.topic.value == topic_name]

    def has(self, topic_name: str, payload: bytes) -> bool:
        return payload in self.payloads(topic_name)

    async def wait_for(self, topic_name: str, payload: bytes, timeout: float = WAIT_S) -> None:
        async with asyncio.timeout(timeout):
            while not self.has(topic_name, payload):
                self._arrived.clear()
                await self._arrived.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@contextlib.asynccontextmanager
async def connected(d: DynsecBroker, name: str, client_id: str, username: str | None,
                    password: str | None, will: aiomqtt.Will | None = None
                    ) -> AsyncIterator[Session]:
    client = _client(d, client_id, username, password, will)
    async with client:
        s = Session(name, client)
        s.start()
        try:
            yield s
        finally:
            await s.stop()


async def connect_refused(d: DynsecBroker, client_id: str, username: str | None,
                          password: str | None) -> str:
    """'refused (reason)' or 'CONNECTED' for a connect that must fail."""
    try:
        async with _client(d, client_id, username, password):
            return "CONNECTED"
    except aiomqtt.MqttCodeError as exc:
        return f"refused ({exc.rc})"
    except aiomqtt.MqttError as exc:
        return f"refused ({exc})"


def marker() -> bytes:
    return json.dumps({"marker": secrets.token_hex(6)}).encode()


def online_state(boot_ts: float = 1.0, online: bool = True) -> bytes:
    return BootState(online=online, firmware="t", chambers=4,
                     zones=["foot", "calf", "knee", "thigh"], max_pressure_mmhg=120,
                     telemetry_period_s=0.5, ts=boot_ts).to_payload()


class Matrix:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, who: str, what: str, expected: str, seen: str) -> None:
        self.rows.append((who, what, expected, seen))

    def failures(self) -> list[tuple[str, str, str, str]]:
        return [r for r in self.rows if not r[3].startswith(r[2])]

    def table(self) -> str:
        widths = [max(len(r[i]) for r in [("who", "what", "expected", "seen"), *self.rows])
                  for i in range(4)]
        lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                 for r in [("who", "what", "expected", "seen"), *self.rows]]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        return "\n".join(lines)


# ---------------------------------------------------------------- the matrix


async def test_impersonation_matrix(dynsec: DynsecBroker) -> None:
    run = secrets.token_hex(3)
    c1, c2 = f"c1-{run}", f"c2-{run}"
    dev_a, dev_b, dev_c = f"a-{run}", f"b-{run}", f"c-{run}"
    a = await provision_boot(dynsec, c1, dev_a)
    b = await provision_boot(dynsec, c2, dev_b)
    c = await provision_boot(dynsec, c2, dev_c)
    assert (a.username, a.client_id) == (dev_a, f"boot-{c1}-{dev_a}")
    m = Matrix()
    t_a = {ch: topic(c1, dev_a, ch) for ch in Channel}
    t_b = {ch: topic(c2, dev_b, ch) for ch in Channel}
    will_a = aiomqtt.Will(t_a[Channel.STATE], online_state(online=False), qos=1, retain=True)
    will_c = aiomqtt.Will(topic(c2, dev_c, Channel.STATE), online_state(online=False), qos=1,
                          retain=True)

    try:
        async with contextlib.AsyncExitStack() as stack:
            obs = await stack.enter_async_context(
                connected(dynsec, "observer", OBSERVER, OBSERVER, dynsec.observer_password))
            await obs.client.subscribe("boots/v1/#", qos=1)
            gw = await stack.enter_async_context(connected(
                dynsec, "gateway", GATEWAY_CLIENT_ID, GATEWAY_USER, dynsec.gateway_password))
            sa = await stack.enter_async_context(
                connected(dynsec, "A", a.client_id, a.username, a.password, will_a))
            sb = await stack.enter_async_context(
                connected(dynsec, "B", b.client_id, b.username, b.password))
            for s, own, clinic in ((sa, t_a, c1), (sb, t_b, c2)):
                granted = await s.client.subscribe(own[Channel.CMD], qos=1)
                m.add(s.name, "subscribe own cmd", "granted",
                      "refused" if granted[0].is_failure else "granted")
                granted = await s.client.subscribe(HEARTBEAT_TOPIC, qos=1)
                m.add(s.name, "subscribe heartbeat", "granted",
                      "refused" if granted[0].is_failure else "granted")
                granted = await s.client.subscribe(clinic_heartbeat_topic(clinic), qos=1)
                m.add(s.name, "subscribe its clinic's heartbeat", "granted",
                      "refused" if granted[0].is_failure else "granted")
            state_a = online_state()
            await sa.client.publish(t_a[Channel.STATE], state_a, qos=1, retain=True)
            await obs.wait_for(t_a[Channel.STATE], state_a)
            m.add("A", "publish own state (retained)", "delivered", "delivered")

            # -- B publishes where it must not; B's own telemetry right after is the control.
            forbidden = [
                (f"A's {ch.value}", t_a[ch]) for ch in
                (Channel.STATE, Channel.TELEMETRY, Channel.EVENT, Channel.ACK)
            ] + [
                ("own device id under clinic 1 (state)", topic(c1, dev_b, Channel.STATE)),
                ("own device id under clinic 1 (telemetry)", topic(c1, dev_b, Channel.TELEMETRY)),
                ("the gateway heartbeat", HEARTBEAT_TOPIC),
                ("its clinic's heartbeat", clinic_heartbeat_topic(c2)),
                ("an alarm under _gateway/", f"boots/v1/_gateway/alarm/{c1}/{dev_a}"),
                ("anything under _gateway/", "boots/v1/_gateway/other"),
                ("A's cmd", t_a[Channel.CMD]),
                ("its own cmd", t_b[Channel.CMD]),
                ("outside boots/v1", f"other/{dev_a}"),
            ]
            for what, name in forbidden:
                bad, ctl = marker(), marker()
                await sb.client.publish(name, bad, qos=1)
                await sb.client.publish(t_b[Channel.TELEMETRY], ctl, qos=1)
                try:
                    await obs.wait_for(t_b[Channel.TELEMETRY], ctl)
                    seen = "DELIVERED" if obs.has(name, bad) else "dropped"
                except TimeoutError:
                    seen = "no control message (inconclusive)"
                m.add("B", f"publish on {what}: {name}", "dropped", seen)
            m.add("B", "publish own telemetry (the control)", "delivered",
                  "delivered" if obs.payloads(t_b[Channel.TELEMETRY]) else "missing")

            # -- B tries the admin's control topic: create an account for itself.
            evil = f"evil-{run}"
            await sb.client.publish("$CONTROL/dynamic-security/v1", json.dumps({"commands": [{
                "command": "createClient", "username": evil, "password": "x" * 20}]}), qos=1)
            await sb.client.publish(t_b[Channel.TELEMETRY], ctl := marker(), qos=1)
            await obs.wait_for(t_b[Channel.TELEMETRY], ctl)
            async with BrokerAdmin.from_settings(dynsec.settings) as admin:
                found = await admin._get_client(evil)
            m.add("B", "createClient on $CONTROL", "no account", "no account" if found is None
                  else "ACCOUNT CREATED")

            # -- B subscribes where it must not; the gateway's commands tell what got through.
            for what, filt in (("A's cmd", t_a[Channel.CMD]), ("boots/v1/#", "boots/v1/#"),
                               ("every cmd", "boots/v1/+/+/cmd"), ("#", "#"),
                               ("A's telemetry", t_a[Channel.TELEMETRY]),
                               ("_gateway/#", "boots/v1/_gateway/#")):
                granted = await sb.client.subscribe(filt, qos=1)
                m.add("B", f"subscribe {what}", "refused",
                      "refused" if granted[0].is_failure else "GRANTED")
            cmd_a, ctl_b = marker(), marker()
            await gw.client.publish(t_a[Channel.CMD], cmd_a, qos=1)
            await gw.client.publish(t_b[Channel.CMD], ctl_b, qos=1)
            await sa.wait_for(t_a[Channel.CMD], cmd_a)
            m.add("A", "receive own cmd from the gateway", "delivered", "delivered")
            await sb.wait_for(t_b[Channel.CMD], ctl_b)
            m.add("B", "receive A's cmd", "nothing",
                  "nothing" if not sb.payloads(t_a[Channel.CMD]) else "RECEIVED")
            tel_a = marker()
            await sa.client.publish(t_a[Channel.TELEMETRY], tel_a, qos=1)
            await obs.wait_for(t_a[Channel.TELEMETRY], tel_a)
            await gw.client.publish(t_b[Channel.CMD], ctl_b := marker(), qos=1)
            await sb.wait_for(t_b[Channel.CMD], ctl_b)
            leaked = [x.topic.value for x in sb.received
                      if not x.topic.value.startswith(t_b[Channel.CMD]) and x.topic.value
                      != HEARTBEAT_TOPIC]
            m.add("B", "receive anything not its own cmd or the heartbeat", "nothing",
                  "nothing" if not leaked else f"RECEIVED {leaked[:3]}")

            # -- the heartbeat: the gateway writes it, boots read it.
            hb = marker()
            await gw.client.publish(HEARTBEAT_TOPIC, hb, qos=1)
            await sb.wait_for(HEARTBEAT_TOPIC, hb)
            m.add("gateway", "publish heartbeat, B receives it", "delivered", "delivered")

            # -- the takeover: another identity with A's client id.
            for what, args in (
                ("B's credentials + A's client id", (a.client_id, b.username, b.password)),
                ("A's username + B's password + A's client id", (a.client_id, a.username,
                                                                 b.password)),
                ("anonymous + A's client id", (a.client_id, None, None)),
                ("B's credentials + the gateway's client id", (GATEWAY_CLIENT_ID, b.username,
                                                              b.password)),
                ("A's credentials + another client id", (f"evil-{run}", a.username, a.password)),
                ("A's username, wrong password", (a.client_id, a.username, "wrong" * 5)),
                ("unknown username", (f"x-{run}", f"x-{run}", "x" * 20)),
                ("anonymous", (f"anon-{run}", None, None)),
            ):
                m.add("attacker", f"connect: {what}", "refused",
                      await connect_refused(dynsec, *args))
            try:
                await sa.client.publish(t_a[Channel.TELEMETRY], ctl := marker(), qos=1)
                await obs.wait_for(t_a[Channel.TELEMETRY], ctl)
                alive = "no (closed)" if sa.closed.is_set() else "yes"
            except (aiomqtt.MqttError, TimeoutError) as exc:
                alive = f"NO, DISPLACED ({exc})"
            m.add("A", "still connected after the attempts", "yes", alive)
            lwt = [p for p in obs.payloads(t_a[Channel.STATE])
                   if p and json.loads(p).get("online") is False]
            m.add("A", "Last Will fired", "no", "YES" if lwt else "no")
            await gw.client.publish(t_a[Channel.CMD], ctl := marker(), qos=1)
            try:
                await sa.wait_for(t_a[Channel.CMD], ctl)
                m.add("A", "still receives its commands", "yes", "yes")
            except TimeoutError:
                m.add("A", "still receives its commands", "yes", "NO")

            # -- removal: C connected, then `boots remove`.
            sc = await stack.enter_async_context(
                connected(dynsec, "C", c.client_id, c.username, c.password, will_c))
            state_c = online_state()
            t_c = topic(c2, dev_c, Channel.STATE)
            await sc.client.publish(t_c, state_c, qos=1, retain=True)
            await obs.wait_for(t_c, state_c)
            err = io.StringIO()
            rc = await provision.run(["boots", "remove", c2, dev_c, "--actor", "test-ops"],
                                     dynsec.settings, stderr=err)
            m.add("ops", "boots remove C", "exit 0", f"exit {rc} {err.getvalue().strip()[:60]}")
            try:
                async with asyncio.timeout(WAIT_S):
                    await sc.closed.wait()
                m.add("C", "disconnected by the removal", "yes", "yes")
            except TimeoutError:
                m.add("C", "disconnected by the removal", "yes", "STILL CONNECTED")
            m.add("C", "reconnect after removal", "refused",
                  await connect_refused(dynsec, c.client_id, c.username, c.password))

        # A fresh subscriber gets retained messages in filter order: A's state (still retained)
        # arrives after C's would have.
        async with connected(dynsec, "observer2", OBSERVER, OBSERVER,
                             dynsec.observer_password) as fresh:
            await fresh.client.subscribe([(t_c, 1), (t_a[Channel.STATE], 1)])
            try:
                await fresh.wait_for(t_a[Channel.STATE], state_a)
                retained_c = [p for p in fresh.payloads(t_c) if p]
                m.add("C", "retained state after removal", "gone",
                      "gone" if not retained_c else f"STILL THERE {retained_c[0][:40]!r}")
            except TimeoutError:
                m.add("C", "retained state after removal", "gone", "A's retained state missing")
    except Exception as exc:  # a broken identity breaks the test's own connections: still
        # show what was seen up to there
        m.add("test", "ran to the end", "yes", f"ABORTED: {exc!r}"[:120])

    print("\n" + m.table())
    assert not m.failures(), "broker identity matrix:\n" + m.table()


# ---------------------------------------------------------------- provisioning rules


async def test_provisioning_refuses_collisions_and_writes_the_audit_trail(
    dynsec: DynsecBroker, influx: LocalInflux,
) -> None:
    run = secrets.token_hex(3)
    c1, c2 = f"p1-{run}", f"p2-{run}"
    dev = f"d-{run}"
    first = await provision_boot(dynsec, c1, dev)

    async def cli(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        rc = await provision.run(list(argv), dynsec.settings, stdout=out, stderr=err,
                                 stdin=io.StringIO("short\n"))
        return rc, out.getvalue(), err.getvalue()

    refusals = {
        "same device id, other clinic": ("boots", "add", c2, dev),
        "same device id, same clinic": ("boots", "add", c1, dev),
        "the gateway's username": ("boots", "add", c2, GATEWAY_USER),
        "the gateway's client id": ("boots", "add", c2, GATEWAY_CLIENT_ID),
        "the admin's username": ("boots", "add", c2, "bootgw-admin"),
        "another account's username (observer)": ("boots", "add", c2, OBSERVER),
        "a client id bound to another boot": ("boots", "add", c2, f"e-{run}", "--client-id",
                                              first.client_id or ""),
        "a client id that is another account's username": (
            "boots", "add", c2, f"f-{run}", "--client-id", OBSERVER),
        "the reserved clinic": ("boots", "add", "_gateway", f"g-{run}"),
        "a bad device id": ("boots", "add", c2, "a/b"),
        "a short given password": ("boots", "add", c2, f"h-{run}", "--password-stdin"),
        "removal under the wrong clinic": ("boots", "remove", c2, dev),
        "removal of an unknown boot": ("boots", "remove", c2, f"nobody-{run}"),
        "removal of a non-boot account": ("boots", "remove", c2, GATEWAY_USER),
    }
    for what, argv in refusals.items():
        rc, out, err = await cli(*argv)
        assert rc == provision.REFUSED and err.startswith("refused: "), (what, rc, err)
        assert out == "", (what, "no password printed for a refused add")

    # Nothing changed: the first boot still logs in, the refused ones have no account.
    async with connected(dynsec, "first", first.client_id or "", first.username,
                         first.password):
        pass
    rc, out, _ = await cli("boots", "list", "--json")
    listed = {(b["clinic"], b["device"]): b for b in json.loads(out)}
    assert (c1, dev) in listed and listed[(c1, dev)]["client_id"] == first.client_id
    assert not [k for k in listed if k[0] == c2], "a refused add left an account"
    rc, out, _ = await cli("boots", "list", "--clinic", c1)
    assert out.splitlines()[1:] == [f"{c1}\t{dev}\t{first.client_id}"]

    # A generated password is printed on stdout, alone, once.
    rc, out, err = await cli("boots", "add", c2, f"p-{run}", "--actor", "test-ops")
    assert rc == 0, err
    password = out.strip()
    assert len(password) >= 32 and "\n" not in password and password not in err
    async with connected(dynsec, "printed", f"boot-{c2}-p-{run}", f"p-{run}", password):
        pass

    # The audit trail in InfluxDB: done and refused adds, with the actor and role.
    db = dynsec.settings.influx.database
    rows = influx.query(db, f"SELECT detail, actor, role, action, result, device FROM audit "
                        f"WHERE clinic = '{c1}' OR clinic = '{c2}'")
    records = {tuple(v[2:7]) for v in rows[0]["values"]} if rows else set()
    assert ("test-ops", "ops", "boot_add", "done", dev) in records
    # Without --actor the actor is the OS user.
    assert (getpass.getuser(), "ops", "boot_add", "refused", dev) in records
    assert any(r[2:4] == ("boot_remove", "refused") for r in records)


async def test_audit_survives_an_unreachable_influxdb(dynsec: DynsecBroker,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """InfluxDB down: the add is done, the record is in the log, the failure is a warning."""
    dead = InfluxSettings(url=f"http://127.0.0.1:{free_port()}", database="audit")
    settings = dynsec.settings.model_copy(update={"influx": dead})
    out, err = io.StringIO(), io.StringIO()
    device = f"q-{secrets.token_hex(3)}"
    with caplog.at_level("DEBUG"):
        rc = await provision.run(["boots", "add", "cq", device, "--actor", "test-ops"],
                                 settings, stdout=out, stderr=err)
    assert rc == 0, err.getvalue()
    audit = [r for r in caplog.records if r.name == "gateway.audit"]
    assert [(r.action, r.result, r.device) for r in audit] == [("boot_add", "done", device)]
    assert any(r.getMessage() == "audit record not stored in InfluxDB" for r in caplog.records)
    password = out.getvalue().strip()
    assert len(password) >= 32
    leaks = [r.getMessage() for r in caplog.records
             if any(password in str(v) for v in vars(r).values())]
    assert not leaks, f"the password is in a log record: {leaks}"


async def test_remove_reports_a_state_clear_the_broker_refused(dynsec: DynsecBroker) -> None:
    """An admin role without the right to clear states (a file from `mosquitto_ctrl dynsec
    init`): the broker drops the empty retained message, and `remove` must say so (exit 3),
    not report a boot gone that the gateway still shows."""
    run = secrets.token_hex(3)
    await provision_boot(dynsec, f"r-{run}", f"r-{run}")
    acl = {"rolename": "bootgw-admin", "acltype": "publishClientSend",
           "topic": "boots/v1/+/+/state"}

    async def change_own_role(command: dict[str, object]) -> None:
        # The broker kicks every holder of a role whose ACL list changes: the admin itself,
        # maybe before the answer; the next connection sees whether it was done.
        with contextlib.suppress(BrokerAdminError):
            async with BrokerAdmin.from_settings(dynsec.settings) as admin:
                await admin.command(command)

    await change_own_role({"command": "removeRoleACL", **acl})
    try:
        err = io.StringIO()
        rc = await provision.run(["boots", "remove", f"r-{run}", f"r-{run}", "--actor",
                                  "test-ops"], dynsec.settings, stderr=err)
        assert rc == provision.FAILED, err.getvalue()
        assert "refused to clear its retained state" in err.getvalue()
    finally:
        await change_own_role({"command": "addRoleACL", **acl, "priority": 0, "allow": True})
        async with BrokerAdmin.from_settings(dynsec.settings) as admin:
            role = (await admin.command({"command": "getRole", "rolename": "bootgw-admin"}))[0]
        assert acl["topic"] in {a["topic"] for a in role["data"]["role"]["acls"]}


async def test_unreachable_broker_fails_with_exit_3_and_a_failed_audit_record(
    dynsec: DynsecBroker, caplog: pytest.LogCaptureFixture,
) -> None:
    nowhere = dynsec.settings.mqtt.model_copy(update={"port": free_port()})
    settings = dynsec.settings.model_copy(update={"mqtt": nowhere})
    out, err = io.StringIO(), io.StringIO()
    with caplog.at_level("INFO"):
        rc = await provision.run(["boots", "add", "cu", "du", "--actor", "test-ops"], settings,
                                 stdout=out, stderr=err)
    assert rc == provision.FAILED and "not reachable" in err.getvalue(), err.getvalue()
    assert out.getvalue() == ""
    audit = [(r.action, r.result) for r in caplog.records if r.name == "gateway.audit"]
    assert audit == [("boot_add", "failed")]


# ---------------------------------------------------------------- the gateway's own identity


async def test_gateway_with_its_identity_runs_sessions_with_provisioned_boots(
    dynsec: DynsecBroker, influx: LocalInflux,
) -> None:
    """End to end on the locked-down broker: the gateway connects as itself (subscribing to
    what its ACL allows), two simulated boots with their own accounts run a session started
    through the API, telemetry is stored, a vent reaches the boot."""
    run = secrets.token_hex(3)
    clinic = f"e-{run}"
    creds = {f"{clinic}/{d}": await provision_boot(dynsec, clinic, d)
             for d in (f"x-{run}", f"y-{run}")}
    base = gateway_settings(dynsec.server, influx)
    settings = base.model_copy(update={"mqtt": dynsec.gateway_mqtt()})
    boot_mqtt = MqttSettings(host="127.0.0.1", port=dynsec.port)
    boots = [SimBoot(clinic, key.split("/")[1], boot_mqtt, telemetry_period_s=0.2,
                     telemetry_qos=1, username=c.username, password=c.password,
                     client_id=c.client_id) for key, c in creds.items()]
    async with running_gateway(settings, influx, clinic_prefix=clinic) as gw:
        tasks = [asyncio.create_task(b.run()) for b in boots]
        try:
            for b in boots:
                await b.wait_connected(WAIT_S)
            await wait_for(lambda: all(b.key in gw.gw.fleet.boots for b in boots), WAIT_S,
                           "the gateway to see both boots")
            for b in boots:
                resp = await gw.api.post(f"/api/v1/boots/{b.clinic}/{b.device}/session",
                                         json={"custom": short_program(duration_s=30)
                                               .model_dump(mode="json")})
                assert resp.status_code == 202, resp.text
                await b.wait_for_command(CommandKind.START, WAIT_S)
            await boots[0].wait_until(lambda: boots[0].telemetry_sent >= 5, WAIT_S)
            resp = await gw.api.post(f"/api/v1/boots/{clinic}/{boots[0].device}/vent",
                                     json={"reason": "identity test"})
            assert resp.status_code == 200, resp.text
            await boots[0].wait_for_vent(WAIT_S)
            await gw.flush()
            stored = gw.count(f"SELECT count(seq) FROM telemetry WHERE clinic = '{clinic}' "
                              f"AND device = '{boots[0].device}'")
            assert stored >= 5
            assert all(b.connections == 1 for b in boots), "a boot was displaced"
        finally:
            await cancel_and_wait(tasks)


async def test_gateway_refused_its_subscriptions_sends_no_heartbeat(
    dynsec: DynsecBroker, influx: LocalInflux, caplog: pytest.LogCaptureFixture,
) -> None:
    """A gateway whose account may not read the boots (here: one boot's account) must not
    run as if it could: no connection, so no heartbeat, and the boots vent by themselves.
    Before, the refused SUBACK went unnoticed and the blind gateway kept the heartbeat up."""
    run = secrets.token_hex(3)
    wrong = await provision_boot(dynsec, f"w-{run}", f"w-{run}")
    base = gateway_settings(dynsec.server, influx)
    mqtt = dynsec.gateway_mqtt(username=wrong.username, password=wrong.password,
                               client_id=wrong.client_id, reconnect_min_s=5.0)
    settings = base.model_copy(update={"mqtt": mqtt})
    from gateway.service import Gateway

    gw = Gateway(settings)
    task = asyncio.create_task(gw.link.run())
    try:
        await wait_for(lambda: any(r.getMessage().startswith("mqtt subscription refused")
                                   for r in caplog.records), WAIT_S, "the refusal logged")
        assert not gw.link.connected.is_set()
    finally:
        await cancel_and_wait([task])


# ---------------------------------------------------------------- the real commands


def _env(d: DynsecBroker) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOTGW_")}
    env.update({
        "BOOTGW_CONFIG_FILE": str(d.workdir / "none.toml"),
        "BOOTGW_MQTT__HOST": "127.0.0.1", "BOOTGW_MQTT__PORT": str(d.port),
        "BOOTGW_MQTT__USERNAME": GATEWAY_USER, "BOOTGW_MQTT__CLIENT_ID": GATEWAY_CLIENT_ID,
        "BOOTGW_BROKER_ADMIN__PASSWORD_FILE": str(d.workdir / "admin.pw"),
        "BOOTGW_INFLUX__URL": d.settings.influx.url,
        "BOOTGW_INFLUX__DATABASE": d.settings.influx.database,
        "BOOTGW_LOG_FORMAT": "text", "PYTHONPATH": str(ROOT),
    })
    return env


async def test_boot_gateway_command_and_simulator_cli_with_credentials(
    dynsec: DynsecBroker, tmp_path: Path,
) -> None:
    """`python -m gateway boots add ... --credentials-out F` (settings from the environment,
    as an operator runs it) and `python -m device_sim run --credentials F`: the simulator's
    boots connect as themselves and announce their state."""
    run = secrets.token_hex(3)
    clinic = f"s-{run}"
    creds = tmp_path / "creds.json"
    env = _env(dynsec)
    proc = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "gateway", "boots", "add", clinic, f"m-{run}", "--actor",
        "test-ops", "--credentials-out", str(creds)],
        env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    err = io.StringIO()  # the second one in-process, appended to the same file
    rc = await provision.run(["boots", "add", clinic, f"n-{run}", "--actor", "test-ops",
                              "--credentials-out", str(creds)], dynsec.settings, stderr=err)
    assert rc == 0, err.getvalue()
    assert sorted(load_credentials(creds)) == [f"{clinic}/m-{run}", f"{clinic}/n-{run}"]

    def onlines(obs: Session, device: str) -> list[bool]:
        return [BootState.model_validate_json(p).online
                for p in obs.payloads(topic(clinic, device, Channel.STATE)) if p]

    devices = (f"m-{run}", f"n-{run}")
    async with connected(dynsec, "observer3", OBSERVER, OBSERVER,
                         dynsec.observer_password) as obs:
        await obs.client.subscribe(f"boots/v1/{clinic}/+/state", qos=1)
        sim = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "device_sim", "run", "--credentials", str(creds),
            "--mqtt-port", str(dynsec.port), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            await wait_for(lambda: all(True in onlines(obs, d) for d in devices), 4 * WAIT_S,
                           "both simulated boots online")
            sim.terminate()  # SIGTERM: the fleet goes offline cleanly and the CLI exits 0
            async with asyncio.timeout(4 * WAIT_S):
                output, _ = await sim.communicate()
        finally:
            if sim.returncode is None:
                sim.kill()
                await sim.wait()
        assert sim.returncode == 0, output.decode()[-2000:]
        assert b"mqtt connect failed" not in output, output.decode()[-800:]
        for device in devices:  # connected as itself, its retained online=false on the way out
            await wait_for(lambda d=device: onlines(obs, d)[-1:] == [False], WAIT_S,
                           f"{device} offline")


# ---------------------------------------------------------------- over TLS


async def test_provisioning_over_tls_to_a_tls_only_broker(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The admin connects with the gateway's TLS settings (docs/deploy.md §2.1): the boot's
    password never crosses a plain connection, and there is none to fall back to here."""
    from device_sim.local_stack import MosquittoTls
    from tests.test_mqtt_tls import Pki

    work = tmp_path_factory.mktemp("dynsec-tls")
    pki = Pki(work)
    cert, key = pki.issue("broker", "127.0.0.1")
    port = free_port()
    tls_mqtt = {"host": "127.0.0.1", "port": port, "tls": True, "ca_file": pki.ca_file,
                "username": GATEWAY_USER, "client_id": GATEWAY_CLIENT_ID}
    settings = GatewaySettings(
        mqtt=MqttSettings.model_validate(tls_mqtt),
        broker_admin=BrokerAdminSettings(password_file=work / "admin.pw", timeout_s=WAIT_S),
        influx=InfluxSettings(url=f"http://127.0.0.1:{free_port()}"),  # none: best effort
    )
    err = io.StringIO()
    rc = await provision.run(["broker", "init", str(work / "dynsec.json"),
                              "--gateway-password-file", str(work / "gw.pw")], settings,
                             stderr=err)
    assert rc == 0, err.getvalue()
    server = LocalMosquitto("mosq-dynsec-tls", work, port, allow_anonymous=False, plain=False,
                            tls=MosquittoTls(pki.ca_file, cert, key),
                            extra_conf=dynsec_conf(work / "dynsec.json"))
    server.start()
    try:
        out = io.StringIO()
        rc = await provision.run(["boots", "add", "tls-c", "tls-d", "--actor", "test-ops"],
                                 settings, stdout=out, stderr=err)
        assert rc == 0, err.getvalue()
        boot_mqtt = MqttSettings.model_validate({**tls_mqtt, "username": None})
        boot = SimBoot("tls-c", "tls-d", boot_mqtt, password=out.getvalue().strip(),
                       client_id="boot-tls-c-tls-d", self_vent=False)
        task = asyncio.create_task(boot.run())
        try:
            await boot.wait_connected(WAIT_S)
        finally:
            await cancel_and_wait([task])
        plain = settings.model_copy(update={
            "mqtt": MqttSettings(host="127.0.0.1", port=port, username=GATEWAY_USER,
                                 client_id=GATEWAY_CLIENT_ID),
            "broker_admin": settings.broker_admin.model_copy(update={"timeout_s": 1.0})})
        rc = await provision.run(["boots", "list"], plain, stdout=io.StringIO(), stderr=err)
        assert rc == provision.FAILED  # a TLS port does not speak plain MQTT
    finally:
        server.stop()
