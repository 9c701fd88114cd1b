"""The gateway reads what is waiting on its MQTT socket in bursts, not one packet per loop turn.

Each turn of the event loop also serves every busy HTTP connection; reading one packet per
turn, an API flood left the gateway reading 70-140 of the 400 telemetry messages/s arriving,
seconds behind, so every rule acted late. Here the loop is held while a backlog builds up on
the socket (as a flood or a stall does), then the test counts the loop turns the link needs
to read it.
"""

from __future__ import annotations

import asyncio
import threading
import time

import aiomqtt
import paho.mqtt.client as paho
import pytest

from device_sim.local_stack import LocalMosquitto
from gateway.aio import cancel_and_wait
from gateway.mqtt_internals import READ_BURST_PACKETS
from gateway.mqtt_link import MqttLink, subscribe_options
from gateway.settings import MqttSettings

BACKLOG = 300


@pytest.mark.parametrize("burst", [READ_BURST_PACKETS, 1])
async def test_a_backlog_is_read_in_a_few_loop_turns(mosquitto: LocalMosquitto, burst: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.mqtt_link as mqtt_link

    if burst == 1:  # the control: one packet per readable event, as aiomqtt does by itself
        real = mqtt_link.fast_publish_reading
        monkeypatch.setattr(mqtt_link, "fast_publish_reading",
                            lambda c, on_publish, b=1: real(c, on_publish, 1))
    received: list[str] = []
    topic = f"burst/{burst}/x"
    settings = MqttSettings(host="127.0.0.1", port=mosquitto.port,
                            client_id=f"burst-reader-{burst}", session_expiry_s=0)
    first = asyncio.Event()

    def on_message(t: str, payload: bytes) -> None:
        received.append(t)
        first.set()

    link = MqttLink(settings, [(topic, subscribe_options(0))], on_message)
    runner = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(link.connected.wait(), 10)
        async with aiomqtt.Client("127.0.0.1", mosquitto.port,
                                  identifier=f"burst-writer-{burst}") as writer:
            await writer.publish(topic, b"warm-up", qos=1)
            await asyncio.wait_for(first.wait(), 10)
        # Hold the loop (as a flood or a stall does) while another thread publishes: the
        # broker's deliveries pile up in the link's socket.
        publisher = threading.Thread(target=_publish_backlog, args=(mosquitto.port, topic))
        publisher.start()
        publisher.join(30)  # holding the loop meanwhile is the point
        time.sleep(0.3)  # noqa: ASYNC251 - the broker's last deliveries reach the socket
        turns = 0
        while len(received) < 1 + BACKLOG and turns < 5_000:
            await asyncio.sleep(0)
            turns += 1
    finally:
        await cancel_and_wait([runner])
    assert len(received) == 1 + BACKLOG, f"read {len(received) - 1} of {BACKLOG}"
    if burst == 1:
        assert turns > BACKLOG // 2, f"control read {BACKLOG} packets in {turns} turns"
    else:
        assert turns <= 20, f"{turns} loop turns to read a backlog of {BACKLOG} packets"


def _publish_backlog(port: int, topic: str) -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"backlog-{topic}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = [client.publish(topic, b"%d" % i, qos=1) for i in range(BACKLOG)]
        for info in infos:
            info.wait_for_publish(10)  # PUBACK: the broker has it
    finally:
        client.loop_stop()
        client.disconnect()
