"""Which gateway watches which clinic: the pure core of running several gateways.

A clinic is a partition. While several gateways run, each clinic is owned by exactly one of
them through a key in etcd bound to the owner's lease (gateway/coordination.py is the etcd
adapter; this module does no I/O and reads no clock). Only the owner subscribes to the
clinic's topics, runs its watchdog, publishes its heartbeat and sends its commands.

Two parts:

- `assign`: where each clinic should be, from the clinics, the live gateways and who owns
  what now. Every gateway computes it from the same etcd view, so they agree without talking
  to each other. Balanced (each gateway gets the floor or the ceiling of clinics / gateways)
  and sticky (a clinic moves only to make room for a newcomer or because its owner left).
- `Ownership`: one gateway's side. Fed the etcd view and its lease's validity (both with the
  time passed in), `step(now)` returns what to do: acquire a free clinic assigned to it, hand
  over one assigned elsewhere, start or stop watching. `may_command(clinic, now)` is the
  fence every command goes through: it is false from the moment the lease may have run out
  in etcd (minus a margin for clock rates), so a gateway cut off from etcd stops commanding
  and heartbeating before anyone else can own the clinic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal


def _weight(clinic: str, member: str) -> bytes:
    # A stable hash (not Python's salted hash()): every process must compute the same order.
    return hashlib.blake2b(f"{clinic}\x00{member}".encode(), digest_size=8).digest()


def _rank(clinic: str, members: Iterable[str]) -> list[str]:
    """The members in the clinic's own order of preference (rendezvous hashing)."""
    return sorted(members, key=lambda m: (_weight(clinic, m), m), reverse=True)


def assign(clinics: Iterable[str], members: Iterable[str],
           owners: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each clinic's owner-to-be among `members` (empty: no owner for any).

    Balanced: each member gets the floor or the ceiling of clinics / members. Sticky: a
    member keeps the clinics it owns now (`owners`) up to its share, so a gateway joining
    takes about its share and the rest stay; one leaving moves only its own clinics. The
    rest go, in a fixed order, to the member each clinic ranks highest among those with room
    (rendezvous hashing). A pure function of its arguments: every gateway, reading the same
    etcd view, computes the same placement.
    """
    ms = sorted(set(members))
    if not ms:
        return {}
    cs = sorted(set(clinics))
    owners = {c: o for c, o in (owners or {}).items() if o in ms and c in cs}
    base, extra = divmod(len(cs), len(ms))
    held = {m: 0 for m in ms}
    for o in owners.values():
        held[o] += 1
    # The ceiling's places go to those that hold most now (fewest moves), then by a hash.
    by_claim = sorted(ms, key=lambda m: (-held[m], hashlib.blake2b(m.encode(), digest_size=8)
                                         .digest(), m))
    cap = {m: base + (i < extra) for i, m in enumerate(by_claim)}
    out: dict[str, str] = {}
    load = dict.fromkeys(ms, 0)
    for m in ms:
        mine = sorted((c for c, o in owners.items() if o == m),
                      key=lambda c: (_weight(c, m), c), reverse=True)
        for c in mine[:cap[m]]:
            out[c] = m
            load[m] += 1
    for c in sorted((c for c in cs if c not in out),
                    key=lambda c: (hashlib.blake2b(c.encode(), digest_size=8).digest(), c)):
        for m in _rank(c, ms):
            if load[m] < cap[m]:
                out[c] = m
                load[m] += 1
                break
    return out


ActionKind = Literal["acquire", "release", "watch", "unwatch"]


@dataclass(frozen=True, slots=True)
class Action:
    """What the adapter does next: acquire or release a clinic's key in etcd; start or stop
    watching a clinic (subscriptions, watchdog, heartbeat, commands)."""

    kind: ActionKind
    clinic: str
    reason: str = ""


@dataclass
class Ownership:
    """One gateway's ownership of clinics, decided over the etcd view and its lease.

    `lease_margin_s` is subtracted from the lease's validity: the local clock may run a
    little slower than etcd's leader's, and the fence must close before etcd's would.
    """

    me: str
    lease_margin_s: float = 0.5
    members: frozenset[str] = frozenset()
    clinics: frozenset[str] = frozenset()
    owners: dict[str, str] = field(default_factory=dict)  # etcd's view: clinic -> owner
    lease_valid_until: float = float("-inf")  # monotonic: the lease may be gone after this
    watching: set[str] = field(default_factory=set)  # clinics this gateway acts for
    closing: bool = False  # release_all() was called: nothing more is acquired
    _asked: set[str] = field(default_factory=set)  # acquire/release sent, view not yet back

    # ------------------------------------------------------------------ inputs

    def on_view(self, members: Iterable[str], clinics: Iterable[str],
                owners: Mapping[str, str]) -> None:
        """The whole etcd view (members with a live lease, known clinics, owner keys)."""
        self.members = frozenset(members)
        self.clinics = frozenset(clinics)
        self.owners = dict(owners)
        # What was asked is now visible, or was refused (a create that lost a race, a key
        # already gone): either way decide again from this view. Asking twice is harmless,
        # every etcd operation is conditional.
        self._asked.clear()

    def on_lease(self, valid_until: float) -> None:
        """A keep-alive came back: the lease lives at least until `valid_until` (monotonic,
        the time the keep-alive was sent plus the TTL etcd granted)."""
        self.lease_valid_until = max(self.lease_valid_until, valid_until)

    def lease_lost(self) -> None:
        """etcd said the lease is gone (expired, revoked): nothing is owned any more."""
        self.lease_valid_until = float("-inf")

    # ------------------------------------------------------------------ decisions

    def lease_ok(self, now: float) -> bool:
        return now < self.lease_valid_until - self.lease_margin_s

    def may_command(self, clinic: str, now: float) -> bool:
        """The fence: this gateway may act for the clinic now (command, vent, heartbeat)."""
        return clinic in self.watching and self.lease_ok(now)

    def target(self) -> dict[str, str]:
        return assign(self.clinics, self.members | {self.me}, self.owners)

    def step(self, now: float) -> list[Action]:
        """What to do now; call it after every input and on a short tick."""
        actions: list[Action] = []
        if self.closing:
            return actions
        if not self.lease_ok(now):
            for c in sorted(self.watching):
                actions.append(Action("unwatch", c, "lease lost"))
            self.watching.clear()
            self._asked.clear()
            return actions
        target = self.target()
        for c in sorted(self.watching):
            if self.owners.get(c) != self.me:
                actions.append(Action("unwatch", c, "key gone"))
                self.watching.discard(c)
        held = {c for c, o in self.owners.items() if o == self.me}
        for c in sorted(self.clinics | held):
            owner, mine = self.owners.get(c), target.get(c) == self.me
            if owner == self.me and mine:
                if c not in self.watching:
                    actions.append(Action("watch", c))
                    self.watching.add(c)
            elif c in self._asked:
                continue
            elif owner == self.me:
                # Handed over: stop acting first, then free the key for the new owner, so
                # the two never act at once.
                if c in self.watching:
                    actions.append(Action("unwatch", c, f"handed over to {target.get(c)}"))
                    self.watching.discard(c)
                actions.append(Action("release", c))
                self._asked.add(c)
            elif owner is None and mine:
                actions.append(Action("acquire", c))
                self._asked.add(c)
        return actions

    def release_all(self) -> list[Action]:
        """Shutting down (SIGTERM): stop acting for every clinic, then free every key; no
        step decides anything afterwards."""
        actions = [Action("unwatch", c, "shutting down") for c in sorted(self.watching)]
        actions += [Action("release", c) for c, o in sorted(self.owners.items()) if o == self.me]
        self.watching.clear()
        self.closing = True
        return actions
