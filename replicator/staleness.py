"""Bounded staleness through peers (``registry_node.staleness.PeerContent``).

When a client names content this node lacks — a manifest pulled right after
its push elsewhere, layers that went to another replica before this manifest
PUT — the node asks its peers and fetches it through ``Transfer``, with the
stamps the peer holds, instead of answering 404 or MANIFEST_BLOB_UNKNOWN.
Residency still holds: a peer never hands out content its region must keep,
and a holder whose copy may not come here is not asked for it.

A manifest is looked up before it is fetched
    A round asks every peer at once, hurried (``PeerClient.hurried``), for the
    image's status (``GetImageStatus``, at most ``lookup_timeout_s``), then
    fetches from the peers that hold it, holders first. By digest, the first
    holder whose copy may come here ends the round; by tag, the round waits
    for every answer it waits for and the newest register wins, exactly as
    replication would decide.

Why a 404 stays fast: a round does not wait for a silent peer
    Most manifests that no replica has are tags a client probes before it
    pushes them (``skopeo copy`` and every push of a new tag ask first), so
    what a round costs is what those 404s cost. A peer that stopped answering
    with its connection open — a stalled link, a frozen process — answers
    nothing until keepalive closes its connection, up to about 90 s later
    (``replicator.peers``), and a reconnect over a stalled link hangs the
    same way; a hurried call fails at once only on a channel that
    knows it cannot connect. Every round waited the
    full lookup timeout for it: behind a stalled link, 404s took 2 s each for
    the first 90 s of the stall.

    So a peer that let a lookup run out is *silent* here until something
    arrives from it: a reply to a lookup, or a batch on this node's
    subscription to it (``Subscription.batches_received``). A round still
    asks a silent peer, at most one lookup to it in flight at a time (which
    is how its return is noticed), and uses the reply if it comes while the
    round waits for the others, but does not wait for it. Only the rounds
    that start before the first lookup to a stalled peer runs out wait for
    it: one lookup timeout per stall, not one per 404.

What was weighed and left out
    * Asking only peers whose stream is behind or not connected: a stream is
      "behind" (``behind_events``) only once the peer has said how far its log
      goes, in the very batch that carries the missing event, so during the
      window a rescue exists for (a pull right after a push elsewhere, the
      event in flight) every stream looks caught up. A stalled stream looks
      connected and caught up too until keepalive closes it (up to about
      90 s: ``replicator.peers``): the stream carries no heartbeat, and an
      idle one is silent anyway.
    * A negative cache of (repository, reference): repeated 404s without a
      round trip, but a wrong 404 for its whole lifetime for content pushed
      elsewhere whose event has not arrived — a tag probed here, pushed
      through another replica (routing moved), pulled here — which is the
      case the rescue exists for; the event that would invalidate the entry is
      the one still in flight. Not waiting for silent peers already bounds a
      404 by one round trip to the farthest peer that answers.
    * Heartbeats on the subscription stream would make a stall known before
      any lookup runs out, sparing that first timeout, at a message per
      interval on every stream (one per ordered pair of nodes) of an idle
      cluster.
    * A shorter deadline learned from each peer's round trips: a loaded,
      shared machine makes those noisy, and every deadline missed is a
      chance of a wrong 404; one missed lookup timeout is a strong signal.

The window for a wrong 404
    Content acknowledged at a peer P whose event has not reached this node yet
    is found by any round that waits for P (P is not silent): no window, as
    before, as long as P answers within the lookup timeout (beyond it, the
    old rounds gave up on P as well). A round answers 404 without P only
    while P is silent and no peer that answers in time holds the content yet.
    P is silent only after a lookup to it ran out, and stops being silent
    when anything arrives from it. While P's link is stalled P can hand
    nothing here itself (what it holds comes, if at all, from peers that
    answer), so a 404 then is what the old rounds gave too, only sooner. The
    window is after P recovers, until the first of:

    * P's next batch on its stream here. A push acknowledged at P sends its
      event on that stream at once, so for content pushed at P the window
      ends one stream delivery after the acknowledgement at the latest (the
      WAN's one-way latency, or the stream's reconnect, whose backoff is
      capped at 1 s), the moment replication brings the content anyway;
    * the reply to a lookup to P: every round asks a silent P unless a lookup
      to it is already in flight (which ends within the lookup timeout), so
      one round trip to P after the first round that finds none in flight.

    A request inside that window gets the 404 that P's stall gave it a
    moment before; one after it does not.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from registry_node.records import Event, EventKind
from registry_node.reference import is_digest

from .errors import ReplicationError
from .peers import PeerClient
from .wire.v1 import replication_pb2 as pb

log = structlog.get_logger("georeg.replication")


class SilentPeers:
    """Peers that let a lookup run out and have not been heard from since.

    ``heard`` is a count that grows whenever something arrives from the peer
    by other means (the batches of this node's subscription to it): a peer
    fell silent at one count and stays silent while the count stays there."""

    def __init__(self) -> None:
        self._at: dict[str, int] = {}

    def fell_silent(self, peer: str, heard: int) -> None:
        self._at[peer] = heard

    def answered(self, peer: str) -> None:
        self._at.pop(peer, None)

    def silent(self, peer: str, heard: int) -> bool:
        at = self._at.get(peer)
        if at is None:
            return False
        if heard != at:          # its stream delivered since: it is back
            del self._at[peer]
            return False
        return True


@dataclass
class LookupRound:
    """Who was asked about one reference and who answered before the round ended."""

    repository: str
    reference: str
    waited_for: list[str] = field(default_factory=list)
    not_waited_for: list[str] = field(default_factory=list)   # silent: asked, or already being
    answers: list[tuple[PeerClient, pb.ImageStatusReply]] = field(default_factory=list)


class PeerRescue:
    def __init__(self, runtime, *, blob_timeout_s: float = 60.0,
                 lookup_timeout_s: float = 2.0) -> None:
        self.runtime = runtime       # replicator.runtime.Replication
        self.blob_timeout_s = blob_timeout_s
        self.lookup_timeout_s = lookup_timeout_s
        self.rescued = 0
        self.rounds = 0
        self.not_waited_for: Counter[str] = Counter()   # rounds that answered without a silent peer
        self.silence = SilentPeers()
        self.last_round: LookupRound | None = None         # the round that started last
        self._probes: dict[str, asyncio.Task] = {}       # the lookup in flight to each silent peer
        self._unfinished: set[asyncio.Task] = set()      # lookups a round no longer waits for

    # -- which peers -------------------------------------------------------------

    def _heard(self) -> dict[str, int]:
        return {s.peer.name: s.batches_received for s in self.runtime.subscriptions}

    def is_silent(self, peer: str) -> bool:
        return self.silence.silent(peer, self._heard().get(peer, 0))

    def _sources(self) -> list[PeerClient]:
        """Peers whose subscription is up first: they are the ones answering now;
        silent peers last. All are asked hurried (``PeerClient.hurried``): a
        client waits on this, and a peer that has just gone down must cost a
        refused connect, not a wait for its channel. (A manifest PUT that needed
        a rescue right after a zone went down waited 40-60 s: four attempts of
        ten seconds each on that zone's channel.)"""
        connected = {s.peer.name for s in self.runtime.subscriptions if s.connected}
        heard = self._heard()
        clients = sorted(self.runtime.clients,
                         key=lambda c: (self.silence.silent(c.name, heard.get(c.name, 0)),
                                        c.name not in connected))
        return [c.hurried() for c in clients]

    # -- lookups -----------------------------------------------------------------

    async def _ask(self, client: PeerClient, repository: str, digest: str,
                   tag: str) -> pb.ImageStatusReply | None:
        """One peer's status of the image; None if it did not answer. Running
        out of time makes it silent; any answer makes it heard."""
        heard = self._heard().get(client.name, 0)
        try:
            # This deadline, not gRPC's (a second later, a backstop), decides:
            # running out is then told from a refusal without reading messages.
            reply = await asyncio.wait_for(
                client.image_status_ref(repository, digest, tag, self.lookup_timeout_s + 1),
                self.lookup_timeout_s)
        except TimeoutError:
            self.silence.fell_silent(client.name, heard)
            log.info("peer_silent", peer=client.name, repository=repository,
                     reference=digest or tag)
            return None
        except ReplicationError:
            # Refused or broken: no answer, but not silence either (a channel
            # that knows it cannot connect refuses at once; a peer that is
            # down costs nothing to ask).
            return None
        self.silence.answered(client.name)
        return reply

    async def lookup(self, repository: str, digest: str = "", tag: str = "", *,
                     enough: Callable[[pb.ImageStatusReply], bool] | None = None) -> LookupRound:
        """Ask every peer about ``digest`` or ``tag``; return once every peer
        that is not silent has answered (or run out of time), or as soon as an
        answer is ``enough``. Silent peers are asked too, at most one lookup in
        flight each, and their answers used if they come in time."""
        reference = digest or tag
        found = LookupRound(repository, reference)
        heard = self._heard()
        waited: dict[asyncio.Task, PeerClient] = {}
        probes: dict[asyncio.Task, PeerClient] = {}
        for client in self.runtime.clients:
            hurried = client.hurried()
            if not self.silence.silent(client.name, heard.get(client.name, 0)):
                waited[self._start(self._ask(hurried, repository, digest, tag))] = hurried
                found.waited_for.append(client.name)
                continue
            found.not_waited_for.append(client.name)
            if client.name not in self._probes:
                probe = self._start(self._ask(hurried, repository, digest, tag))
                self._probes[client.name] = probe
                probe.add_done_callback(lambda _, n=client.name: self._probes.pop(n, None))
                probes[probe] = hurried
        self.rounds += 1
        self.not_waited_for.update(found.not_waited_for)
        self.last_round = found
        pending = set(waited)
        done_early = False
        while pending and not done_early:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                reply = task.result()
                if reply is not None:
                    found.answers.append((waited[task], reply))
                    done_early = done_early or (enough is not None and enough(reply))
        for task, client in probes.items():
            if task.done() and task.result() is not None:
                found.answers.append((client, task.result()))
        return found

    def _start(self, lookup: Awaitable[pb.ImageStatusReply | None]) -> asyncio.Task:
        # Held until done: a round may return before its lookups end, and a
        # task nothing refers to may be collected mid-flight.
        task = asyncio.ensure_future(lookup)
        self._unfinished.add(task)
        task.add_done_callback(self._unfinished.discard)
        return task

    # -- fetching ----------------------------------------------------------------

    async def fetch_blobs(self, repository: str, digests: list[str]) -> set[str]:
        transfer = self.runtime.transfer
        # Only peers whose region's content of the repository may come here: a
        # confined region's content is never asked for from another region
        # (what a peer holds came from its region, or may go anywhere).
        here = self.runtime.replica.registry.identity.region
        sources = [c for c in self._sources()
                   if self.runtime.residency.allows(c.peer.region, repository, here)]
        if transfer is None or not sources:
            return set()

        async def one(digest: str) -> str | None:
            try:
                await asyncio.wait_for(transfer.ensure_blob(repository, digest, sources),
                                       self.blob_timeout_s)
                return digest
            except (ReplicationError, TimeoutError) as exc:
                log.info("rescue_failed", repository=repository, digest=digest, error=str(exc))
                return None

        found = {d for d in await asyncio.gather(*(one(d) for d in digests)) if d}
        self.rescued += len(found)
        return found

    async def fetch_manifest(self, repository: str, reference: str) -> bool:
        if self.runtime.transfer is None or not self.runtime.clients:
            return False
        try:
            if is_digest(reference):
                return await self._fetch_digest(repository, reference)
            return await self._fetch_tag(repository, reference)
        except (ReplicationError, TimeoutError) as exc:
            log.info("rescue_failed", repository=repository, reference=reference, error=str(exc))
            return False

    def _may_come_here(self, repository: str, reply: pb.ImageStatusReply) -> bool:
        region = self.runtime.replica.registry.identity.region
        return self.runtime.residency.allows(reply.origin_region, repository, region)

    def _ordered(self, found: LookupRound, first: list[PeerClient]) -> list[PeerClient]:
        """``first``, then the other peers that are not silent (a blob the
        manifest needs may be fetched from any of them)."""
        names = {c.name for c in first}
        rest = [c for c in self._sources() if c.name not in names
                and c.name in found.waited_for]
        return [*first, *rest]

    async def _fetch_digest(self, repository: str, digest: str) -> bool:
        found = await self.lookup(repository, digest=digest,
                                  enough=lambda r: r.present and self._may_come_here(repository, r))
        holders = [c for c, r in found.answers if r.present and self._may_come_here(repository, r)]
        if not holders:
            return False
        await asyncio.wait_for(self.runtime.transfer.ensure_manifest(
            repository, digest, self._ordered(found, holders)), self.blob_timeout_s)
        arrived = self.runtime.replica.manifest_record(repository, digest) is not None
        if arrived:
            self.rescued += 1
            log.info("rescued", repository=repository, digest=digest, source=holders[0].name)
        return arrived

    async def _fetch_tag(self, repository: str, tag: str) -> bool:
        found = await self.lookup(repository, tag=tag)
        answers = [(c, r) for c, r in found.answers if r.present and r.tag_hlc]
        if not answers:
            return False
        # The newest register wins, exactly as replication would decide.
        client, reply = max(answers, key=lambda a: (a[1].tag_hlc, a[1].tag_origin_region,
                                                    a[1].tag_origin_zone))
        event = Event(kind=EventKind.TAG_SET, repository=repository, tag=tag, digest=reply.digest,
                      media_type=reply.media_type, hlc=reply.tag_hlc,
                      origin_region=reply.tag_origin_region, origin_zone=reply.tag_origin_zone,
                      acked_ns=reply.tag_acked_ns)
        holders = [client, *(c for c, r in answers if c is not client and r.digest == reply.digest)]
        await asyncio.wait_for(self.runtime.transfer.apply(event, self._ordered(found, holders)),
                               self.blob_timeout_s)
        found_here = self.runtime.replica.resolve_tag(repository, tag) is not None
        if found_here:
            self.rescued += 1
            log.info("rescued", repository=repository, tag=tag, source=client.name)
        return found_here
