"""The session lifecycle: starting → running → one terminal outcome, across restarts.

One job: keep each boot's session (gateway/fleet.py::Session), the watchdog's view of it and
the session journal (gateway/journal.py) in step, whatever the order of the boot's messages,
and reconcile the sessions that were open when the gateway last stopped. What to do about a
boot that will not obey (vent again) is the effects' job: it is handed in as `apply`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from gateway.fleet import Boot, Session, SessionOutcome, SessionStatus, catalogue_key
from gateway.journal import OpenSession, SessionJournal
from gateway.recorder import Recorder
from gateway.settings import GatewaySettings
from gateway.stats import IngestStats
from gateway.watchdog import Outcome, Watchdog

# The service's logger: operators filter on it, the messages stay where they were.
log = logging.getLogger("gateway.service")

Apply = Callable[[Boot, list[Outcome]], None]


class Sessions:
    """Each boot's one session at a time and its one recorded outcome, journalled."""

    def __init__(self, settings: GatewaySettings, *, watchdog: Watchdog, stats: IngestStats,
                 journal: SessionJournal, recorder: Recorder, apply: Apply,
                 clock: Callable[[], float], monotonic: Callable[[], float]) -> None:
        self.settings = settings
        self.watchdog = watchdog
        self.stats = stats
        self.journal = journal
        self.recorder = recorder
        self.apply = apply
        self.clock = clock
        self.monotonic = monotonic
        # sessions open at the last stop, not yet seen running or ended (see recover), by id
        self.unreconciled: dict[str, OpenSession] = {}
        self.reconcile_until: float | None = None

    # ------------------------------------------------------------------ restart

    def recover(self) -> None:
        """Load the sessions that were open when the gateway last stopped.

        Each is then resumed when the boot's retained state or telemetry shows it still
        running, closed with the outcome of a queued terminal event, or recorded `lost` when
        neither came within `reconcile_window_s` of the broker connection.
        """
        self.unreconciled = self.journal.load()
        if self.unreconciled:
            log.info("open sessions from the last run", extra={
                "sessions": len(self.unreconciled)})

    def begin_reconcile(self) -> None:
        if self.unreconciled and self.reconcile_until is None:
            self.reconcile_until = self.monotonic() + self.settings.reconcile_window_s

    def reconcile_due(self, now: float) -> None:
        """The reconcile window is over: what was not seen again ended `lost`."""
        if self.reconcile_until is not None and now >= self.reconcile_until:
            self.reconcile_until = None
            for entry in list(self.unreconciled.values()):
                self.close_unreconciled(entry, SessionOutcome.LOST)

    def unreconciled_for(self, key: str, session_id: str) -> OpenSession | None:
        """The last run's open session `session_id`, if it was `key`'s."""
        entry = self.unreconciled.get(session_id)
        return entry if entry is not None and entry.key == key else None

    def unreconciled_start(self, key: str, cmd_id: str) -> OpenSession | None:
        """The last run's open session whose start command was `cmd_id` to `key`."""
        return next((e for e in self.unreconciled.values()
                     if e.cmd_id == cmd_id and e.key == key), None)

    def close_unreconciled(self, entry: OpenSession, outcome: SessionOutcome) -> None:
        """A session of the last run that ended while the gateway was away: its one outcome."""
        del self.unreconciled[entry.session_id]
        clinic, device = entry.key.split("/", 1)
        log.warning("session ended while the gateway was away", extra={
            "device": entry.key, "session_id": entry.session_id, "outcome": outcome.value})
        self.recorder.session(clinic, device, Session.from_journal(
                                  entry, self.settings.programs), outcome.value)
        self.journal.closed(entry.key, entry.session_id)

    # ------------------------------------------------------------------ the boot's word

    def in_session(self, boot: Boot, session_id: str, elapsed_s: float | None = None) -> None:
        """The boot says, by any of its messages, that it runs `session_id`: watch it.

        Whatever the order and timing of ack, event, state and telemetry, a boot in a session
        by its own word is watched by every rule, even one the gateway had given up on.
        """
        session = boot.session
        if session is not None and session.session_id == session_id:
            session.left_at = None
            if session.status is SessionStatus.STARTING:
                self.session_running(boot)
            return
        ended = boot.ended_sessions.get(session_id)
        if ended is not None:
            if not (ended.by_boot or boot.watch.venting):
                # The gateway closed it (a vent, a start it gave up on): the boot has not
                # obeyed. Vent again; the session keeps its one recorded outcome.
                self.apply(boot, [self.watchdog.session_not_ended(
                    boot.watch, session_id, ended.outcome.value, self.monotonic())])
            return  # else a late message of a session the boot ended, or rule 8 has it
        if session is not None:
            log.warning("boot runs another session than the gateway's", extra={
                "device": boot.key, "gateway_session": session.session_id,
                "boot_session": session_id})
            self.end_session(boot, SessionOutcome.FAILED if session.status is
                             SessionStatus.STARTING else SessionOutcome.LOST, by_boot=True)
        self.resume(boot, session_id, elapsed_s)

    def out_of_session(self, boot: Boot) -> None:
        """The boot's message shows no session: it may have ended it, or rebooted.

        The terminal event may still be on its way (QoS 1 behind QoS 0, or a reordering), so
        the session ends `lost` only when none came within `session_end_grace_s`.
        """
        session = boot.session
        if session is not None and session.status is SessionStatus.RUNNING and (
                session.left_at is None):
            session.left_at = self.monotonic()

    def resume(self, boot: Boot, session_id: str, elapsed_s: float | None = None) -> None:
        """Watch a session this gateway did not see start (a restart): the program comes
        from the boot's retained state, else from the journal, else it is unknown."""
        active = boot.state.session if (boot.state.session is not None and
                                        boot.state.session.session_id == session_id) else None
        journalled = self.unreconciled.get(session_id)
        if journalled is not None and journalled.key == boot.key:
            del self.unreconciled[session_id]
        else:
            journalled = None
        known = Session.from_journal(journalled) if journalled is not None else None
        program = active.program if active else known.program if known else None
        cmd_id = active.cmd_id if active else known.cmd_id if known else None
        now = self.clock()
        provisional = False
        if elapsed_s is None:
            # a guess on the boot's (or our) wall clock, until its session_elapsed_s says
            started = (active.started_at if active else
                       known.started_at or known.requested_at if known else now)
            elapsed_s, provisional = max(0.0, now - started), True
        boot.session = Session(session_id, program, cmd_id,
                               known.requested_at if known else now, SessionStatus.RUNNING,
                               now - elapsed_s, resumed=True,
                               catalogue=catalogue_key(program, self.settings.programs))
        self.watchdog.start_session(boot.watch, session_id, program, self.monotonic(),
                                    elapsed_s, provisional)
        self.stats.sessions_resumed += 1
        self.journal.opened(boot.session.journal_entry(boot.key))
        self.recorder.session(boot.clinic, boot.device, boot.session, "resumed")
        log.warning("session resumed", extra={
            "device": boot.key, "session_id": session_id,
            "program": program.name if program else None, "elapsed_s": elapsed_s})

    def session_running(self, boot: Boot) -> None:
        """The boot confirmed a start: it has been watched since the start was sent."""
        session = boot.session
        assert session is not None
        if session.status is SessionStatus.RUNNING:
            return
        session.status = SessionStatus.RUNNING
        session.started_at = self.clock()
        if boot.watch.session_id != session.session_id:
            self.watchdog.start_session(boot.watch, session.session_id, session.program,
                                        self.monotonic())
        log.info("session running", extra={"device": boot.key, "session_id": session.session_id,
                                           "program": session.program_name})
        self.journal.opened(session.journal_entry(boot.key))
        self.recorder.session(boot.clinic, boot.device, session, "started")

    def end_session(self, boot: Boot, outcome: SessionOutcome, *, by_boot: bool = False
                    ) -> None:
        """The session's one terminal outcome. by_boot: the boot's own message ended it."""
        session = boot.session
        if session is None:
            return
        boot.session = None
        boot.last_outcome = outcome
        boot.remember_ended(session, by_boot, outcome)
        boot.watch.end_session()
        log.info("session ended", extra={"device": boot.key, "session_id": session.session_id,
                                         "outcome": outcome.value})
        self.journal.closed(boot.key, session.session_id)
        self.recorder.session(boot.clinic, boot.device, session, outcome.value,
                              ended_at=self.clock())
