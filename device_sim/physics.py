"""Pure physical model of one compression boot: chambers, valves, relief valve, faults.

No I/O, no asyncio, no clock: every method takes `now` (seconds, any monotonic-ish origin) so
tests can drive hours of session time in microseconds and the same seed gives the same trace.

Each chamber is a first-order system, dp/dt = (setpoint - p) / tau, with tau depending on
what moves the air (pump inflating, valve deflating, vent valve dumping). Setpoints are
piecewise constant in time, so `step` integrates segment by segment with the exact solution
p(t) = s + (p0 - s) * exp(-dt / tau); a step of any length is therefore stable and exact.

A leaking chamber (`leak`) loses a constant L mmHg/s on top of that: dp/dt = (s - p)/tau - L,
which is the same first-order system towards s - L*tau, so the exact solution still holds
(floored at atmospheric pressure: a leak cannot pull a chamber below 0). A pump that keeps
regulating makes up for most of it: a leaking chamber settles L*tau below its setpoint. With
every valve shut (a vent that did not open) it loses exactly L per second.
"""

from __future__ import annotations

import math
import random
from typing import Literal

from gateway.contract import Phase, SessionProgram

# Below this pressure (mmHg) a venting or deflating chamber counts as empty.
EMPTY_MMHG = 2.0
# Measured values are clipped here: a gauge sensor reads slightly negative at most.
MEASURED_FLOOR_MMHG = -1.0
# Gaussian noise is clipped at this many standard deviations so the reading error is bounded.
NOISE_CLIP_SIGMA = 3.0
# Guard against zero-length segments from float rounding at schedule boundaries.
_EPS = 1e-9

DoneReason = Literal["completed", "stopped", "vented"]


class BootModel:
    """A boot with N chambers running sequential cycles (0 = most distal, the foot).

    Cycle schedule (per `ProgramTiming`, n chambers): chamber i gets its target from
    `i * inflate_s` after the cycle start until the deflate phase begins at
    `n * inflate_s + hold_s`; then every setpoint is 0 for `deflate_s` and `pause_s`.
    Modes WAVE and FLOW run the same sequential pattern: the simulator only needs pressures
    that look like a real boot's to the gateway, not a faithful wave shape.
    """

    def __init__(
        self,
        chambers: int,
        max_pressure_mmhg: float,
        *,
        tau_inflate_s: float = 1.5,
        tau_deflate_s: float = 0.8,
        tau_vent_s: float = 0.4,
        noise_mmhg: float = 0.3,
        relief_margin_mmhg: float = 5.0,
        rng: random.Random,
    ) -> None:
        if chambers < 1:
            raise ValueError("a boot needs at least one chamber")
        if min(tau_inflate_s, tau_deflate_s, tau_vent_s) <= 0:
            raise ValueError("time constants must be positive")
        self.chambers = chambers
        self.max_pressure_mmhg = max_pressure_mmhg
        self.tau_inflate_s = tau_inflate_s
        self.tau_deflate_s = tau_deflate_s
        self.tau_vent_s = tau_vent_s
        self.noise_mmhg = noise_mmhg
        self.relief_margin_mmhg = relief_margin_mmhg
        self._rng = rng

        self._p: list[float] = [0.0] * chambers
        self._last: float | None = None
        self._program: SessionProgram | None = None
        self._start: float = 0.0
        self._end: float = math.inf
        self._venting = False
        self._stuck: set[int] = set()
        self._held: set[int] = set()
        self._overrun = False
        self._vent_broken = False
        self._leaks: dict[int, float] = {}
        self._completed_pending = False
        self.session_done_reason: DoneReason | None = None

    # ------------------------------------------------------------------ properties

    @property
    def relief_limit_mmhg(self) -> float:
        """The mechanical relief valve opens here; no chamber can exceed it."""
        return self.max_pressure_mmhg + self.relief_margin_mmhg

    @property
    def noise_bound_mmhg(self) -> float:
        """Largest possible difference between a measured and a true pressure."""
        return NOISE_CLIP_SIGMA * self.noise_mmhg

    @property
    def in_session(self) -> bool:
        return self._program is not None

    @property
    def program(self) -> SessionProgram | None:
        return self._program

    @property
    def venting(self) -> bool:
        return self._venting

    @property
    def stuck_chambers(self) -> frozenset[int]:
        return frozenset(self._stuck)

    @property
    def held_chambers(self) -> frozenset[int]:
        return frozenset(self._held)

    @property
    def leaks(self) -> dict[int, float]:
        """Leak rate (mmHg/s) per leaking chamber."""
        return dict(self._leaks)

    @property
    def overrun_fault(self) -> bool:
        return self._overrun

    @property
    def vent_valve_fault(self) -> bool:
        return self._vent_broken

    @property
    def pressures(self) -> list[float]:
        """True (noise-free) chamber pressures as of the last step."""
        return list(self._p)

    def session_elapsed(self, now: float) -> float | None:
        return None if self._program is None else now - self._start

    # ------------------------------------------------------------------ controls

    def start(self, program: SessionProgram, now: float) -> None:
        """Begin a session at `now`; the caller checks busy/chamber count (the boot's job)."""
        if len(program.targets_mmhg) != self.chambers:
            raise ValueError(
                f"program has {len(program.targets_mmhg)} chambers, boot has {self.chambers}"
            )
        if self._program is not None:
            raise RuntimeError("a session is already running")
        self._advance(now)
        self._program = program
        self._start = now
        self._end = now + program.duration_s
        self._venting = False
        self._completed_pending = False
        self.session_done_reason = None

    def stop(self, now: float) -> None:
        """Normal stop: the session ends and every chamber deflates through its valve.

        After a vent that failed (broken vent valve) the deflate valves still work, so a stop
        is how that boot gets empty.
        """
        self._advance(now)
        self._end_session("stopped")
        if self._venting and self._vent_broken:
            self._venting = False

    def vent(self, now: float) -> None:
        """Emergency dump: the vent valve opens (beating a stuck valve) and the session ends.

        With `vent_valve_broken()` the session still ends (phase VENT) but nothing moves:
        chambers keep their pressure and a stuck inlet keeps inflating.
        """
        self._advance(now)
        self._end_session("vented")
        self._venting = True
        if not self._vent_broken:
            self._stuck.clear()  # the vent valve resets the valve driver
            self._held.clear()

    def stuck_valve(self, chamber: int) -> None:
        """Fault: this chamber's inlet keeps inflating toward the relief limit in any session."""
        self._stuck.add(self._check_chamber(chamber))

    def hold_valve(self, chamber: int) -> None:
        """Fault: this chamber's inflate valve stays open at its target for the whole session.

        Pressure never exceeds the target, so only a "held inflated too long" rule sees it.
        """
        self._held.add(self._check_chamber(chamber))

    def clear_stuck(self, chamber: int) -> None:
        """Repair one stuck inlet valve (the others stay stuck)."""
        self._stuck.discard(self._check_chamber(chamber))

    def leak(self, chamber: int, mmhg_per_s: float) -> None:
        """Fault: this chamber loses `mmhg_per_s` whenever it holds pressure (a torn sleeve or
        a loose hose); 0 repairs it. Under-inflation is no hazard: no rule should fire on it."""
        if not (math.isfinite(mmhg_per_s) and mmhg_per_s >= 0):
            raise ValueError(f"leak rate must be finite and >= 0, got {mmhg_per_s}")
        chamber = self._check_chamber(chamber)
        if mmhg_per_s == 0:
            self._leaks.pop(chamber, None)
        else:
            self._leaks[chamber] = mmhg_per_s

    def overrun(self) -> None:
        """Fault: the session timer never fires; cycles go on past duration_s until stop/vent."""
        self._overrun = True

    def vent_valve_broken(self) -> None:
        """Fault: vent() ends the session but opens nothing: the gateway sees no pressure drop."""
        self._vent_broken = True

    def clear_faults(self) -> None:
        """Repair everything; a vent left pending by a broken vent valve now takes effect."""
        self._stuck.clear()
        self._held.clear()
        self._overrun = False
        self._vent_broken = False
        self._leaks.clear()

    def _check_chamber(self, chamber: int) -> int:
        if not 0 <= chamber < self.chambers:
            raise ValueError(f"chamber {chamber} out of range 0..{self.chambers - 1}")
        return chamber

    def poll_completed(self) -> bool:
        """True exactly once after a session ran to its full duration."""
        done, self._completed_pending = self._completed_pending, False
        return done

    # ------------------------------------------------------------------ dynamics

    def step(self, now: float) -> tuple[Phase, list[float]]:
        """Advance to `now` and return the phase and noisy measured pressures."""
        self._advance(now)
        phase = self.phase(now)
        sigma = self.noise_mmhg
        clip = self.noise_bound_mmhg
        measured = []
        for p in self._p:
            noise = max(-clip, min(clip, self._rng.gauss(0.0, sigma))) if sigma > 0 else 0.0
            measured.append(max(MEASURED_FLOOR_MMHG, p + noise))
        return phase, measured

    def phase(self, now: float) -> Phase:
        """Phase at `now` given the state as of the last step (does not advance)."""
        if self._program is None:
            if self._venting:
                return Phase.VENT
            return Phase.IDLE
        timing = self._program.timing
        n = self.chambers
        u = self._cycle_offset(now)
        if u < n * timing.inflate_s:
            return Phase.INFLATE
        if u < n * timing.inflate_s + timing.hold_s:
            return Phase.HOLD
        if u < n * timing.inflate_s + timing.hold_s + timing.deflate_s:
            return Phase.DEFLATE
        return Phase.PAUSE

    def _end_session(self, reason: DoneReason) -> None:
        if self._program is not None:
            self.session_done_reason = reason
        self._program = None

    def _cycle_offset(self, t: float) -> float:
        assert self._program is not None
        cycle = self._program.timing.cycle_s(self.chambers)
        elapsed = max(0.0, t - self._start)
        return elapsed - math.floor(elapsed / cycle) * cycle

    @property
    def _session_end(self) -> float:
        return math.inf if self._overrun else self._end

    def _setpoints(self, t: float) -> tuple[list[tuple[float, float]], float]:
        """(setpoint, tau) per chamber valid from t, and the time the schedule next changes."""
        relief = self.relief_limit_mmhg
        if self._program is None:
            if self._venting and self._vent_broken:
                # Vented with a dead vent valve: valves shut (tau = inf), pressures stay where
                # they are (less any leak), except that a stuck inlet keeps pumping.
                return [
                    (relief, self.tau_inflate_s) if i in self._stuck else (p, math.inf)
                    for i, p in enumerate(self._p)
                ], math.inf
            tau = self.tau_vent_s if self._venting else self.tau_deflate_s
            return [(0.0, tau)] * self.chambers, math.inf
        timing = self._program.timing
        n = self.chambers
        u = self._cycle_offset(t)
        deflate_at = n * timing.inflate_s + timing.hold_s
        out: list[tuple[float, float]] = []
        for i, target in enumerate(self._program.targets_mmhg):
            if i in self._stuck:
                out.append((relief, self.tau_inflate_s))
            elif i in self._held or i * timing.inflate_s <= u < deflate_at:
                out.append((min(target, relief), self.tau_inflate_s))
            else:
                out.append((0.0, self.tau_deflate_s))
        boundaries = [i * timing.inflate_s for i in range(1, n)]
        boundaries += [deflate_at, deflate_at + timing.deflate_s, timing.cycle_s(n)]
        nxt = min((b for b in boundaries if b > u + _EPS), default=timing.cycle_s(n))
        change_at = t + (nxt - u)
        return out, min(change_at, self._session_end)

    def _evolve(self, p: float, s: float, tau: float, leak: float, dt: float) -> float:
        """Pressure after `dt` towards setpoint `s`, exactly (the caller floors it at 0)."""
        if tau == math.inf:  # valves shut: only the leak moves the pressure
            return p - leak * dt
        if p > s and tau == self.tau_inflate_s:
            # Above its setpoint a chamber deflates through its valve, whatever the schedule's
            # tau says; a leak takes it past s, and from there the pump holds it (below).
            sink = s - leak * self.tau_deflate_s
            if leak <= 0:
                return sink + (p - sink) * math.exp(-dt / self.tau_deflate_s)
            reach_s = self.tau_deflate_s * math.log((p - sink) / (s - sink))
            if reach_s >= dt:
                return sink + (p - sink) * math.exp(-dt / self.tau_deflate_s)
            p, dt = s, dt - reach_s
        # A leak shifts the equilibrium down by rate * tau (module docstring).
        sink = s - leak * tau
        return sink + (p - sink) * math.exp(-dt / tau)

    def _advance(self, now: float) -> None:
        if self._last is None:
            self._last = now
            return
        t = self._last
        while t < now:
            if self._program is not None and t >= self._session_end:
                self._end_session("completed")
                self._completed_pending = True
            setpoints, change_at = self._setpoints(t)
            # nextafter guarantees progress even where t + tiny == t (unix-time magnitudes).
            t_next = min(now, max(change_at, math.nextafter(t, math.inf)))
            dt = t_next - t
            relief = self.relief_limit_mmhg
            for i, (s, tau) in enumerate(setpoints):
                p = self._evolve(self._p[i], s, tau, self._leaks.get(i, 0.0), dt)
                self._p[i] = min(relief, max(0.0, p))
            t = t_next
        # A session whose end falls exactly on `now` ends now, not at the next step.
        if self._program is not None and now >= self._session_end:
            self._end_session("completed")
            self._completed_pending = True
        if self._venting and self._program is None and all(p < EMPTY_MMHG for p in self._p):
            self._venting = False
        self._last = max(self._last, now)
