"""`boot-gateway certs init`: the broker's CA and certificate, made once and kept.

Judged the way a TLS client judges them: a handshake (Python's ssl, in memory) verifying the
broker's certificate against the CA for the host name dialled. The compose stack runs the same
command in its init step at every start, so running it again must change nothing, and it must
never replace the CA the boots pin.
"""

from __future__ import annotations

import datetime as dt
import io
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from gateway.certs import CertsRefused, cli, init, parse_hosts

ROOT = Path(__file__).resolve().parent.parent


def _handshake(certs: Path, host: str, cafile: Path | None = None) -> None:
    """A TLS 1.2+ handshake between a client that trusts `cafile` (default certs/ca.crt) and
    dials `host`, and a server with certs/server.crt; raises ssl.SSLError when refused."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs / "server.crt", certs / "server.key")
    client = ssl.create_default_context(cafile=str(cafile or certs / "ca.crt"))
    client.minimum_version = ssl.TLSVersion.TLSv1_2
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=host)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        done = 0
        for side, out, peer_in in ((c, c_out, s_in), (s, s_out, c_in)):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
            finally:
                peer_in.write(out.read())
        if done == 2:
            return
    raise AssertionError("handshake did not finish")


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_a_client_with_the_ca_accepts_the_broker_for_every_host_and_no_other(tmp_path: Path):
    certs = tmp_path / "certs"
    init(certs, parse_hosts(["mosquitto", "localhost,192.168.10.5", ""]), ca_dir=tmp_path / "ca")
    for host in ("mosquitto", "localhost", "192.168.10.5"):
        _handshake(certs, host)
    with pytest.raises(ssl.SSLCertVerificationError, match=r"match|mismatch"):
        _handshake(certs, "evil.example")
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(certs, "mosquitto", cafile=tmp_path / "other-ca.pem")


def test_the_ca_key_stays_out_of_the_brokers_directory_and_keys_are_private(tmp_path: Path):
    certs, ca = tmp_path / "certs", tmp_path / "ca"
    init(certs, ["mosquitto"], ca_dir=ca)
    assert sorted(_files(certs)) == ["ca.crt", "server.crt", "server.key"]
    assert sorted(_files(ca)) == ["ca.crt", "ca.key"]
    assert (certs / "ca.crt").read_bytes() == (ca / "ca.crt").read_bytes()
    for key in (certs / "server.key", ca / "ca.key"):
        assert key.stat().st_mode & 0o777 == 0o600, key
    for public in (certs / "ca.crt", certs / "server.crt"):
        assert public.stat().st_mode & 0o777 == 0o644, public


def test_running_it_again_changes_nothing(tmp_path: Path):
    certs, ca = tmp_path / "certs", tmp_path / "ca"
    init(certs, ["mosquitto", "localhost"], ca_dir=ca)
    before = _files(certs), _files(ca)
    result = init(certs, ["localhost", "mosquitto"], ca_dir=ca)
    assert (_files(certs), _files(ca)) == before
    assert any("kept" in a for a in result.actions)


@pytest.mark.parametrize("change", ["new host", "expiring", "foreign cert", "wrong key"])
def test_the_server_certificate_is_issued_again_by_the_same_ca(tmp_path: Path, change: str):
    certs, ca = tmp_path / "certs", tmp_path / "ca"
    now = dt.datetime.now(dt.UTC)
    init(certs, ["mosquitto"], ca_dir=ca, now=now)
    ca_before, server_before = _files(ca), (certs / "server.crt").read_bytes()
    hosts = ["mosquitto"]
    if change == "new host":
        hosts.append("mqtt.clinic.example")
    elif change == "expiring":
        now += dt.timedelta(days=825 - 10)
    elif change == "foreign cert":
        trustme.CA().issue_cert("mosquitto").cert_chain_pems[0].write_to_path(
            str(certs / "server.crt"))
    else:
        trustme.CA().issue_cert("x").private_key_pem.write_to_path(str(certs / "server.key"))
    result = init(certs, hosts, ca_dir=ca, now=now)
    assert _files(ca) == ca_before, "the CA must never change"
    assert (certs / "server.crt").read_bytes() != server_before
    assert any("issued" in a for a in result.actions), result.actions
    if change != "expiring":  # the handshake runs on the real clock
        for host in hosts:
            _handshake(certs, host)


@pytest.mark.parametrize("missing", ["ca.key", "ca.crt"])
def test_half_a_ca_is_refused_and_nothing_is_written(tmp_path: Path, missing: str):
    certs, ca = tmp_path / "certs", tmp_path / "ca"
    init(certs, ["mosquitto"], ca_dir=ca)
    (ca / missing).unlink()
    before = _files(certs), _files(ca)
    with pytest.raises(CertsRefused, match="restore it"):
        init(certs, ["mosquitto"], ca_dir=ca)
    assert (_files(certs), _files(ca)) == before


def test_certificates_of_the_clinics_own_ca_are_checked_and_never_replaced(tmp_path: Path):
    certs = tmp_path / "certs"
    certs.mkdir()
    theirs = trustme.CA()
    leaf = theirs.issue_cert("mosquitto", "localhost")
    theirs.cert_pem.write_to_path(str(certs / "ca.crt"))
    leaf.cert_chain_pems[0].write_to_path(str(certs / "server.crt"))
    leaf.private_key_pem.write_to_path(str(certs / "server.key"))
    before = _files(certs)
    result = init(certs, ["mosquitto", "localhost"], ca_dir=tmp_path / "ca")
    assert _files(certs) == before and not (tmp_path / "ca").exists()
    assert any("your own CA" in a for a in result.actions)
    # A name their certificate lacks cannot be fixed here: refused, not silently replaced.
    with pytest.raises(CertsRefused, match=r"does not name mqtt\.clinic\.example"):
        init(certs, ["mosquitto", "mqtt.clinic.example"], ca_dir=tmp_path / "ca")
    assert _files(certs) == before


@pytest.mark.parametrize("value", ["*.clinic.example", "a b", "-x.example", "x_y.example",
                                   "a..b"])
def test_a_host_that_is_no_dns_name_or_address_is_refused(value: str):
    with pytest.raises(CertsRefused, match="not a DNS name"):
        parse_hosts([value])


def test_no_host_at_all_is_refused():
    with pytest.raises(CertsRefused, match="no --host"):
        parse_hosts(["", " , "])


def test_the_command_line_exit_codes(tmp_path: Path):
    err = io.StringIO()
    assert cli(["init", str(tmp_path / "c"), "--host", "mosquitto"], stderr=err) == 0
    assert "CA created" in err.getvalue()
    assert cli(["init", str(tmp_path / "c"), "--host", "*"], stderr=io.StringIO()) == 1
    assert cli(["init", str(tmp_path / "c")], stderr=io.StringIO()) == 2  # --host required
    # and as `boot-gateway certs ...`, the way the compose init step and the docs call it
    done = subprocess.run([sys.executable, "-m", "gateway", "certs", "init",
                           str(tmp_path / "c"), "--host", "mosquitto"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "server certificate kept" in done.stderr, done.stderr
