"""Where a recovery connection is in its shard's history (:mod:`quart_wslb.recovery`).

A position is a history entry's id, ``<ms>-<seq>``: ``seq`` numbers the shard's messages
without gaps, so positions compare by it. Each recovery connection keeps the last one it
was handed, and its live messages wait here while its history is read; a message or a
mark numbered behind it means the history was renumbered. Messages reach the client
wrapped in JSON with their position (:func:`wrap`).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

from .envelope import Frame, Kind
from .keys import Keys
from .outgoing import Outgoing

__all__ = ("MAX_HELD", "Recovery", "position_frame", "seq_of", "wrap")

#: Live messages a connection holds while its history is read, at most: past that (a
#: client that does not read its replay) it is closed, and resumes later.
MAX_HELD = 10_000


def seq_of(pos: str | None) -> int | None:
    """The sequence number of a position ``<ms>-<seq>``; ``None`` if it is not one."""
    if pos is None:
        return None
    ms, _, seq = pos.partition("-")
    return int(seq) if ms.isdigit() and seq.isdigit() else None


def wrap(kind: Kind | str, frame: Frame, pos: str | None) -> str:
    """The frame a recovery connection gets for one message: JSON, ``{"t":"msg"}`` with
    its position ``pos`` (none for a message not in history) and ``d`` (text), ``j``
    (a JSON value) or ``b`` (bytes, base64)."""
    head = '{"t":"msg",' if pos is None else f'{{"t":"msg","pos":"{pos}",'
    if isinstance(frame, bytes):
        return head + '"b":"' + base64.b64encode(frame).decode() + '"}'
    if kind == "json":
        return head + '"j":' + frame + "}"
    return head + '"d":' + json.dumps(frame, ensure_ascii=False) + "}"


@dataclass(slots=True)
class Recovery:
    """A recovery connection's state: its session, where it is in the history, and its
    live messages held while the history is read."""

    keys: Keys
    session: str = ""
    #: The history's epoch, and the connection ids the session has had.
    epoch: str = ""
    ids: frozenset[str] = frozenset()
    holding: bool = True
    #: Holding until the history fills what the subscriber may have missed.
    catching: bool = False
    #: More than ``MAX_HELD`` live messages came while holding: some were not kept.
    overflowed: bool = False
    #: A message came numbered at or before one it has: the history was renumbered.
    broken: bool = False
    #: Its queue was full: live messages are dropped (the history has them) while a task
    #: hands it the history at the pace it reads (``recovery.Sessions.follow``).
    lagging: bool = False
    #: A message that is not in the history came while lagging: it cannot be handed.
    unrecoverable: bool = False
    held: list[tuple[str | None, Outgoing, str]] = field(default_factory=list)
    #: The sequence number of the last message handed to the connection, and its
    #: position.
    last: int = 0
    position: str = "0-0"

    def admit(self, pos: str | None, frame: Outgoing, message_id: str) -> bool:
        """Whether to queue a live message now (then :meth:`handed` once queued): not
        while holding (it is kept), nor while lagging (the history has it; one that is
        not in it makes the connection :attr:`unrecoverable`), nor if it is numbered at
        or before the last one handed out (then :attr:`broken`)."""
        if self.holding:
            if len(self.held) < MAX_HELD:
                self.held.append((pos, frame, message_id))
            else:
                self.overflowed = True
            return False
        if self.lagging:
            self.unrecoverable = self.unrecoverable or pos is None
            return False
        seq = seq_of(pos)
        if seq is not None and seq <= self.last:
            self.broken = True
            return False
        return True

    def mark(self, pos: str | None) -> bool:
        """A mark: the history ended at ``pos`` when every message before it had
        reached this instance. Whether the connection moved on to it (then its client is
        told); one behind what it has means the history was renumbered (:attr:`broken`)."""
        seq = seq_of(pos)
        if self.holding or self.lagging or seq is None or pos is None or seq == self.last:
            return False
        if seq < self.last:
            self.broken = True
            return False
        self.last, self.position = seq, pos
        return True

    def handed(self, pos: str) -> None:
        """Note that the message at ``pos`` was handed to the connection."""
        self.last, self.position = seq_of(pos) or 0, pos

    def take(self) -> list[tuple[Outgoing, str]]:
        """The held messages not handed out already, in order, taken from the hold
        (which goes on: more may come while they are queued)."""
        out = []
        for pos, frame, message_id in self.held:
            seq = seq_of(pos)
            if seq is not None and pos is not None:
                if seq <= self.last:
                    continue
                self.last, self.position = seq, pos
            out.append((frame, message_id))
        self.held.clear()
        return out

    def release(self) -> list[tuple[Outgoing, str]]:
        """Stop holding: :meth:`take`, and live messages go straight out from now on."""
        out = self.take()
        self.holding = self.catching = False
        return out

    def hold(self) -> None:
        """Hold live messages until :meth:`recovery.Sessions.catch_up` has run: the subscriber
        resubscribed, and may have missed some (a claimed session only: one being
        resumed holds already, and checks for a resubscription itself)."""
        if self.epoch and not self.holding and not self.lagging:
            self.holding = self.catching = True


def position_frame(pos: str) -> str:
    """The frame that tells a recovery client it is at ``pos`` (a mark reached it)."""
    return f'{{"t":"pos","pos":"{pos}"}}'
