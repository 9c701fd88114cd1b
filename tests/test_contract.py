"""Unit tests of the device contract: topics, ids and payload decoding."""

from __future__ import annotations

import json

import pytest

from gateway.contract import (
    ActiveSession,
    BootState,
    Channel,
    Command,
    CommandKind,
    Mode,
    PayloadError,
    Phase,
    ProgramTiming,
    SessionProgram,
    Telemetry,
    TopicError,
    decode,
    parse_topic,
    topic,
)


def test_topic_round_trip() -> None:
    name = topic("clinic-1", "boot_07", Channel.TELEMETRY)
    assert name == "boots/v1/clinic-1/boot_07/telemetry"
    addr = parse_topic(name)
    assert (addr.clinic, addr.device, addr.channel) == ("clinic-1", "boot_07", Channel.TELEMETRY)


@pytest.mark.parametrize("name", [
    "boots/v1/c1/b1/bogus",
    "boots/v1/c1/b/1/telemetry",  # a device id with a slash adds a level
    "boots/v1/c1/b 1/telemetry",
    "boots/v1/c1/" + "x" * 65 + "/telemetry",
    "boots/v2/c1/b1/telemetry",
    "other/c1/b1/telemetry",
])
def test_bad_topics_are_refused(name: str) -> None:
    with pytest.raises(TopicError):
        parse_topic(name)


def test_topic_builder_refuses_bad_ids() -> None:
    with pytest.raises(ValueError):
        topic("c1", "a/b", Channel.STATE)


GOOD = {"seq": 1, "ts": 1.5, "phase": "hold", "pressures": [50.0, 49.0]}


@pytest.mark.parametrize(("payload", "kind", "text"), [
    (b"not json", "not_json", "not JSON"),
    (b'{"seq": 1, "ts": NaN, "phase": "hold", "pressures": [1]}', "invalid", "ts"),
    (json.dumps({**GOOD, "pressures": ["high", 1]}).encode(), "invalid", "pressures.0"),
    (json.dumps({**GOOD, "seq": -1}).encode(), "invalid", "seq"),
    (json.dumps({**GOOD, "phase": 7}).encode(), "invalid", "phase"),
    (json.dumps([1, 2]).encode(), "invalid", "payload"),
    (b"\xff\xfe", "not_json", "not JSON"),
    (b"x" * 20000, "too_large", "20000 bytes"),
])
def test_bad_payloads_raise_a_labelled_error(payload: bytes, kind: str, text: str) -> None:
    with pytest.raises(PayloadError) as err:
        decode(Channel.TELEMETRY, payload, max_bytes=16384)
    assert err.value.kind == kind
    assert text in str(err.value)


def test_an_unknown_phase_is_read_as_unknown_not_dropped() -> None:
    """A newer firmware's phase must not drop the sample: in a session that would be silence."""
    msg = decode(Channel.TELEMETRY, json.dumps({**GOOD, "phase": "warmup"}).encode(), 16384)
    assert isinstance(msg, Telemetry) and msg.phase is Phase.UNKNOWN


def test_nan_pressures_reach_the_watchdog() -> None:
    """Rule 6 judges NaN readings (vent + fault), so the contract lets them through."""
    msg = decode(Channel.TELEMETRY, b'{"seq": 1, "ts": 1, "phase": "hold", '
                 b'"pressures": [NaN, Infinity]}', 16384)
    assert isinstance(msg, Telemetry) and msg.pressures[1] == float("inf")
    with pytest.raises(PayloadError):
        decode(Channel.STATE, b'{"online": true, "firmware": "f", "chambers": 1, "zones": ["a"],'
               b' "max_pressure_mmhg": NaN, "telemetry_period_s": 1, "ts": 0}', 16384)


def test_good_payload_decodes() -> None:
    msg = decode(Channel.TELEMETRY, json.dumps(GOOD).encode(), 16384)
    assert isinstance(msg, Telemetry) and msg.pressures == [50.0, 49.0]


def test_state_zones_must_match_chambers() -> None:
    with pytest.raises(ValueError, match="zones has 1 entries for 2 chambers"):
        BootState(online=True, firmware="f", chambers=2, zones=["foot"], max_pressure_mmhg=120,
                  telemetry_period_s=0.5, ts=0)


def test_state_session_program_must_have_one_target_per_chamber() -> None:
    """The watchdog judges rule 2 chamber by chamber; a mismatched program cannot be watched."""
    timing = ProgramTiming(inflate_s=5, hold_s=5, deflate_s=5, pause_s=5)
    program = SessionProgram(name="p", mode=Mode.SEQUENTIAL, targets_mmhg=[40.0],
                             duration_s=600, timing=timing)
    with pytest.raises(ValueError, match="session program has 1 targets for 2 chambers"):
        BootState(online=True, firmware="f", chambers=2, zones=["foot", "calf"],
                  max_pressure_mmhg=120, telemetry_period_s=0.5, ts=0,
                  session=ActiveSession(session_id="s-1", program=program, started_at=0))


def test_start_command_needs_a_program() -> None:
    with pytest.raises(ValueError, match="needs a program"):
        Command(cmd_id="c-1", kind=CommandKind.START, issued_at=0)
    vent = Command(cmd_id="v-1", kind=CommandKind.VENT, issued_at=0)
    assert json.loads(vent.to_payload()) == {"cmd_id": "v-1", "kind": "vent", "issued_at": 0.0}


@pytest.mark.parametrize("name", [
    "boots/v1/_gateway/b1/state", "boots/v1/_gateway/b1/telemetry", "boots/v1/c1/b1\n/state",
    "boots/v1/c1\n/b1/state",
])
def test_reserved_clinic_and_trailing_newlines_are_not_boot_topics(name: str) -> None:
    with pytest.raises(TopicError):
        parse_topic(name)


def test_a_command_topic_is_never_built_under_the_reserved_level() -> None:
    with pytest.raises(ValueError):
        topic("_gateway", "alarm", Channel.CMD)


def test_deeply_nested_json_is_a_labelled_rejection_not_a_recursion_error() -> None:
    deep = b"[" * 3000 + b"]" * 3000
    for channel in (Channel.TELEMETRY, Channel.STATE, Channel.EVENT, Channel.ACK):
        with pytest.raises(PayloadError) as err:
            decode(channel, deep, max_bytes=16384)
        assert err.value.kind == "not_json" and "nested too deeply" in str(err.value)


def test_ids_in_payloads_refuse_a_trailing_newline() -> None:
    payload = json.dumps({**GOOD, "session_id": "s-1\n"}).encode()
    with pytest.raises(PayloadError):
        decode(Channel.TELEMETRY, payload, max_bytes=16384)
