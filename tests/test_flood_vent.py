"""No outside input can stall or switch off rule 5: a boot that goes silent in session is vented
within its bound while the API is flooded, while another client floods boot topics with bad
payloads, while InfluxDB is paused, and while the gateway's own event loop is made to stall
again and again; and a stall does not vent the boots that keep sending.

The bound (docs/safety.md §3.1, rule 5): the silence limit + `receive_backlog_grace_s` + one
tick after the last sample the gateway received. Here: limit 1 s (the tests' silence floor,
boots at 10 Hz), grace 1 s, tick 0.1 s. Two things are checked for the silent boot: the
gateway's own measure of the silence when it decided (the `value` of its `telemetry_loss`
safety event: no delivery in it, so a tight margin), and the time from the boot going silent
to the boot receiving the vent (broker both ways, a loaded 2-core machine: a wide margin).

Set-up: the gateway runs in the test's process and event loop, as everywhere in tests/; the
boots run on an event loop of their own in another thread, so that, like real boots, they
keep sending while the gateway's loop stalls; the attackers run in processes of their own
(`python -m device_sim.flood`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from pydantic import SecretStr

from device_sim.boot import SimBoot
from device_sim.fleet import SimFleet
from device_sim.local_stack import LocalInflux, LocalMosquitto, free_port
from gateway.settings import ApiSettings, InfluxSettings, WatchdogSettings
from tests.helpers import (
    RunningGateway,
    gateway_settings,
    mqtt_of,
    running_gateway,
    short_program,
    wait_for,
)

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

TOKEN = "flood-test-" + secrets.token_hex(8)
PERIOD_S = 0.1  # the boots' telemetry period
LIMIT_S = 1.0  # rule 5's limit for them: max(floor 1 s, 6 x 0.1 s)
GRACE_S = 1.0  # receive_backlog_grace_s, the default
TICK_S = 0.1
# The gateway's own measure of the silence when it vented: the bound, plus what a busy loop
# on a loaded machine may add to one tick.
DECISION_BOUND_S = LIMIT_S + GRACE_S + TICK_S + 0.5
# From the boot going silent to the vent arriving at the boot (its last sample went out at
# most one period before it went silent; broker both ways).
RECEIPT_BOUND_S = LIMIT_S + GRACE_S + TICK_S + 1.5
WATCHDOG = WatchdogSettings(telemetry_loss_floor_s=LIMIT_S, tick_interval_s=TICK_S,
                            receive_backlog_grace_s=GRACE_S)


class BootsElsewhere:
    """SimBoots on an event loop of their own, in a thread: they do not stop when the
    gateway's loop stalls (time.sleep releases the GIL), as real boots would not."""

    def __init__(self, members: list[tuple[str, str]], mosquitto: LocalMosquitto) -> None:
        self._members = members
        self._mqtt = mqtt_of(mosquitto)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="boots",
                                        daemon=True)
        self._fleet: SimFleet | None = None
        self.boots: dict[str, SimBoot] = {}

    async def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run `coro` on the boots' loop; await its result from the gateway's."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.wrap_future(future)
        except TimeoutError:
            future.cancel()
            raise

    async def _start(self) -> None:
        self._fleet = SimFleet(self._members, self._mqtt, telemetry_period_s=PERIOD_S, seed=11)
        await self._fleet.__aenter__()
        self.boots = self._fleet.boots

    async def _stop(self) -> None:
        if self._fleet is not None:
            await self._fleet.__aexit__(None, None, None)

    async def silence(self, boot: SimBoot) -> float:
        """Stop the boot's telemetry; the clock time it took effect (boot's thread)."""
        async def go() -> float:
            boot.set_silent(True)
            return boot.clock()
        return await self.call(go())

    async def __aenter__(self) -> BootsElsewhere:
        self._thread.start()
        await self.call(self._start())
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.call(self._stop(), timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            await asyncio.to_thread(self._thread.join, 10)
            if not self._thread.is_alive():
                self._loop.close()


@contextlib.asynccontextmanager
async def flood(*args: str) -> AsyncIterator[dict[str, Any]]:
    """`python -m device_sim.flood ARGS` in its own process, in force for the block; then its
    summary (what it sent, what it got back) is in the yielded dict."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "device_sim.flood", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    summary: dict[str, Any] = {}
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = await proc.stdout.readline()
        assert line.strip() == b"flooding", (line, await proc.stderr.read())  # type: ignore[union-attr]
        yield summary
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            async with asyncio.timeout(20):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            out, err = await proc.communicate()
        with contextlib.suppress(ValueError, IndexError):
            summary.update(json.loads(out.strip().splitlines()[-1]))
        summary.setdefault("stderr", err.decode(errors="replace")[-2000:])


@contextlib.asynccontextmanager
async def stalls(stall_s: float, every_s: float) -> AsyncIterator[list[float]]:
    """The gateway's own loop held `stall_s` (a blocking call, as CPU starvation or a slow
    disk would) every `every_s`, for the block. Yields the stalls done so far."""
    loop = asyncio.get_running_loop()
    done: list[float] = []

    def hold() -> None:
        time.sleep(stall_s)
        done.append(stall_s)

    async def keep_stalling() -> None:
        while True:
            loop.call_soon(hold)
            await asyncio.sleep(every_s)  # pacing of the attack, not a synchronisation

    task = asyncio.create_task(keep_stalling())
    try:
        yield done
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


Attack = Callable[[RunningGateway, BootsElsewhere], contextlib.AbstractAsyncContextManager[Any]]


async def silent_boot_under(attack: Attack, mosquitto: LocalMosquitto, influx: LocalInflux,
                            *, steady: int = 3, after_s: float = 1.0,
                            settings_over: dict[str, Any] | None = None,
                            before_flush: Callable[[], Awaitable[None]] | None = None
                            ) -> dict[str, Any]:
    """Boots in session; under `attack`, `quiet` goes silent. Returns what was measured.

    Asserts the rule 5 bound for `quiet`, and that no steady boot got a vent or a
    telemetry_loss, neither during the attack nor `after_s` after the silent one's vent."""
    settings = gateway_settings(mosquitto, influx, watchdog=WATCHDOG, **(settings_over or {}))
    settings = settings.model_copy(update={"api": ApiSettings(port=free_port(),
                                                              token=SecretStr(TOKEN))})
    async with running_gateway(settings, influx) as gw:
        clinic = gw.clinic()
        names = ["quiet", *(f"steady{i}" for i in range(steady))]
        members = [(clinic, n) for n in names]
        base = f"http://127.0.0.1:{settings.api.port}"
        async with (BootsElsewhere(members, mosquitto) as boots,
                    httpx.AsyncClient(base_url=base, timeout=30,
                                      headers={"Authorization": f"Bearer {TOKEN}"}) as api):
            keys = [f"{clinic}/{n}" for n in names]
            await wait_for(lambda: all(k in gw.gw.fleet.boots for k in keys), 15,
                           "the boots' retained states")
            program = short_program(duration_s=120.0).model_dump(mode="json")
            for n in names:
                r = await api.post(f"/api/v1/boots/{clinic}/{n}/session",
                                   json={"custom": program})
                assert r.status_code == 202, r.text
            quiet = boots.boots[f"{clinic}/quiet"]
            steadies = [boots.boots[f"{clinic}/{n}"] for n in names[1:]]
            await boots.call(quiet.wait_until(lambda: quiet.telemetry_sent > 5, timeout=10))
            async with attack(gw, boots) as attacked:
                silent_at = await boots.silence(quiet)
                try:
                    vent_at = await boots.call(
                        quiet.wait_for_vent(timeout=RECEIPT_BOUND_S + 4.0), timeout=30)
                except TimeoutError:
                    vent_at = None
                if vent_at is not None and after_s:
                    # the steady boots, still under attack for a while
                    await asyncio.sleep(after_s)
            steady_vents = {b.device: b.vents_received for b in steadies}
            lag_ms = gw.gw.stats.loop_lag_max_ms
        if before_flush is not None:
            await before_flush()
        await gw.flush()
        rows = gw.query("SELECT device, rule, \"value\", \"limit\" FROM safety_event")
    events = [tuple(r[1:]) for r in rows[0]["values"]] if rows and rows[0].get("values") else []
    assert vent_at is not None, (
        f"the silent boot was not vented within {RECEIPT_BOUND_S + 4.0:g} s (bound "
        f"{RECEIPT_BOUND_S:g} s); attack: {attacked}; safety events: {events}")
    receipt_s = vent_at - silent_at
    loss = [e for e in events if e[0] == "quiet" and e[1] == "telemetry_loss"]
    assert len(loss) == 1, events
    decision_s = loss[0][2]
    assert LIMIT_S < decision_s <= DECISION_BOUND_S, (decision_s, events)
    assert receipt_s + PERIOD_S <= RECEIPT_BOUND_S, (receipt_s, decision_s, lag_ms)
    assert steady_vents == dict.fromkeys(steady_vents, 0), (steady_vents, events)
    assert [e for e in events if e[0] != "quiet"] == [], events
    result = {"receipt_s": round(receipt_s, 3), "decision_s": decision_s,
              "loop_lag_max_ms": lag_ms, "attack": attacked}
    log.info("silent boot vented under attack: %s", result, extra=result)
    return result


# ---------------------------------------------------------------- the attacks


async def test_silent_boot_is_vented_in_time_while_the_gateway_loop_stalls_again_and_again(
        mosquitto: LocalMosquitto, influx: LocalInflux) -> None:
    """The hold rule's attack: a stall of the gateway's loop more than 250 ms long every
    0.8 s. The code before this change held rule 5 for a silence floor after each such stall,
    so it never vented the silent boot; now it is vented within limit + grace + one tick (+
    the stall the tick may fall in), and the boots that keep sending are not vented."""
    stall_s = 0.4
    result = await silent_boot_under(lambda gw, boots: stalls(stall_s, 0.8), mosquitto, influx)
    assert len(result["attack"]) >= 3  # the stalls did happen, during the silence
    assert result["loop_lag_max_ms"] > 250  # ... and were seen as stalls by the ticker


async def test_a_long_stall_of_the_gateway_does_not_vent_boots_that_keep_sending(
        mosquitto: LocalMosquitto, influx: LocalInflux) -> None:
    """A stall longer than the boots' silence limit: their samples wait in the gateway's
    socket meanwhile; the first ticks after it find them overdue with input unread, and the
    grace lets the backlog drain. None of them is vented; the silent boot still is."""
    @contextlib.asynccontextmanager
    async def one_long_stall(gw: RunningGateway, boots: BootsElsewhere
                             ) -> AsyncIterator[list[float]]:
        async with stalls(1.3, 3.0) as done:
            yield done

    result = await silent_boot_under(one_long_stall, mosquitto, influx, after_s=3.5)
    assert 1.3 in result["attack"] and result["loop_lag_max_ms"] > 1000


async def test_silent_boot_is_vented_in_time_while_the_api_is_flooded(
        mosquitto: LocalMosquitto, influx: LocalInflux) -> None:
    """Concurrent clients: 20 MB bodies with and without the token (with and without a
    Content-Length), bodies that are not JSON, valid authenticated GETs as fast as they go."""
    def api_flood(gw: RunningGateway, boots: BootsElsewhere
                  ) -> contextlib.AbstractAsyncContextManager[dict[str, Any]]:
        port = gw.gw.settings.api.port
        return flood("api", "--url", f"http://127.0.0.1:{port}", "--token", TOKEN,
                     "--concurrency", "24", "--clinic", gw.clinic(), "--device", "steady0")

    result = await silent_boot_under(api_flood, mosquitto, influx)
    codes = result["attack"]["codes"]
    assert result["attack"]["requests"] > 50, result["attack"]
    for kind in ("get:200", "bad_json:4"):
        assert any(k.startswith(kind) for k in codes), codes
    assert any(k.startswith("big_no_token:") for k in codes), codes


async def test_silent_boot_is_vented_in_time_while_bad_payloads_flood_boot_topics(
        mosquitto: LocalMosquitto, influx: LocalInflux) -> None:
    """Another client publishes payloads every gateway must reject (not JSON, invalid, too
    large, topics outside the contract) on the silent boot's own topics, a steady boot's and
    made-up boots', at 2,000 messages/s: none of it counts as a sign of life, and the
    rejections are counted."""
    rejected_before: list[int] = []

    @contextlib.asynccontextmanager
    async def mqtt_flood(gw: RunningGateway, boots: BootsElsewhere
                         ) -> AsyncIterator[dict[str, Any]]:
        rejected_before.append(sum(gw.gw.stats.rejected.values()))
        async with flood("mqtt", "--port", str(mosquitto.port), "--clinic", gw.clinic(),
                         "--device", "quiet", "--device", "steady0", "--rate", "2000") as s:
            yield s
        s["rejected"] = sum(gw.gw.stats.rejected.values()) - rejected_before[0]

    result = await silent_boot_under(mqtt_flood, mosquitto, influx)
    sent = result["attack"]["messages"]
    assert sent > 2000, result["attack"]
    assert result["attack"]["rejected"] >= sent // 2, result["attack"]


async def test_silent_boot_is_vented_in_time_while_influxdb_is_paused(
        mosquitto: LocalMosquitto, own_influx: LocalInflux, tmp_path: Path) -> None:
    """InfluxDB stopped with SIGSTOP: every write hangs until the client's timeout, then the
    batches go to the disk spool. The safety path does not wait for any of it."""
    influx_settings = InfluxSettings(url=own_influx.url, database="paused",
                                     flush_interval_s=0.1, timeout_s=2.0, retry_max_s=1.0,
                                     spool_dir=tmp_path / "spool")

    @contextlib.asynccontextmanager
    async def paused(gw: RunningGateway, boots: BootsElsewhere) -> AsyncIterator[dict[str, Any]]:
        own_influx.pause()
        state: dict[str, Any] = {}
        try:
            yield state
            state["unwritten_at_end"] = gw.gw.writer.backlog
        finally:
            own_influx.resume()

    result = await silent_boot_under(paused, mosquitto, own_influx,
                                     settings_over={"influx": influx_settings})
    assert result["attack"]["unwritten_at_end"] > 0  # storage was really stuck meanwhile
