"""HTTP control API for clinic apps and the front desk (OpenAPI at /openapi.json, docs at /docs).

A thin adapter: every route calls one method of `Gateway`. Routes live on `router` behind the
`authorize` dependency, so access control and new routes are added without touching these.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from gateway.alarms import UnknownAlarm
from gateway.api_guard import ApiGuard
from gateway.commands import TrackedCommand
from gateway.contract import Alarm, SessionProgram
from gateway.fleet import Boot
from gateway.mqtt_link import NotConnected
from gateway.programs import CATALOGUE
from gateway.service import Gateway, UnknownBoot
from gateway.settings import Intensity

_bearer = HTTPBearer(auto_error=False)


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def authorize(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """With `api.token` set, every API call must carry it as a bearer token."""
    token = get_gateway(request).settings.api.token
    if token is None:
        return
    given = creds.credentials if creds else ""
    if not secrets.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong bearer token",
                            headers={"WWW-Authenticate": "Bearer"})


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
router = APIRouter(prefix="/api/v1", dependencies=[Depends(authorize)])


class SessionView(BaseModel):
    session_id: str
    program: str
    status: str
    started_at: float | None
    elapsed_s: float | None
    planned_s: float | None
    targets_mmhg: list[float] | None
    resumed: bool


class BootView(BaseModel):
    clinic: str
    device: str
    online: bool
    firmware: str
    chambers: int
    zones: list[str]
    max_pressure_mmhg: float
    last_seen: float
    pressures_mmhg: list[float] | None
    phase: str | None
    session: SessionView | None
    last_outcome: str | None
    vents: int
    faults: int


class ProgramView(BaseModel):
    key: str
    title: str
    intensity: Intensity
    duration_min: float
    mode: str
    when: str


class StartRequest(BaseModel):
    """A catalogue program by key, or a clinic's own program in full (checked the same way)."""

    program: str | None = Field(None, description="catalogue key, see GET /api/v1/programs")
    custom: SessionProgram | None = Field(None, description="a full program instead of a key")
    wait: bool = Field(True, description="wait for the boot's ack before answering")


class StartResponse(BaseModel):
    session_id: str
    cmd_id: str
    outcome: str


class Refusal(BaseModel):
    detail: str
    reasons: list[str]


class CommandView(BaseModel):
    cmd_id: str
    device: str
    kind: str
    outcome: str
    reason: str | None
    latency_ms: float | None


class VentRequest(BaseModel):
    reason: str = Field("manual vent from the API", max_length=200)
    wait: bool = True


def _boot_view(gw: Gateway, boot: Boot) -> BootView:
    session = None
    if boot.session is not None:
        s = boot.session
        session = SessionView(
            session_id=s.session_id, program=s.program_name, status=s.status.value,
            started_at=s.started_at,
            elapsed_s=round(gw.clock() - s.started_at, 1) if s.started_at else None,
            planned_s=s.program.duration_s if s.program else None,
            targets_mmhg=list(s.program.targets_mmhg) if s.program else None,
            resumed=s.resumed,
        )
    t = boot.last_telemetry
    return BootView(
        clinic=boot.clinic, device=boot.device, online=boot.online,
        firmware=boot.state.firmware, chambers=boot.state.chambers, zones=boot.state.zones,
        max_pressure_mmhg=boot.state.max_pressure_mmhg, last_seen=boot.last_seen,
        pressures_mmhg=list(t.pressures) if t else None, phase=t.phase.value if t else None,
        session=session, last_outcome=boot.last_outcome.value if boot.last_outcome else None,
        vents=boot.vents, faults=boot.faults,
    )


def _command_view(tracked: TrackedCommand) -> CommandView:
    return CommandView(
        cmd_id=tracked.command.cmd_id, device=tracked.key, kind=tracked.command.kind.value,
        outcome=tracked.outcome.value, reason=tracked.reason,
        latency_ms=round(tracked.latency_s * 1000, 2) if tracked.latency_s is not None else None,
    )


def _boot_or_404(gw: Gateway, clinic: str, device: str) -> Boot:
    try:
        return gw.boot(clinic, device)
    except UnknownBoot as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None


@router.get("/boots", response_model=list[BootView])
def list_boots(gw: GatewayDep, clinic: str | None = None) -> list[BootView]:
    boots = sorted(gw.fleet.boots.values(), key=lambda b: b.key)
    return [_boot_view(gw, b) for b in boots if clinic is None or b.clinic == clinic]


@router.get("/boots/{clinic}/{device}", response_model=BootView)
def get_boot(gw: GatewayDep, clinic: str, device: str) -> BootView:
    return _boot_view(gw, _boot_or_404(gw, clinic, device))


@router.get("/programs", response_model=list[ProgramView])
def list_programs() -> list[ProgramView]:
    return [
        ProgramView(key=p.key, title=p.title, intensity=p.intensity,
                    duration_min=p.duration_s / 60, mode=p.mode.value, when=p.when)
        for p in CATALOGUE.values()
    ]


@router.post(
    "/boots/{clinic}/{device}/session",
    response_model=StartResponse,
    status_code=status.HTTP_202_ACCEPTED,
    responses={409: {"model": Refusal, "description": "program refused, nothing was sent"},
               502: {"model": Refusal, "description": "the boot rejected or did not ack"}},
)
async def start_session(
    gw: GatewayDep, clinic: str, device: str, body: StartRequest
) -> StartResponse:
    boot = _boot_or_404(gw, clinic, device)
    if (body.program is None) == (body.custom is None):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY,
                            "give exactly one of 'program' (catalogue key) or 'custom'")
    if body.custom is not None:
        program = body.custom
    else:
        template = CATALOGUE.get(body.program or "")
        if template is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND,
                                f"no program {body.program!r}; known: {sorted(CATALOGUE)}")
        program = template.resolve(boot.state.chambers, gw.settings.programs)
    result = await gw.start_session(clinic, device, program, wait=body.wait)
    if not result.accepted:
        refused_before_sending = result.cmd_id is None
        raise HTTPException(
            status.HTTP_409_CONFLICT if refused_before_sending else status.HTTP_502_BAD_GATEWAY,
            detail={"detail": "program refused" if refused_before_sending
                    else f"boot answered {result.outcome}", "reasons": result.reasons},
        )
    assert result.session_id and result.cmd_id and result.outcome
    return StartResponse(session_id=result.session_id, cmd_id=result.cmd_id,
                         outcome=result.outcome.value)


@router.post("/boots/{clinic}/{device}/stop", response_model=CommandView)
async def stop_session(gw: GatewayDep, clinic: str, device: str, wait: bool = True
                       ) -> CommandView:
    _boot_or_404(gw, clinic, device)
    return _command_view(await gw.stop_session(clinic, device, wait=wait))


@router.post("/boots/{clinic}/{device}/vent", response_model=CommandView)
async def vent(gw: GatewayDep, clinic: str, device: str, body: VentRequest | None = None
               ) -> CommandView:
    _boot_or_404(gw, clinic, device)
    body = body or VentRequest()
    return _command_view(await gw.vent(clinic, device, body.reason, wait=body.wait))


@router.get("/commands/{cmd_id}", response_model=CommandView)
def get_command(gw: GatewayDep, cmd_id: str) -> CommandView:
    tracked = gw.commands.get(cmd_id)
    if tracked is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no recent command {cmd_id}")
    return _command_view(tracked)


class AckAlarmRequest(BaseModel):
    by: str = Field(min_length=1, max_length=80, description="who acknowledges (name or role)")


@router.get("/alarms", response_model=list[Alarm])
def list_alarms(gw: GatewayDep, include_cleared: bool = False, clinic: str | None = None
                ) -> list[Alarm]:
    """Alarms latch: listed until acknowledged and resolved (see docs/safety.md)."""
    return [a for a in gw.alarms.listed(include_cleared) if clinic is None or a.clinic == clinic]


@router.post("/alarms/{alarm_id}/ack", response_model=Alarm)
async def acknowledge_alarm(gw: GatewayDep, alarm_id: str, body: AckAlarmRequest) -> Alarm:
    try:
        return gw.acknowledge_alarm(alarm_id, body.by)
    except UnknownAlarm as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    mqtt_connected: bool
    influx_connected: bool
    storage_queue: int
    spool_points: int
    boots: dict[str, int]


class Stats(BaseModel):
    messages: dict[str, int]
    rejected: dict[str, int]
    vents_sent: int
    vents_confirmed: int
    sessions_resumed: int
    safety_events: int
    alarms_listed: int
    points_written: int
    points_dropped: int
    points_refused: int
    storage_queue: int
    storage_queue_peak: int
    spool_points: int
    spool_bytes: int
    points_spooled: int
    points_replayed: int
    points_dropped_spool_full: int
    write_errors: int
    influx_connected: bool
    mqtt_reconnects: int
    loop_lag_max_ms: float
    gc_pause_max_ms: float


def create_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(
        title="Boot fleet gateway",
        version="1",
        description="Start, stop and vent pneumatic compression boots; see the fleet's state.",
    )
    app.state.gateway = gateway
    app.include_router(router)
    api = gateway.settings.api
    # Before FastAPI reads a byte of the body: the token, then the size (gateway/api_guard.py).
    app.add_middleware(ApiGuard, max_body_bytes=api.max_body_bytes, token=lambda: (
        api.token.get_secret_value() if api.token is not None else None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Where and why, without echoing the input: it may not even be JSON-serialisable
        # (NaN, Infinity), and a 500 would hide the reason from the client.
        errors = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()]
        return JSONResponse({"detail": errors},
                            status_code=status.HTTP_422_UNPROCESSABLE_ENTITY)

    @app.exception_handler(NotConnected)
    async def _no_broker(request: Request, exc: NotConnected) -> JSONResponse:
        return JSONResponse({"detail": f"{exc}; retry"},
                            status_code=status.HTTP_503_SERVICE_UNAVAILABLE)

    @app.get("/health", response_model=Health, tags=["ops"])
    def health() -> Health:
        mqtt_ok = gateway.link.connected.is_set()
        influx_ok = gateway.writer.stats.connected
        return Health(
            status="ok" if mqtt_ok and influx_ok else "degraded",
            mqtt_connected=mqtt_ok, influx_connected=influx_ok,
            storage_queue=gateway.writer.queue_depth, spool_points=gateway.writer.spool_points,
            boots=gateway.fleet.counts(),
        )

    @app.get("/api/v1/stats", response_model=Stats, tags=["ops"],
             dependencies=[Depends(authorize)])
    def stats() -> Stats:
        w = gateway.writer.stats
        return Stats(
            messages=dict(gateway.stats.messages), rejected=dict(gateway.stats.rejected),
            vents_sent=gateway.stats.vents_sent, vents_confirmed=gateway.stats.vents_confirmed,
            sessions_resumed=gateway.stats.sessions_resumed,
            safety_events=gateway.stats.safety_events,
            alarms_listed=len(gateway.alarms.listed()),
            points_written=w.points_written, points_dropped=w.points_dropped_queue_full,
            points_refused=w.points_refused, storage_queue=gateway.writer.queue_depth,
            storage_queue_peak=w.queue_peak, spool_points=gateway.writer.spool_points,
            spool_bytes=gateway.writer.spool_bytes, points_spooled=w.points_spooled,
            points_replayed=w.points_replayed,
            points_dropped_spool_full=w.points_dropped_spool_full,
            write_errors=w.write_errors, influx_connected=w.connected,
            mqtt_reconnects=gateway.link.reconnects,
            loop_lag_max_ms=gateway.stats.loop_lag_max_ms,
            gc_pause_max_ms=round(gateway.gc_pauses.max_ms, 3),
        )

    return app
