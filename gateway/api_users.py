"""Who may call the HTTP API, and what each role may do: users, hashed tokens, the route table.

The API is closed by default (docs/deploy.md, "API users, roles and the audit trail"):
  * `api.users`: named users with a role, each holding the SHA-256 of a random token, never the
    token itself. The tokens are 32 random bytes, so an unsalted SHA-256 is the right hash (as
    for GitHub or PyPI tokens): there is nothing to guess, and a slow password hash would only
    cost time on every request. A leaked settings file gives no working token.
  * `api.token`: the simple setup, one shared secret; it is the `ops` user named `token`.
  * `api.allow_anonymous = true`: an open API, every caller is the `ops` user `anonymous`.
    Only when set explicitly; with no user and no token the gateway refuses to start.

`ROUTES` is the one table of who may call what. The gate (gateway/api_guard.py) looks every
request up in it before FastAPI reads the body, so a caller without the role gets 403 without
a byte of the body parsed; a route missing from it is never reachable (tests/test_api_roles.py
checks that every route of the app is in it).

`cli()` is `boot-gateway users ...`: a new user's token and the lines that configure it, or the
hash of a token read from stdin.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import re
import secrets
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TextIO

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.audit import AuditAction
from gateway.contract import ID_PATTERN, is_valid_id

if TYPE_CHECKING:
    from gateway.settings import ApiSettings

TOKEN_PREFIX = "bgw_"  # lets secret scanners (and people) recognise a leaked token
TOKEN_BYTES = 32
LEGACY_TOKEN_USER = "token"  # api.token, as a user
ANONYMOUS_USER = "anonymous"  # every caller with api.allow_anonymous
RESERVED_NAMES = frozenset({LEGACY_TOKEN_USER, ANONYMOUS_USER})
SHA256_HEX = r"^[0-9a-fA-F]{64}$"


class Role(StrEnum):
    FRONT_DESK = "front_desk"  # start, stop, vent; reads boots, programs, commands
    MANAGER = "manager"  # reads everything, acknowledges alarms
    OPS = "ops"  # everything


class ApiUser(BaseModel):
    """One API user as configured: `[[api.users]]` in TOML, or JSON in BOOTGW_API__USERS."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=ID_PATTERN, description="shown as the actor in the audit trail")
    role: Role
    token_sha256: str = Field(
        pattern=SHA256_HEX, description="hex SHA-256 of the user's token "
        "(`boot-gateway users new` or `users hash`); the token itself is never configured",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_plaintext(cls, data: Any) -> Any:
        # A token pasted where its hash belongs would otherwise be a bare "extra input" error,
        # and the secret would sit in the settings file: say what to do instead.
        if isinstance(data, dict) and ("token" in data or "password" in data):
            raise ValueError("an API user holds token_sha256, never the token itself: "
                             "hash it with `boot-gateway users hash`")
        return data

    @field_validator("token_sha256")
    @classmethod
    def _lower(cls, digest: str) -> str:
        return digest.lower()


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token, as `token_sha256` holds it."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one request, as the gate established it."""

    name: str
    role: Role
    anonymous: bool = False


ANONYMOUS = Principal(ANONYMOUS_USER, Role.OPS, anonymous=True)


class ApiClosedError(ValueError):
    """The API has no way in (no user, no token) and anonymous access was not allowed."""


CLOSED_REASON = ("the HTTP API has no users: set api.users (`boot-gateway users new NAME "
                 "--role ROLE`) or api.token, or set api.allow_anonymous = true to run it "
                 "open on purpose")


def check_users(api: ApiSettings) -> None:
    """Configuration errors of the user list (run by ApiSettings' validator)."""
    names = [u.name for u in api.users]
    if api.token is not None:
        names.append(LEGACY_TOKEN_USER)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"api.users: names used twice: {dupes} (api.token is the user "
                         f"'{LEGACY_TOKEN_USER}')")
    reserved = sorted({u.name for u in api.users} & RESERVED_NAMES)
    if reserved:
        raise ValueError(f"api.users: reserved names {reserved}")
    digests = [u.token_sha256 for u in api.users]
    if len(set(digests)) != len(digests):
        raise ValueError("api.users: two users with the same token_sha256; give each its own")
    if api.allow_anonymous and (api.users or api.token is not None):
        raise ValueError("api.allow_anonymous is set together with api.users or api.token: "
                         "an anonymous caller would get past every user; choose one")


class Authenticator:
    """Bearer token -> user, in constant time over all users (no early exit, no timing hint)."""

    def __init__(self, api: ApiSettings) -> None:
        self.anonymous = api.allow_anonymous
        entries: list[tuple[Principal, bytes]] = [
            (Principal(u.name, u.role), bytes.fromhex(u.token_sha256)) for u in api.users]
        if api.token is not None:
            entries.append((Principal(LEGACY_TOKEN_USER, Role.OPS),
                            hashlib.sha256(api.token.get_secret_value().encode()).digest()))
        self._entries = tuple(entries)
        if not entries and not self.anonymous:
            raise ApiClosedError(CLOSED_REASON)

    @property
    def users(self) -> int:
        return len(self._entries)

    def authenticate(self, authorization: bytes | None) -> Principal | None:
        """The user of an `Authorization: Bearer <token>` header value, or None."""
        if self.anonymous:
            return ANONYMOUS
        scheme, _, token = (authorization or b"").partition(b" ")
        if scheme.lower() != b"bearer":
            token = b""
        digest = hashlib.sha256(token.strip()).digest()
        found: Principal | None = None
        for principal, expected in self._entries:
            if hmac.compare_digest(digest, expected) and found is None:
                found = principal
        return found if token.strip() else None


# ---------------------------------------------------------------- who may call what

ALL_ROLES = frozenset(Role)
READERS = ALL_ROLES  # boots, programs, commands: what the front desk needs to act
SUPERVISORS = frozenset({Role.MANAGER, Role.OPS})  # alarms, stats, audit
ACTORS = frozenset({Role.FRONT_DESK, Role.OPS})  # start, stop, vent


@dataclass(frozen=True, slots=True)
class RouteRule:
    method: str
    path: str  # the route's template, as FastAPI has it: /api/v1/boots/{clinic}/{device}
    roles: frozenset[Role] | None  # None: public (no token)
    action: AuditAction | None = None  # audited: a 403 for it is an audit record too

    @property
    def pattern(self) -> re.Pattern[str]:
        return _compile(self.path)


def _compile(template: str) -> re.Pattern[str]:
    # Starlette's default path converter: a parameter is one non-empty segment.
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)"
                    for i, p in enumerate(parts))
    return re.compile(f"^{regex}$")


ROUTES: tuple[RouteRule, ...] = (
    RouteRule("GET", "/health", None),
    RouteRule("GET", "/openapi.json", None),
    RouteRule("GET", "/docs", None),
    RouteRule("GET", "/docs/oauth2-redirect", None),
    RouteRule("GET", "/redoc", None),
    RouteRule("GET", "/api/v1/boots", READERS),
    RouteRule("GET", "/api/v1/boots/{clinic}/{device}", READERS),
    RouteRule("GET", "/api/v1/programs", READERS),
    RouteRule("POST", "/api/v1/boots/{clinic}/{device}/session", ACTORS,
              AuditAction.SESSION_START),
    RouteRule("POST", "/api/v1/boots/{clinic}/{device}/stop", ACTORS, AuditAction.SESSION_STOP),
    RouteRule("POST", "/api/v1/boots/{clinic}/{device}/vent", ACTORS, AuditAction.VENT),
    RouteRule("GET", "/api/v1/commands/{cmd_id}", READERS),
    RouteRule("GET", "/api/v1/alarms", SUPERVISORS),
    RouteRule("POST", "/api/v1/alarms/{alarm_id}/ack", SUPERVISORS, AuditAction.ALARM_ACK),
    RouteRule("GET", "/api/v1/stats", SUPERVISORS),
    RouteRule("GET", "/api/v1/audit", SUPERVISORS),
)


@dataclass(frozen=True, slots=True)
class RouteMatch:
    rule: RouteRule | None  # None: the path is known but not with this method
    params: dict[str, str]
    allowed_methods: tuple[str, ...]


class RouteTable:
    """Method + path -> the rule, by the same path matching as Starlette's router."""

    def __init__(self, rules: Iterable[RouteRule] = ROUTES) -> None:
        self.rules = tuple(rules)
        self._compiled = [(r, r.pattern) for r in self.rules]

    def match(self, method: str, path: str) -> RouteMatch | None:
        """None for a path no rule knows."""
        method = "GET" if method == "HEAD" else method
        methods: list[str] = []
        for rule, pattern in self._compiled:
            found = pattern.match(path)
            if found is None:
                continue
            if rule.method == method:
                return RouteMatch(rule, found.groupdict(), (rule.method,))
            methods.append(rule.method)
        if methods:
            return RouteMatch(None, {}, tuple(methods))
        return None


def role_names(roles: Iterable[Role]) -> str:
    ordered = [r.value for r in Role if r in set(roles)]
    return " or ".join(ordered)


# ---------------------------------------------------------------- boot-gateway users ...


def _toml_lines(user: ApiUser) -> str:
    return (f'[[api.users]]\nname = "{user.name}"\nrole = "{user.role.value}"\n'
            f'token_sha256 = "{user.token_sha256}"')


def _env_line(user: ApiUser) -> str:
    doc = json.dumps([user.model_dump(mode="json")])
    return f"BOOTGW_API__USERS='{doc}'"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="boot-gateway users",
                                description="API users: a new user's token, or a token's hash")
    sub = p.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="make a token for a new user; prints it once, with the "
                         "configuration lines that hold its hash")
    new.add_argument("name", help="the user's name (letters, digits, _ and -; at most 64)")
    new.add_argument("--role", required=True, choices=[r.value for r in Role])
    sub.add_parser("hash", help="the token_sha256 of a token read from stdin")
    return p


def cli(argv: Sequence[str], stdin: TextIO | None = None, stdout: TextIO | None = None,
        stderr: TextIO | None = None) -> int:
    """`boot-gateway users new NAME --role ROLE` | `boot-gateway users hash` (token on stdin).

    Exit codes: 0 done, 2 bad arguments or input. The token is printed to stdout only, once;
    it is not logged and not stored.
    """
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        args = _parser().parse_args(list(argv))
    except SystemExit as exc:  # argparse has printed its message
        return 0 if exc.code == 0 else 2
    if args.command == "hash":
        token = stdin.read().strip()
        if not token:
            err.write("no token on stdin\n")
            return 2
        out.write(hash_token(token) + "\n")
        return 0
    if not is_valid_id(args.name) or args.name in RESERVED_NAMES:
        err.write(f"bad user name {args.name!r}: letters, digits, '_' and '-', 1-64 "
                  f"characters, not {sorted(RESERVED_NAMES)}\n")
        return 2
    token = new_token()
    user = ApiUser(name=args.name, role=Role(args.role), token_sha256=hash_token(token))
    out.write(
        f"token for {user.name} (role {user.role.value}); shown only now, store it in a "
        f"password manager and give it to the user:\n\n    {token}\n\n"
        f"the gateway keeps only its hash; add to bootgw.toml:\n\n{_toml_lines(user)}\n\n"
        f"or to the environment (BOOTGW_API__USERS holds the whole list as JSON; merge with "
        f"the users you have):\n\n{_env_line(user)}\n")
    return 0
