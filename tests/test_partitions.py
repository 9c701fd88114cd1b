"""Clinics over several gateways: the placement and one gateway's ownership, without etcd.

Written from issue 15's rules: each clinic owned by exactly one gateway at a time, a fair
share for each, an instance that loses its lease stops commanding at once, a dead owner's
clinics taken over within the lease's TTL, a SIGTERM hands everything over at once. etcd is
modelled here as what it guarantees (create-if-absent, keys bound to leases that expire
TTL after the last keep-alive reached it); tests/test_coordination.py runs the real one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from gateway.partitions import Action, Ownership, assign

names = st.text("abcdefghij0123456789-", min_size=1, max_size=6)


@given(st.lists(names, max_size=40), st.lists(names, min_size=1, max_size=8))
def test_every_clinic_gets_one_live_gateway_and_loads_differ_by_at_most_one(
        clinics: list[str], members: list[str]) -> None:
    out = assign(clinics, members)
    assert set(out) == set(clinics)
    assert set(out.values()) <= set(members)
    loads = [list(out.values()).count(m) for m in set(members)]
    n, m = len(set(clinics)), len(set(members))
    assert sorted(set(loads)) <= [n // m, math.ceil(n / m)]
    assert sum(loads) == n


@given(st.lists(names, max_size=30), st.lists(names, min_size=1, max_size=6), st.randoms())
def test_every_gateway_computes_the_same_placement_from_the_same_sets(
        clinics: list[str], members: list[str], rnd: object) -> None:
    shuffled_c, shuffled_m = list(clinics) * 2, list(members)
    rnd.shuffle(shuffled_c)  # type: ignore[attr-defined]
    rnd.shuffle(shuffled_m)  # type: ignore[attr-defined]
    assert assign(shuffled_c, shuffled_m) == assign(clinics, members)


def test_no_gateway_no_owner() -> None:
    assert assign(["c1", "c2"], []) == {}


@given(st.sets(names, min_size=1, max_size=40), st.sets(names, min_size=1, max_size=6), names)
def test_a_gateway_joining_takes_its_share_and_the_rest_stay(
        clinics: set[str], members: set[str], newcomer: str) -> None:
    """From a settled fleet, a new gateway takes its share; no other clinic moves."""
    if newcomer in members:
        return
    before = assign(clinics, members)
    after = assign(clinics, members | {newcomer}, before)
    moved = {c for c in clinics if before[c] != after[c]}
    assert all(after[c] == newcomer for c in moved)
    assert len(moved) in (len(clinics) // (len(members) + 1),
                          math.ceil(len(clinics) / (len(members) + 1)))


@given(st.sets(names, min_size=1, max_size=40), st.sets(names, min_size=2, max_size=6),
       st.data())
def test_a_gateway_leaving_moves_only_its_own_clinics(
        clinics: set[str], members: set[str], data: st.DataObject) -> None:
    before = assign(clinics, members)
    gone = data.draw(st.sampled_from(sorted(members)))
    after = assign(clinics, members - {gone}, before)
    assert {c for c in clinics if before[c] != after[c]} == \
        {c for c in clinics if before[c] == gone}


@given(st.sets(names, max_size=30), st.sets(names, min_size=1, max_size=6),
       st.dictionaries(names, names, max_size=30))
def test_any_current_owners_still_give_a_balanced_placement(
        clinics: set[str], members: set[str], owners: dict[str, str]) -> None:
    """Whatever etcd says now (owners that left, clinics unknown, too many on one), the
    placement is balanced and on live gateways only."""
    out = assign(clinics, members, owners)
    assert set(out) == clinics and set(out.values()) <= members
    loads = [list(out.values()).count(m) for m in members]
    assert max(loads) - min(loads) <= 1


# ---------------------------------------------------------------- one gateway, by hand

def test_a_free_clinic_assigned_here_is_acquired_then_watched_once_the_key_is_ours() -> None:
    o = Ownership("gw-a")
    o.on_lease(10.0)
    o.on_view({"gw-a"}, {"c1"}, {})
    assert o.step(1.0) == [Action("acquire", "c1")]
    assert o.step(1.1) == []  # asked already; waiting for the view
    assert not o.may_command("c1", 1.1)
    o.on_view({"gw-a"}, {"c1"}, {"c1": "gw-a"})
    assert o.step(1.2) == [Action("watch", "c1")]
    assert o.may_command("c1", 1.2)


def test_the_fence_closes_before_the_lease_can_have_run_out_in_etcd() -> None:
    o = Ownership("gw-a", lease_margin_s=0.5)
    o.on_lease(10.0)
    o.on_view({"gw-a"}, {"c1"}, {"c1": "gw-a"})
    o.step(1.0)
    assert o.may_command("c1", 9.4)
    assert not o.may_command("c1", 9.5)  # no keep-alive came back: stop before etcd could
    assert o.step(9.5) == [Action("unwatch", "c1", "lease lost")]


def test_a_clinic_assigned_to_a_newcomer_is_unwatched_before_its_key_is_released() -> None:
    o = Ownership("gw-a")
    o.on_lease(100.0)
    clinics = {f"c{i}" for i in range(6)}
    o.on_view({"gw-a"}, clinics, dict.fromkeys(clinics, "gw-a"))
    o.step(1.0)
    o.on_view({"gw-a", "gw-b"}, clinics, dict.fromkeys(clinics, "gw-a"))
    acts = o.step(1.1)
    released = [a.clinic for a in acts if a.kind == "release"]
    assert len(released) == 3
    for c in released:
        assert acts.index(Action("unwatch", c, "handed over to gw-b")) < \
            acts.index(Action("release", c))
        assert not o.may_command(c, 1.1)


def test_sigterm_releases_everything_and_acquires_nothing_after() -> None:
    o = Ownership("gw-a")
    o.on_lease(100.0)
    o.on_view({"gw-a"}, {"c1", "c2"}, {"c1": "gw-a", "c2": "gw-a"})
    o.step(1.0)
    acts = o.release_all()
    assert [a.kind for a in acts] == ["unwatch", "unwatch", "release", "release"]
    o.on_view({"gw-a"}, {"c1", "c2"}, {})
    assert o.step(2.0) == []
    assert not o.may_command("c1", 2.0)


# ---------------------------------------------------------------- many gateways, one etcd

TTL = 2.0


@dataclass
class Gw:
    """A gateway as the model sees it: its core, its lease, whether etcd hears it."""

    own: Ownership
    lease: int | None = None
    cut_off: bool = False  # partitioned from etcd: runs on, hears and is heard by nobody


@dataclass
class Etcd:
    """What etcd guarantees, nothing more: leases that expire TTL after the last keep-alive
    reached the leader; keys bound to them; create-if-absent."""

    now: float = 0.0
    next_lease: int = 1
    leases: dict[int, float] = field(default_factory=dict)  # id -> expires at
    members: dict[str, int] = field(default_factory=dict)  # gateway -> lease
    owners: dict[str, tuple[str, int]] = field(default_factory=dict)  # clinic -> (gw, lease)
    clinics: set[str] = field(default_factory=set)

    def grant(self) -> int:
        lease = self.next_lease
        self.next_lease += 1
        self.leases[lease] = self.now + TTL
        return lease

    def expire(self) -> None:
        self.revoke({lease for lease, t in self.leases.items() if t <= self.now})

    def revoke(self, dead: set[int]) -> None:
        """Leases gone, and every key bound to them with them."""
        for lease in dead:
            self.leases.pop(lease, None)
        self.members = {m: lease for m, lease in self.members.items() if lease not in dead}
        self.owners = {c: v for c, v in self.owners.items() if v[1] not in dead}

    def view(self) -> tuple[set[str], set[str], dict[str, str]]:
        return set(self.members), set(self.clinics), {c: v[0] for c, v in self.owners.items()}


class ManyGateways(RuleBasedStateMachine):
    """Gateways join, die, are cut off from etcd and come back, shut down; time passes in
    steps shorter than the TTL. Invariant on every step: no clinic has two gateways that
    may command it. After a quiet spell: every clinic is watched by exactly one gateway etcd
    hears, and the loads differ by at most one."""

    gateways = Bundle("gateways")

    def __init__(self) -> None:
        super().__init__()
        self.etcd = Etcd()
        self.gws: dict[str, Gw] = {}
        self.n = 0

    @initialize(target=gateways, clinics=st.integers(1, 12))
    def first(self, clinics: int) -> str:
        self.etcd.clinics = {f"clinic-{i}" for i in range(clinics)}
        return self._start()

    def _start(self) -> str:
        self.n += 1
        name = f"gw-{self.n}"
        gw = Gw(Ownership(name, lease_margin_s=0.3))
        self.gws[name] = gw
        self._register(name, gw)
        return name

    def _register(self, name: str, gw: Gw) -> None:
        sent = self.etcd.now
        gw.lease = self.etcd.grant()
        self.etcd.members[name] = gw.lease
        gw.own.on_lease(sent + TTL)

    def _round(self) -> None:
        """Every gateway etcd hears gets the view and acts on it; the cut-off act alone."""
        for name, gw in list(self.gws.items()):
            if not gw.cut_off:
                gw.own.on_view(*self.etcd.view())
            for a in gw.own.step(self.etcd.now):
                if gw.cut_off:
                    continue  # its requests do not reach etcd
                if a.kind == "acquire" and a.clinic not in self.etcd.owners \
                        and gw.lease in self.etcd.leases:
                    self.etcd.owners[a.clinic] = (name, gw.lease)
                elif a.kind == "release" and self.etcd.owners.get(a.clinic, ("",))[0] == name:
                    del self.etcd.owners[a.clinic]

    @rule(target=gateways)
    @precondition(lambda self: len(self.gws) < 5)
    def join(self) -> str:
        name = self._start()
        self._round()
        return name

    @rule(dt=st.floats(0.05, TTL / 3))
    def time_passes(self, dt: float) -> None:
        self.etcd.now += dt
        for name, gw in self.gws.items():
            if gw.cut_off:
                continue
            if gw.lease in self.etcd.leases:
                sent = self.etcd.now
                self.etcd.leases[gw.lease] = sent + TTL  # a keep-alive every tick
                gw.own.on_lease(sent + TTL)
            else:
                gw.own.lease_lost()
                self._register(name, gw)  # a new lease, a new membership
        self.etcd.expire()
        self._round()

    @rule(name=consumes(gateways))
    def killed(self, name: str) -> None:
        del self.gws[name]  # SIGKILL: nothing more from it; etcd expires its lease

    @rule(name=consumes(gateways))
    def sigterm(self, name: str) -> None:
        gw = self.gws.pop(name)
        for a in gw.own.release_all():
            if a.kind == "release" and self.etcd.owners.get(a.clinic, ("",))[0] == name:
                del self.etcd.owners[a.clinic]
        if gw.lease is not None:
            self.etcd.revoke({gw.lease})
        self._round()

    @rule(name=gateways)
    def cut_off(self, name: str) -> None:
        if name in self.gws:
            self.gws[name].cut_off = True

    @rule(name=gateways)
    def heals(self, name: str) -> None:
        if name in self.gws:
            self.gws[name].cut_off = False

    @rule(clinic=st.integers(0, 15))
    def new_clinic(self, clinic: int) -> None:
        self.etcd.clinics.add(f"clinic-{clinic}")
        self._round()

    @invariant()
    def never_two_commanders(self) -> None:
        for c in self.etcd.clinics:
            who = [n for n, gw in self.gws.items() if gw.own.may_command(c, self.etcd.now)]
            assert len(who) <= 1, (c, who, self.etcd.now)

    @rule()
    def quiet_spell(self) -> None:
        """Everyone heals and time passes past a TTL: the fleet settles, fairly."""
        for gw in self.gws.values():
            gw.cut_off = False
        for _ in range(int(2 * TTL / 0.25) + 4):
            self.time_passes(0.25)
        if not self.gws:
            return
        for c in self.etcd.clinics:
            who = [n for n, gw in self.gws.items() if gw.own.may_command(c, self.etcd.now)]
            assert len(who) == 1, (c, who)
        loads = [len(gw.own.watching) for gw in self.gws.values()]
        assert max(loads) - min(loads) <= 1, loads


ManyGateways.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                          deadline=None)
test_many_gateways = ManyGateways.TestCase
