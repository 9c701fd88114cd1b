"""No credential reaches a log line: InfluxDB 1.x takes them in the URL, and httpx puts the
URL into its error messages."""

from __future__ import annotations

import asyncio
import io
import logging

import pytest

from gateway.logs import setup_logging
from gateway.redact import redact
from gateway.service import Gateway
from gateway.settings import GatewaySettings, InfluxSettings
from tests.helpers import wait_for


@pytest.mark.parametrize(("text", "expected"), [
    ("http://admin:s3cret@db:8086/write", "http://***@db:8086/write"),
    ("ConnectError for url 'https://u:p%40ss@10.0.0.1:8086/ping'",
     "ConnectError for url 'https://***@10.0.0.1:8086/ping'"),
    ("http://db:8086/query?u=admin&p=s3cret&q=SHOW", "http://db:8086/query?u=***&p=***&q=SHOW"),
    ("http://db:8086/write?db=boots", "http://db:8086/write?db=boots"),
])
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


async def test_influx_credentials_in_the_url_are_never_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    """An InfluxDB that refuses the credentials (401, as 1.x with auth does) at a URL that
    carries them: httpx names the URL in its error, the gateway logs the retries, and the
    password is in none of the lines."""

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    caplog.set_level(logging.DEBUG)
    url = f"http://admin:Sup3rSecret@127.0.0.1:{port}"
    gw = Gateway(GatewaySettings(influx=InfluxSettings(url=url, spool_dir=None)))
    prepare = asyncio.create_task(gw._prepare_storage())
    try:
        await wait_for(lambda: [r for r in caplog.records
                                if r.getMessage() == "influxdb not ready"], 10,
                       "a startup retry logged")
    finally:
        prepare.cancel()
        server.close()
        await gw.writer.close(timeout=1.0)
    retry = next(r for r in caplog.records if r.getMessage() == "influxdb not ready")
    assert "401" in str(retry.__dict__.get("error"))  # the reason is logged ...
    ours = [r for r in caplog.records if r.name.startswith("gateway")]
    text = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in ours)
    assert "Sup3rSecret" not in text and "admin:" not in text  # ... the credentials are not


def test_the_http_clients_own_request_log_is_silenced() -> None:
    """httpx logs every request with its URL at INFO: the gateway's logging keeps it out."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("httpx").level)
    try:
        setup_logging("DEBUG", "json", stream=io.StringIO())
        assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        logging.getLogger("httpx").setLevel(saved[2])
