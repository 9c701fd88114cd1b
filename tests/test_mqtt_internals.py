"""Pins what gateway/mqtt_internals.py takes from aiomqtt's and paho's internals.

When an upgrade changes one of them, this file fails and names it; nothing else needs
reading. Re-check each use in gateway/mqtt_internals.py against the new version's source,
then update TESTED_WITH there.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect

import aiomqtt
import aiomqtt.client
import paho.mqtt.client as paho_mqtt

from gateway.mqtt_internals import TESTED_WITH, paho_of


def test_the_installed_versions_are_the_ones_the_internals_were_read_from() -> None:
    installed = {name: importlib.metadata.version(name) for name in TESTED_WITH}
    assert installed == TESTED_WITH


async def test_aiomqtt_keeps_its_paho_client_where_paho_of_looks() -> None:
    client = aiomqtt.Client("127.0.0.1", 1, identifier="pin")
    assert isinstance(paho_of(client), paho_mqtt.Client)


async def test_paho_has_the_private_attributes_used() -> None:
    paho = paho_of(aiomqtt.Client("127.0.0.1", 1, identifier="pin"))
    for name in ("_on_message_filtered", "_registered_write", "_out_packet"):
        assert hasattr(paho, name), name
    assert callable(paho._call_socket_register_write)
    assert hasattr(paho._on_message_filtered, "iter_match")  # replaced by _NoTopicCallbacks
    for public in ("loop_read", "loop_write", "socket", "publish"):
        assert callable(getattr(paho, public)), public


def test_aiomqtt_reads_through_loop_read_and_queues_with_put_nowait() -> None:
    """reading_in_bursts wraps loop_read as aiomqtt's socket callback calls it, and
    dispatching_queue relies on each message being handed to queue.put_nowait."""
    source = inspect.getsource(aiomqtt.client)
    assert "client.loop_read()" in source
    assert "put_nowait(" in source
    assert "queue_type" in inspect.signature(aiomqtt.Client).parameters


async def test_paho_reads_and_handles_publish_through_the_attributes_fast_reading_replaces(
        ) -> None:
    """fast_publish_reading replaces the instance's _sock_recv and _handle_publish: paho must
    still reach both through the instance, and keep the parsed packet where it reads it."""
    paho = paho_of(aiomqtt.Client("127.0.0.1", 1, identifier="pin"))
    read = inspect.getsource(paho_mqtt.Client._packet_read)
    assert "self._sock_recv(" in read
    assert "self._packet_handle()" in read
    assert "self._handle_publish()" in inspect.getsource(paho_mqtt.Client._packet_handle)
    assert {"command", "packet"} <= set(paho._in_packet)
    for name in ("_sock", "_protocol", "_manual_ack", "_msgtime_mutex", "_last_bytes_received"):
        assert hasattr(paho, name), name
    assert callable(paho._sock_recv)
    assert callable(paho._loop_rc_handle) and callable(paho_mqtt.time_func)
    # a burst's PUBACKs are queued as one out packet, which paho writes as it writes one
    assert list(inspect.signature(paho._packet_queue).parameters)[:4] == [
        "command", "packet", "mid", "qos"]
    write = inspect.getsource(paho_mqtt.Client._packet_write)
    assert "packet['packet'][packet['pos']:]" in write and paho_mqtt.PUBACK == 0x40
    # a packet read directly from the buffer does what paho's read does after each packet
    assert "self._last_bytes_received = time_func()" in read
    assert "_handle_on_message(message)" in inspect.getsource(paho_mqtt.Client._handle_publish)


async def test_aiomqtt_keeps_the_disconnect_future_fast_reading_reports_to() -> None:
    client = aiomqtt.Client("127.0.0.1", 1, identifier="pin")
    assert isinstance(client._disconnected, asyncio.Future)
