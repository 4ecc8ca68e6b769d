"""Positions in a shard's history, and a recovery connection's state
(``quart_wslb.positions``)."""

from __future__ import annotations

import base64
import json

from quart_wslb.keys import Keys
from quart_wslb.outgoing import Outgoing
from quart_wslb.positions import Recovery, seq_of, wrap


def test_seq_of_reads_the_sequence_number() -> None:
    assert seq_of("1700000000000-42") == 42
    assert seq_of("0-0") == 0
    assert seq_of("42") is None
    assert seq_of(None) is None


def test_wrap_each_kind() -> None:
    assert json.loads(wrap("text", 'a"b', "1-2")) == {"t": "msg", "pos": "1-2", "d": 'a"b'}
    assert json.loads(wrap("json", '{"x":[1]}', "1-3")) == {
        "t": "msg",
        "pos": "1-3",
        "j": {"x": [1]},
    }
    raw = json.loads(wrap("binary", b"\x00\xff", None))
    assert raw == {"t": "msg", "b": base64.b64encode(b"\x00\xff").decode()}


def test_recovery_holds_then_drops_what_was_replayed() -> None:
    recovery = Recovery(Keys("p"), "s")
    for seq in (3, 4, 5):
        assert not recovery.admit(f"1-{seq}", Outgoing(f"m{seq}"), f"id{seq}")
    recovery.last = 4  # replayed up to 4
    released = recovery.release()
    assert [message_id for _, message_id in released] == ["id5"]
    assert recovery.admit("1-6", Outgoing("m6"), "id6")
    recovery.handed("1-6")  # queued
    assert recovery.admit(None, Outgoing("local"), "x")
    assert not recovery.broken
    # Live, numbered at or before what it has: the history was renumbered.
    assert not recovery.admit("1-5", Outgoing("again"), "id5")
    assert recovery.broken


def test_recovery_mark_moves_on_and_tells_a_renumbering() -> None:
    recovery = Recovery(Keys("p"), "s", epoch="e", holding=False)
    assert recovery.mark("9-7") and recovery.position == "9-7"
    assert not recovery.mark("9-7"), "the same mark twice"
    assert not recovery.broken
    recovery.hold()
    assert not recovery.mark("10-8"), "a mark while catching up would skip what it fills"
    recovery.release()
    assert not recovery.mark("3-2") and recovery.broken


def test_recovery_lagging_drops_what_the_history_has() -> None:
    recovery = Recovery(Keys("p"), "s", epoch="e", holding=False)
    recovery.lagging = True
    assert not recovery.admit("1-1", Outgoing("m1"), "id1")
    assert not recovery.unrecoverable and not recovery.held
    assert not recovery.mark("2-5"), "a mark while lagging would skip what it never got"
    recovery.hold()
    assert not recovery.holding, "a resubscription's catch-up while its own task follows"
    assert not recovery.admit(None, Outgoing("local"), "x")
    assert recovery.unrecoverable, "a message the history lacks, dropped"
