"""Fuzzing every decoder that takes outside input, with a fixed budget (hypothesis).

From MQTT: topic parsing, the payload of every channel (a boot's state, telemetry, event and
ack; a command as the boot decodes it), and the gateway's ingest entry point
`Gateway.handle_message(topic, payload)`, called directly on a gateway that is not connected
(no broker or database is needed to decide what a message does). From files: scenario files
(`device_sim.scenario.load_scenario`), YAML and TOML.

The property is the same everywhere: the input is decoded into a value that keeps the
contract's invariants (docs/protocol.md), or it gets the contract's documented rejection
(`TopicError`, `PayloadError` with its `kind`, `ScenarioError` with file and line), never
another exception. The ingest entry point never raises, counts every rejection, stores every
point it makes, and never changes what the gateway knows of a boot (its watchdog state
included) other than the one the topic names.

Spool records and API bodies are fuzzed in their own test files.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import math
import string
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from device_sim.local_stack import LocalInflux, LocalMosquitto
from device_sim.scenario import Scenario, ScenarioError, load_scenario
from gateway import service
from gateway.contract import (
    ALARM_TOPIC_PREFIX,
    HEARTBEAT_TOPIC,
    MAX_CHAMBERS,
    PAYLOAD_MODELS,
    RESERVED_CLINIC,
    TOPIC_ROOT,
    Ack,
    AckStatus,
    BootEvent,
    BootState,
    Channel,
    Command,
    CommandKind,
    EventKind,
    Mode,
    PayloadError,
    Phase,
    SessionProgram,
    Telemetry,
    TopicError,
    decode,
    is_valid_clinic,
    is_valid_id,
    parse_topic,
    topic,
)
from gateway.lineprotocol import Point
from gateway.service import Gateway
from gateway.storage import InfluxWriter
from tests.helpers import gateway_settings

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted((ROOT / "scenarios").glob("*.yaml"))
MAX_BYTES = 16_384  # the gateway's default max_payload_bytes
# InfluxDB's time range: nanoseconds since the epoch in a signed 64-bit integer.
INFLUX_MAX_NS = 2**63 - 1

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
SMALL = settings(FUZZ, max_examples=200)

NAN, INF = float("nan"), float("inf")

# ---------------------------------------------------------------- topics

IDS = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
WEIRD_LEVELS = ["", "+", "#", "\x00", "b\x001", "b1\n", "\nb1", " ", "b 1", "ü", "$SYS",
                RESERVED_CLINIC, "..", "boots", "v1", "x" * 65, "x" * 70_000, "b1/", "\ufffd",
                "\U0001f600", "b1\r", "state\n"]
LEVEL = st.one_of(IDS, st.sampled_from(WEIRD_LEVELS), st.text(max_size=80),
                  st.sampled_from([c.value for c in Channel]))
TOPICS = st.one_of(
    st.text(max_size=300),
    st.lists(LEVEL, max_size=8).map("/".join),
    st.tuples(LEVEL, LEVEL, LEVEL).map(lambda t: f"{TOPIC_ROOT}/{t[0]}/{t[1]}/{t[2]}"),
    st.tuples(IDS, IDS, st.sampled_from(Channel)).map(
        lambda t: f"{TOPIC_ROOT}/{t[0]}/{t[1]}/{t[2].value}"),
    st.sampled_from([HEARTBEAT_TOPIC, f"{HEARTBEAT_TOPIC}/state", f"{ALARM_TOPIC_PREFIX}/c1/b1",
                     f"{TOPIC_ROOT}/{RESERVED_CLINIC}/b1/state", f"{TOPIC_ROOT}/c1/b1/state/x",
                     f"{TOPIC_ROOT}/c1/b1", f"/{TOPIC_ROOT}/c1/b1/state", "boots/v2/c1/b1/state",
                     f"{TOPIC_ROOT}/c1/+/state", f"{TOPIC_ROOT}/#", f"{TOPIC_ROOT}/c1/b1/STATE"]),
)


@FUZZ
@given(TOPICS)
@example(f"{TOPIC_ROOT}/c1/b1/state\n")  # Python's `$` matches before a trailing newline
@example(f"{TOPIC_ROOT}/{RESERVED_CLINIC}/heartbeat/state")
@example(f"{TOPIC_ROOT}/c1/{'x' * 70_000}/state")
def test_a_topic_is_a_boot_topic_of_the_contract_or_a_topic_error(name: str) -> None:
    try:
        addr = parse_topic(name)
    except TopicError as exc:
        assert 0 < len(str(exc)) <= 2500  # fit for a log line: never the whole topic
        return
    assert is_valid_clinic(addr.clinic) and is_valid_id(addr.device)
    assert isinstance(addr.channel, Channel)
    assert topic(addr.clinic, addr.device, addr.channel) == name  # exactly, nothing more


# ---------------------------------------------------------------- payloads: strategies

TS = st.floats(min_value=0, max_value=4e9)
TEXT = st.text(max_size=40)


def _finite(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(min_value=lo, max_value=hi)


def _program(min_chambers: int = 1, max_chambers: int = MAX_CHAMBERS
             ) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({
        "name": st.text(min_size=1, max_size=80),
        "mode": st.sampled_from([m.value for m in Mode]),
        "targets_mmhg": st.lists(_finite(0, 200), min_size=min_chambers, max_size=max_chambers),
        "duration_s": _finite(1, 4 * 3600),
        "timing": st.fixed_dictionaries({
            "inflate_s": _finite(0.1, 120), "hold_s": _finite(0, 120),
            "deflate_s": _finite(0.1, 120), "pause_s": _finite(0, 120)}),
    }, optional={"max_inflation_s": _finite(0.1, 600)})


PROGRAM = _program()

VALID: dict[Channel, st.SearchStrategy[dict[str, Any]]] = {
    Channel.TELEMETRY: st.fixed_dictionaries({
        "seq": st.integers(0, 2**63 - 1), "ts": TS,
        "phase": st.sampled_from([p.value for p in Phase]) | TEXT,
        "pressures": st.lists(_finite(-20, 300), min_size=1, max_size=MAX_CHAMBERS),
    }, optional={"session_id": IDS, "session_elapsed_s": _finite(0, 1e5)}),
    Channel.STATE: st.integers(1, MAX_CHAMBERS).flatmap(lambda n: st.fixed_dictionaries({
        "online": st.booleans(), "firmware": st.text(max_size=64), "chambers": st.just(n),
        "zones": st.lists(TEXT, min_size=n, max_size=n),
        "max_pressure_mmhg": _finite(1, 300), "telemetry_period_s": _finite(0.01, 60),
        "ts": TS,
    }, optional={"session": st.fixed_dictionaries(
        {"session_id": IDS, "program": _program(n, n), "started_at": TS},
        optional={"cmd_id": IDS})})),
    Channel.EVENT: st.fixed_dictionaries({
        "kind": st.sampled_from([k.value for k in EventKind]), "ts": TS,
    }, optional={"session_id": IDS, "detail": st.text(max_size=500)}),
    Channel.ACK: st.fixed_dictionaries({
        "cmd_id": IDS, "status": st.sampled_from([s.value for s in AckStatus]), "ts": TS,
    }, optional={"reason": st.text(max_size=500)}),
    Channel.CMD: st.fixed_dictionaries({
        "cmd_id": IDS, "kind": st.sampled_from([CommandKind.STOP.value, CommandKind.VENT.value]),
        "issued_at": TS,
    }, optional={"expires_at": TS, "session_id": IDS, "reason": st.text(max_size=500)})
    | st.fixed_dictionaries({
        "cmd_id": IDS, "kind": st.just(CommandKind.START.value), "issued_at": TS,
        "expires_at": TS, "session_id": IDS, "program": PROGRAM}),
}


class Deep:
    """Placeholder for a value nested `depth` lists deep (json.dumps cannot write one)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth


JSON_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20))
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
BAD_VALUES = st.one_of(
    st.sampled_from([None, True, False, 0, -1, -0.0, 0.5, 12.0, -1e308, 1e308, 2**63, 2**64,
                     -(2**63) - 1, 10**30, 1e300, -1e300, 9.3e9, "", "150", "NaN", "true",
                     "x" * 10_000, "\ud800", "a\x00b", "\u202e", [], {}, [[]], {"a": {}},
                     [1.0] * (MAX_CHAMBERS + 1)]),
    st.sampled_from([NAN, INF, -INF]),
    st.integers(1, 5000).map(Deep),
    JSON_VALUES,
)


def dumps(obj: Any) -> bytes:
    """JSON with the extensions a boot may send (NaN, Infinity), and Deep nesting."""
    deep: list[int] = []

    def mark(o: Any) -> Any:
        if isinstance(o, Deep):
            deep.append(o.depth)
            return f"\x00DEEP{len(deep) - 1}\x00"
        if isinstance(o, dict):
            return {k: mark(v) for k, v in o.items()}
        if isinstance(o, list):
            return [mark(v) for v in o]
        return o

    text = json.dumps(mark(obj), allow_nan=True)
    for i, depth in enumerate(deep):
        text = text.replace(f'"\\u0000DEEP{i}\\u0000"', "[" * depth + "]" * depth)
    return text.encode()


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def _set(obj: Any, path: tuple[Any, ...], value: Any, delete: bool = False) -> Any:
    obj = copy.deepcopy(obj)
    parent = obj
    for part in path[:-1]:
        parent = parent[part]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


OVERLONG = [b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80",
            b"\xff", b"\xc3", b"\x80"]


@st.composite
def payloads(draw: st.DrawFn, channel: Channel) -> bytes:
    """Random bytes or JSON, or a valid payload of `channel` with one thing broken."""
    how = draw(st.sampled_from(["bytes", "json", "valid", "field", "delete", "extra", "dup",
                                "bytes_of_valid"]))
    if how == "bytes":
        return draw(st.binary(max_size=300))
    if how == "json":
        return dumps(draw(JSON_VALUES))
    valid = draw(VALID[channel])
    paths = list(_paths(valid))
    if how == "field" and paths:
        return dumps(_set(valid, draw(st.sampled_from(paths)), draw(BAD_VALUES)))
    if how == "delete" and paths:
        return dumps(_set(valid, draw(st.sampled_from(paths)), None, delete=True))
    if how == "extra":
        return dumps({**valid, draw(st.text(max_size=10)): draw(BAD_VALUES)})
    body = dumps(valid)
    if how == "dup":  # the same key twice: which one counts is the parser's guess
        key = draw(st.sampled_from(sorted(valid)))
        dup = f'"{key}": '.encode() + dumps(draw(BAD_VALUES)) + b", "
        return b"{" + dup + body[1:] if draw(st.booleans()) else body[:-1] + b", " + dup[:-2] + b"}"
    if how == "bytes_of_valid":
        op = draw(st.sampled_from(["bom", "utf16", "utf32", "overlong", "truncate", "trail",
                                   "flip", "huge", "nul"]))
        if op == "bom":
            return b"\xef\xbb\xbf" + body
        if op in ("utf16", "utf32"):
            return body.decode().encode("utf-16" if op == "utf16" else "utf-32")
        if op == "overlong":  # inside a string: an invalid or overlong UTF-8 sequence
            quotes = [i for i, b in enumerate(body) if b == ord('"')]
            at = draw(st.sampled_from(quotes)) + 1
            return body[:at] + draw(st.sampled_from(OVERLONG)) + body[at:]
        if op == "truncate":
            return body[:draw(st.integers(0, max(0, len(body) - 1)))]
        if op == "trail":
            return body + draw(st.sampled_from([b" x", b"{}", b"\x00", b"]", b" ", b"\n"]))
        if op == "flip":
            i = draw(st.integers(0, len(body) - 1))
            return body[:i] + bytes([body[i] ^ draw(st.integers(1, 255))]) + body[i + 1:]
        if op == "huge":
            return body[:-1] + b', "pad": "' + b"x" * MAX_BYTES + b'"}'
        return body.replace(b'"', b'"\x00', 1)
    return body


# ---------------------------------------------------------------- payloads: invariants


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"duplicate key accepted: {keys}"
    return dict(pairs)


def _finite_in(x: object, lo: float, hi: float, *, lo_open: bool = False) -> bool:
    return (isinstance(x, float) and math.isfinite(x) and (x > lo if lo_open else x >= lo)
            and x <= hi)


def _device_time(ts: object) -> bool:
    """The boot's clock: stored as the time of a point, so within InfluxDB's range."""
    return _finite_in(ts, 0, 9.2e9)


def _program_ok(p: SessionProgram) -> None:
    assert 1 <= len(p.name) <= 80 and isinstance(p.mode, Mode)
    assert 1 <= len(p.targets_mmhg) <= MAX_CHAMBERS
    assert all(_finite_in(t, -math.inf, math.inf) for t in p.targets_mmhg)
    assert _finite_in(p.duration_s, 0, 4 * 3600, lo_open=True)
    t = p.timing
    assert _finite_in(t.inflate_s, 0, 120, lo_open=True) and _finite_in(t.deflate_s, 0, 120,
                                                                          lo_open=True)
    assert _finite_in(t.hold_s, 0, 120) and _finite_in(t.pause_s, 0, 120)
    assert p.max_inflation_s is None or _finite_in(p.max_inflation_s, 0, math.inf, lo_open=True)


def _id_or_none(v: str | None) -> bool:
    return v is None or is_valid_id(v)


def check_message(channel: Channel, msg: object, payload: bytes) -> None:
    """What every consumer of a decoded message may rely on (docs/protocol.md §4, §6)."""
    assert type(msg) is PAYLOAD_MODELS[channel]
    text = payload.decode("utf-8")  # §4: UTF-8, so a valid message is valid UTF-8 (strict)
    assert not text.startswith("\ufeff"), "byte-order mark accepted"
    json.loads(text, object_pairs_hook=_unique_keys)
    cast(Any, msg).to_payload().decode("utf-8")  # every string is valid Unicode
    if isinstance(msg, Telemetry):
        assert isinstance(msg.seq, int) and 0 <= msg.seq < 2**63
        assert _device_time(msg.ts) and _id_or_none(msg.session_id)
        assert msg.session_elapsed_s is None or _finite_in(msg.session_elapsed_s, 0, math.inf)
        assert isinstance(msg.phase, Phase)
        assert 1 <= len(msg.pressures) <= MAX_CHAMBERS
        assert all(isinstance(p, float) for p in msg.pressures)  # NaN allowed: rule 6 judges
    elif isinstance(msg, BootState):
        assert type(msg.online) is bool and len(msg.firmware) <= 64
        assert type(msg.chambers) is int and 1 <= msg.chambers <= MAX_CHAMBERS
        assert len(msg.zones) == msg.chambers
        assert _finite_in(msg.max_pressure_mmhg, 0, 300, lo_open=True)
        assert _finite_in(msg.telemetry_period_s, 0, 60, lo_open=True)
        assert _device_time(msg.ts)
        if msg.session is not None:
            assert is_valid_id(msg.session.session_id) and _id_or_none(msg.session.cmd_id)
            assert _finite_in(msg.session.started_at, -math.inf, math.inf)
            _program_ok(msg.session.program)
            assert len(msg.session.program.targets_mmhg) == msg.chambers  # §4.1
    elif isinstance(msg, BootEvent):
        assert isinstance(msg.kind, EventKind) and _device_time(msg.ts)
        assert _id_or_none(msg.session_id) and (msg.detail is None or len(msg.detail) <= 500)
    elif isinstance(msg, Ack):
        assert is_valid_id(msg.cmd_id) and isinstance(msg.status, AckStatus)
        assert _device_time(msg.ts) and (msg.reason is None or len(msg.reason) <= 500)
    elif isinstance(msg, Command):
        assert is_valid_id(msg.cmd_id) and isinstance(msg.kind, CommandKind)
        assert _finite_in(msg.issued_at, -math.inf, math.inf)
        assert msg.expires_at is None or _finite_in(msg.expires_at, -math.inf, math.inf)
        assert _id_or_none(msg.session_id) and (msg.reason is None or len(msg.reason) <= 500)
        if msg.kind is CommandKind.START:
            assert msg.program is not None and msg.session_id is not None
        if msg.program is not None:
            _program_ok(msg.program)


def check_decode(channel: Channel, payload: bytes) -> PayloadError | None:
    try:
        msg = decode(channel, payload, MAX_BYTES)
    except PayloadError as exc:
        assert exc.kind in ("too_large", "not_json", "invalid")
        assert 0 < len(str(exc)) <= 600, str(exc)  # a reason fit for a log line
        assert (exc.kind == "too_large") == (len(payload) > MAX_BYTES)
        return exc
    check_message(channel, msg, payload)
    return None


CHANNEL_PAYLOADS = st.sampled_from(list(Channel)).flatmap(
    lambda c: st.tuples(st.just(c), payloads(c)))


@FUZZ
@given(CHANNEL_PAYLOADS)
@example((Channel.TELEMETRY, b'{"seq": 1, "ts": 1.0, "phase": "hold", "pressures": [1.0]}'
          .decode().encode("utf-16")))
@example((Channel.TELEMETRY, b'\xef\xbb\xbf{"seq": 1, "ts": 1.0, "phase": "hold", '
          b'"pressures": [1.0]}'))
@example((Channel.EVENT, b'{"kind": "fault", "ts": 1.0, "x": "\xed\xa0\x80"}'))
@example((Channel.ACK, b'{"cmd_id": "c-1", "status": "done", "status": "rejected", "ts": 1}'))
@example((Channel.TELEMETRY, b'{"seq": 1, "ts": 1e300, "phase": "hold", "pressures": [1.0]}'))
@example((Channel.EVENT, b'{"kind": "user_stop", "ts": -1e300}'))
@example((Channel.STATE, b'{"online": true, "firmware": "f", "chambers": 1, "zones": ["c"], '
          b'"max_pressure_mmhg": 100, "telemetry_period_s": 1, "ts": 1, "session": '
          b'{"session_id": "s-1", "started_at": 1, "program": {"name": "p", "targets_mmhg": '
          b'[50], "duration_s": 600, "max_inflation_s": Infinity, "timing": {"inflate_s": 1, '
          b'"hold_s": 1, "deflate_s": 1, "pause_s": 1}}}}'))
@example((Channel.CMD, b'{"cmd_id": "c-1", "kind": "stop", "issued_at": 1, '
          b'"expires_at": NaN}'))
@example((Channel.TELEMETRY, b'{"seq": 1, "ts": 1, "phase": "hold", "pressures": [' +
          b"[" * 100_000 + b"]" * 100_000 + b"]}"))
def test_a_payload_decodes_to_the_contract_or_a_labelled_rejection(
    case: tuple[Channel, bytes],
) -> None:
    check_decode(*case)


@SMALL
@given(st.sampled_from(list(Channel)).flatmap(lambda c: st.tuples(st.just(c), VALID[c])))
def test_every_valid_payload_decodes_and_survives_a_round_trip(
    case: tuple[Channel, dict[str, Any]],
) -> None:
    """The generators above make valid payloads, so the mutations start from real ones."""
    channel, data = case
    payload = dumps(data)
    assert check_decode(channel, payload) is None
    msg = decode(channel, payload, MAX_BYTES)
    assert decode(channel, msg.to_payload(), MAX_BYTES) == msg


# ---------------------------------------------------------------- the ingest entry point

KNOWN = [("c1", "b1"), ("c1", "b2"), ("c2", "b1")]
NEW = ("c3", "b9")


def _setup_messages(now: float) -> list[tuple[str, bytes]]:
    """Three boots: one in a session resumed from telemetry, one idle, one in a session from
    its retained state (with its program)."""
    def state(session: dict[str, Any] | None = None) -> bytes:
        body: dict[str, Any] = {
            "online": True, "firmware": "2.4.1", "chambers": 4,
            "zones": ["foot", "calf", "knee", "thigh"], "max_pressure_mmhg": 150.0,
            "telemetry_period_s": 1.0, "ts": now}
        if session:
            body["session"] = session
        return json.dumps(body).encode()

    program = {"name": "p", "targets_mmhg": [60.0, 58.0, 56.0, 54.0], "duration_s": 900.0,
               "timing": {"inflate_s": 3, "hold_s": 5, "deflate_s": 6, "pause_s": 6}}
    sample = Telemetry(seq=5, ts=now, phase=Phase.HOLD, session_id="s-c1b1",
                       session_elapsed_s=30.0, pressures=[40.0, 38.0, 36.0, 34.0])
    return [
        (topic("c1", "b1", Channel.STATE), state()),
        (topic("c1", "b2", Channel.STATE), state()),
        (topic("c2", "b1", Channel.STATE), state({"session_id": "s-c2b1", "program": program,
                                                  "started_at": now - 60})),
        (topic("c1", "b1", Channel.TELEMETRY), sample.to_payload()),
    ]


@pytest.fixture(scope="module")
def gateway_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], Gateway]]:
    """Gateways with the tests' settings, never connected: the broker and InfluxDB are never
    reached (the addresses are unused ports); storage queues in memory. They share one
    unused HTTP client: making one loads the CA store, 65 ms per gateway."""
    work = tmp_path_factory.mktemp("fuzz-gw")
    broker = cast(LocalMosquitto, SimpleNamespace(port=9))
    influx = cast(LocalInflux, SimpleNamespace(url="http://127.0.0.1:9"))
    cfg = gateway_settings(broker, influx, session_journal=work / "sessions.jsonl")
    client = httpx.AsyncClient(base_url=cfg.influx.url)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(service, "InfluxWriter", functools.partial(InfluxWriter, client=client))
        yield lambda: Gateway(cfg)
    asyncio.run(client.aclose())


def _topic_for(boot: tuple[str, str], channel: Channel) -> str:
    return topic(boot[0], boot[1], channel)


MESSAGES = st.one_of(
    st.tuples(st.sampled_from([*KNOWN, NEW]), st.sampled_from(list(Channel))).flatmap(
        lambda bc: st.tuples(st.just(_topic_for(*bc)), payloads(bc[1]) | VALID[bc[1]].map(dumps)
                             | st.just(b""))),
    st.tuples(TOPICS, st.binary(max_size=100) | JSON_VALUES.map(dumps)),
)


def _storable(p: Point) -> None:
    line = p.encode().encode("utf-8")
    assert b"\n" not in line and b"\r" not in line
    assert abs(p.time_us) * 1000 <= INFLUX_MAX_NS, (p.measurement, p.time_us)


def _ingest_one(gw: Gateway, submitted: list[Point], name: str, payload: bytes) -> None:
    try:
        addr = parse_topic(name)
    except TopicError:
        addr = None
    others = {k: copy.deepcopy(b) for k, b in gw.fleet.boots.items()
              if addr is None or k != addr.key}
    messages, rejected = gw.stats.messages.copy(), gw.stats.rejected.copy()
    n_points = len(submitted)

    gw.handle_message(name, payload)  # never raises

    for key, boot in others.items():  # no other boot changed, its watchdog state included
        assert gw.fleet.boots.get(key) == boot, key
    assert set(gw.fleet.boots) <= set(others) | ({addr.key} if addr else set())
    new_rejected = gw.stats.rejected - rejected
    if addr is None:
        own = name == HEARTBEAT_TOPIC or name.startswith(
            (f"{HEARTBEAT_TOPIC}/", f"{ALARM_TOPIC_PREFIX}/"))  # protocol §5: the gateways
        assert new_rejected == ({} if own else {"bad_topic": 1})
        assert gw.stats.messages == messages and len(submitted) == n_points
        return
    if addr.channel is Channel.CMD or (addr.channel is Channel.STATE and not payload):
        assert gw.stats.messages == messages and not new_rejected
        return
    refused = check_decode(addr.channel, payload)
    new_messages = gw.stats.messages - messages
    if refused is not None:  # counted once under its kind, and stored as a device fault
        assert new_rejected == {refused.kind: 1} and not new_messages
        faults = [p for p in submitted[n_points:] if p.measurement == "device_fault"]
        assert [p.tags["kind"] for p in faults] == [refused.kind]
        assert (faults[0].tags["clinic"], faults[0].tags["device"]) == (addr.clinic,
                                                                         addr.device)
    else:
        assert new_messages == {addr.channel.value: 1}


@FUZZ
@given(st.lists(MESSAGES, min_size=1, max_size=3))
@example([(topic("c2", "b1", Channel.TELEMETRY),
           b'{"seq": 9, "ts": 1e300, "phase": "hold", "pressures": [1.0, 1.0, 1.0, 1.0]}')])
@example([(topic("c1", "b1", Channel.EVENT), b'{"kind": "user_stop", "ts": 1e12, '
           b'"session_id": "s-c1b1"}')])
@example([(topic("c1", "b1", Channel.STATE), b"")])
@example([(topic("c1", "b2", Channel.STATE),  # a lone surrogate: GET /api/v1/boots failed
           b'{"online": true, "firmware": "", "chambers": 1, "zones": ["\\ud800"], '
           b'"max_pressure_mmhg": 1.0, "telemetry_period_s": 1.0, "ts": 0.0}')])
@example([(f"{TOPIC_ROOT}/c1/b1/state\n", b"{}")])
@example([  # a session program with 1 target for 11 chambers: the watchdog raised (CI run 17)
    (topic("c2", "b1", Channel.STATE),
     b'{"online": false, "firmware": "", "chambers": 11, "zones": ["", "", "", "", "", "", "",'
     b' "", "", "", ""], "max_pressure_mmhg": 1.0, "telemetry_period_s": 1.0, "ts": 0.0, '
     b'"session": {"session_id": "0", "program": {"name": "0", "mode": "sequential", '
     b'"targets_mmhg": [0.0], "duration_s": 1.0, "timing": {"inflate_s": 1.0, "hold_s": 0.0,'
     b' "deflate_s": 1.0, "pause_s": 0.0}}, "started_at": 0.0}}'),
    (topic("c2", "b1", Channel.TELEMETRY),
     b'{"seq": 0, "ts": 0.0, "phase": "idle", "pressures": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,'
     b' 0.0, 0.0, 0.0, 0.0]}')])
def test_ingest_never_raises_counts_every_rejection_and_touches_only_the_named_boot(
    gateway_factory: Callable[[], Gateway], messages: list[tuple[str, bytes]],
) -> None:
    async def run() -> None:
        gw = gateway_factory()
        submitted: list[Point] = []
        real = gw.writer.submit

        def submit(point: Point) -> None:
            submitted.append(point)
            real(point)

        gw.writer.submit = submit  # type: ignore[method-assign]
        try:
            for name, payload in _setup_messages(gw.clock()):
                gw.handle_message(name, payload)
            assert gw.fleet.boots["c1/b1"].session is not None
            assert gw.fleet.boots["c2/b1"].session is not None
            for name, payload in messages:
                _ingest_one(gw, submitted, name, payload)
            for p in submitted:
                _storable(p)  # nothing the gateway made of it is refused by InfluxDB
            assert gw.writer.stats.points_refused == 0
        finally:
            gw.journal.close()

    asyncio.run(run())


# ---------------------------------------------------------------- scenario files

SCENARIO_TEXTS = {p.name: p.read_text() for p in SCENARIOS}
YAML_SCALARS = ["~", "[]", "{}", ".nan", ".inf", "-.inf", "-1", "0", "1e400", "1e-400",
                "99999999999999999999999999", "true", "no", "&a [*a]", "*nowhere", "!!binary aGk=",
                "!!python/object:os.system x", "!!set {a, b}", "2020-01-01", "2020-01-01 10:00:00",
                '"\\ud800"', "'", '"', "|", ">", "- x", "? x", "[" * 3000 + "]" * 3000,
                "{a: " * 2000 + "1" + "}" * 2000, "0x1F", "0o17", "1_000", "12:30:00",
                "'" + "x" * 5000 + "'", "\t", "%YAML 1.1", "---", "...", "@x", "`x"]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v) if not isinstance(v, float) or math.isfinite(v) else (
            "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}"
                               for k, x in v.items()) + "}"
    return json.dumps(str(v))


def to_toml(data: dict[str, Any]) -> str:
    """A small TOML writer for scenario-shaped data: tables, arrays of tables, inline rest."""
    head, tables = [], []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append(f"\n[{k}]\n" + "".join(f"{json.dumps(str(a))} = {_toml_value(b)}\n"
                                                  for a, b in v.items()))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for item in v:
                tables.append(f"\n[[{k}]]\n" + "".join(
                    f"{json.dumps(str(a))} = {_toml_value(b)}\n" for a, b in item.items()))
        else:
            head.append(f"{json.dumps(str(k))} = {_toml_value(v)}\n")
    return "".join(head) + "".join(tables)


SHIPPED_DATA = {name: yaml.safe_load(text) for name, text in SCENARIO_TEXTS.items()}


@st.composite
def scenario_files(draw: st.DrawFn) -> tuple[str, str]:
    """(suffix, text): a shipped scenario with one thing changed, as YAML or TOML, or noise."""
    how = draw(st.sampled_from(["line", "value", "data", "toml_data", "toml_text", "noise"]))
    name = draw(st.sampled_from(sorted(SCENARIO_TEXTS)))
    text, data = SCENARIO_TEXTS[name], SHIPPED_DATA[name]
    if how == "noise":
        suffix = draw(st.sampled_from([".yaml", ".toml"]))
        return suffix, draw(st.text(max_size=200) | JSON_VALUES.map(
            lambda v: yaml.safe_dump(v) if suffix == ".yaml" else to_toml({"x": v})))
    if how == "line":  # delete, repeat, indent or cut a line; or put text into it
        lines = text.splitlines(keepends=True)
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "repeat", "indent", "cut", "insert"]))
        if op == "delete":
            del lines[i]
        elif op == "repeat":
            lines.insert(i, lines[i])
        elif op == "indent":
            lines[i] = draw(st.sampled_from([" ", "  ", "\t", "    "])) + lines[i]
        elif op == "cut":
            lines[i] = lines[i][:draw(st.integers(0, len(lines[i])))] + "\n"
        else:
            at = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:at] + draw(st.sampled_from(YAML_SCALARS) | st.text(
                alphabet=string.printable, max_size=10)) + lines[i][at:]
        return ".yaml", "".join(lines)
    if how == "value":  # a `key: value` line gets another value, as YAML text
        lines = text.splitlines(keepends=True)
        keyed = [i for i, ln in enumerate(lines) if ": " in ln and not ln.lstrip().startswith("#")]
        i = draw(st.sampled_from(keyed))
        key = lines[i].split(": ", 1)[0]
        lines[i] = f"{key}: {draw(st.sampled_from(YAML_SCALARS))}\n"
        return ".yaml", "".join(lines)
    mutated = data
    paths = list(_paths(data))
    if paths:
        value = draw(BAD_VALUES.filter(lambda v: not isinstance(v, Deep)) | st.sampled_from(
            [10**6, 100_000, 3600.0, 7 * 86400.0, 1e-9, "stuck_valve", "default"]))
        mutated = _set(data, draw(st.sampled_from(paths)), value,
                       delete=draw(st.booleans()) and how != "toml_text")
    if how == "data":
        return ".yaml", yaml.safe_dump(mutated, allow_unicode=True)
    toml = to_toml(mutated)
    if how == "toml_text":
        lines = toml.splitlines(keepends=True)
        i = draw(st.integers(0, len(lines) - 1))
        at = draw(st.integers(0, len(lines[i])))
        lines[i] = lines[i][:at] + draw(st.sampled_from(
            ["[", "]", "=", '"', "'", '"""', "[[x]]", "\n[fleet]\n", "{", "}", ",", "#",
             "[" * 3000 + "]" * 3000, "{a = " * 2000 + "1" + "}" * 2000, "\\", "\x00", "\x7f",
             "1979-05-27T07:32:00Z", "0x", "+inf", "nan"])) + lines[i][at:]
        return ".toml", "".join(lines)
    return ".toml", toml


@pytest.fixture(scope="module")
def scenario_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-scenarios")


def check_scenario_file(path: Path) -> None:
    try:
        scenario = load_scenario(path)
    except ScenarioError as exc:
        assert exc.problems and str(exc)
        for problem in exc.problems:
            assert problem.msg
            assert problem.line is not None and problem.line >= 1, problem
        return
    assert isinstance(scenario, Scenario)
    assert scenario.fault_plan() == scenario.fault_plan()  # and it can be run


RECURSIVE_ALIAS = "name: x\nduration_s: 60\nfaults: &a [*a]\n"
DEEP_YAML = "name: x\nduration_s: 60\ndescription: " + "[" * 5000 + "]" * 5000 + "\n"
DEEP_BLOCK = "name: x\n" + "".join(" " * i + "a:\n" for i in range(2000)) + " " * 2000 + "1\n"
DEEP_TOML = 'name = "x"\nduration_s = 60\ndescription = ' + "[" * 5000 + "]" * 5000 + "\n"
DEEP_INLINE_TOML = 'name = "x"\nx = ' + "{a = " * 3000 + "1" + "}" * 3000 + "\n"
# nine aliases of nine: 9**9 nodes if each alias is walked again
LAUGHS = "".join(
    f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "x"] * 9) + "]\n" for i in range(9))


@FUZZ
@given(scenario_files())
@example((".yaml", RECURSIVE_ALIAS))
@example((".yaml", DEEP_YAML))
@example((".yaml", DEEP_BLOCK))
@example((".yaml", LAUGHS + "name: x\nduration_s: 60\n"))
@example((".toml", DEEP_TOML))
@example((".toml", DEEP_INLINE_TOML))
def test_a_scenario_file_loads_or_says_where_it_is_wrong(
    scenario_dir: Path, case: tuple[str, str],
) -> None:
    suffix, text = case
    path = scenario_dir / f"fuzz{suffix}"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    check_scenario_file(path)
