"""One identity per boot, enforced by the broker: Mosquitto's dynamic-security plugin.

The broker, not the gateway, decides who may publish what (docs/deploy.md §2.2-2.3). Each boot
is a dynamic-security *client* whose username is its device id (fleet-unique, protocol §3.2),
whose client id is bound to that username (so nobody else can take the boot's client id and
displace its connection, which would fire its Last Will and make it vent), and whose own *role*
allows exactly its five topics: publish `state` (its Last Will included), `telemetry`, `event`,
`ack` under its own clinic and device; subscribe to and receive its own `cmd`. The fixed group
`boots` adds the gateway heartbeat (subscribe + receive). Everything else falls through to the
default access, which is deny for all four kinds of ACL.

This module has two halves:

* `initial_config` / `write_initial_config`: the plugin's JSON file for a new broker, holding the
  admin and the gateway's identity, written here with PBKDF2-SHA512 hashes in the plugin's own
  format (Mosquitto 2.0.11 `plugins/dynamic-security`), so setting up needs no running broker
  and no `mosquitto_ctrl`.
* `BrokerAdmin`: a client of the plugin's control topic (`$CONTROL/dynamic-security/v1`, answers
  on `.../response`, matched by correlation data) with the admin's credentials, which adds,
  removes and lists boots. The running gateway never holds these credentials (settings
  `broker_admin`), only the provisioning command does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import aiomqtt

from gateway.boot_credentials import write_private
from gateway.contract import (
    CHANNEL_QOS,
    HEARTBEAT_TOPIC,
    RESERVED_CLINIC,
    TOPIC_ROOT,
    Channel,
    is_valid_clinic,
    is_valid_id,
    topic,
)
from gateway.mqtt_internals import paho_of
from gateway.mqtt_link import subscription_refused
from gateway.mqtt_tls import tls_context
from gateway.settings import (
    PLACEHOLDER_PREFIX,
    BrokerAdminSettings,
    GatewaySettings,
    MqttSettings,
)

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"

BOOTS_GROUP = "boots"
BOOT_COMMON_ROLE = "boot-common"
GATEWAY_ROLE = "bootgw-gateway"
ADMIN_ROLE = "bootgw-admin"
# Per-boot role: "boot.{clinic}.{device}". Ids never contain '.', so the name parses back.
BOOT_ROLE_PREFIX = "boot."
# The gateway's username when its settings name none (docs/deploy.md): reserved either way.
DEFAULT_GATEWAY_USERNAME = "boot-gateway"

# What a boot publishes; it subscribes to its CMD only.
BOOT_SEND_CHANNELS = (Channel.STATE, Channel.TELEMETRY, Channel.EVENT, Channel.ACK)
# A client id of our own making: the id alphabet, long enough for boot-{clinic}-{device}.
CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,160}")
# secrets.token_urlsafe(24): 32 characters, 192 bits. Guessing it is hopeless whatever the
# broker's hash costs, which is why the plugin's fixed 101 PBKDF2 rounds for boots are fine.
GENERATED_PASSWORD_BYTES = 24
# PBKDF2 rounds for the accounts in the initial file. The broker pays them on its one thread
# at every CONNECT with that username, also a failed one: a high count would let anyone who can
# reach the port stall the broker with login attempts. The admin's and the gateway's passwords
# are long (min_password_chars) or generated, so the count is not what protects them.
INIT_PBKDF2_ITERATIONS = 1000
SALT_BYTES = 12  # the plugin refuses any other salt length
HASH_BYTES = 64  # SHA-512
DEFAULT_ACL_ACCESS = {"publishClientSend": False, "publishClientReceive": False,
                      "subscribe": False, "unsubscribe": False}
_LIST_PAGE = 500  # clients per listClients answer: a big fleet in pages, not one huge message


class BrokerAdminError(RuntimeError):
    """The operation did not happen: broker unreachable, login refused, no answer, an error
    from the plugin. The message says which and never holds a password."""


class ProvisionRefused(ValueError):
    """Refused before anything changed: a bad id, a collision with another identity."""


@dataclass(frozen=True, slots=True)
class Account:
    """An identity for the initial file: username, bound client id, password (secret)."""

    username: str
    client_id: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class ProvisionedBoot:
    clinic: str
    device: str
    client_id: str | None  # None: not bound (an account made by hand)

    @property
    def key(self) -> str:
        return f"{self.clinic}/{self.device}"

    @property
    def username(self) -> str:
        return self.device


@dataclass(frozen=True, slots=True)
class NewBoot:
    """A boot just added, with its password: shown or stored once, never logged."""

    boot: ProvisionedBoot
    password: str = field(repr=False)


# ---------------------------------------------------------------- names and ACLs


def boot_role_name(clinic: str, device: str) -> str:
    return f"{BOOT_ROLE_PREFIX}{clinic}.{device}"


def parse_boot_role(name: str) -> tuple[str, str] | None:
    """(clinic, device) of a per-boot role name, None for any other role."""
    if not name.startswith(BOOT_ROLE_PREFIX):
        return None
    clinic, sep, device = name[len(BOOT_ROLE_PREFIX):].partition(".")
    if not sep or not is_valid_clinic(clinic) or not is_valid_id(device):
        return None
    return clinic, device


def default_client_id(clinic: str, device: str) -> str:
    """The recommended client id of a real boot (protocol §3.2)."""
    return f"boot-{clinic}-{device}"


def _acl(acltype: str, topic_filter: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic_filter, "priority": 0, "allow": True}


def _read_acls(topic_filter: str, literal: bool) -> list[dict[str, Any]]:
    """Subscribe, receive and unsubscribe for one filter (unsubscribe is denied by default too,
    so a client may leave exactly what it may join)."""
    kind = "Literal" if literal else "Pattern"
    return [_acl(f"subscribe{kind}", topic_filter), _acl("publishClientReceive", topic_filter),
            _acl(f"unsubscribe{kind}", topic_filter)]


def boot_role_acls(clinic: str, device: str) -> list[dict[str, Any]]:
    """Exactly the boot's own topics; literal topics, no wildcard anywhere."""
    acls = [_acl("publishClientSend", topic(clinic, device, ch)) for ch in BOOT_SEND_CHANNELS]
    return acls + _read_acls(topic(clinic, device, Channel.CMD), literal=True)


def boot_common_acls() -> list[dict[str, Any]]:
    """What every boot shares (the group `boots`): reading the gateway heartbeats, the
    fleet-wide one and the clinics' (protocol §5.1). Any clinic's: a heartbeat says only
    which gateway lives, and a shared role reaches boots provisioned before revision 2 at
    the next `boots add`, which puts this role's ACLs back."""
    return (_read_acls(HEARTBEAT_TOPIC, literal=True)
            + _read_acls(f"{HEARTBEAT_TOPIC}/+", literal=False))


def gateway_acls() -> list[dict[str, Any]]:
    """The gateway reads every boot's four outgoing channels, writes every boot's cmd and its
    own `_gateway` topics (heartbeat, alarms). It does not read cmd or `_gateway` topics, and
    it cannot touch `$CONTROL`."""
    acls: list[dict[str, Any]] = []
    for ch in BOOT_SEND_CHANNELS:
        acls += _read_acls(f"{TOPIC_ROOT}/+/+/{ch.value}", literal=False)
    acls.append(_acl("publishClientSend", f"{TOPIC_ROOT}/+/+/{Channel.CMD.value}"))
    acls.append(_acl("publishClientSend", f"{TOPIC_ROOT}/{RESERVED_CLINIC}/#"))
    return acls


def gateway_subscriptions() -> list[str]:
    """The topic filters the gateway subscribes to: what gateway_acls lets it read."""
    return [f"{TOPIC_ROOT}/+/+/{ch.value}" for ch in BOOT_SEND_CHANNELS]


def admin_acls() -> list[dict[str, Any]]:
    """The control topic, and writing a boot's state: `boots remove` clears the removed boot's
    retained state. The admin reads no boot traffic."""
    return [
        _acl("publishClientSend", f"{CONTROL_TOPIC}"),
        *_read_acls(RESPONSE_TOPIC, literal=True),
        _acl("publishClientSend", f"{TOPIC_ROOT}/+/+/{Channel.STATE.value}"),
    ]


# ---------------------------------------------------------------- the initial file


def _acl_set(acls: Iterable[dict[str, Any]]) -> set[tuple[object, ...]]:
    """ACLs comparable regardless of order (the plugin lists them grouped by type)."""
    return {(a.get("acltype"), a.get("topic"), a.get("priority", 0), a.get("allow"))
            for a in acls}


def hash_password(password: str, iterations: int = INIT_PBKDF2_ITERATIONS,
                  salt: bytes | None = None) -> dict[str, Any]:
    """The `password`/`salt`/`iterations` of a plugin client entry (PBKDF2-HMAC-SHA512,
    12-byte salt, 64-byte hash, both base64), as 2.0.11's `dynsec_auth__pw_hash` checks it."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    if len(salt) != SALT_BYTES:
        raise ValueError(f"the plugin needs a {SALT_BYTES}-byte salt")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, HASH_BYTES)
    return {"password": base64.b64encode(digest).decode(), "salt": base64.b64encode(salt).decode(),
            "iterations": iterations}


def _check_password(what: str, password: str, min_chars: int) -> None:
    if password.strip().lower().startswith(PLACEHOLDER_PREFIX):
        raise ProvisionRefused(f"{what} is still the change-me placeholder; set a real one")
    if len(password) < min_chars:
        raise ProvisionRefused(f"{what} has {len(password)} characters; at least {min_chars} "
                               "(broker_admin.min_password_chars)")


def generate_password() -> str:
    return secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)


def initial_config(admin: Account, gateway: Account, *, min_password_chars: int = 16
                   ) -> dict[str, Any]:
    """The plugin's JSON document for a new broker: default access deny, the admin, the
    gateway's identity, the role and group every boot will share, no boot yet."""
    for who, acct in (("admin", admin), ("gateway", gateway)):
        if not (is_valid_id(acct.username) and CLIENT_ID_RE.fullmatch(acct.client_id)):
            raise ProvisionRefused(f"{who}: username and client id must be ids "
                                   "(letters, digits, '_' and '-')")
        _check_password(f"the {who}'s password", acct.password, min_password_chars)
    names = [admin.username, admin.client_id, gateway.username, gateway.client_id]
    if {admin.username, admin.client_id} & {gateway.username, gateway.client_id}:
        raise ProvisionRefused(f"the admin and the gateway need names of their own: {names}")

    def client(acct: Account, role: str, text: str) -> dict[str, Any]:
        return {"username": acct.username, "clientid": acct.client_id, "textname": text,
                **hash_password(acct.password), "roles": [{"rolename": role, "priority": 0}]}

    return {
        "defaultACLAccess": dict(DEFAULT_ACL_ACCESS),
        "clients": [client(admin, ADMIN_ROLE, "boot-gateway provisioning admin"),
                    client(gateway, GATEWAY_ROLE, "boot fleet gateway")],
        "groups": [{"groupname": BOOTS_GROUP, "textname": "every provisioned boot",
                    "roles": [{"rolename": BOOT_COMMON_ROLE, "priority": 0}], "clients": []}],
        "roles": [
            {"rolename": ADMIN_ROLE, "textname": "provisioning admin", "acls": admin_acls()},
            {"rolename": GATEWAY_ROLE, "textname": "the gateway", "acls": gateway_acls()},
            {"rolename": BOOT_COMMON_ROLE, "textname": "every boot: the gateway heartbeat",
             "acls": boot_common_acls()},
        ],
    }


def write_initial_config(path: Path, doc: dict[str, Any], *, force: bool = False) -> None:
    """Write the plugin's file, mode 0600 (it holds password hashes). An existing file is the
    broker's live registry of every boot: it is replaced only with `force`."""
    if path.exists() and not force:
        raise ProvisionRefused(f"{path} exists: it holds every provisioned boot; give --force "
                               "to replace it")
    write_private(path, json.dumps(doc, indent=2) + "\n")


def read_secret_file(path: Path, setting: str) -> str:
    """A password from a file, without the trailing newline; errors name the file only."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BrokerAdminError(f"{setting} {str(path)!r} cannot be read: "
                               f"{getattr(exc, 'strerror', None) or type(exc).__name__}"
                               ) from None
    secret = text.rstrip("\r\n")
    if not secret.strip():
        raise BrokerAdminError(f"{setting} {str(path)!r} is empty")
    return secret


def admin_password(admin: BrokerAdminSettings) -> str:
    if admin.password is not None:
        return admin.password.get_secret_value()
    if admin.password_file is not None:
        return read_secret_file(admin.password_file, "broker_admin.password_file")
    raise BrokerAdminError("no admin password: set BOOTGW_BROKER_ADMIN__PASSWORD_FILE "
                           "(or __PASSWORD)")


def reserved_names(settings: GatewaySettings) -> set[str]:
    """Names no boot may take as device id or client id: the gateway's and the admin's."""
    names = {DEFAULT_GATEWAY_USERNAME, settings.mqtt.client_id,
             settings.broker_admin.username, settings.broker_admin.client_id}
    if settings.mqtt.username:
        names.add(settings.mqtt.username)
    return names


# ---------------------------------------------------------------- the control-topic client


class BrokerAdmin:
    """`async with BrokerAdmin(...) as admin:` one admin connection; its methods are the
    provisioning operations. One at a time per broker: the admin's client id is bound, so a
    second admin connection displaces the first."""

    def __init__(self, mqtt: MqttSettings, admin: BrokerAdminSettings, *,
                 reserved: Iterable[str] = ()) -> None:
        self.mqtt = mqtt
        self.admin = admin
        self.reserved = set(reserved) | {admin.username, admin.client_id}
        self._client: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._fixed = False  # ensure_fixed done on this connection
        self._pubacks: list[object] = []  # PUBACK reason codes, newest last

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> BrokerAdmin:
        return cls(settings.mqtt, settings.broker_admin, reserved=reserved_names(settings))

    async def __aenter__(self) -> Self:
        m, a = self.mqtt, self.admin
        broker = f"{m.host}:{m.port}"
        try:
            ctx = tls_context(m)
        except (OSError, ValueError) as exc:
            raise BrokerAdminError(f"mqtt TLS settings unusable: {exc}") from None
        client = aiomqtt.Client(
            m.host, m.port, username=a.username, password=admin_password(a),
            identifier=a.client_id, protocol=aiomqtt.ProtocolVersion.V5, tls_context=ctx,
            keepalive=max(30, int(a.timeout_s * 2)), timeout=a.timeout_s)
        try:
            async with asyncio.timeout(a.timeout_s):
                await client.__aenter__()
        except aiomqtt.MqttCodeError as exc:
            raise BrokerAdminError(
                f"broker {broker} refused the admin login ({exc}): wrong username, password "
                "or client id (broker_admin.*), or the broker runs without the "
                "dynamic-security plugin") from None
        except (aiomqtt.MqttError, TimeoutError, OSError) as exc:
            raise BrokerAdminError(f"broker {broker} not reachable: {exc or 'timed out'}"
                                   ) from None
        self._client = client
        self._watch_pubacks(client)
        try:
            granted = await client.subscribe(RESPONSE_TOPIC, qos=1)
            if any(subscription_refused(rc) for rc in granted):
                raise BrokerAdminError(f"{a.username!r} may not read {RESPONSE_TOPIC}: not the "
                                       "dynamic-security admin of this broker")
            self._reader = asyncio.create_task(self._read(client), name="dynsec-responses")
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        log.info("broker admin connected", extra={"broker": broker, "username": a.username})
        return self

    def _watch_pubacks(self, client: aiomqtt.Client) -> None:
        """Keep each PUBACK's reason code: aiomqtt drops it, and a refused publish (0x87)
        looks like a done one otherwise."""
        paho = paho_of(client)  # aiomqtt has no hook for this
        inner = cast(Callable[..., None] | None, paho.on_publish)

        def on_publish(c: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
            self._pubacks.append(reason)
            del self._pubacks[:-16]
            if inner is not None:
                inner(c, userdata, mid, reason, props)

        paho.on_publish = on_publish

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
            self._reader = None
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError, OSError):
                async with asyncio.timeout(self.admin.timeout_s):
                    await client.__aexit__(None, None, None)

    async def _read(self, client: aiomqtt.Client) -> None:
        """Hand each answer to the request waiting for its correlation data."""
        error: BaseException = BrokerAdminError("connection to the broker lost")
        try:
            async for message in client.messages:
                if message.topic.value != RESPONSE_TOPIC:
                    continue
                try:
                    doc = json.loads(bytes(message.payload))  # type: ignore[arg-type, unused-ignore]
                    responses = doc["responses"]
                except (ValueError, KeyError, TypeError):
                    log.warning("unreadable dynamic-security answer ignored")
                    continue
                for resp in responses if isinstance(responses, list) else []:
                    if not isinstance(resp, dict):
                        continue
                    fut = self._pending.get(str(resp.get("correlationData")))
                    if fut is not None and not fut.done():
                        fut.set_result(resp)
        except aiomqtt.MqttError as exc:
            error = BrokerAdminError(f"connection to the broker lost: {exc}")
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(error)

    async def command(self, *commands: dict[str, Any], allow_errors: Collection[str] = ()
                      ) -> list[dict[str, Any]]:
        """Send commands in one control message; their answers, in order. An answer with an
        error not in `allow_errors` raises BrokerAdminError (the commands before it are done:
        the plugin runs them one by one)."""
        client = self._client
        if client is None:
            raise BrokerAdminError("not connected")
        loop = asyncio.get_running_loop()
        corr = [secrets.token_hex(8) for _ in commands]
        futures = [loop.create_future() for _ in commands]
        self._pending.update(zip(corr, futures, strict=True))
        payload = json.dumps({"commands": [{**cmd, "correlationData": c}
                                           for cmd, c in zip(commands, corr, strict=True)]})
        # The answers come before the PUBACK, and a broker that disconnects us (it does so to
        # an admin whose own role changes) sends neither: wait for all of it at once, so a
        # lost connection fails the command now (the reader fails the futures), not at the
        # timeout.
        publish = asyncio.ensure_future(client.publish(CONTROL_TOPIC, payload, qos=1))
        try:
            async with asyncio.timeout(self.admin.timeout_s):
                answers = list(await asyncio.gather(publish, *futures))[1:]
        except TimeoutError:
            raise BrokerAdminError(
                f"no answer on {RESPONSE_TOPIC} within {self.admin.timeout_s:g} s: is the "
                "dynamic-security plugin loaded (plugin_opt_config_file)?") from None
        except aiomqtt.MqttError as exc:
            raise BrokerAdminError(f"control message not sent: {exc}") from None
        finally:
            for c in corr:
                self._pending.pop(c, None)
            if not publish.done():
                publish.cancel()
            for fut in (publish, *futures):  # retrieved: no "exception never retrieved"
                if fut.done() and not fut.cancelled():
                    fut.exception()
        for cmd, answer in zip(commands, answers, strict=True):
            error = answer.get("error")
            if error and error not in allow_errors:
                raise BrokerAdminError(f"{cmd['command']}: {error}")
        return answers

    # ------------------------------------------------------------ fleet set-up

    async def ensure_fixed(self) -> None:
        """Default access deny, and the shared role and group every boot needs, made or put
        back as this version wants them (a file made with `mosquitto_ctrl dynsec init` has
        neither, and allows receiving by default). Reads first and changes only what differs:
        every change makes the broker rewrite its whole file, on the thread that serves all
        boots. Only changes that disconnect no boot (Mosquitto 2.0.11 kicks every member on
        addRoleACL, removeRoleACL and group role changes; modifyRole and the default access
        apply live). Once per connection."""
        if self._fixed:
            return
        current, role, group = await self.command(
            {"command": "getDefaultACLAccess"},
            {"command": "getRole", "rolename": BOOT_COMMON_ROLE},
            {"command": "getGroup", "groupname": BOOTS_GROUP},
            allow_errors={"Role not found", "Group not found"})
        access = {a.get("acltype"): a.get("allow")
                  for a in current.get("data", {}).get("acls", [])}
        if access != DEFAULT_ACL_ACCESS:
            await self.command({"command": "setDefaultACLAccess", "acls": [
                {"acltype": k, "allow": v} for k, v in DEFAULT_ACL_ACCESS.items()]})
        wanted: dict[str, Any] = {"rolename": BOOT_COMMON_ROLE, "acls": boot_common_acls()}
        if role.get("error"):
            await self.command({"command": "createRole", **wanted})
        elif _acl_set(role["data"]["role"].get("acls", [])) != _acl_set(wanted["acls"]):
            await self.command({"command": "modifyRole", **wanted})
        if group.get("error"):
            await self.command({"command": "createGroup", "groupname": BOOTS_GROUP,
                                "roles": [{"rolename": BOOT_COMMON_ROLE, "priority": 0}]})
        elif BOOT_COMMON_ROLE not in {r.get("rolename")
                                      for r in group["data"]["group"].get("roles", [])}:
            # addGroupRole would make the broker disconnect every boot in the group, and
            # every boot in a session would vent: not something to do in passing.
            raise BrokerAdminError(
                f"group {BOOTS_GROUP!r} lacks role {BOOT_COMMON_ROLE!r} (the boots cannot read "
                "the heartbeat). Adding it disconnects every boot: at a quiet time, run "
                f"`mosquitto_ctrl ... dynsec addGroupRole {BOOTS_GROUP} {BOOT_COMMON_ROLE}`")
        self._fixed = True

    async def _get_client(self, username: str) -> dict[str, Any] | None:
        answer = (await self.command({"command": "getClient", "username": username},
                                     allow_errors={"Client not found"}))[0]
        if answer.get("error"):
            return None
        return answer.get("data", {}).get("client")

    async def _all_clients(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        while True:
            answer = (await self.command({"command": "listClients", "verbose": True,
                                          "count": _LIST_PAGE, "offset": len(found)}))[0]
            page = answer.get("data", {}).get("clients", [])
            found += page
            if len(page) < _LIST_PAGE:
                return found

    @staticmethod
    def _boot_of(client: dict[str, Any]) -> ProvisionedBoot | None:
        for role in client.get("roles", []):
            parsed = parse_boot_role(str(role.get("rolename", "")))
            if parsed and parsed[1] == client.get("username"):
                return ProvisionedBoot(parsed[0], parsed[1], client.get("clientid"))
        return None

    # ------------------------------------------------------------ the operations

    async def add_boot(self, clinic: str, device: str, *, password: str | None = None,
                       client_id: str | None = None, min_password_chars: int | None = None
                       ) -> NewBoot:
        """Create the boot's account and role. ProvisionRefused, with nothing changed, for a
        bad id, a device id already provisioned (in any clinic: ids are fleet-unique), or a
        username/client id that is, or is bound to, another identity."""
        if not is_valid_clinic(clinic):
            raise ProvisionRefused(f"bad clinic id {clinic!r}: letters, digits, '_' and '-', "
                                   f"1-64 characters, not {RESERVED_CLINIC!r}")
        if not is_valid_id(device):
            raise ProvisionRefused(f"bad device id {device!r}: letters, digits, '_' and '-', "
                                   "1-64 characters")
        client_id = client_id or default_client_id(clinic, device)
        if not CLIENT_ID_RE.fullmatch(client_id):
            raise ProvisionRefused(f"bad client id {client_id!r}: letters, digits, '_' and '-'")
        if password is None:
            password = generate_password()
        else:
            _check_password("the password", password,
                            min_password_chars or self.admin.min_password_chars)
        for name in (device, client_id):
            if name in self.reserved:
                raise ProvisionRefused(f"{name!r} is the gateway's or the admin's username or "
                                       "client id; a boot cannot have it")
        await self.ensure_fixed()
        existing = await self._get_client(device)
        if existing is not None:
            boot = self._boot_of(existing)
            if boot is None:
                raise ProvisionRefused(f"{device!r} is the username of another broker account "
                                       "(not a boot)")
            where = "in this clinic" if boot.clinic == clinic else f"in clinic {boot.clinic!r}"
            raise ProvisionRefused(f"device {device!r} is already provisioned {where}: device "
                                   "ids are unique across the fleet (remove it first)")
        for other in await self._all_clients():
            taken = {other.get("username"), other.get("clientid")} - {None}
            if client_id in taken or device in taken:
                raise ProvisionRefused(
                    f"{client_id if client_id in taken else device!r} is already the username "
                    f"or client id of the account {other.get('username')!r}")
        role = boot_role_name(clinic, device)
        # A role left behind by an interrupted add (no client has it): replace it.
        await self.command({"command": "deleteRole", "rolename": role},
                           allow_errors={"Role not found"})
        await self.command({"command": "createRole", "rolename": role,
                            "textname": f"boot {clinic}/{device}",
                            "acls": boot_role_acls(clinic, device)})
        try:
            await self.command({
                "command": "createClient", "username": device, "password": password,
                "clientid": client_id, "textname": f"{clinic}/{device}",
                "roles": [{"rolename": role, "priority": 0}],
                "groups": [{"groupname": BOOTS_GROUP, "priority": 0}]})
        except BrokerAdminError as exc:
            with contextlib.suppress(BrokerAdminError):
                await self.command({"command": "deleteRole", "rolename": role},
                                   allow_errors={"Role not found"})
            if "Client already exists" in str(exc):  # another add won the race
                raise ProvisionRefused(f"device {device!r} was provisioned meanwhile") from None
            raise
        boot = ProvisionedBoot(clinic, device, client_id)
        log.info("boot provisioned", extra={"boot": boot.key, "client_id": client_id})
        return NewBoot(boot, password)

    async def remove_boot(self, clinic: str, device: str) -> ProvisionedBoot:
        """Delete the boot's account (the broker disconnects it at once, without its Last
        Will) and its role, then clear its retained state, so the gateway forgets it."""
        if not (is_valid_clinic(clinic) and is_valid_id(device)):
            raise ProvisionRefused(f"bad clinic or device id {clinic!r}/{device!r}")
        existing = await self._get_client(device)
        if existing is None:
            raise ProvisionRefused(f"device {device!r} is not provisioned")
        boot = self._boot_of(existing)
        if boot is None:
            raise ProvisionRefused(f"{device!r} is another broker account, not a boot")
        if boot.clinic != clinic:
            raise ProvisionRefused(f"device {device!r} is provisioned in clinic "
                                   f"{boot.clinic!r}, not {clinic!r}")
        await self.command({"command": "deleteClient", "username": device})
        await self.command({"command": "deleteRole", "rolename": boot_role_name(clinic, device)},
                           allow_errors={"Role not found"})
        assert self._client is not None
        self._pubacks.clear()
        try:
            await self._client.publish(topic(clinic, device, Channel.STATE), b"",
                                       qos=CHANNEL_QOS[Channel.STATE], retain=True)
        except aiomqtt.MqttError as exc:
            raise BrokerAdminError(f"account removed, but its retained state was not cleared: "
                                   f"{exc}") from None
        if self._pubacks and subscription_refused(self._pubacks[-1]):
            # The broker dropped it: the gateway would keep showing the removed boot.
            raise BrokerAdminError(
                f"account removed, but the broker refused to clear its retained state "
                f"({self._pubacks[-1]}): the admin's role needs publishClientSend on "
                f"{TOPIC_ROOT}/+/+/state (docs/deploy.md §2.3)")
        log.info("boot removed", extra={"boot": boot.key})
        return boot

    async def list_boots(self, clinic: str | None = None) -> list[ProvisionedBoot]:
        """Every provisioned boot (optionally of one clinic), sorted by clinic and device."""
        boots = [b for c in await self._all_clients() if (b := self._boot_of(c)) is not None]
        if clinic is not None:
            boots = [b for b in boots if b.clinic == clinic]
        return sorted(boots, key=lambda b: (b.clinic, b.device))

