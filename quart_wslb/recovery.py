"""Recovery mode: a client that comes back, to any instance, gets what it missed.

A route opts in with ``ws_route(recovery=True)``. While any recovery session exists
under the prefix, every message sent is also appended, by the routing script itself
(``lua/send.lua``), to its shard's history stream under ``<ms>-<seq>``: ``seq`` has no
gaps, and the stream's meta hash holds an ``epoch`` that changes when Redis loses the
history. Each message carries its position on the wire, and a recovery connection gets
it wrapped with that position (:func:`wrap`). The session (user, path, metadata,
groups, a token) is written when the connection opens, so it outlives a ``kill -9``
of its instance, for ``recovery_ttl`` seconds after it was last refreshed.

A client resumes with its first frame (never the token in a URL). The new connection is
registered first, holding its live messages; then one script claims the session and
reads where the history ends; the history up to there is replayed, filtered by the
session's selector match, and the held live messages follow, those already replayed
dropped by sequence number. A history that cannot be replayed in full (another epoch,
entries trimmed, an unknown session) is reported: ``"recovered": false``.
The protocol is in ``docs/recovery.md``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis

from .contract import (
    OP_ALL,
    OP_AND,
    OP_BROADCAST,
    OP_CONNECTION,
    OP_IDS,
    OP_OR,
    OP_SET,
    OP_USER,
)
from .envelope import Frame
from .exceptions import WsLoadBalanceError, redis_deadline
from .keys import Keys, shard_of
from .outgoing import Outgoing
from .positions import seq_of, wrap

if TYPE_CHECKING:
    from .connection import Connection

__all__ = (
    "FIRST_FRAME_TIMEOUT",
    "HISTORY_LOST",
    "RESUMED_ELSEWHERE",
    "Claim",
    "HistoryGapError",
    "Peek",
    "Resume",
    "ResumeRefusedError",
    "Sessions",
    "hand",
    "matches",
    "release",
    "parse_resume",
)

#: Seconds a recovery route waits for the client's first frame (the resume frame).
FIRST_FRAME_TIMEOUT = 10.0
#: Close code of a connection whose session was resumed by another connection.
RESUMED_ELSEWHERE = 4409
#: Close code of a recovery connection that could not catch up: its client resumes.
TRY_AGAIN = 1013
#: Close code of a connection that missed messages the history no longer holds (Redis
#: lost it): the client resumes, and is told ``"recovered": false``.
HISTORY_LOST = 4410
#: Seconds a catch-up waits for room in one connection's queue, at most.
HAND_TIMEOUT = 10.0
#: History entries read per round trip while replaying.
PAGE = 500
#: Connection ids a session remembers (messages sent to an id replay to its session).
MAX_IDS = 8
#: How much longer than ``recovery_ttl`` and a refresh period a session lives after its
#: last refresh (ms), and the history after the last session (ms).
SESSION_GRACE_MS = 1000
HISTORY_GRACE_MS = 4000

# Claim a session for a connection, in one step: make the shard's history exist (a new
# epoch if Redis lost it), then resume the session named (its token checked, its owner
# swapped) or create it; reply with where the history stands.
# KEYS: session, history meta, history stream. ARGV: token hash, connection id, session
# TTL (ms), epoch for a new history, length, history TTL (ms), record (JSON), who
# (user and path, which a resume must match), resume (1) or create (0), how many ids
# the session keeps, the history's TTL (ms).
# Returns {status, epoch, seq, ms, first entry id, old owner, record, ids}: status 2
# resumed, 1 created, 0 no such session, -1 bad token, -2 another user or path.
_CLAIM = """
local session, meta, stream = KEYS[1], KEYS[2], KEYS[3]
if redis.call('HEXISTS', meta, 'e') == 0 then
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', ARGV[4], 's', 0, 'm', 0)
end
redis.call('HSET', meta, 'n', ARGV[5], 't', ARGV[6])
redis.call('PEXPIRE', meta, ARGV[11])
redis.call('PEXPIRE', stream, ARGV[11])
local h = redis.call('HMGET', meta, 'e', 's', 'm')
local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
local first_id = first[1] and first[1][1] or ''
local status, old, record, ids = 1, '', ARGV[7], ARGV[2]
if ARGV[9] == '1' then
  local s = redis.call('HMGET', session, 'k', 'c', 'r', 'ids', 'w')
  if not s[1] then status = 0
  elseif s[1] ~= ARGV[1] then status = -1
  elseif s[5] ~= ARGV[8] then status = -2
  else
    status, old, record = 2, s[2] or '', s[3] or ARGV[7]
    local kept = {}
    for id in string.gmatch(s[4] or '', '[^ ]+') do kept[#kept + 1] = id end
    kept[#kept + 1] = ARGV[2]
    while #kept > tonumber(ARGV[10]) do table.remove(kept, 1) end
    ids = table.concat(kept, ' ')
  end
  if status <= 0 then return {status, h[1], h[2], h[3], first_id, '', '', ''} end
  redis.call('HSET', session, 'c', ARGV[2], 'ids', ids)
else
  redis.call('HSET', session, 'k', ARGV[1], 'c', ARGV[2], 'r', ARGV[7], 'ids', ids,
    'w', ARGV[8])
end
redis.call('PEXPIRE', session, ARGV[3])
return {status, h[1], h[2], h[3], first_id, old, record, ids}
"""


# Refresh a session for its owner only: one that lost it (resumed elsewhere) or whose
# session expired must neither rewrite nor revive it.
# KEYS: session. ARGV: connection id, record (JSON), TTL (ms). Returns 1 if refreshed.
_REFRESH = """
if redis.call('HGET', KEYS[1], 'c') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'r', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


@dataclass(frozen=True, slots=True)
class Resume:
    """What a client's resume frame asked for: a new session (``session`` ``None``) or
    to resume one from ``pos`` in ``epoch``."""

    session: str | None = None
    token: str = field(default="", repr=False)
    epoch: str = ""
    pos: str = "0-0"


def parse_resume(frame: Frame) -> Resume | None:
    """The resume frame ``{"t":"resume",...}``; ``None`` for anything else."""
    try:
        data = json.loads(frame)
    except (ValueError, TypeError):
        return None
    if type(data) is not dict or data.get("t") != "resume":
        return None
    session = data.get("session")
    if session is None:
        return Resume()
    texts = [data.get(name, "") for name in ("session", "token", "epoch", "pos")]
    if not all(type(text) is str and len(text) <= 200 for text in texts):
        return None
    if seq_of(texts[3]) is None:
        return None
    return Resume(*texts)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(slots=True)
class Claim:
    """A claimed session: what the welcome frame says, and what to replay."""

    session: str
    token: str = field(repr=False)
    epoch: str
    #: Where the history ended when the session was claimed: ``<ms>-<seq>``.
    end: str
    recovered: bool
    #: The position to replay after: the client's, or where a new session began.
    start: str
    #: The previous owner (to close), or ``""``.
    old: str
    #: What to match the history against: the user, the session's connection ids and
    #: its index sets (as its record stored them, and as the connection has them).
    user: str | None
    ids: frozenset[str]
    names: set[str]


class HistoryGapError(WsLoadBalanceError):
    """The history misses an entry a connection needs: trimmed, or renumbered."""


class ResumeRefusedError(WsLoadBalanceError):
    """A recovery route's client did not open with a resume frame (closed 1008)."""


@dataclass(frozen=True, slots=True)
class Peek:
    """What :meth:`Sessions.peek` read before registering: the session's record if the
    resume may take it, and where the shard's history stood."""

    record: dict[str, Any] | None
    epoch: str
    base: str


Page = list[tuple[str, dict[bytes, bytes]]]


class Sessions:
    """Reads and claims sessions and replays their history, for one extension."""

    def __init__(
        self, redis: Redis, keys: Keys, *, length: int, ttl: float, timeout: float
    ) -> None:
        self._redis = redis
        self._timeout = timeout
        self._keys = keys
        self._length = length
        self._ttl_ms = int(ttl * 1000)
        #: Seconds between refreshes of a live connection's session.
        self.refresh_every = min(ttl / 4, 30.0)
        # A session outlives its last refresh by the TTL and one more period, so that a
        # crash leaves its client the whole TTL; the history outlives every session.
        self._session_ms = int((ttl + self.refresh_every) * 1000) + SESSION_GRACE_MS
        self._history_ms = self._session_ms + HISTORY_GRACE_MS
        self._claim = redis.register_script(_CLAIM)
        self._refresh = redis.register_script(_REFRESH)

    def new_session(self, user: str | None, connection_id: str) -> str:
        """A new session id, in the shard of the connection (its user's, else its id's)."""
        shards = self._keys.shards
        wanted = shard_of(user if user is not None else connection_id, shards)
        while True:
            session = secrets.token_urlsafe(16)
            if user is not None or shard_of(session, shards) == wanted:
                return session

    def view(self, user: str | None, session: str) -> Keys:
        """The shard of a session: its user's, else its id's."""
        if user is not None:
            return self._keys.of_user(user)
        return self._keys.view(shard_of(session, self._keys.shards))

    async def peek(self, view: Keys, user: str | None, path: str, resume: Resume) -> Peek:
        """Where the history stands, and the record of the session ``resume`` names if
        its token, user and path match: read before registering, so that a bad token
        never joins the session's groups."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hmget(view.history_meta, ["e", "s", "m"])
            if resume.session is not None:
                pipe.hmget(view.session(resume.session), ["k", "r", "w"])
            replies = await pipe.execute()
        epoch, seq, ms = replies[0]
        base = f"{_text(ms or 0)}-{_text(seq or 0)}"
        record = None
        if resume.session is not None:
            token, raw, who = replies[1]
            if (
                token is not None
                and raw is not None
                and hmac.compare_digest(token, _hash(resume.token).encode())
                and who is not None
                and who.decode() == _who(user, path)
            ):
                found = json.loads(raw)
                record = found if isinstance(found, dict) else None
        return Peek(record, "" if epoch is None else _text(epoch), base)

    async def claim(
        self,
        connection: Connection,
        view: Keys,
        session: str,
        token: str,
        resume: Resume,
        peek: Peek,
    ) -> Claim | None:
        """Claim ``session`` for ``connection`` (registered already): resume it when
        ``resume`` names it, else create it. ``None``: it may not be resumed after all
        (gone, or its token changed, since :meth:`peek`)."""
        resuming = resume.session is not None
        record = _record(connection)
        reply = await self._claim(
            keys=[view.session(session), view.history_meta, view.history],
            args=[
                _hash(token),
                connection.id,
                self._session_ms,
                secrets.token_hex(8),
                self._length,
                self._ttl_ms,
                json.dumps(record, separators=(",", ":"), ensure_ascii=False),
                _who(connection.user, connection.path),
                "1" if resuming else "0",
                MAX_IDS,
                self._history_ms,
            ],
        )
        status, epoch, seq, ms, first, old, raw, ids = (_text(item) for item in reply)
        if int(status) <= 0:
            return None
        end = f"{ms}-{seq}"
        # Replay after the client's position if the history holds everything after it,
        # else (and for a new session) after where the history stood before registering:
        # what came since may have reached this connection live, or may not.
        base = peek.base if peek.epoch == epoch else "0-0"
        recovered = not resuming
        if resuming:
            wanted, last, oldest = seq_of(resume.pos), int(seq), seq_of(first)
            recovered = (
                epoch == resume.epoch
                and wanted is not None
                and wanted <= last
                and (wanted == last or (oldest is not None and oldest <= wanted + 1))
            )
        # Matched as the session was, and as the connection is (its metadata may differ,
        # and groups may have changed since the peek): what reached it live was replayed.
        names = _index_names(view, record)
        for stored in (peek.record, json.loads(raw) if raw else None):
            if isinstance(stored, dict):
                names |= _index_names(view, stored)
        return Claim(
            session=session,
            token=token,
            epoch=epoch,
            end=end,
            recovered=recovered,
            start=resume.pos if recovered and resuming else base,
            old=old,
            user=connection.user,
            ids=frozenset(ids.split()) | {connection.id},
            names=names,
        )

    async def replay(self, claim: Claim, view: Keys) -> AsyncIterator[list[tuple[str, Outgoing]]]:
        """The messages of the history after ``claim.start`` up to ``claim.end`` that
        the session was sent, a page at a time; :class:`HistoryGapError` where one is
        missing (``seq`` has no gaps: every entry is checked, matched or not)."""
        async for page in self._pages(view, claim.start, claim.end):
            yield [
                (pos, Outgoing(_wrapped(entry, pos)))
                for pos, entry in page
                if matches(json.loads(entry[b"o"]), claim.user, claim.ids, claim.names)
            ]

    async def _pages(self, view: Keys, start: str, end: str) -> AsyncIterator[Page]:
        """The entries after ``start`` up to ``end``, a page at a time, each numbered
        one more than the one before; :class:`HistoryGapError` if one is missing."""
        expected, last = (seq_of(start) or 0) + 1, seq_of(end) or 0
        after = "(" + start
        while expected <= last:
            async with redis_deadline(self._timeout, "read history"):
                raw: list[tuple[bytes, dict[bytes, bytes]]] = await self._redis.xrange(
                    view.history, after, end, count=PAGE
                )  # type: ignore[assignment]
            if not raw:
                raise HistoryGapError(f"history ends before {expected} of {last}")
            page: Page = []
            for entry_id, entry in raw:
                pos = _text(entry_id)
                seq = seq_of(pos) or 0
                if seq < expected:  # at or before the start (a position's ms is the client's)
                    continue
                if seq != expected:
                    raise HistoryGapError(f"history has {seq} where {expected} was due")
                expected += 1
                page.append((pos, entry))
            yield page
            after = "(" + _text(raw[-1][0])
            await asyncio.sleep(0)  # a long history shares the loop

    async def catch_up(self, connections: list[Connection]) -> list[Connection]:
        """Hand each connection that :meth:`Recovery.hold` holds what the history holds
        for it past its last position (the subscriber was not listening for a while),
        then the live messages held meanwhile that it did not get that way. Returns
        those whose missed messages the history no longer holds (another epoch,
        trimmed, renumbered). Raises on a failure, the connections still held; if
        cancelled (the subscriber resubscribed again), the next call takes them.

        Each connection is handed its messages by a task of its own, waiting for room in
        its queue for at most ``HAND_TIMEOUT`` (then it is closed with 1013, and its
        client resumes): a client that does not read holds up no other."""
        by_shard: dict[Keys, list[Connection]] = {}
        for connection in connections:
            recovery = connection.recovery
            if recovery is not None and recovery.catching:
                by_shard.setdefault(recovery.keys, []).append(connection)
        lost: list[Connection] = []
        for view, held in by_shard.items():
            gone, found = await self._catch_up_shard(view, held)
            lost += gone
            await asyncio.gather(*(_hand_over(c, found.get(c, [])) for c in held if c not in gone))
        return lost

    async def _catch_up_shard(
        self, view: Keys, connections: list[Connection]
    ) -> tuple[list[Connection], dict[Connection, list[tuple[str, Outgoing]]]]:
        """One shard's :meth:`catch_up`: one read of the history from the earliest
        position of its connections; returns those whose history is lost, and what each
        other one is to be handed."""
        async with redis_deadline(self._timeout, "catch up"):
            epoch, top, ms = await self._redis.hmget(view.history_meta, ["e", "s", "m"])
        newest, now = int(_text(top or 0)), _text(epoch or "")
        end = f"{_text(ms or 0)}-{newest}"
        lost: list[Connection] = []
        waiting: dict[Connection, tuple[str | None, frozenset[str], set[str]]] = {}
        for connection in connections:
            recovery = connection.recovery
            if recovery is None or recovery.epoch != now or recovery.last > newest:
                lost.append(connection)  # another history, or one renumbered
            elif recovery.last < newest:
                names = _index_names(view, _record(connection))
                waiting[connection] = (connection.user, _ids(connection), names)
        found: dict[Connection, list[tuple[str, Outgoing]]] = {}
        if not waiting:
            return lost, found
        earliest = min(waiting, key=lambda c: c.recovery.last if c.recovery else 0)
        start = earliest.recovery.position if earliest.recovery else "0-0"
        candidates = _Candidates(waiting)
        try:
            async for page in self._pages(view, start, end):
                for pos, entry in page:
                    seq, ops = seq_of(pos) or 0, json.loads(entry[b"o"])
                    for connection in candidates.of(ops):
                        recovery = connection.recovery
                        check = waiting[connection]
                        if recovery is not None and seq > recovery.last and matches(ops, *check):
                            frame = Outgoing(_wrapped(entry, pos))
                            found.setdefault(connection, []).append((pos, frame))
        except HistoryGapError:  # trimmed past the earliest: each below the cut is lost
            return lost + list(waiting), {}
        return lost, found

    async def follow(self, connection: Connection, subscriptions: Callable[[], int]) -> bool:
        """Hand a lagging connection (:attr:`Recovery.lagging`: its queue was full) the
        history from its position, at the pace it reads, until it has caught up; then
        its live messages go straight out again. A last pass holds the live messages
        (those dropped before it are in the history it reads), and another follows if
        the subscriber resubscribed meanwhile (``subscriptions()`` counts them). Returns
        ``False`` if its history is lost; ``TimeoutError`` if it takes none of its
        messages for ``HAND_TIMEOUT``."""
        recovery = connection.recovery
        if recovery is None:
            return True
        check = (
            connection.user,
            _ids(connection),
            _index_names(recovery.keys, _record(connection)),
        )
        last_pass, seen = False, subscriptions()
        while True:
            async with redis_deadline(self._timeout, "follow"):
                epoch, top, ms = await self._redis.hmget(
                    recovery.keys.history_meta, ["e", "s", "m"]
                )
            newest = int(_text(top or 0))
            if _text(epoch or "") != recovery.epoch or newest < recovery.last:
                return False
            try:
                async for page in self._pages(
                    recovery.keys, recovery.position, f"{_text(ms or 0)}-{newest}"
                ):
                    for pos, entry in page:
                        if matches(json.loads(entry[b"o"]), *check):
                            async with asyncio.timeout(HAND_TIMEOUT):
                                await connection.put(Outgoing(_wrapped(entry, pos)))
                        recovery.handed(pos)
            except HistoryGapError:
                return False
            if last_pass and subscriptions() == seen:
                async with asyncio.timeout(HAND_TIMEOUT):
                    await release(connection)
                return True
            seen, last_pass = subscriptions(), True
            recovery.holding, recovery.lagging = True, False

    async def refresh(self, connections: list[Connection]) -> None:
        """Rewrite each session's record (its groups change) and restart its TTL, and
        that of its shard's history."""
        shards: set[Keys] = set()
        async with self._redis.pipeline(transaction=False) as pipe:
            for connection in connections:
                recovery = connection.recovery
                if recovery is None or not recovery.session:
                    continue
                key = recovery.keys.session(recovery.session)
                record = json.dumps(_record(connection), separators=(",", ":"))
                args: list[str | int] = [connection.id, record, self._session_ms]
                await self._refresh(keys=[key], args=args, client=pipe)
                shards.add(recovery.keys)
            for view in shards:
                pipe.pexpire(view.history_meta, self._history_ms)
                pipe.pexpire(view.history, self._history_ms)
            await pipe.execute()


class _Candidates:
    """The connections an entry may select, found from its program's operands (each
    user, id and index set it names) rather than by matching every connection: a
    catch-up reads thousands of entries for thousands of connections."""

    def __init__(self, checks: dict[Connection, tuple[str | None, frozenset[str], set[str]]]):
        self._all = list(checks)
        self._by: dict[str, list[Connection]] = {}
        for connection, (user, ids, names) in checks.items():
            keys = [OP_SET + name for name in names] + [OP_CONNECTION + id for id in ids]
            if user is not None:
                keys.append(OP_USER + user)
            for key in keys:
                self._by.setdefault(key, []).append(connection)

    def of(self, ops: list[str]) -> list[Connection]:
        """A superset of the connections ``ops`` selects, in a stable order."""
        found: dict[Connection, None] = {}
        i = 0
        while i < len(ops):
            op = ops[i]
            if op == OP_ALL or op == OP_BROADCAST:
                return self._all
            if op[:1] == OP_IDS:
                n = int(op[1:])
                for id in ops[i + 1 : i + 1 + n]:
                    found.update(dict.fromkeys(self._by.get(OP_CONNECTION + id, ())))
                i += n
            else:
                found.update(dict.fromkeys(self._by.get(op, ())))
            i += 1
        return list(found)


async def hand(connection: Connection, page: list[tuple[str, Outgoing]]) -> None:
    """Queue messages read from the history, each noted as handed, waiting for room."""
    recovery = connection.recovery
    for pos, frame in page:
        if recovery is not None:
            recovery.handed(pos)
        await connection.put(frame)


async def _hand_over(connection: Connection, found: list[tuple[str, Outgoing]]) -> None:
    """Queue what a catch-up found for ``connection``, then release its held messages,
    waiting for room at most ``HAND_TIMEOUT`` (else closed, 1013: its client resumes)."""
    try:
        async with asyncio.timeout(HAND_TIMEOUT):
            await hand(connection, found)
            await release(connection)
    except TimeoutError:
        await connection.close(TRY_AGAIN, "too slow to catch up: resume")


async def release(connection: Connection) -> None:
    """Stop holding ``connection``'s live messages: queue those not handed out already,
    waiting for room (they are more than a queue takes after a long replay), or close it
    (1013: its client resumes) if more came than it could hold."""
    recovery = connection.recovery
    if recovery is None:
        return
    # Held until the last is queued: a live message must not pass those before it.
    while batch := recovery.take():
        for frame, _ in batch:
            await connection.put(frame)
    overflowed, recovery.overflowed = recovery.overflowed, False
    recovery.release()
    if overflowed:
        await connection.close(TRY_AGAIN, "too many messages while catching up: resume")


def matches(ops: list[str], user: str | None, ids: frozenset[str], names: set[str]) -> bool:
    """Whether a history entry's selector program selects the session: ``user``, its
    connection ``ids``, and ``names``, the index sets it is in (keys without their hash
    tag). The program is a :class:`~quart_wslb.selectors.Program`'s ops, set ops naming
    their key."""
    stack: list[bool] = []
    i = 0
    while i < len(ops):
        op = ops[i]
        code = op[:1]
        if op == OP_AND or op == OP_OR:
            right, left = stack.pop(), stack.pop()
            stack.append(left and right if op == OP_AND else left or right)
        elif code == OP_SET:
            stack.append(op[1:] in names)
        elif code == OP_USER:
            stack.append(user is not None and op[1:] == user)
        elif op == OP_ALL or op == OP_BROADCAST:
            stack.append(True)
        elif code == OP_CONNECTION:
            stack.append(op[1:] in ids)
        elif code == OP_IDS:
            n = int(op[1:])
            stack.append(any(id in ids for id in ops[i + 1 : i + 1 + n]))
            i += n
        else:
            return False
        i += 1
    return len(stack) == 1 and stack[0]


def _wrapped(entry: dict[bytes, bytes], pos: str) -> str:
    kind = entry[b"k"].decode()
    payload = entry[b"p"]
    return wrap(kind, payload if kind == "binary" else payload.decode(), pos)


def _ids(connection: Connection) -> frozenset[str]:
    recovery = connection.recovery
    return (recovery.ids if recovery is not None else frozenset()) | {connection.id}


def _record(connection: Connection) -> dict[str, Any]:
    return {
        "u": connection.user,
        "p": connection.path,
        "m": dict(connection.metadata),
        "g": sorted(connection.groups),
    }


def _index_names(view: Keys, record: dict[str, Any]) -> set[str]:
    names = {view.relative(view.path(str(record.get("p", ""))))}
    for name, value in dict(record.get("m") or {}).items():
        names.add(view.relative(view.metadata(str(name), str(value))))
    for group in record.get("g") or ():
        names.add(view.relative(view.group(str(group))))
    return names


def _who(user: str | None, path: str) -> str:
    return json.dumps([user, path], ensure_ascii=False)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
