"""The InfluxDB client's answer classes (gateway/influx_client.py), from the HTTP side.

An HTTP policy test: no database involved, InfluxDB's answer is the point. A real influxd's
400 partial write is covered end to end by tests/test_storage_writer.py."""

from __future__ import annotations

from collections.abc import Collection

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.influx_client import InfluxClient, Retry
from gateway.settings import InfluxSettings
from gateway.storage import WriterStats

SETTINGS = InfluxSettings(url="http://influx", allow_plaintext=True, database="d",
                          spool_dir=None)


def client(handler: httpx.MockTransport) -> tuple[InfluxClient, WriterStats]:
    stats = WriterStats()
    http = httpx.AsyncClient(transport=handler, base_url="http://influx")
    return InfluxClient(SETTINGS, http, stats), stats


def lines(n: int, bad: Collection[int] = ()) -> list[bytes]:
    return [(b"bad" if i in bad else b"m") + b" v=%d %d" % (i, i) for i in range(n)]


async def test_a_400_is_bisected_until_each_bad_line_is_alone() -> None:
    """InfluxDB refuses a body holding a bad line (and writes the rest): the client splits
    until each bad line is alone, counts it refused, and counts the others written."""
    bodies: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        return httpx.Response(400 if b"bad" in request.content else 204, text="conflict")

    influx, stats = client(httpx.MockTransport(answer))
    await influx.write(lines(16, bad={3, 11}))
    await influx.aclose()
    assert stats.points_refused == 2
    assert stats.points_written == 14
    refused_alone = [b for b in bodies if b.startswith(b"bad") and b"\n" not in b]
    assert len(refused_alone) == 2


async def test_a_failure_during_bisection_raises_retry_with_only_the_unwritten_lines() -> None:
    """The first half is written (one bad line refused), then InfluxDB goes away: Retry
    carries the second half only, so nothing is written twice or lost."""
    def answer(request: httpx.Request) -> httpx.Response:
        if request.content.startswith(b"m v=4 "):  # the second half
            return httpx.Response(503, headers={"Retry-After": "3"}, text="busy")
        return httpx.Response(400 if b"bad" in request.content else 204, text="conflict")

    batch = lines(8, bad={1})
    influx, stats = client(httpx.MockTransport(answer))
    with pytest.raises(Retry) as caught:
        await influx.write(batch)
    await influx.aclose()
    assert caught.value.remainder == batch[4:]
    assert caught.value.retry_after_s == 3.0 and caught.value.kind == "unavailable"
    assert stats.points_written == 3 and stats.points_refused == 1


@pytest.mark.parametrize(("status", "kind"), [(401, "auth"), (403, "auth"), (404, "unavailable"),
                                              (500, "unavailable"), (429, "unavailable")])
async def test_answers_that_may_pass_are_retry_with_their_kind(status: int, kind: str) -> None:
    influx, stats = client(httpx.MockTransport(lambda r: httpx.Response(status, text="no")))
    with pytest.raises(Retry) as caught:
        await influx.write(lines(5))
    await influx.aclose()
    assert caught.value.kind == kind and caught.value.remainder == lines(5)
    assert stats.points_written == 0 and stats.points_refused == 0


async def test_a_network_error_is_retry_and_says_no_secret() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused to http://user:hunter2@influx")

    influx, _ = client(httpx.MockTransport(answer))
    with pytest.raises(Retry) as caught:
        await influx.write(lines(2))
    await influx.aclose()
    assert caught.value.kind == "unavailable" and caught.value.remainder == lines(2)
    assert "hunter2" not in caught.value.reason


@given(st.lists(st.binary(min_size=1, max_size=30).filter(lambda b: b"\n" not in b),
                max_size=1_300))
@settings(max_examples=60, deadline=None)
async def test_a_write_body_sent_in_pieces_is_the_batch_joined(lines: list[bytes]) -> None:
    """The body goes out chunked (no 500 KB block per write, which fragmented the heap); the
    pieces together must be exactly the lines joined by newlines, nothing more or less."""
    from gateway.influx_client import BODY_CHUNK_LINES, _body_chunks

    pieces = [piece async for piece in _body_chunks(lines)]
    assert b"".join(pieces) == b"\n".join(lines)
    assert len(pieces) == -(-len(lines) // BODY_CHUNK_LINES)
