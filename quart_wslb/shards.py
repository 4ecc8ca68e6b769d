"""Sends over every shard: one group commit per shard, and the sum of their replies.

With one shard (one Redis) this is one :class:`~quart_wslb.batch.GroupCommit` and a
send is one script call, as ever. With several (:class:`~quart_wslb.keys.Keys`), each
shard is a registry of its own: a send goes to the shards that may hold a match
(:meth:`Program.shards <quart_wslb.selectors.Program.shards>`: a user's or a
connection's one shard, every shard for an index set), each shard's ``send.lua`` routes
its own connections (and names its shard in the envelope, for the receivers), and the
send's :class:`Routed` adds them up. Each shard has its own group commit, so that
concurrent sends still share each shard's round trips and script calls, and the shards'
calls run side by side: on one Redis each on a transport (a connection) of its own; on a
Redis Cluster all on the one cluster transport, which sends what the shards of one
master want at once together, on one connection per master
(:class:`~quart_wslb.funnel.Funnel`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.commands.core import AsyncScript

from .batch import Args, GroupCommit
from .contract import BROADCAST_REACHED, NO_INSTANCES, OP_IDS
from .keys import Keys
from .selectors import Program
from .transport import Transport, close

__all__ = ("Routed", "ShardedSends")


@dataclass(slots=True)
class Routed:
    """What one send did, over all of its shards."""

    #: Connections the message was routed to.
    routed: int = 0
    #: Instances that received an envelope (their ids as Redis returned them: bytes).
    reached: set[bytes] = field(default_factory=set)
    #: Owning instances whose channel nobody heard (dead or cut off), as bytes.
    unheard: set[bytes] = field(default_factory=set)
    #: For a broadcast: the most instances that heard one shard's copy.
    heard: int | None = None
    #: Whether every shard said that no instance ever announced itself.
    nobody: bool = True

    def add(self, reply: list[Any]) -> None:
        """Count one shard's ``send.lua`` reply in (see its header)."""
        routed, reached = reply[0], reply[1]
        if routed == NO_INSTANCES:
            return
        self.nobody = False
        self.routed += routed
        if reached == BROADCAST_REACHED:
            self.heard = max(self.heard or 0, reply[2])
            return
        # Decoded only where a receipt names them (unheard ones, rare).
        self.reached.update(reply[2 : 2 + reached])
        if len(reply) > 2 + reached:
            self.unheard.update(reply[2 + reached :])

    @property
    def instances(self) -> int:
        """How many instances received an envelope."""
        return self.heard if self.heard is not None else len(self.reached)


class ShardedSends:
    """``send.lua`` calls over every shard of ``keys``, each shard through a group
    commit of its own (made on ``transports``, one per shard, in order; one transport
    may serve several: :func:`~quart_wslb.transport.another`)."""

    def __init__(
        self,
        keys: Keys,
        transports: Sequence[Transport],
        script: AsyncScript,
        timeout: float,
        origin: str,
    ) -> None:
        self._keys = keys
        self._transports = list(transports)
        self._commits = [
            GroupCommit(
                transport,
                script,
                timeout,
                keys=[view.users.encode(), view.instances.encode()],
                args=[view.channel_base.encode(), origin.encode(), _more(keys, view.shard)],
            )
            for view, transport in zip(keys.views, transports, strict=True)
        ]

    @property
    def commits(self) -> list[GroupCommit]:
        """Each shard's group commit, in order."""
        return self._commits

    async def send(self, program: Program, args: list[bytes | str], alone: bool) -> Routed:
        """The :class:`Routed` of one send of ``program`` (``args``: the message's id,
        kind, payload and fragment); an error raises."""
        if len(self._commits) == 1:  # the hot path: one shard, nothing to plan
            routed = Routed()
            routed.add(await self._commits[0](program.keys, [*args, *program.ops], alone=alone))
            return routed
        calls = self._calls(program, args, alone)
        if len(calls) == 1:  # a user's or a connection's: one shard, one call
            shard, (keys, call_args, heavy) = calls[0]
            replies = [await self._commits[shard](keys, call_args, alone=heavy)]
        else:
            replies = await asyncio.gather(
                *(self._commits[n](keys, a, alone=heavy) for n, (keys, a, heavy) in calls)
            )
        routed = Routed()
        for reply in replies:
            routed.add(reply)
        return routed

    async def many(self, sends: Sequence[tuple[Program, list[bytes | str], bool]]) -> list[Any]:
        """The :class:`Routed` of each send, in order, or the error of a send that
        failed alone; a round trip that failed raises (see ``GroupCommit.many``)."""
        if len(self._commits) == 1:  # one shard: no plan, one window after another
            replies = await self._commits[0].many(
                [(program.keys, [*args, *program.ops], alone) for program, args, alone in sends]
            )
            return [_routed(reply) for reply in replies]
        per_shard: list[list[Args]] = [[] for _ in self._commits]
        owners: list[list[tuple[int, int]]] = []  # per send: (shard, index in its list)
        for program, args, alone in sends:
            mine = []
            for shard, call in self._calls(program, args, alone):
                mine.append((shard, len(per_shard[shard])))
                per_shard[shard].append(call)
            owners.append(mine)
        replies = await asyncio.gather(
            *(commit.many(calls) for commit, calls in zip(self._commits, per_shard, strict=True))
        )
        results: list[Any] = []
        for mine in owners:
            routed = Routed()
            failed: BaseException | None = None
            for shard, at in mine:
                reply = replies[shard][at]
                if isinstance(reply, BaseException):
                    failed = failed or reply
                else:
                    routed.add(reply)
            results.append(failed if failed is not None else routed)
        return results

    def _calls(
        self, program: Program, args: list[bytes | str], alone: bool
    ) -> list[tuple[int, Args]]:
        """Each shard's call of one send: the program's keys as that shard names them,
        and a lone list of ids cut to that shard's."""
        keys = self._keys
        if keys.shards == 1:
            return [(0, (program.keys, [*args, *program.ops], alone))]
        ops = program.ops
        if ops and ops[0][:1] == OP_IDS and len(ops) == int(ops[0][1:]) + 1:
            return [
                (view.shard, (program.keys, [*args, f"{OP_IDS}{len(ids)}", *ids], alone))
                for view, ids in keys.split(ops[1:])
            ]
        return [
            (n, ([keys.view(n).move(k) for k in program.keys], [*args, *ops], alone))
            for n in program.shards(keys.shards)
        ]

    async def aclose(self) -> None:
        """Hand every shard's connection back to the pool, and close what each shard's
        transport opened itself."""
        for commit in self._commits:
            await commit.aclose()
        for transport in self._transports:
            await close(transport)


def _more(keys: Keys, shard: int) -> bytes:
    """``send.lua``'s ``ARGV[3]``: the envelope's shard, with several."""
    return b"" if keys.shards == 1 else f',"sh":{shard}'.encode()


def _routed(reply: Any) -> Any:
    """One shard's reply as a :class:`Routed`, or the error it is."""
    if isinstance(reply, BaseException):
        return reply
    routed = Routed()
    routed.add(reply)
    return routed
