"""Pins what gateway/mqtt_internals.py takes from aiomqtt's and paho's internals.

When an upgrade changes one of them, this file fails and names it; nothing else needs
reading. Re-check each use in gateway/mqtt_internals.py against the new version's source,
then update TESTED_WITH there.
"""

from __future__ import annotations

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
