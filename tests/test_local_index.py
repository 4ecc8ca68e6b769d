"""The local index: an instance's connections by id, and by the operands of selectors,
over which it resolves the selector an envelope names."""

from __future__ import annotations

import pytest

from quart_wslb import MetadataSelector, PathSelector, UserSelector
from quart_wslb.keys import Keys, shard_of
from quart_wslb.local_index import LocalIndex
from quart_wslb.signing import canonical
from tests.support import KEYS, make_connection

ANN = make_connection(id="i1:ann", user="ann", path="/a", metadata={"room": "red"})
BOB = make_connection(id="i1:bob", user="bob", path="/a", metadata={"room": "blue"})
CID = make_connection(id="i1:cid", user=None, path="/b", metadata={"room": "red", "t": "x"})


def index() -> LocalIndex:
    local = LocalIndex(KEYS)
    for connection in (ANN, BOB, CID):
        connection.groups.clear()
        local.add(connection)
    return local


def ids(local: LocalIndex, sel: list[str]) -> set[str] | None:
    found = local.resolve(sel)
    return None if found is None else {c.id for c in found}


def sel_of(selector: object) -> list[str]:
    return canonical(selector.compile(KEYS))  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (UserSelector("ann"), {"i1:ann"}),
        (PathSelector("/a"), {"i1:ann", "i1:bob"}),
        (MetadataSelector(room="red"), {"i1:ann", "i1:cid"}),
        (MetadataSelector(room="red", t="x"), {"i1:cid"}),
        (PathSelector("/a") & MetadataSelector(room="red"), {"i1:ann"}),
        (PathSelector("/b") | UserSelector("bob"), {"i1:bob", "i1:cid"}),
        (UserSelector("nobody"), set()),
        (PathSelector("/nowhere") & UserSelector("ann"), set()),
    ],
)
def test_local_index_resolves_each_selector_as_matches_does(
    selector: object, expected: set[str]
) -> None:
    local = index()
    assert ids(local, sel_of(selector)) == expected
    assert {c.id for c in local.values() if selector.matches(c)} == expected  # type: ignore[attr-defined]


def test_local_index_resolves_broadcast_ids_and_connections() -> None:
    local = index()
    assert ids(local, ["B"]) == ids(local, ["A"]) == {"i1:ann", "i1:bob", "i1:cid"}
    assert ids(local, ["Ci1:bob"]) == {"i1:bob"}
    assert ids(local, ["Ci2:elsewhere"]) == set()
    assert ids(local, ["M3", "i1:ann", "i1:gone", "i1:cid", "S" + KEYS.path("/a"), "&"]) == {
        "i1:ann"
    }


@pytest.mark.parametrize(
    "sel",
    [[], ["&"], ["Ua", "|"], ["Ua", "Ub"], ["X"], ["M2", "i1:ann"], ["Mx"], ["M-1", "a"]],
)
def test_local_index_refuses_an_unreadable_selector(sel: list[str]) -> None:
    assert index().resolve(sel) is None


def test_local_index_join_leave_and_regroup_follow_the_groups() -> None:
    local = index()
    room = ["S" + KEYS.group("room")]
    local.join(ANN, "room")
    local.join(BOB, "room")
    assert (ids(local, room), ANN.groups) == ({"i1:ann", "i1:bob"}, {"room"})
    local.leave(ANN, "room")
    local.leave(ANN, "room")  # leaving twice does nothing
    assert (ids(local, room), ANN.groups) == ({"i1:bob"}, set())
    local.regroup(BOB, frozenset({"other"}))
    assert (ids(local, room), ids(local, ["S" + KEYS.group("other")])) == (set(), {"i1:bob"})
    assert BOB.groups == {"other"}


def test_local_index_forgets_a_connection_everywhere() -> None:
    local = index()
    local.join(ANN, "room")
    ANN.groups.clear()  # by hand, not through leave: the index still knows
    local.discard(ANN)
    assert "i1:ann" not in local and len(local) == 2
    assert ids(local, ["S" + KEYS.group("room")]) == set()
    assert ids(local, ["Uann"]) == set()
    assert local._members[0].keys() == set(op for c in (BOB, CID) for op in local.operands(c)), (
        "an operand with no member left is dropped"
    )


def test_local_index_leaves_a_connection_it_does_not_hold_alone() -> None:
    """A connection replaced under its id (or never held) is not indexed by a join, and
    discarding it does not forget the one held."""
    local = index()
    stranger = make_connection(id="i1:ann", user="ann", path="/a")
    local.join(stranger, "room")
    assert stranger.groups == {"room"}
    assert ids(local, ["S" + KEYS.group("room")]) == set()
    local.discard(stranger)
    assert local["i1:ann"] is ANN


def test_local_index_add_replaces_the_connection_held_under_its_id() -> None:
    local = index()
    newer = make_connection(id="i1:ann", user="ann2", path="/new")
    local.add(newer)
    assert local["i1:ann"] is newer
    assert ids(local, ["Uann"]) == set() and ids(local, ["Uann2"]) == {"i1:ann"}
    assert ids(local, ["S" + KEYS.path("/a")]) == {"i1:bob"}
    local.discard(newer)
    assert "i1:ann" not in local and ids(local, ["Uann2"]) == set()


def test_local_index_resolves_among_one_shards_connections() -> None:
    """With several shards, each shard's envelope selects among its own connections."""
    keys = Keys("t", shards=4)
    local = LocalIndex(keys)
    members = [make_connection(id=f"i1:c{n}", user=None, path="/a") for n in range(12)]
    for connection in members:
        local.add(connection)
    sel = canonical(PathSelector("/a").compile(keys))
    for shard in range(4):
        found = {c.id for c in local.resolve(sel, shard) or []}
        assert found == {c.id for c in members if shard_of(c.id, 4) == shard}
        assert {c.id for c in local.resolve(["B"], shard) or []} == found
    assert {c.id for c in local.resolve(sel) or []} == {c.id for c in members}
    assert local.resolve(sel, 4) is None, "no such shard"
    local.discard(members[0])
    assert members[0].id not in {c.id for c in local.resolve(sel) or []}


def test_local_index_changes_count_the_joins_and_leaves_of_held_connections() -> None:
    local = LocalIndex(KEYS)
    held, stray = make_connection(id="i1:a"), make_connection(id="i1:b")
    local.add(held)
    before = local.changes()
    local.join(held, "g")
    local.leave(held, "g")
    local.leave(held, "never joined")  # no change: nothing to count
    local.join(stray, "g")  # not held: not counted
    assert before == {} and local.changes() == {"i1:a": 2}
    assert local.changes_of("i1:a") == 2 and local.changes_of("i1:b") == 0
    local.discard(held)
    assert local.changes() == {}


def test_local_index_snapshot_is_a_copy_of_the_held_connections() -> None:
    local = index()
    held = local.snapshot()
    local.discard(BOB)
    assert held == [ANN, BOB, CID]  # what was held then, unchanged by what came after
    assert local.snapshot() == [ANN, CID]
