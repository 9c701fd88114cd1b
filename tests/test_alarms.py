"""Unit tests of the latching alarm book."""

from __future__ import annotations

import pytest

from gateway.alarms import VENT_RESOLVED, AlarmBook, UnknownAlarm
from gateway.contract import AlarmState, Severity
from gateway.watchdog import Rule, SafetyAction


def action(rule: Rule) -> SafetyAction:
    return SafetyAction(rule=rule, severity=Severity.HIGH, vent=True, alarm=True, detail="x")


def test_alarm_clears_only_when_acknowledged_and_resolved() -> None:
    book = AlarmBook()
    a = book.raise_alarm("c1", "b1", action(Rule.OVER_TARGET), "s1", 1.0)
    assert a.state is AlarmState.ACTIVE and not a.resolved
    acked = book.acknowledge(a.alarm_id, "nurse", 2.0)
    assert acked.state is AlarmState.ACKNOWLEDGED and acked.acked_by == "nurse"
    assert [x.alarm_id for x in book.listed()] == [a.alarm_id]
    [resolved] = book.resolve("c1", "b1", VENT_RESOLVED, 3.0)
    assert resolved.state is AlarmState.CLEARED and resolved.updated_at == 3.0
    assert book.listed() == []
    assert len(book.listed(include_cleared=True)) == 1


def test_resolved_first_stays_active_until_acknowledged() -> None:
    book = AlarmBook()
    a = book.raise_alarm("c1", "b1", action(Rule.TELEMETRY_LOSS), None, 1.0)
    [r] = book.resolve("c1", "b1", VENT_RESOLVED, 2.0)
    assert r.resolved and r.state is AlarmState.ACTIVE
    assert book.acknowledge(a.alarm_id, "desk", 3.0).state is AlarmState.CLEARED


def test_resolve_touches_only_that_boot_and_those_rules() -> None:
    book = AlarmBook()
    book.raise_alarm("c1", "b1", action(Rule.OFFLINE_IN_SESSION), None, 1.0)
    book.raise_alarm("c1", "b2", action(Rule.OVER_TARGET), None, 1.0)
    assert book.resolve("c1", "b1", VENT_RESOLVED, 2.0) == []
    assert [a.device for a in book.resolve("c1", "b2", VENT_RESOLVED, 2.0)] == ["b2"]


def test_user_stop_alarm_is_resolved_from_the_start() -> None:
    book = AlarmBook()
    a = book.raise_alarm("c1", "b1", action(Rule.USER_STOP), None, 1.0)
    assert a.resolved
    assert book.acknowledge(a.alarm_id, "desk", 2.0).state is AlarmState.CLEARED


def test_unknown_alarm() -> None:
    with pytest.raises(UnknownAlarm):
        AlarmBook().acknowledge("a-nope", "x", 1.0)


def test_cleared_alarms_are_trimmed() -> None:
    book = AlarmBook(keep_cleared=2)
    for _ in range(5):
        a = book.raise_alarm("c1", "b1", action(Rule.USER_STOP), None, 1.0)
        book.acknowledge(a.alarm_id, "x", 2.0)
    assert len(book.listed(include_cleared=True)) == 2
