"""Free text is never a tag: the `session` measurement's `program` tag is a closed vocabulary.

A program name is free text (a clinic's custom program from the API, or whatever a boot's
retained state says it runs). As a tag, every new name would be a new InfluxDB series: a
series-explosion attack on the database and a patient's name listed by `SHOW TAG VALUES`.
docs/schema.md §2.4: the tag is the catalogue key, `custom` or `unknown`; the name is the
string field `program_name` (at most PROGRAM_NAME_MAX_CHARS characters).

The integration test drives the real API, a real Mosquitto and a real influxd, and reads what
InfluxDB holds, as a Grafana user would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import pytest

from device_sim.local_stack import LocalMosquitto
from gateway import points
from gateway.contract import (
    Ack,
    AckStatus,
    ActiveSession,
    BootEvent,
    BootState,
    Channel,
    EventKind,
    Mode,
    Phase,
    SessionProgram,
    Telemetry,
    topic,
)
from gateway.fleet import Session, SessionStatus
from gateway.journal import OpenSession
from gateway.programs import CATALOGUE
from tests.helpers import RunningGateway, mqtt_of, short_program, wait_for

CLOSED = set(CATALOGUE) | {"custom", "unknown"}

# Names a front desk could type, and names an attacker would: every line-protocol
# metacharacter, control characters, an injected second point, the 80-character maximum.
NASTY = [
    "line\nbreak",
    "comma,name",
    "equals=name",
    "with space",
    "tab\tand\rcr",
    'quote"and\\backslash',
    "Ümlaut café ✓",
    'x\nsafety_event,clinic=c1,device=b1,rule=hard_ceiling action="vent" 1',
    "post_workout_recovery",  # a catalogue key as a custom name is not the catalogue program
    "n" * 80,
]
BULK = 1000  # distinct custom names: 1,000 series per boot as tags, none as fields
BOOTS = 20


def stored_text(name: str) -> str:
    """A string field as InfluxDB returns it: control characters escaped (docs/schema.md §1)."""
    table = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}
    table.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
    return name.translate(table)


def _state(session: ActiveSession | None = None) -> bytes:
    return BootState(online=True, firmware="t", chambers=4, zones=["foot", "calf", "knee",
                     "thigh"], max_pressure_mmhg=150, telemetry_period_s=0.5, ts=time.time(),
                     session=session).to_payload()


@contextlib.asynccontextmanager
async def boots(mosquitto: LocalMosquitto, clinic: str, devices: list[str],
                accept: set[str], seen: dict[str, dict[str, Any]]) -> AsyncIterator[
                    aiomqtt.Client]:
    """Simulated boots that reject every start (reason `busy`) except those whose program name
    is in `accept`: those are accepted and completed at once. The start's program is kept in
    `seen` by name, as the boot received it. Retained states are cleared on the way out."""
    m = mqtt_of(mosquitto)
    async with aiomqtt.Client(m.host, m.port, protocol=aiomqtt.ProtocolVersion.V5) as c:
        await c.subscribe(f"boots/v1/{clinic}/+/cmd", qos=1)

        async def answer() -> None:
            async for msg in c.messages:
                device = str(msg.topic).split("/")[3]
                cmd = json.loads(msg.payload)  # type: ignore[arg-type]
                if cmd["kind"] != "start":
                    continue
                name = cmd["program"]["name"]
                seen[name] = cmd["program"]
                ok = name in accept
                ack = Ack(cmd_id=cmd["cmd_id"], ts=time.time(), reason=None if ok else "busy",
                          status=AckStatus.ACCEPTED if ok else AckStatus.REJECTED)
                await c.publish(topic(clinic, device, Channel.ACK), ack.to_payload(), qos=1)
                if ok:
                    done = BootEvent(kind=EventKind.SESSION_COMPLETED, ts=time.time(),
                                     session_id=cmd["session_id"])
                    await c.publish(topic(clinic, device, Channel.EVENT), done.to_payload(),
                                    qos=1)

        task = asyncio.create_task(answer())
        try:
            for d in devices:
                await c.publish(topic(clinic, d, Channel.STATE), _state(), qos=1, retain=True)
            yield c
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            for d in devices:
                await c.publish(topic(clinic, d, Channel.STATE), b"", qos=1, retain=True)


def _custom(name: str) -> dict[str, Any]:
    return {"custom": short_program(duration_s=6.0).model_copy(
        update={"name": name}).model_dump(mode="json")}


@pytest.mark.integration
async def test_program_tag_is_a_closed_vocabulary_and_the_name_a_field(
    gateway: RunningGateway, mosquitto: LocalMosquitto,
) -> None:
    clinic = gateway.clinic()
    devices = [f"b{i}" for i in range(BOOTS)]
    resumed = ["r-catalogue", "r-lookalike", "r-telemetry"]
    names = NASTY + [f"clinic program {i}, gentle=yes" for i in range(BULK)]
    seen: dict[str, dict[str, Any]] = {}
    api = gateway.api
    async with boots(mosquitto, clinic, devices + resumed, {"post_workout_recovery", *NASTY},
                     seen) as pub:
        await wait_for(lambda: all(f"{clinic}/{d}" in gateway.gw.fleet.boots
                                   for d in devices + resumed), 15, "boots known")

        # a catalogue program by key, then one session per name, spread over the boots
        r = await api.post(f"/api/v1/boots/{clinic}/b0/session",
                           json={"program": "post_workout_recovery"})
        assert r.status_code == 202, r.text
        await wait_for(lambda: gateway.gw.fleet.boots[f"{clinic}/b0"].session is None, 10,
                       "the catalogue session to complete")
        exact = SessionProgram.model_validate(seen["post_workout_recovery"])  # as the boot got it
        statuses: dict[str, int] = {}

        async def run(device: str, name: str) -> None:
            r = await api.post(f"/api/v1/boots/{clinic}/{device}/session", json=_custom(name))
            statuses[name] = r.status_code

        # the accepted ones, one per boot: each ends with the boot's own event
        await asyncio.gather(*(run(d, n) for d, n in zip(devices, NASTY, strict=False)))
        await wait_for(lambda: all(b.session is None for b in gateway.gw.fleet.boots.values()),
                       10, "the accepted sessions to complete")
        assert all(statuses[n] == 202 for n in NASTY), {n: statuses[n] for n in NASTY}
        queue: asyncio.Queue[str] = asyncio.Queue()
        for n in names[len(NASTY):]:
            queue.put_nowait(n)

        async def front_desk(device: str) -> None:
            while not queue.empty():
                await run(device, queue.get_nowait())

        await asyncio.gather(*(front_desk(d) for d in devices))
        assert all(statuses[n] == 502 for n in names[len(NASTY):])  # the boot said busy

        # too long for the contract: refused with the field named, nothing sent
        r = await api.post(f"/api/v1/boots/{clinic}/b1/session", json=_custom("x" * 10_000))
        assert r.status_code == 422 and "name" in r.text, r.text
        assert "x" * 10_000 not in seen

        # sessions the gateway did not start: from retained state (exactly the catalogue
        # program the boot was sent / the same with one target changed) and from telemetry
        lookalike = exact.model_copy(update={"targets_mmhg": [exact.targets_mmhg[0] - 1,
                                                              *exact.targets_mmhg[1:]]})
        for device, program in (("r-catalogue", exact), ("r-lookalike", lookalike)):
            active = ActiveSession(session_id=f"s-{device}", program=program,
                                   started_at=time.time() - 5)
            await pub.publish(topic(clinic, device, Channel.STATE), _state(active), qos=1,
                              retain=True)
        sample = Telemetry(seq=1, ts=time.time(), phase=Phase.INFLATE, session_id="s-r-tel",
                           pressures=[30.0, 20.0, 10.0, 5.0])
        await pub.publish(topic(clinic, "r-telemetry", Channel.TELEMETRY),
                          sample.to_payload(), qos=0)
        await wait_for(lambda: all(gateway.gw.fleet.boots[f"{clinic}/{d}"].session is not None
                                   for d in resumed), 10, "three sessions resumed")
        await gateway.flush()

    where = f"\"clinic\" = '{clinic}'"
    tags = gateway.query(f'SHOW TAG VALUES FROM "session" WITH KEY = "program" WHERE {where}')
    values = {v for _, v in tags[0]["values"]}
    assert values <= CLOSED, sorted(values - CLOSED)[:5]
    assert values == {"post_workout_recovery", "custom", "unknown"}

    rows = gateway.query(f'SELECT "device", "program_name", "program", "outcome", '
                         f'"session_id" FROM "session" WHERE {where}')[0]
    cols = rows["columns"]
    got = [dict(zip(cols, v, strict=True)) for v in rows["values"]]
    custom: dict[str | None, set[str]] = {}
    for row in got:
        if row["device"] in devices and row["program"] == "custom":
            custom.setdefault(row["program_name"], set()).add(row["outcome"])
    for name in names:
        want = {"started", "completed"} if name in NASTY else {"rejected"}
        assert custom.get(stored_text(name)) == want, name
    assert sum(r["device"] in devices for r in got) == 2 + 2 * len(NASTY) + BULK
    catalogue = {(r["device"], r["outcome"], r["program_name"]) for r in got
                 if r["program"] == "post_workout_recovery"}
    assert catalogue == {("b0", "started", "post_workout_recovery"),
                         ("b0", "completed", "post_workout_recovery"),
                         ("r-catalogue", "resumed", "post_workout_recovery")}
    resumes = {r["device"]: (r["program"], r["program_name"]) for r in got
               if r["outcome"] == "resumed"}
    assert resumes == {"r-catalogue": ("post_workout_recovery", "post_workout_recovery"),
                       "r-lookalike": ("custom", "post_workout_recovery"),
                       "r-telemetry": ("unknown", None)}
    series = gateway.query(f'SHOW SERIES FROM "session" WHERE {where}')[0]["values"]
    assert len(series) < 60, len(series)  # boots x {catalogue key, custom, unknown} x outcomes


def test_the_name_field_is_bounded_even_past_the_contract() -> None:
    """The contract refuses names over 80 characters; the point is bounded all the same, so no
    path around the contract (a journal written by hand, a future model) stores more."""
    bound = next(m.max_length for m in SessionProgram.model_fields["name"].metadata
                 if hasattr(m, "max_length"))
    assert bound == points.PROGRAM_NAME_MAX_CHARS
    long = SessionProgram.model_construct(**{**short_program().model_dump(), "name": "y" * 10_000})
    sess = Session("s-1", long, "c-1", 0.0, SessionStatus.RUNNING, 0.0)
    p = points.session("c1", "b1", sess, "started", 1)
    assert p.tags["program"] == "custom"
    assert p.fields["program_name"] == "y" * points.PROGRAM_NAME_MAX_CHARS


def test_a_catalogue_name_is_not_proof_of_a_catalogue_program() -> None:
    """Only the program itself, as the catalogue resolves it for the boot, earns its key."""
    from gateway.fleet import catalogue_key
    from gateway.settings import ProgramLimits

    limits = ProgramLimits()
    for key, template in CATALOGUE.items():
        for chambers in (1, 4, 12):
            exact = template.resolve(chambers, limits)
            assert catalogue_key(exact, limits) == key
            # a JSON round trip (the boot's retained state, the journal) keeps it exact
            again = SessionProgram.model_validate_json(exact.model_dump_json())
            assert catalogue_key(again, limits) == key
            longer = exact.model_copy(update={"duration_s": exact.duration_s + 60})
            assert catalogue_key(longer, limits) is None
            # the clinic changed what the intensity word means: no longer that program
            base = limits.intensity_mmhg[template.intensity]
            other = ProgramLimits(intensity_mmhg={**limits.intensity_mmhg,
                                                  template.intensity: base + 5})
            assert catalogue_key(exact, other) is None
            assert catalogue_key(template.resolve(chambers, other), other) == key
    assert catalogue_key(short_program(), limits) is None
    assert catalogue_key(None, limits) is None
    # a session from the gateway's journal after a restart: the same comparison
    doms = CATALOGUE["doms_24_48h"].resolve(4, limits)
    entry = OpenSession(key="c1/b1", session_id="s-1", cmd_id="c-1", program=doms,
                        requested_at=0.0, started_at=1.0)
    assert Session.from_journal(entry, limits).program_tag == "doms_24_48h"
    assert Session.from_journal(entry.model_copy(update={"program": doms.model_copy(
        update={"mode": Mode.WAVE})}), limits).program_tag == "custom"
    named = Session("s-1", short_program().model_copy(update={"name": "doms_24_48h"}), None,
                    0.0, catalogue=catalogue_key(short_program(), limits))
    assert named.program_tag == "custom"
    assert Session("s-2", None, None, 0.0).program_tag == "unknown"
    bogus = Session("s-3", short_program(), None, 0.0, catalogue="a free text")
    assert bogus.program_tag == "custom"  # never anything outside the vocabulary
