"""Alarms raised by the watchdog, with their acknowledged state (no I/O).

Latching, as IEC 60601-1-8 asks of high-priority alarms: an alarm stays listed until someone
acknowledges it AND its cause is over; either may come first.
"""

from __future__ import annotations

from collections import OrderedDict

from gateway.commands import new_id
from gateway.contract import RESERVED_CLINIC, Alarm, AlarmState, Severity
from gateway.watchdog import Rule, SafetyAction

# Causes that end when a vent is confirmed (the boot is deflated and safe).
VENT_RESOLVED = frozenset({
    Rule.HARD_CEILING, Rule.OVER_TARGET, Rule.SUSTAINED_INFLATION, Rule.SESSION_OVERRUN,
    Rule.TELEMETRY_LOSS, Rule.IMPLAUSIBLE_DATA, Rule.VENT_NOT_CONFIRMED,
})

# The gateway's own alarms (not a boot's): clinic `_gateway`, device = the gateway's id.
STORAGE_FAULT = "storage_fault"  # the disk spool cannot be written (full, read-only, I/O)


class UnknownAlarm(LookupError):
    pass


class AlarmBook:
    def __init__(self, keep_cleared: int = 1000) -> None:
        self._alarms: OrderedDict[str, Alarm] = OrderedDict()
        self._keep_cleared = keep_cleared

    def raise_alarm(self, clinic: str, device: str, action: SafetyAction,
                    session_id: str | None, now: float) -> Alarm:
        alarm = Alarm(
            alarm_id=new_id("a"), clinic=clinic, device=device, rule=action.rule.value,
            severity=action.severity, state=AlarmState.ACTIVE, detail=action.detail[:500],
            raised_at=now, updated_at=now, session_id=session_id,
            resolved=action.rule is Rule.USER_STOP,  # a record of what happened, no condition
        )
        self._alarms[alarm.alarm_id] = alarm
        self._trim()
        return alarm

    def raise_gateway_alarm(self, gateway_id: str, rule: str, severity: Severity, detail: str,
                            now: float) -> Alarm:
        """An alarm about the gateway itself, listed and latched like a boot's.

        Its clinic is `_gateway` (never a clinic id, gateway/contract.py) and its device the
        gateway's id, so it has a topic of its own and a clinic filter never hides it wrongly.
        """
        alarm = Alarm(
            alarm_id=new_id("a"), clinic=RESERVED_CLINIC, device=gateway_id, rule=rule,
            severity=severity, state=AlarmState.ACTIVE, detail=detail[:500], raised_at=now,
            updated_at=now,
        )
        self._alarms[alarm.alarm_id] = alarm
        self._trim()
        return alarm

    def resolve_alarm(self, alarm_id: str, now: float) -> Alarm | None:
        """The cause of one alarm is over; the alarm if it changed (it may be trimmed)."""
        alarm = self._alarms.get(alarm_id)
        if alarm is None or alarm.resolved:
            return None
        state = AlarmState.CLEARED if alarm.state is AlarmState.ACKNOWLEDGED else alarm.state
        return self._put(alarm.model_copy(update={"resolved": True, "state": state,
                                                  "updated_at": now}))

    def acknowledge(self, alarm_id: str, by: str, now: float) -> Alarm:
        alarm = self._alarms.get(alarm_id)
        if alarm is None:
            raise UnknownAlarm(f"no alarm {alarm_id}")
        if alarm.state is not AlarmState.ACTIVE:
            return alarm
        state = AlarmState.CLEARED if alarm.resolved else AlarmState.ACKNOWLEDGED
        return self._put(alarm.model_copy(update={"state": state, "acked_by": by,
                                                  "updated_at": now}))

    def resolve(self, clinic: str, device: str, rules: frozenset[Rule], now: float
                ) -> list[Alarm]:
        """Mark the causes over; returns the alarms that changed."""
        changed = []
        for alarm in list(self._alarms.values()):
            if (alarm.clinic, alarm.device) != (clinic, device) or alarm.resolved:
                continue
            if alarm.rule not in rules:  # a str: a gateway alarm's rule is no watchdog Rule
                continue
            state = (AlarmState.CLEARED if alarm.state is AlarmState.ACKNOWLEDGED
                     else alarm.state)
            changed.append(self._put(alarm.model_copy(update={
                "resolved": True, "state": state, "updated_at": now})))
        return changed

    def get(self, alarm_id: str) -> Alarm | None:
        return self._alarms.get(alarm_id)

    def listed(self, include_cleared: bool = False) -> list[Alarm]:
        return [a for a in self._alarms.values()
                if include_cleared or a.state is not AlarmState.CLEARED]

    def _put(self, alarm: Alarm) -> Alarm:
        self._alarms[alarm.alarm_id] = alarm
        self._trim()
        return alarm

    def _trim(self) -> None:
        cleared = [k for k, a in self._alarms.items() if a.state is AlarmState.CLEARED]
        for key in cleared[: max(0, len(cleared) - self._keep_cleared)]:
            del self._alarms[key]
