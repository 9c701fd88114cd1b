"""The pure decisions of a simulated boot's firmware: no MQTT, no clock of its own.

Whether a start must be refused and whether a session has outlived the gateway's heartbeat
(docs/protocol.md §5 "start" and §7.2) are judged here from plain values, the time passed
in, the way device_sim/physics.py keeps the chambers and gateway/watchdog.py the gateway's
rules: so they can be unit-tested with a fake clock (tests/test_firmware.py), and
device_sim/boot.py (`SimBoot`) only gathers its state, calls these and publishes.
"""

from __future__ import annotations

import math

from gateway.contract import Command

# Heartbeat-loss timeout when none is configured (protocol §7.2): this many of the gateway's
# announced intervals, never less than the floor; the gateway default interval until one is seen.
HEARTBEAT_TIMEOUT_INTERVALS = 3.0
HEARTBEAT_TIMEOUT_FLOOR_S = 5.0
DEFAULT_HEARTBEAT_INTERVAL_S = 2.0
SELF_VENT_HEARTBEAT = "gateway heartbeat lost"
SELF_VENT_CONNECTION = "mqtt connection lost"


def heartbeat_timeout_s(configured_s: float | None, interval_s: float | None) -> float:
    """How long a session survives without a live heartbeat (protocol §7.2): the configured
    timeout, else 3 times the last heartbeat's interval_s (the gateway default 2 s before one was
    seen), never less than 5 s."""
    if configured_s is not None:
        return configured_s
    interval = interval_s or DEFAULT_HEARTBEAT_INTERVAL_S
    return max(HEARTBEAT_TIMEOUT_FLOOR_S, HEARTBEAT_TIMEOUT_INTERVALS * interval)


def heartbeat_lost(
    now: float, *, in_session: bool, session_elapsed_s: float | None,
    last_heartbeat_at: float | None, timeout_s: float,
) -> bool:
    """In session and neither a live heartbeat nor the session start within the timeout
    (a session started from a stale heartbeat gets the full timeout, not an instant vent)."""
    if not in_session:
        return False
    elapsed = session_elapsed_s or 0.0
    reference = max(last_heartbeat_at or -math.inf, now - elapsed)
    return now - reference > timeout_s


def start_refusal(
    cmd: Command, *, device_now: float, in_session: bool, chambers: int,
    max_pressure_mmhg: float,
) -> str | None:
    """Why this start must not run (the ack's `reason`), or None to start it. `device_now` is
    the boot's own wall clock (skew included): the expiry is judged on it, as a boot would."""
    assert cmd.program is not None
    if cmd.expires_at is not None and device_now > cmd.expires_at:
        return "expired"  # judged on the boot's own (possibly skewed) wall clock
    if in_session:
        return "busy"
    n = len(cmd.program.targets_mmhg)
    if n != chambers:
        return f"program has {n} chamber targets, boot has {chambers} chambers"
    for i, target in enumerate(cmd.program.targets_mmhg, start=1):
        if target > max_pressure_mmhg:
            return (
                f"chamber {i} target {target:g} mmHg above boot maximum "
                f"{max_pressure_mmhg:g} mmHg"
            )
    return None
