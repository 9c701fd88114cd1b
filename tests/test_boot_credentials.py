"""The provisioning side without a broker: the credentials file, the initial plugin file.

What a real broker makes of them is in test_broker_identities.py; here the rules that need no
broker: files are private, a bad file is a clear error that never quotes a password, the
initial file refuses weak or clashing identities.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from gateway.boot_credentials import (
    BootCredentials,
    CredentialsError,
    load_credentials,
    update_credentials,
)
from gateway.broker_admin import (
    Account,
    ProvisionRefused,
    boot_role_acls,
    boot_role_name,
    gateway_acls,
    gateway_subscriptions,
    initial_config,
    parse_boot_role,
    write_initial_config,
)

SECRET = "s3cret-password-that-must-not-leak"


def test_credentials_file_round_trip_is_private(tmp_path: Path) -> None:
    path = tmp_path / "creds.json"
    update_credentials(path, "c1/d1", BootCredentials("d1", SECRET, "boot-c1-d1"))
    update_credentials(path, "c2/d2", BootCredentials("d2", "other-password-xxxx", None))
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = load_credentials(path)
    assert loaded["c1/d1"] == BootCredentials("d1", SECRET, "boot-c1-d1")
    assert loaded["c2/d2"].client_id is None
    update_credentials(path, "c1/d1", None)
    assert list(load_credentials(path)) == ["c2/d2"]
    assert SECRET not in repr(loaded["c1/d1"])


def test_toml_credentials_are_read_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "creds.toml"
    path.write_text('["c1/d1"]\npassword = "pw-from-toml-xxxxxx"\nclient_id = "x1"\n')
    creds = load_credentials(path)["c1/d1"]
    assert (creds.username, creds.client_id) == ("d1", "x1")  # username defaults to the device
    with pytest.raises(CredentialsError, match="only JSON"):
        update_credentials(path, "c1/d2", creds)


@pytest.mark.parametrize("doc, problem", [
    ({"c1-d1": {"password": SECRET}}, "not 'clinic/device'"),
    ({"_gateway/d1": {"password": SECRET}}, "not 'clinic/device'"),
    ({"c1/d 1": {"password": SECRET}}, "not 'clinic/device'"),
    ({"c1/d1": {"username": "d1"}}, "password missing"),
    ({"c1/d1": SECRET}, "an entry is an object"),
    ({"c1/d1": {"password": SECRET, "client_id": 7}}, "client_id"),
    ([SECRET], "one object"),
])
def test_bad_credentials_files_are_refused_without_quoting_them(
    tmp_path: Path, doc: object, problem: str
) -> None:
    path = tmp_path / "creds.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(CredentialsError, match=problem) as info:
        load_credentials(path)
    assert SECRET not in str(info.value)


def test_unparsable_credentials_file_names_no_content(tmp_path: Path) -> None:
    path = tmp_path / "creds.json"
    path.write_text('{"c1/d1": {"password": "' + SECRET + '"')
    with pytest.raises(CredentialsError, match="not valid JSON") as info:
        load_credentials(path)
    assert SECRET not in str(info.value)


def test_initial_file_has_the_plugin_hash_format_and_denies_by_default(tmp_path: Path) -> None:
    admin = Account("bootgw-admin", "bootgw-admin", "a" * 20)
    gateway = Account("boot-gateway", "gw-1", "g" * 20)
    doc = initial_config(admin, gateway)
    assert doc["defaultACLAccess"] == {"publishClientSend": False, "publishClientReceive": False,
                                       "subscribe": False, "unsubscribe": False}
    entry = next(c for c in doc["clients"] if c["username"] == "boot-gateway")
    salt = base64.b64decode(entry["salt"])
    assert len(salt) == 12 and entry["clientid"] == "gw-1"
    expected = hashlib.pbkdf2_hmac("sha512", b"g" * 20, salt, entry["iterations"], 64)
    assert base64.b64decode(entry["password"]) == expected
    assert "g" * 20 not in json.dumps(doc)
    path = tmp_path / "dynsec.json"
    write_initial_config(path, doc)
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ProvisionRefused, match="exists"):
        write_initial_config(path, doc)


@pytest.mark.parametrize("admin, gateway, problem", [
    (Account("adm", "adm", "short"), Account("gw", "gw", "g" * 20), "at least 16"),
    (Account("adm", "adm", "a" * 20), Account("gw", "gw", "change-me-gateway-password"),
     "placeholder"),
    (Account("adm", "adm", "a" * 20), Account("adm", "gw", "g" * 20), "names of their own"),
    (Account("adm", "gw", "a" * 20), Account("gw2", "gw", "g" * 20), "names of their own"),
    (Account("a/b", "adm", "a" * 20), Account("gw", "gw", "g" * 20), "must be ids"),
])
def test_initial_file_refuses_weak_or_clashing_identities(
    admin: Account, gateway: Account, problem: str
) -> None:
    with pytest.raises(ProvisionRefused, match=problem):
        initial_config(admin, gateway)


def test_boot_role_names_parse_back_and_grant_literal_topics_only() -> None:
    assert parse_boot_role(boot_role_name("clinic-1", "boot-001")) == ("clinic-1", "boot-001")
    assert parse_boot_role("bootgw-gateway") is None
    assert parse_boot_role("boot._gateway.x") is None
    acls = boot_role_acls("c1", "d1")
    assert all("+" not in a["topic"] and "#" not in a["topic"] for a in acls)
    sends = {a["topic"] for a in acls if a["acltype"] == "publishClientSend"}
    assert sends == {f"boots/v1/c1/d1/{ch}" for ch in ("state", "telemetry", "event", "ack")}
    assert all(a["allow"] for a in acls)


def test_gateway_subscribes_to_exactly_what_its_role_lets_it_read() -> None:
    patterns = {a["topic"] for a in gateway_acls() if a["acltype"] == "subscribePattern"}
    assert set(gateway_subscriptions()) == patterns


def test_scenario_credentials_file_is_relative_to_the_scenario_and_checked(
    tmp_path: Path,
) -> None:
    from device_sim.scenario import ScenarioError, load_scenario

    body = ("name: t\nduration_s: 600\ngateway_url: http://127.0.0.1:8080\n"
            "fleet: {boots: 2, clinics: 1}\nbroker: {credentials_file: creds.json}\n")
    (tmp_path / "s.yaml").write_text(body)
    with pytest.raises(ScenarioError, match=r"broker\.credentials_file: .*cannot read"):
        load_scenario(tmp_path / "s.yaml")
    update_credentials(tmp_path / "creds.json", "sim-1/boot-001",
                       BootCredentials("boot-001", SECRET, "boot-sim-1-boot-001"))
    sc = load_scenario(tmp_path / "s.yaml")
    assert sc.broker.credentials_file == tmp_path / "creds.json"
