"""The telemetry fast path must never take a payload the full decoder refuses, nor read one
differently: hostile bytes on a boot's telemetry topic get the same answer either way.

Written against the contract (docs/protocol.md §4: strict UTF-8, no key twice, strict types,
NaN only where a reading may be), not against the fast path's guard: the payloads below mix
valid samples with every kind of near miss a boot or an attacker could send.
"""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.contract import (
    Channel,
    PayloadError,
    Phase,
    Telemetry,
    decode,
    decode_full,
    telemetry_fast,
)

KEYS = ["seq", "ts", "phase", "pressures", "session_id", "session_elapsed_s"]
# Ways a key can be spelt that mean the same or nearly the same to some parser.
KEY_SPELLINGS = [*KEYS, "se\\u0071", "Seq", "seq ", "extra", "", "p\\\"h", "ts\u00e9"]


def _number_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers(min_value=-(2**70), max_value=2**70).map(str),
        st.floats(allow_nan=False, allow_infinity=False).map(repr),
        st.sampled_from(["NaN", "Infinity", "-Infinity", "nan", "inf", "1e999", "-1e999",
                         "1.0", "0", "-0", "-0.0", "1E3", "1e-400", "01", "1.", ".5", "+1",
                         "9223372036854775807", "9223372036854775808", "9.2e9", "9.3e9",
                         "1796172552.600647", "0x10", "1_000"]),
    )


def _string_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from([p.value for p in Phase] + ["s-abc123", "x" * 65, "a\\nb", "\\u00e9",
                                                    "\u00e9", "a b", "a\"", "", "\\ud800",
                                                    "seq", "\\\""]),
        st.text(max_size=8),
    ).map(lambda s: f'"{s}"')


_scalar = st.one_of(_number_text(), _string_text(),
                    st.sampled_from(["true", "false", "null", "[]", "{}"]))
_value = st.one_of(
    _scalar,
    st.lists(st.one_of(_number_text(), _string_text(), st.just("null")), max_size=14).map(
        lambda xs: "[" + ",".join(xs) + "]"),
    st.dictionaries(st.sampled_from(KEYS), _number_text(), max_size=2).map(json.dumps),
)


def _valid_pairs() -> st.SearchStrategy[list[tuple[str, str]]]:
    """A sample the contract accepts, as (key, value text) pairs."""
    reading = st.one_of(st.floats(min_value=-20, max_value=300).map(repr),
                        st.integers(min_value=0, max_value=300).map(str),
                        st.sampled_from(["NaN", "Infinity"]))
    return st.fixed_dictionaries(
        {"seq": st.integers(min_value=0, max_value=2**63 - 1).map(str),
         "ts": st.floats(min_value=0, max_value=9.2e9).map(repr),
         "phase": st.sampled_from([f'"{p.value}"' for p in Phase] + ['"newer"']),
         "pressures": st.lists(reading, min_size=1, max_size=12).map(
             lambda xs: "[" + ",".join(xs) + "]")},
        optional={"session_id": st.sampled_from(['"s-1"', '"A_b-9"', "null"]),
                  "session_elapsed_s": st.one_of(st.floats(min_value=0, max_value=1e6).map(repr),
                                                 st.just("null"))},
    ).map(lambda d: list(d.items()))


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    pairs = draw(_valid_pairs())
    for _ in range(draw(st.integers(0, 3))):  # near misses: change, add or repeat a key
        what = draw(st.sampled_from(["change", "add", "repeat", "drop"]))
        if what == "change" and pairs:
            i = draw(st.integers(0, len(pairs) - 1))
            pairs[i] = (pairs[i][0], draw(_value))
        elif what == "add":
            pairs.append((draw(st.sampled_from(KEY_SPELLINGS)), draw(_value)))
        elif what == "repeat" and pairs:
            key = draw(st.sampled_from(pairs))[0]
            pairs.append((key, draw(_value)))
        elif what == "drop" and pairs:
            pairs.pop(draw(st.integers(0, len(pairs) - 1)))
    pairs = draw(st.permutations(pairs))
    space = draw(st.sampled_from(["", " ", "\n", "\t "]))
    text = "{" + ",".join(f'{space}"{k}"{space}:{space}{v}' for k, v in pairs) + space + "}"
    data = text.encode("utf-8", "surrogatepass")
    wrap = draw(st.sampled_from(["", "bom", "trail", "utf16", "lead"]))
    if wrap == "bom":
        data = b"\xef\xbb\xbf" + data
    elif wrap == "trail":
        data += draw(st.sampled_from([b" ", b"x", b"{}", b"\x00", b"\xff"]))
    elif wrap == "utf16":
        data = text.encode("utf-16", "surrogatepass")
    elif wrap == "lead":
        data = draw(st.sampled_from([b" ", b"\n", b"\xff"])) + data
    return data


def _same(a: Telemetry, b: Telemetry) -> bool:
    """Equal field by field, a NaN reading equal to a NaN reading."""
    da, db = a.model_dump(), b.model_dump()
    pa, pb = da.pop("pressures"), db.pop("pressures")
    return da == db and len(pa) == len(pb) and all(
        (math.isnan(x) and math.isnan(y)) or (x == y and type(x) is type(y))
        for x, y in zip(pa, pb, strict=True))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads())
@example(b'{"seq":1,"seq":2,"ts":1.0,"phase":"idle","pressures":[1.0]}')
@example(b'{"seq":1,"se\\u0071":2,"ts":1.0,"phase":"idle","pressures":[1.0]}')
@example(b'{"seq":1,"ts":1.0,"phase":"idle","pressures":[1.0],"extra":"x"}')
@example(b'\xef\xbb\xbf{"seq":1,"ts":1.0,"phase":"idle","pressures":[1.0]}')
@example(b'{"seq":1,"ts":1.0,"phase":"\xc3\xa9","pressures":[1.0]}')
@example(b'{"seq":1,"ts":1.0,"phase":"idle","pressures":[NaN],"session_id":null}')
def test_what_the_fast_path_takes_the_full_decoder_takes_the_same(payload: bytes) -> None:
    fast = telemetry_fast(payload)
    try:
        full = decode_full(Channel.TELEMETRY, payload)
    except PayloadError as exc:
        assert fast is None, f"fast path took what the full decoder refuses ({exc})"
        return
    assert isinstance(full, Telemetry)
    if fast is not None:
        assert _same(fast, full), (fast, full)
    # decode() answers as the full decoder does, whichever way it went
    got = decode(Channel.TELEMETRY, payload, 65536)
    assert isinstance(got, Telemetry) and _same(got, full)


@settings(max_examples=300, deadline=None)
@given(_valid_pairs(), st.permutations(range(6)))
def test_plain_samples_take_the_fast_path(pairs: list[tuple[str, str]], _: list[int]) -> None:
    """The point of it: what a boot following the contract sends is decoded in one pass."""
    payload = ("{" + ",".join(f'"{k}":{v}' for k, v in pairs) + "}").encode()
    assert telemetry_fast(payload) is not None


def test_what_a_simulated_boot_sends_takes_the_fast_path() -> None:
    sample = Telemetry(seq=7, ts=1796172552.6, phase=Phase.INFLATE, session_id="s-1",
                       session_elapsed_s=3.5, pressures=[41.2, 38.0, 35.5, 30.25])
    fast = telemetry_fast(sample.to_payload())
    assert fast is not None and _same(fast, sample)


def test_a_duplicate_key_is_still_refused_with_its_reason() -> None:
    payload = b'{"seq":1,"ts":1.0,"phase":"idle","pressures":[1.0],"seq":2}'
    assert telemetry_fast(payload) is None
    try:
        decode(Channel.TELEMETRY, payload, 65536)
    except PayloadError as exc:
        assert exc.kind == "invalid" and "duplicate key 'seq'" in str(exc)
    else:
        raise AssertionError("a duplicate key was accepted")
