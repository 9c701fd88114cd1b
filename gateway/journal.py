"""The session journal: which sessions are open, kept on disk so a restart can close them.

A session that ends while the gateway is down (the boot vents itself on heartbeat loss,
completes, reboots) must still get its one terminal outcome. After a restart the retained
state says what runs now and the broker's queued events say what ended, but only this file
says which sessions were open when the gateway went away.

One JSON object per line, appended with a single write() per change (an open, an update, a
close), so a SIGKILL loses nothing the kernel already has; the file is rewritten with only the
open sessions when it is loaded. A failing disk is logged and counted, never raised: the
journal is bookkeeping, and the safety path must not wait for it or stop on it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from gateway.contract import SessionProgram

log = logging.getLogger(__name__)


class OpenSession(BaseModel):
    """What the outcome record of a session needs, should the gateway restart before its end."""

    model_config = ConfigDict(frozen=True)

    key: str  # "clinic/device"
    session_id: str
    cmd_id: str | None = None
    program: SessionProgram | None = None
    requested_at: float  # wall clock
    started_at: float | None = None  # wall clock; None while the start is unanswered


class SessionJournal:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.errors = 0
        self._fd: int | None = None

    def load(self) -> dict[str, OpenSession]:
        """The sessions open at the last stop, by session id; compacts the file.

        A boot may have more than one: a start it never answered, then a newer session.
        """
        if self.path is None:
            return {}
        open_: dict[str, OpenSession] = {}
        try:
            lines = self.path.read_bytes().splitlines() if self.path.exists() else []
        except OSError as exc:
            self._failed("read", exc)
            lines = []
        bad = 0
        for line in lines:
            try:
                entry = json.loads(line)
                if entry.get("op") == "close":
                    open_.pop(entry["session_id"], None)
                else:
                    session = OpenSession.model_validate(entry["session"])
                    open_[session.session_id] = session
            except (ValueError, KeyError, TypeError, ValidationError):
                bad += 1  # a torn last line after a crash, or a damaged one: skip it
        if bad:
            log.warning("session journal: unreadable lines skipped",
                        extra={"path": str(self.path), "lines": bad})
        self._rewrite(open_)
        return open_

    def opened(self, session: OpenSession) -> None:
        """A session was started or resumed (or its record changed): it is open."""
        self._append({"op": "open", "session": session.model_dump(mode="json")})

    def closed(self, key: str, session_id: str) -> None:
        self._append({"op": "close", "key": key, "session_id": session_id})

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _append(self, entry: dict[str, object]) -> None:
        if self.path is None:
            return
        data = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
        try:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.write(self._fd, data)
        except OSError as exc:
            self._failed("write", exc)

    def _rewrite(self, open_: dict[str, OpenSession]) -> None:
        assert self.path is not None
        self.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(b"".join(
                json.dumps({"op": "open", "session": s.model_dump(mode="json")},
                           separators=(",", ":")).encode() + b"\n" for s in open_.values()))
            os.replace(tmp, self.path)
        except OSError as exc:
            self._failed("rewrite", exc)

    def _failed(self, what: str, exc: OSError) -> None:
        self.errors += 1
        log.error("session journal failed", extra={
            "path": str(self.path), "op": what, "error": str(exc), "errors": self.errors})
