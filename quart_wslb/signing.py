"""Signed envelopes: the keys, the MAC of each message, and the receiver's checks.

Without a secret, anyone who can ``PUBLISH`` under the prefix is trusted: a publish on
an instance's channel (or the broadcast channel) that parses as an envelope is
delivered. With a secret (``WSLB_SECRET``), every message entry of an envelope carries
a MAC that the sender computes in Python, before the routing script runs, so that the
key never reaches Redis (where ``MONITOR`` or ``SLOWLOG`` would show it)::

    {"ts":<ms>,"sel":[<selector>],"sig":"<key id>:<mac>","id":...,"kind":...,
     "targets":[...],"size":n}

The MAC covers every byte the sender decides: origin, message id, kind, the timestamp,
the selector as compiled (:func:`canonical`: the program's ops with each ``S<n>`` op
naming its key) and the payload. The targets are what Redis computed, so they are not
signed; instead the receiver checks each target against the signed selector on its
own records of the connection (:func:`predicate`), so a captured message cannot be
redirected to anyone the sender did not select. A timestamp window and a bounded set
of recent MACs (:class:`Verifier`) stop replays. Probes carry a MAC of their own.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .contract import (
    FIXED_KEYS,
    OP_ALL,
    OP_BROADCAST,
    OP_CONNECTION,
    OP_IDS,
    OP_SET,
    OP_USER,
    W_GROUP,
    W_METADATA,
    W_PATH,
)
from .envelope import Envelope
from .keys import Keys
from .selectors import Program, fold

if TYPE_CHECKING:
    from .records import ConnectionInfo

__all__ = (
    "RECENT",
    "WINDOW",
    "Keyring",
    "Predicate",
    "Verifier",
    "canonical",
    "message",
    "predicate",
    "sel_text",
)

#: Seconds a message's timestamp may differ from the receiver's clock (either way):
#: generous, for clock skew and a subscriber working through a backlog.
WINDOW = 30.0
#: MACs of recent messages an instance keeps to refuse replays (see :class:`Verifier`).
RECENT = 100_000
#: Bytes of HMAC-SHA256 kept: 128 bits, as hex.
MAC_BYTES = 16
#: Origins whose replay floors a :class:`Verifier` keeps before dropping those that
#: have fallen below the window (emitters take a new origin per process).
FLOORS = 4096
MIN_SECRET = 16
_KID_RE = re.compile(r"[A-Za-z0-9_.\-]{1,32}")
#: What a JSON string must escape (``ensure_ascii=False``), NUL aside (see sel_text).
_ESCAPE_RE = re.compile(r'["\\\x01-\x1f]')
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
#: Whether a connection is one that a signed selector selected.
Predicate = Callable[["ConnectionInfo"], bool]


class _Key:
    """HMAC-SHA256 under one secret, its padded inner and outer states hashed once
    (RFC 2104): a MAC then costs two copies and two short hashes, about a third of
    ``hmac.digest``'s time, which sets the key up again on every call."""

    __slots__ = ("inner", "outer")

    def __init__(self, secret: bytes) -> None:
        if len(secret) > 64:  # the block size: longer keys are hashed first
            secret = hashlib.sha256(secret).digest()
        padded = secret.ljust(64, b"\0")
        self.inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self.outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))

    def mac(self, data: bytes) -> str:
        inner = self.inner.copy()
        inner.update(data)
        outer = self.outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:MAC_BYTES].hex()


class Keyring:
    """Secrets by key id: the first signs, every one is accepted (for rotation).

    Built by :meth:`parse` from ``"kid1:secret1,kid0:secret0"`` (``WSLB_SECRET``), a
    mapping of key id to secret, or another keyring. Key ids are 1-32 characters of
    ``A-Z a-z 0-9 _ . -``; secrets are at least 16 bytes and contain no ``,``. Its
    ``repr`` shows key ids only, never a secret.
    """

    __slots__ = ("_accepted", "_identity", "_key", "signing")

    def __init__(self, secrets: Mapping[str, bytes]) -> None:
        if not secrets:
            raise ValueError("a secret needs at least one key")
        for kid, key in secrets.items():
            if not isinstance(kid, str) or not _KID_RE.fullmatch(kid):
                raise ValueError("key ids must be 1-32 characters of A-Z a-z 0-9 _ . -")
            if not isinstance(key, bytes) or len(key) < MIN_SECRET:
                raise ValueError(
                    f"the secret of key id {kid!r} must be at least {MIN_SECRET} bytes"
                )
        #: The key id that signs.
        self.signing = next(iter(secrets))
        self._accepted = {kid: _Key(key) for kid, key in secrets.items()}
        self._key = self._accepted[self.signing]
        # What equality compares: key ids, in order, and a MAC standing for each secret.
        self._identity = tuple((kid, key.mac(b"")) for kid, key in self._accepted.items())

    @classmethod
    def parse(cls, value: object) -> Keyring:
        """A keyring from ``WSLB_SECRET``'s text, a ``{key id: secret}`` mapping or a
        keyring; a ``ValueError`` (which never quotes a secret) for anything else."""
        if isinstance(value, Keyring):
            return value
        if isinstance(value, str):
            pairs = [item.partition(":") for item in value.split(",")]
            if any(not sep for _, sep, _ in pairs):
                raise ValueError("WSLB_SECRET must be 'kid:secret', comma-separated")
            value = {kid.strip(): secret for kid, _, secret in pairs}
        if not isinstance(value, Mapping):
            raise TypeError("a secret must be a str or a mapping of key id to secret")
        return cls({k: v.encode() if isinstance(v, str) else v for k, v in value.items()})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Keyring) and self._identity == other._identity

    def __hash__(self) -> int:
        return hash(self._identity)

    def __repr__(self) -> str:
        return f"Keyring(signing={self.signing!r}, accepted={list(self._accepted)!r})"

    def sign(self, data: bytes) -> str:
        """``<key id>:<mac>`` of ``data`` under the signing key."""
        return f"{self.signing}:{self._key.mac(data)}"

    def check(self, signature: str, data: bytes) -> str | None:
        """``None`` when ``signature`` is a MAC of ``data`` under an accepted key; else
        what is wrong with it."""
        kid, _, mac = signature.partition(":")
        key = self._accepted.get(kid)
        if key is None:
            return f"unknown key id {kid[:40]!r}"
        if not mac.isascii():  # compare_digest takes ASCII text only
            return "bad MAC"
        inner = key.inner.copy()  # _Key.mac, inline: this runs for every message received
        inner.update(data)
        outer = key.outer.copy()
        outer.update(inner.digest())
        return None if hmac.compare_digest(outer.digest()[:MAC_BYTES].hex(), mac) else "bad MAC"

    def fragment(
        self, origin: str, message_id: str, kind: str, payload: bytes, sel: list[str]
    ) -> bytes:
        """What ``send.lua`` puts at the start of a message entry: ``"ts":..,"sel":..,
        "sig":"..",`` (sent now). ``ValueError`` for a selector value with a NUL."""
        ts = time.time_ns() // 1_000_000
        text = sel_text(sel)
        if text is None:
            raise ValueError("a selector whose values hold a NUL character cannot be signed")
        sig = self.sign(message(origin, message_id, kind, ts, text, payload))
        if _ESCAPE_RE.search(text) is None:  # the common case: nothing to escape
            listed = '["' + text.replace("\0", '","') + '"]'
        else:
            listed = _dumps(sel)
        return f'"ts":{ts},"sel":{listed},"sig":"{sig}",'.encode()

    def probe(self, instance: str, number: int) -> bytes:
        """The signed tail of probe ``number`` of ``instance``: ``N:<kid>:<mac>``."""
        return f"{number}:{self.sign(_probe(instance, number))}".encode()


def _probe(instance: str, number: int) -> bytes:
    return f"probe\n{instance}\n{number}".encode()


def sel_text(sel: list[str]) -> str | None:
    """The selector's ops joined by NULs, as the MAC covers them; ``None`` when an op
    holds a NUL itself (that would be ambiguous, so it is never signed nor accepted)."""
    text = "\0".join(sel)
    return text if text.count("\0") == len(sel) - 1 else None


def message(origin: str, message_id: str, kind: str, ts: int, sel: str, payload: bytes) -> bytes:
    """The bytes a message's MAC covers, each field unambiguous: origins are checked by
    the sender, kinds are fixed words, ``ts`` is an int, and ``sel`` (:func:`sel_text`)
    comes with its length, so that no byte can move between it and the payload."""
    return f"{origin}\n{message_id}\n{kind}\n{ts}\n{len(sel)}\n{sel}".encode() + payload


def canonical(program: Program) -> list[str]:
    """A program's ops with each ``S<n>`` op naming its key (``S<key>``): what it means
    on its own, outside the script call that numbers the keys."""
    if not program.keys:  # no set op: the ops as they are (the hot path)
        return program.ops
    ops, out, i = program.ops, [], 0
    while i < len(ops):
        op = ops[i]
        if op[:1] == OP_IDS:  # M<n> and its n ids, which may start with anything
            count = int(op[1:])
            out.extend(ops[i : i + 1 + count])
            i += 1 + count
            continue
        if op[:1] == OP_SET:  # S<n>: KEYS[n], past the fixed keys
            op = OP_SET + program.keys[int(op[1:]) - FIXED_KEYS - 1]
        out.append(op)
        i += 1
    return out


def predicate(sel: list[str], keys: Keys) -> Predicate | None:
    """Whether a local connection is one that the signed selector ``sel`` selects,
    evaluated over the connection alone (the postfix ops of ``selectors.Program``);
    ``None`` for a selector that cannot be read. ``S<key>`` holds when ``key`` is one
    of the connection's index sets: its path's, a group's or a metadata pair's."""
    if len(sel) == 1 and sel[0][:1] != OP_IDS:  # the common case: one operand
        return _operand(sel[0], keys)
    return fold(sel, lambda op: _operand(op, keys), _among, _both, _either)


def _digits(text: str) -> bool:
    """Whether ``text`` is a count as the sender writes it: ASCII digits only
    (``str.isdigit`` also holds for ``"²"``, which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


def _among(ids: list[str]) -> Predicate:
    listed = frozenset(ids)
    return lambda c: c.id in listed


def _both(left: Predicate, right: Predicate) -> Predicate:
    return lambda c: left(c) and right(c)


def _either(left: Predicate, right: Predicate) -> Predicate:
    return lambda c: left(c) or right(c)


def _everyone(connection: ConnectionInfo) -> bool:
    return True


def _operand(op: str, keys: Keys) -> Predicate | None:
    code, value = op[:1], op[1:]
    if code == OP_USER and value:
        return lambda c: c.user == value
    if code == OP_CONNECTION and value:
        return lambda c: c.id == value
    if op in (OP_ALL, OP_BROADCAST):
        return _everyone
    if code == OP_SET:
        return _index(value, keys)
    return None


def _index(key: str, keys: Keys) -> Predicate | None:
    """A test of membership of index set ``key``, if it is one under ``keys``' prefix
    (each parse is checked by building the name again, as ``Keys`` does)."""
    _, _, rest = key.partition("}:")
    kind, _, value = rest.partition(":")
    if kind == W_PATH and keys.path(value) == key:
        return lambda c: c.path == value
    if kind == W_GROUP and keys.group(value) == key:
        return lambda c: value in c.groups
    if kind == W_METADATA:
        length, _, pair = value.partition(":")
        raw = pair.encode()
        if not _digits(length) or len(length) > 10 or raw[int(length) : int(length) + 1] != b":":
            return None
        try:
            name = raw[: int(length)].decode()
            wanted = raw[int(length) + 1 :].decode()
        except UnicodeDecodeError:
            return None
        if keys.metadata(name, wanted) == key:
            return lambda c: c.metadata.get(name) == wanted
    return None


class Verifier:
    """An instance's checks of signed messages: MAC, freshness, replays.

    A message is fresh when its timestamp is within ``window`` seconds of this clock.
    The MAC of every accepted message is kept for ``2 * window`` (past that, a replay
    is stale anyway), at most ``recent`` of them: when more arrive within that time,
    the oldest are forgotten, and every message of the same origin not newer than the
    newest forgotten one is refused as a possible replay, so a flood of legitimate
    traffic narrows the window rather than opening a hole. The floor is kept per
    origin: timestamps are only compared with others from the same clock, so a sender
    whose clock runs behind another's is not refused when the other's floor rises.
    """

    __slots__ = (
        "_floors",
        "_keep",
        "_keyring",
        "_keys",
        "_known",
        "_last_match",
        "_last_sel",
        "_prune_at",
        "_recent",
        "_seen",
        "_window",
    )

    def __init__(
        self, keyring: Keyring, keys: Keys, window: float = WINDOW, recent: int = RECENT
    ) -> None:
        self._keyring = keyring
        self._keys = keys
        self._window = int(window * 1000)
        #: How long (ms) an accepted MAC is kept: past it, a replay is stale anyway.
        self._keep = 2 * self._window
        self._recent = recent
        #: (when it was accepted, in ms; its origin; its timestamp; its MAC), oldest first.
        self._seen: deque[tuple[int, str, int, str]] = deque()
        self._known: set[str] = set()
        #: Per origin, the timestamp at or below which its messages may be forgotten replays.
        self._floors: dict[str, int] = {}
        #: How many floors make the next prune (see _forget).
        self._prune_at = FLOORS
        #: The last selector asked about, and its test (see selects).
        self._last_sel: list[str] | None = None
        self._last_match: Predicate | None = None

    def check(self, envelope: Envelope, now: int | None = None) -> str | None:
        """``None`` for an authentic, fresh, first-seen message; else why not.

        ``now`` is this clock in Unix ms (``time.time_ns() // 1_000_000``), read here
        when not given: a caller checking the messages of one publish reads it once.
        """
        sig, ts, sel = envelope.sig, envelope.ts, envelope.sel
        if sig is None:
            return "unsigned"
        if ts is None or sel is None:
            return "incomplete signature"
        # sel_text and message, inline: this runs per message.
        if len(sel) == 1:
            text = sel[0]
            if "\0" in text:
                return "a selector value holds a NUL"
        else:
            text = "\0".join(sel)
            if text.count("\0") != len(sel) - 1:
                return "a selector value holds a NUL"
        origin, frame = envelope.origin, envelope.frame
        try:
            if isinstance(frame, str):  # one string, one encode: its UTF-8 is the payload
                data = (
                    f"{origin}\n{envelope.id}\n{envelope.kind}\n{ts}\n{len(text)}\n{text}{frame}"
                ).encode()
            else:
                data = (
                    f"{origin}\n{envelope.id}\n{envelope.kind}\n{ts}\n{len(text)}\n{text}"
                ).encode() + frame
        except UnicodeEncodeError:  # a lone surrogate (JSON allows them): nobody signs one
            return "a field is not valid Unicode"
        problem = self._keyring.check(sig, data)
        if problem is not None:
            return problem
        if now is None:
            now = time.time_ns() // 1_000_000
        if abs(now - ts) > self._window:
            return f"stale: sent {(now - ts) / 1000:.1f}s from now"
        known = self._known
        if ts <= self._floors.get(origin, 0):
            return "replayed"
        if envelope.shard is not None:  # each shard routes its own copy (keys.py)
            sig = f"{sig}#{envelope.shard}"
        size = len(known)
        known.add(sig)
        if len(known) == size:  # it was there: one hash of the MAC instead of two
            return "replayed"
        seen = self._seen
        seen.append((now, origin, ts, sig))
        if seen[0][0] < now - self._keep or len(seen) > self._recent:
            self._forget(now)
        return None

    def _forget(self, now: int) -> None:
        seen, expired, floors = self._seen, now - self._keep, self._floors
        while seen and (seen[0][0] < expired or len(seen) > self._recent):
            received, origin, ts, sig = seen.popleft()
            self._known.discard(sig)
            # Forgotten early: its replays must still fail.
            if received >= expired and ts > floors.get(origin, 0):
                floors[origin] = ts
        if len(floors) > self._prune_at:  # a floor below the window stops nothing it lets in
            oldest = now - self._window
            self._floors = {origin: ts for origin, ts in floors.items() if ts >= oldest}
            # Where many origins stay within the window, prune again only once their
            # number has doubled: amortised O(1) per message, memory at most twice theirs.
            self._prune_at = max(FLOORS, 2 * len(self._floors))

    def selects(self, sel: list[str]) -> Predicate | None:
        """The local test of the targets of a message signed with ``sel``.

        The last one is kept: the messages of a burst of sends that list their targets
        (to one user, or a user within a group) share their selector, whose test costs
        a microsecond or two to build.
        """
        if sel == self._last_sel:
            return self._last_match
        if len(sel) == 1 and sel[0][:1] != OP_IDS:  # predicate's common case, one call less
            match = _operand(sel[0], self._keys)
        else:
            match = predicate(sel, self._keys)
        self._last_sel, self._last_match = sel, match
        return match

    def probe(self, instance: str, number: int, signature: bytes) -> str | None:
        """``None`` when ``signature`` signs probe ``number`` of ``instance``; else why
        not (``"unsigned"`` when there is none)."""
        if not signature:
            return "unsigned"
        data = _probe(instance, number)
        return self._keyring.check(signature.decode("utf-8", "replace"), data)
