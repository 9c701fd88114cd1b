"""`boot-gateway certs init DIR --host NAME ...`: a private CA and the broker's TLS certificate.

Every link to the broker is TLS (docs/deploy.md §2.1), so a first start needs a certificate
before the broker can open its listener. A clinic with a PKI of its own brings its files; for
everyone else (and the compose stack's init step, whose `python:3.11-slim` image has no
`openssl` command) this module makes them with the `cryptography` package:

    CA_DIR/ca.key      the CA's private key (0600): keep it off the broker, back it up
    CA_DIR/ca.crt      the CA certificate, what boots and the gateway pin
    DIR/ca.crt         a copy of it, next to the broker's files (the one clients are given)
    DIR/server.crt     the broker's certificate, naming every --host (DNS names, IP addresses)
    DIR/server.key     its key (0600, owned by --owner: the broker's user must read it)

It is idempotent, so an init step may run it at every start: existing files are kept while they
are sound. The server certificate is issued again (with the same CA) when it is missing, does
not match its key, was not issued by the CA, lacks a --host or expires within --renew-days. The
CA is never replaced: every boot pins it, so a new CA would lock the whole fleet out; a CA with
half its files missing is refused. Files in DIR that this CA did not issue (a CA certificate in
DIR but no CA key in CA_DIR: the clinic's own PKI) are checked and never overwritten.

Keys are ECDSA P-256: small, fast on a boot's microcontroller TLS stack, and accepted by
Mosquitto, Python's ssl and mbedTLS alike.

Exit codes as for the other commands: 0 done, 1 refused (nothing written), 2 bad arguments,
3 failed (a file could not be read, written or handed to --owner).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.boot_credentials import write_private

OK, REFUSED, USAGE, FAILED = 0, 1, 2, 3
SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey  # what a CA made elsewhere may be

CA_KEY, CA_CERT = "ca.key", "ca.crt"
SERVER_KEY, SERVER_CERT = "server.key", "server.crt"
# Days. The CA outlives many server certificates: replacing it means re-provisioning every
# boot's trust anchor. 825 days is the longest validity common TLS stacks accept for a leaf.
CA_DAYS = 3650
SERVER_DAYS = 825
RENEW_DAYS = 30
# A boot whose clock is a little behind must not see a certificate from the future.
BACKDATE = dt.timedelta(minutes=5)
# A DNS label: letters, digits, '-' (not at either end); no wildcards, no underscores.
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


class CertsRefused(ValueError):
    """Nothing written: the files on disk or the arguments do not allow it; says why."""


@dataclass
class InitResult:
    """What `init` did, one line per file (for the operator), and warnings to act on."""

    actions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def parse_hosts(values: Iterable[str]) -> list[str]:
    """Host names and IP addresses from repeated and comma-separated --host values.

    Empty items are dropped (compose passes an unset variable as an empty value); anything
    that is neither an IP address nor a DNS name is refused, wildcards included: the broker's
    certificate names exactly the hosts clients dial."""
    hosts: list[str] = []
    for value in values:
        for item in value.split(","):
            name = item.strip().lower().removesuffix(".")
            if not name:
                continue
            if not _is_ip(name) and not (len(name) <= 253
                                         and all(_LABEL.fullmatch(p) for p in name.split("."))):
                raise CertsRefused(f"--host {item.strip()!r} is not a DNS name or IP address")
            if name not in hosts:
                hosts.append(name)
    if not hosts:
        raise CertsRefused("no --host: the certificate must name the host clients dial")
    return hosts


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName([
        x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h)
        for h in hosts])


def _names_in(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return ({n.lower() for n in san.get_values_for_type(x509.DNSName)}
            | {str(ip) for ip in san.get_values_for_type(x509.IPAddress)})


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    # Unencrypted on purpose: a broker cannot prompt for a pass phrase; file modes protect it.
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def make_ca(now: dt.datetime, days: int = CA_DAYS
            ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA that may sign server and client certificates, no intermediate CAs."""
    key = _new_key()
    # A random part in the name: two stacks' CAs are told apart in a boot's error message.
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "boot fleet"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"boot fleet private CA {os.urandom(4).hex()}"),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_server(ca_cert: x509.Certificate, ca_key: SigningKey,
                 hosts: Sequence[str], now: dt.datetime, days: int = SERVER_DAYS
                 ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A TLS server certificate for `hosts` (the first is also its common name)."""
    key = _new_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(
            min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise CertsRefused(f"{path} is not a PEM certificate") from None


def _load_key(path: Path) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):  # TypeError: an encrypted key
        raise CertsRefused(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise CertsRefused(f"{path}: a {type(key).__name__}; an RSA or EC key is needed")
    return key


def _matches(cert: x509.Certificate, key: object) -> bool:
    public = getattr(key, "public_key", None)
    return public is not None and public() == cert.public_key()


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def server_problem(cert: x509.Certificate, key: object, ca: x509.Certificate,
                   hosts: Sequence[str], now: dt.datetime, renew_days: int) -> str | None:
    """Why this server certificate must be issued again, or None if it is sound."""
    if not _matches(cert, key):
        return "it does not match its key"
    if not _issued_by(cert, ca):
        return "it was not issued by the CA"
    missing = [h for h in hosts if h not in _names_in(cert)]
    if missing:
        return f"it does not name {', '.join(missing)}"
    if cert.not_valid_after_utc - now < dt.timedelta(days=renew_days):
        return f"it expires on {cert.not_valid_after_utc:%Y-%m-%d}"
    return None


def _write_public(path: Path, text: str) -> None:
    write_private(path, text)  # atomic; then readable by every client of the broker
    path.chmod(0o644)


def _chown(path: Path, owner: tuple[int, int] | None) -> None:
    if owner is not None:
        st = path.stat()
        if (st.st_uid, st.st_gid) != owner:
            os.chown(path, *owner)


def init(certs_dir: Path, hosts: Sequence[str], *, ca_dir: Path | None = None,
         owner: tuple[int, int] | None = None, days: int = SERVER_DAYS, ca_days: int = CA_DAYS,
         renew_days: int = RENEW_DAYS, now: dt.datetime | None = None) -> InitResult:
    """Make or keep the CA and the broker's certificate (module docstring); CertsRefused
    before anything is written when the files on disk do not allow it."""
    now = now or dt.datetime.now(dt.UTC)
    ca_dir = ca_dir or certs_dir
    hosts = list(hosts)
    result = InitResult()
    ca_key_path, ca_cert_path = ca_dir / CA_KEY, ca_dir / CA_CERT
    pub_ca, srv_cert, srv_key = certs_dir / CA_CERT, certs_dir / SERVER_CERT, certs_dir / SERVER_KEY

    have_key, have_cert = ca_key_path.exists(), ca_cert_path.exists()
    if have_key != have_cert:
        present, absent = (ca_key_path, ca_cert_path) if have_key else (ca_cert_path, ca_key_path)
        raise CertsRefused(f"{present} exists but {absent} does not: restore it from the "
                           "backup (a new CA would lock out every boot that pins the old one)")
    if not have_key and pub_ca.exists():
        return _check_external(pub_ca, srv_cert, srv_key, hosts, now, renew_days, owner, result)

    certs_dir.mkdir(parents=True, exist_ok=True)
    ca_dir.mkdir(parents=True, exist_ok=True)
    if have_key:
        ca_cert, ca_key = _load_cert(ca_cert_path), _load_key(ca_key_path)
        if not _matches(ca_cert, ca_key):
            raise CertsRefused(f"{ca_key_path} is not the key of {ca_cert_path}")
        if not _is_ca(ca_cert):
            raise CertsRefused(f"{ca_cert_path} is not a CA certificate (basic constraints)")
        result.actions.append(f"CA kept: {ca_cert_path} ({ca_cert.subject.rfc4514_string()})")
        if ca_cert.not_valid_after_utc - now < dt.timedelta(days=renew_days):
            result.warnings.append(
                f"the CA expires on {ca_cert.not_valid_after_utc:%Y-%m-%d}: plan a new CA and "
                "give it to every boot before then (docs/deploy.md §2.1)")
    else:
        ca_cert, ca_key = make_ca(now, ca_days)
        write_private(ca_key_path, _key_pem(ca_key))
        _write_public(ca_cert_path, _cert_pem(ca_cert))
        result.actions.append(f"CA created: {ca_cert_path} and its key {ca_key_path} "
                              "(back the key up, keep it off the broker)")
    if pub_ca != ca_cert_path and (not pub_ca.exists() or pub_ca.read_text() != _cert_pem(ca_cert)):
        _write_public(pub_ca, _cert_pem(ca_cert))
        result.actions.append(f"CA certificate copied to {pub_ca}")

    reason = "it or its key does not exist"
    if srv_cert.exists() and srv_key.exists():
        reason = server_problem(_load_cert(srv_cert), _load_key(srv_key), ca_cert, hosts, now,
                                renew_days) or ""
    if reason:
        cert, key = issue_server(ca_cert, ca_key, hosts, now, days)
        write_private(srv_key, _key_pem(key))
        _chown(srv_key, owner)
        _write_public(srv_cert, _cert_pem(cert))
        result.actions.append(f"server certificate issued ({reason}): {srv_cert} for "
                              f"{', '.join(hosts)}, valid until {cert.not_valid_after_utc:%Y-%m-%d}"
                              "; restart the broker if it is running")
    else:
        _chown(srv_key, owner)
        result.actions.append(f"server certificate kept: {srv_cert}")
    return result


def _check_external(pub_ca: Path, srv_cert: Path, srv_key: Path, hosts: Sequence[str],
                    now: dt.datetime, renew_days: int, owner: tuple[int, int] | None,
                    result: InitResult) -> InitResult:
    """Files from a PKI of the clinic's own: checked, never replaced (we hold no CA key)."""
    if not (srv_cert.exists() and srv_key.exists()):
        raise CertsRefused(f"{pub_ca} is a CA certificate without its key here, and "
                           f"{srv_cert} / {srv_key} are missing: bring the broker's certificate "
                           "from the same CA, or remove the CA file to have a CA made")
    cert, key = _load_cert(srv_cert), _load_key(srv_key)
    problem = server_problem(cert, key, _load_cert(pub_ca), hosts, now, renew_days)
    if problem is not None and "expires" not in problem:
        raise CertsRefused(f"{srv_cert}: {problem} ({pub_ca} is not ours to issue from)")
    if problem is not None:
        result.warnings.append(f"{srv_cert}: {problem}: renew it with your CA")
    _chown(srv_key, owner)
    result.actions.append(f"certificates of your own CA kept: {pub_ca}, {srv_cert}")
    return result


def _owner(value: str) -> tuple[int, int]:
    uid, sep, gid = value.partition(":")
    try:
        return int(uid), int(gid if sep else uid)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not UID[:GID] (numbers)") from None


def _days(value: str) -> int:
    try:
        days = int(value)
    except ValueError:
        days = 0
    if not 1 <= days <= 36500:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of days (1-36500)")
    return days


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="boot-gateway certs", description="a private CA and "
                                "the broker's TLS certificate (docs/deploy.md §2.1)")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("init", help="make or keep ca.crt, server.crt, server.key in DIR "
                       "(idempotent: sound files are kept, the CA is never replaced)")
    i.add_argument("dir", type=Path, help="where the broker reads its files")
    i.add_argument("--host", action="append", default=[], required=True,
                   help="a name or address clients dial (repeat, or comma-separated); "
                   "empty values are ignored")
    i.add_argument("--ca-dir", type=Path, help="where the CA's key and certificate live "
                   "(default DIR; give another place so the broker never sees the CA key)")
    i.add_argument("--owner", type=_owner, metavar="UID[:GID]", help="owner of server.key "
                   "(the broker's user: 1883 in the eclipse-mosquitto image)")
    i.add_argument("--days", type=_days, default=SERVER_DAYS, help="server certificate "
                   f"validity (default {SERVER_DAYS})")
    i.add_argument("--ca-days", type=_days, default=CA_DAYS, help="validity of a new CA "
                   f"(default {CA_DAYS})")
    i.add_argument("--renew-days", type=_days, default=RENEW_DAYS, help="issue the server "
                   f"certificate again this long before it expires (default {RENEW_DAYS})")
    return p


def cli(argv: Sequence[str], stderr: TextIO | None = None) -> int:
    """`boot-gateway certs ...`; human-readable lines on stderr, no secret among them."""
    err = stderr or sys.stderr
    try:
        args = parser().parse_args(list(argv))
    except SystemExit as exc:  # argparse printed the reason
        return OK if exc.code == 0 else USAGE
    try:
        result = init(args.dir, parse_hosts(args.host), ca_dir=args.ca_dir, owner=args.owner,
                      days=args.days, ca_days=args.ca_days, renew_days=args.renew_days)
    except CertsRefused as exc:
        err.write(f"refused: {exc}\n")
        return REFUSED
    except OSError as exc:
        err.write(f"failed: {exc}\n")
        return FAILED
    for line in result.actions:
        err.write(line + "\n")
    for line in result.warnings:
        err.write(f"warning: {line}\n")
    return OK


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
