"""The per-boot credentials file: what `boot-gateway boots add --credentials-out` writes and the
simulator (`python -m device_sim run --credentials`, a scenario's `broker.credentials_file`)
reads.

One object keyed by `"clinic/device"`, each entry the boot's broker identity:

    {"clinic-1/boot-001": {"username": "boot-001", "client_id": "boot-clinic-1-boot-001",
                           "password": "..."}}

JSON, or TOML with the same shape (`["clinic-1/boot-001"]` tables), chosen by the file's suffix.
It lives here, in `gateway`, because the gateway's provisioning command owns the format and
`device_sim` already depends on `gateway` (never the other way round). The file holds
passwords: it is written with mode 0600 and replaced atomically, so a crash mid-write leaves the
old file, never half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.contract import is_valid_clinic, is_valid_id


class CredentialsError(ValueError):
    """A credentials file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True, slots=True)
class BootCredentials:
    """One boot's broker identity. The password is a secret: never log an instance."""

    username: str
    password: str
    client_id: str | None = None  # None: the connecting side's default

    def __repr__(self) -> str:  # a stray log line or traceback must not show the password
        return (f"BootCredentials(username={self.username!r}, client_id={self.client_id!r}, "
                "password='***')")


def _parse_entry(path: Path, key: str, raw: object) -> BootCredentials:
    clinic, sep, device = key.partition("/")
    if not sep or not is_valid_clinic(clinic) or not is_valid_id(device):
        raise CredentialsError(f"{path}: {key!r} is not 'clinic/device'")
    if not isinstance(raw, Mapping):
        raise CredentialsError(f"{path}: {key}: an entry is an object with a password")
    password = raw.get("password")
    if not isinstance(password, str) or not password:
        raise CredentialsError(f"{path}: {key}: password missing or not a string")
    username = raw.get("username", device)
    client_id = raw.get("client_id")
    if not isinstance(username, str) or not username:
        raise CredentialsError(f"{path}: {key}: username must be a non-empty string")
    if client_id is not None and (not isinstance(client_id, str) or not client_id):
        raise CredentialsError(f"{path}: {key}: client_id must be a non-empty string")
    return BootCredentials(username=username, password=password, client_id=client_id)


def load_credentials(path: Path) -> dict[str, BootCredentials]:
    """Read a credentials file (JSON, or TOML by suffix); CredentialsError if it is unusable."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        doc = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        # The parser's message may quote the file (passwords): give only where it failed.
        where = getattr(exc, "lineno", None)
        raise CredentialsError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}"
                               + (f" (line {where})" if where else "")) from None
    if not isinstance(doc, dict):
        raise CredentialsError(f"{path}: the file must hold one object keyed by 'clinic/device'")
    return {key: _parse_entry(path, key, raw) for key, raw in doc.items()}


def write_private(path: Path, data: str) -> None:
    """Replace `path` with `data`, mode 0600 from the first byte, atomically (temp + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp: 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def update_credentials(path: Path, key: str, creds: BootCredentials | None) -> None:
    """Add (or replace) the entry `key`, or remove it when `creds` is None. JSON only: the
    TOML form is for hand-written files, which this must not rewrite and reformat."""
    if path.suffix == ".toml":
        raise CredentialsError(f"{path}: only JSON credentials files are written; use .json")
    doc: dict[str, object] = {}
    if path.exists():
        load_credentials(path)  # refuse to rewrite a file that is not ours to understand
        doc = json.loads(path.read_text(encoding="utf-8"))
    if creds is None:
        doc.pop(key, None)
    else:
        entry: dict[str, str] = {"username": creds.username, "password": creds.password}
        if creds.client_id is not None:
            entry["client_id"] = creds.client_id
        doc[key] = entry
    write_private(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")
