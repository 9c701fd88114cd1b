"""HTTP control API for clinic apps and the front desk (OpenAPI at /openapi.json, docs at /docs).

A thin adapter: every route calls the control facade (gateway/control.py::Control) and
nothing else of the gateway. Who may call which route is decided before FastAPI sees the
request, by the gate (gateway/api_guard.py) from the one route table
(gateway/api_users.py::ROUTES); the routes get the caller from it (`CallerDep`) and write the
audit trail (gateway/audit.py) for every start, stop, vent and alarm acknowledgement.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from gateway.alarms import UnknownAlarm
from gateway.api_guard import PRINCIPAL_KEY, ApiCounters, ApiGuard
from gateway.api_users import Authenticator, Principal, Role, RouteRule, RouteTable
from gateway.audit import AuditAction, AuditEvent, AuditResult
from gateway.commands import CommandOutcome, TrackedCommand
from gateway.contract import Alarm, SessionProgram
from gateway.control import Control, NotWatchedHere, UnknownBoot
from gateway.fleet import Boot
from gateway.mqtt_link import NotConnected
from gateway.programs import CATALOGUE
from gateway.service import Gateway
from gateway.settings import Intensity

log = logging.getLogger("gateway.api")

# In the OpenAPI document only (the security scheme a client sees); the gate checks the token.
_bearer = HTTPBearer(auto_error=False, description="a user's token (`boot-gateway users new`) "
                     "or api.token")


def get_control(request: Request) -> Control:
    return request.app.state.control


def authorize(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller the gate established. Without one the gate was bypassed: refuse."""
    principal = getattr(request.state, PRINCIPAL_KEY, None)
    if not isinstance(principal, Principal):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    return principal


class ErrorDetail(BaseModel):
    detail: str


ControlDep = Annotated[Control, Depends(get_control)]
CallerDep = Annotated[Principal, Depends(authorize)]
_GUARDED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorDetail, "description": "missing or wrong bearer token "
          "(the body is not read)"},
    403: {"model": ErrorDetail, "description": "the user's role may not call this "
          "route (the body is not read); docs/deploy.md lists the roles"},
    413: {"model": ErrorDetail, "description": "body larger than api.max_body_bytes"}}
router = APIRouter(prefix="/api/v1", dependencies=[Depends(authorize)], responses=_GUARDED)


def _boot_tags(gw: Control, clinic: str | None, device: str | None
               ) -> tuple[str | None, str | None, str]:
    """The audit record's clinic and device tags: only for a boot the gateway knows, so that
    a caller naming boots at will makes no new series; otherwise the names go to `detail`."""
    if clinic is None or device is None:
        return None, None, ""
    if gw.knows(clinic, device):
        return clinic, device, ""
    return None, None, f"unknown boot {clinic[:64]!r}/{device[:64]!r}: "


@dataclass
class _Audit:
    """What one audited call did, filled in by the route; recorded however the call ends."""

    result: AuditResult = AuditResult.DONE
    detail: str = ""
    clinic: str | None = None
    device: str | None = None
    ids: dict[str, str] = field(default_factory=dict)


def _reason_text(detail: Any) -> str:
    if isinstance(detail, dict):
        reasons = detail.get("reasons") or []
        return "; ".join([str(detail.get("detail", "")), *map(str, reasons)])
    return str(detail)


@contextlib.contextmanager
def _audited(gw: Control, caller: Principal, action: AuditAction, clinic: str | None = None,
             device: str | None = None) -> Iterator[_Audit]:
    record = _Audit(clinic=clinic, device=device)
    try:
        yield record
    except HTTPException as exc:
        record.result = (AuditResult.FAILED if exc.status_code >= 500
                         else AuditResult.REFUSED)
        record.detail = record.detail or _reason_text(exc.detail)
        raise
    except NotConnected as exc:
        record.result, record.detail = AuditResult.FAILED, str(exc)
        raise
    except BaseException as exc:  # a bug (500) or a cancelled request: not done, say so
        record.result = AuditResult.FAILED
        record.detail = f"not finished: {type(exc).__name__}"
        raise
    finally:
        tag_clinic, tag_device, note = _boot_tags(gw, record.clinic, record.device)
        gw.record_audit(AuditEvent(
            actor=caller.name, role=caller.role.value, action=action, result=record.result,
            clinic=tag_clinic, device=tag_device, detail=note + record.detail,
            ids={k: v for k, v in record.ids.items() if v}))


def _command_result(tracked: TrackedCommand) -> AuditResult:
    return (AuditResult.FAILED if tracked.outcome in (CommandOutcome.FAILED,
                                                      CommandOutcome.REJECTED)
            else AuditResult.DONE)


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


def _boot_view(gw: Control, boot: Boot) -> BootView:
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


def _boot_or_404(gw: Control, clinic: str, device: str) -> Boot:
    try:
        return gw.boot(clinic, device)
    except UnknownBoot as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except NotWatchedHere as exc:
        # Several gateways: another one watches this clinic (GET /health says which
        # clinics each one watches).
        raise HTTPException(status.HTTP_421_MISDIRECTED_REQUEST, str(exc)) from None


@router.get("/boots", response_model=list[BootView])
def list_boots(gw: ControlDep, clinic: str | None = None) -> list[BootView]:
    return [_boot_view(gw, b) for b in gw.boots(clinic)]


@router.get("/boots/{clinic}/{device}", response_model=BootView)
def get_boot(gw: ControlDep, clinic: str, device: str) -> BootView:
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
    gw: ControlDep, caller: CallerDep, clinic: str, device: str, body: StartRequest
) -> StartResponse:
    with _audited(gw, caller, AuditAction.SESSION_START, clinic, device) as audit:
        boot = _boot_or_404(gw, clinic, device)
        if (body.program is None) == (body.custom is None):
            raise HTTPException(422,
                                "give exactly one of 'program' (catalogue key) or 'custom'")
        if body.custom is not None:
            program = body.custom
            what = f"custom program {program.name!r}"
        else:
            template = CATALOGUE.get(body.program or "")
            if template is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND,
                                    f"no program {body.program!r}; known: {sorted(CATALOGUE)}")
            program = gw.resolve_program(template, boot)
            what = f"program {template.key}"
        result = await gw.start_session(clinic, device, program, wait=body.wait)
        audit.ids.update(cmd_id=result.cmd_id or "", session_id=result.session_id or "")
        audit.detail = what if result.accepted else f"{what}: {'; '.join(result.reasons)}"
        if not result.accepted:
            refused_before_sending = result.cmd_id is None
            raise HTTPException(
                status.HTTP_409_CONFLICT if refused_before_sending
                else status.HTTP_502_BAD_GATEWAY,
                detail={"detail": "program refused" if refused_before_sending
                        else f"boot answered {result.outcome}", "reasons": result.reasons},
            )
        assert result.session_id and result.cmd_id and result.outcome
        audit.detail = f"{what}: {result.outcome.value}"
        return StartResponse(session_id=result.session_id, cmd_id=result.cmd_id,
                             outcome=result.outcome.value)


@router.post("/boots/{clinic}/{device}/stop", response_model=CommandView)
async def stop_session(gw: ControlDep, caller: CallerDep, clinic: str, device: str,
                       wait: bool = True) -> CommandView:
    with _audited(gw, caller, AuditAction.SESSION_STOP, clinic, device) as audit:
        _boot_or_404(gw, clinic, device)
        tracked = await gw.stop_session(clinic, device, wait=wait)
        audit.ids.update(cmd_id=tracked.command.cmd_id,
                         session_id=tracked.command.session_id or "")
        audit.result = _command_result(tracked)
        audit.detail = f"stop: {tracked.outcome.value}"
        return _command_view(tracked)


@router.post("/boots/{clinic}/{device}/vent", response_model=CommandView)
async def vent(gw: ControlDep, caller: CallerDep, clinic: str, device: str,
               body: VentRequest | None = None) -> CommandView:
    with _audited(gw, caller, AuditAction.VENT, clinic, device) as audit:
        _boot_or_404(gw, clinic, device)
        body = body or VentRequest()
        session = gw.boot(clinic, device).session
        audit.ids["session_id"] = session.session_id if session else ""
        tracked = await gw.vent(clinic, device, body.reason, wait=body.wait)
        audit.ids["cmd_id"] = tracked.command.cmd_id
        audit.result = _command_result(tracked)
        audit.detail = f"{body.reason}: {tracked.outcome.value}"
        return _command_view(tracked)


@router.get("/commands/{cmd_id}", response_model=CommandView)
def get_command(gw: ControlDep, cmd_id: str) -> CommandView:
    tracked = gw.command(cmd_id)
    if tracked is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no recent command {cmd_id}")
    return _command_view(tracked)


class AckAlarmRequest(BaseModel):
    by: str | None = Field(
        None, min_length=1, max_length=80, description="a note, e.g. who at the desk saw it; "
        "the alarm records the token's user as who acknowledged it, the note goes to the "
        "audit trail")


@router.get("/alarms", response_model=list[Alarm])
def list_alarms(gw: ControlDep, include_cleared: bool = False, clinic: str | None = None
                ) -> list[Alarm]:
    """Alarms latch: listed until acknowledged and resolved (see docs/safety.md)."""
    return gw.listed_alarms(include_cleared, clinic)


@router.post("/alarms/{alarm_id}/ack", response_model=Alarm)
async def acknowledge_alarm(gw: ControlDep, caller: CallerDep, alarm_id: str,
                            body: AckAlarmRequest | None = None) -> Alarm:
    with _audited(gw, caller, AuditAction.ALARM_ACK) as audit:
        audit.ids["alarm_id"] = alarm_id[:200]
        note = body.by if body and body.by else None
        audit.detail = f"note: {note}" if note else ""
        try:
            alarm = gw.acknowledge_alarm(alarm_id, caller.name)
        except UnknownAlarm as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        audit.clinic, audit.device = alarm.clinic, alarm.device
        audit.detail = f"{alarm.rule} {alarm.state.value}" + (f"; note: {note}" if note else "")
        return alarm


class AuditView(BaseModel):
    time: float = Field(description="unix s, the gateway's clock (the InfluxDB point's time)")
    actor: str
    role: str
    action: AuditAction
    result: AuditResult
    clinic: str | None
    device: str | None
    detail: str
    ids: dict[str, str] = Field(description="cmd_id, session_id, alarm_id where they apply")


@router.get("/audit", response_model=list[AuditView])
def list_audit(
    gw: ControlDep,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 100,
    actor: str | None = None,
    role: Role | None = None,
    action: AuditAction | None = None,
    result: AuditResult | None = None,
    clinic: str | None = None,
    device: str | None = None,
    since: Annotated[float | None, Query(allow_inf_nan=False,
                                         description="unix s: records from then on")] = None,
) -> list[AuditView]:
    """The newest audit records kept in memory (`api.audit_keep`), newest first; all of them
    are in InfluxDB (measurement `audit`, docs/schema.md)."""
    found = gw.audit(limit=limit, actor=actor, role=role.value if role else None,
                     action=action, result=result, clinic=clinic, device=device, since=since)
    return [AuditView(time=r.time, actor=r.event.actor, role=r.event.role,
                      action=r.event.action, result=r.event.result, clinic=r.event.clinic,
                      device=r.event.device, detail=r.event.detail, ids=dict(r.event.ids))
            for r in found]


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    mqtt_connected: bool
    influx_connected: bool
    storage_queue: int
    spool_points: int
    boots: dict[str, int]
    gateway_id: str = Field(description="this gateway (setting gateway_id)")
    clinics: list[str] | None = Field(
        None, description="the clinics this gateway watches when several share the fleet "
        "(docs/deploy.md §4); null: a single gateway, every clinic")
    storage_fault: bool = Field(False, description="the disk spool cannot be written (full, "
                                "read-only, I/O errors) or the storage writer is not running: "
                                "degraded; details in /api/v1/stats and the gateway's alarm")


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
    points_dropped_spool_error: int = Field(0, description="memory full while the spool failed")
    storage_faults: dict[str, int] = Field(
        default_factory=dict, description="spool and InfluxDB fault counters and the "
        "spool_fault gauge, as in gateway_health (docs/schema.md §2.10)")
    write_errors: int
    influx_connected: bool
    mqtt_reconnects: int
    loop_lag_max_ms: float
    gc_pause_max_ms: float
    api_refused: dict[str, int] = Field(description="API calls refused, by kind: "
                                        "unauthorized (401), forbidden (403), too_large, "
                                        "invalid (422), not_found, ...")
    api_anonymous: bool = Field(description="api.allow_anonymous: the API is open")
    api_users: int
    audit_records: int = Field(description="audit records since the start")


def create_app(gateway: Gateway) -> FastAPI:
    """The API app; refuses (ApiClosedError) when the API has no users and is not open on
    purpose, so a gateway is never started with an API that anyone can use by accident."""
    control = gateway.control
    api = control.settings.api
    authenticator = Authenticator(api)  # raises ApiClosedError: no user, no token, not open
    if authenticator.anonymous:
        log.warning("API open to anyone: api.allow_anonymous is set, every caller is the ops "
                    "user 'anonymous'", extra={"api": f"{api.host}:{api.port}"})
    app = FastAPI(
        title="Boot fleet gateway",
        version="1",
        description="Start, stop and vent pneumatic compression boots; see the fleet's state. "
        "Every /api call needs `Authorization: Bearer <token>` of a user whose role may call "
        "it (front_desk, manager, ops; docs/deploy.md).",
    )
    app.state.control = control
    app.include_router(router)
    counters = app.state.api_counters = ApiCounters()

    def forbidden(principal: Principal, rule: RouteRule, params: dict[str, str]) -> None:
        assert rule.action is not None
        alarm_id = params.get("alarm_id")
        clinic, device, note = _boot_tags(control, params.get("clinic"), params.get("device"))
        control.record_audit(AuditEvent(
            actor=principal.name, role=principal.role.value, action=rule.action,
            result=AuditResult.REFUSED, clinic=clinic, device=device,
            detail=f"{note}role {principal.role.value} may not {rule.action.value}",
            ids={"alarm_id": alarm_id[:200]} if alarm_id else {}))

    # Before FastAPI reads a byte of the body: the token, the role, then the size.
    app.add_middleware(ApiGuard, authenticator=authenticator, max_body_bytes=api.max_body_bytes,
                       counters=counters, routes=RouteTable(), on_forbidden=forbidden,
                       log_interval_s=control.settings.reject_log_interval_s,
                       monotonic=control.monotonic)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        counters.refused["invalid"] += 1
        # Where and why, without echoing the input: it may not even be JSON-serialisable
        # (NaN, Infinity), and a 500 would hide the reason from the client.
        errors = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()]
        return JSONResponse({"detail": errors},
                            status_code=422)

    @app.exception_handler(NotConnected)
    async def _no_broker(request: Request, exc: NotConnected) -> JSONResponse:
        return JSONResponse({"detail": f"{exc}; retry"},
                            status_code=status.HTTP_503_SERVICE_UNAVAILABLE)

    @app.get("/health", response_model=Health, tags=["ops"])
    def health() -> Health:
        h = control.health()
        return Health(
            status="ok" if h.mqtt_connected and h.influx_connected and not h.storage_fault
            else "degraded",
            mqtt_connected=h.mqtt_connected, influx_connected=h.influx_connected,
            storage_queue=h.storage_queue, spool_points=h.spool_points,
            boots=h.boots, storage_fault=h.storage_fault, gateway_id=h.gateway_id,
            clinics=h.clinics,
        )

    @app.get("/api/v1/stats", response_model=Stats, tags=["ops"],
             dependencies=[Depends(authorize)], responses=_GUARDED)
    def stats() -> Stats:
        # The same snapshot gateway_health is made of (gateway/stats.py): one meaning per name.
        s = control.snapshot()
        return Stats(
            messages=s.messages, rejected=s.rejected,
            vents_sent=s.vents_sent, vents_confirmed=s.vents_confirmed,
            sessions_resumed=s.sessions_resumed, safety_events=s.safety_events,
            alarms_listed=s.alarms_listed,
            points_written=s.points_written, points_dropped=s.points_dropped,
            points_refused=s.points_refused, storage_queue=s.queue_depth,
            storage_queue_peak=s.queue_peak, spool_points=s.spool_points,
            spool_bytes=s.spool_bytes, points_spooled=s.points_spooled,
            points_replayed=s.points_replayed,
            points_dropped_spool_full=s.points_dropped_spool_full,
            points_dropped_spool_error=s.points_dropped_spool_error,
            storage_faults=s.storage_faults,
            write_errors=s.write_errors, influx_connected=s.influx_connected,
            mqtt_reconnects=s.mqtt_reconnects, loop_lag_max_ms=s.loop_lag_max_ms,
            gc_pause_max_ms=s.gc_pause_max_ms,
            api_refused=dict(counters.refused), api_anonymous=authenticator.anonymous,
            api_users=authenticator.users, audit_records=control.audit_records,
        )

    return app
