"""Talking to one peer over gRPC: a channel, and each RPC wrapped so that
failures leave as ``ReplicationError`` (definite, indefinite or permanent).

Channels are plaintext, or mutual TLS on an auth cluster (the node's
certificate presented, the peer's checked against the cluster CA:
``replicator.peer_identity``). Channels reconnect on their own. A peer that dies or a link that is cut closes
its connections, which the channel sees at once; keepalive pings (every 30 s)
are for the silent cases (a stalled link, a frozen process), kept rare so an
idle cluster stays idle: every ping crosses a WAN link in the cluster process,
and at 10 s they were a fifth of an idle default cluster's CPU (5.9 → 4.8 %
of one core).

What a peer sends this node (its event stream, blob bytes) may run a fixed
window ahead of what this node has read, per stream (``receive_window``).
gRPC's default starts at 64 KiB and grows by estimating the bandwidth-delay
product, which a stream that is idle between images never lets it do: under
``georeg bench lag`` an image's 3 MiB of inline blobs then crossed East US →
West Europe in several window round trips, ~200 ms where the link needs ~90.
A fixed window of at least ``RECEIVE_WINDOW``, which holds an image's inline
bytes (``replicator.service`` sends at most 4 MiB per batch), crosses in one
trip. A large blob needs more: a stream moves at most one window per round
trip, and 4 MiB per 186 ms (East US → Southeast Asia) is 180 Mbit/s whatever
the link offers: a 100 MiB layer needs 4.7 s where 500 Mbit/s needs 1.7
(``georeg bench lag --layer-mib 100`` measured it 5.7–6.2 s after the ack,
2.1–3.0 s with the window below: ``docs/benchmarks.md``). So the window for a peer is sized to the bandwidth-delay product of the
modelled link to it (``Peer.rtt_ms``, ``Peer.bandwidth_mbps``, from the plan),
twice over — the receiver returns window only as it reads, and jitter and its
own pauses must not idle the link — capped at ``MAX_RECEIVE_WINDOW``, which
also bounds what a peer can make this node buffer per stream.

The window is per stream, and gRPC sizes a connection's window as the sum of
its streams' (there is no separate option for the connection), so what a
peer may have in flight towards this node grows with the streams on the
channel: the subscription and up to ``transfer_concurrency`` (16) blob
fetches, 17 × 22 MiB from East US to Southeast Asia if this node fell behind
reading them. So a channel whose window is sized past the least runs at most
``fetch_streams`` blob fetches at once (``CHANNEL_WINDOW_BUDGET``: the
subscription's window and theirs together); a further fetch from that peer
waits for one to end. One stream at such a window already fills the link —
that is what the window is sized for — so waiting costs a blob its turn,
not bandwidth. Channels at the least window (zones of one region, loopback)
keep no such limit: a sibling may wait on a blob that is about to land, and
fetches queued behind such waits would stall the region.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from registry_node import fingerprints
from registry_node.records import NodeIdentity

from .convert import node_ref
from .errors import definite, from_grpc, indefinite, permanent
from .peer_identity import PeerCredentials
from .topology import Peer
from .wire.integrity import DAMAGED, Refused, sealed_stub
from .wire.v1 import replication_pb2 as pb

RECEIVE_WINDOW = 4 << 20           # the least window, any link
MAX_RECEIVE_WINDOW = 24 << 20      # the most, any link (24 MiB per 186 ms: 1.1 Gbit/s)
# The most the streams of one channel with a sized window may be sent ahead of
# this node's reading, together (see the module docstring): two of the
# largest windows, the subscription's and one fetch's.
CHANNEL_WINDOW_BUDGET = 2 * MAX_RECEIVE_WINDOW
WINDOW_BDP_MULTIPLE = 2
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.enable_retries", 0),
    ("grpc.http2.bdp_probe", 0),
]


def receive_window(rtt_ms: float, bandwidth_mbps: float) -> int:
    """The receive window (bytes per stream) for a peer over a link of this
    round trip and bandwidth (0: unlimited, or unknown): ``WINDOW_BDP_MULTIPLE``
    × its bandwidth-delay product, within [``RECEIVE_WINDOW``,
    ``MAX_RECEIVE_WINDOW``]. Unlimited bandwidth (zones of one region,
    loopback) has no product to size to: the least window, whose one round
    trip of about a millisecond is never the bound."""
    if bandwidth_mbps <= 0 or rtt_ms <= 0:
        return RECEIVE_WINDOW
    product = bandwidth_mbps * 1e6 / 8 * rtt_ms / 1000
    return int(min(MAX_RECEIVE_WINDOW, max(RECEIVE_WINDOW, WINDOW_BDP_MULTIPLE * product)))


def fetch_streams(window: int) -> int | None:
    """How many blob fetches may run at once over a channel whose streams each
    have ``window``: as many as fit ``CHANNEL_WINDOW_BUDGET`` beside the
    subscription, at least one; no limit (None) at the least window."""
    if window <= RECEIVE_WINDOW:
        return None
    return max(1, CHANNEL_WINDOW_BUDGET // window - 1)


def channel_options(peer: Peer) -> list[tuple[str, int]]:
    """The gRPC channel options for ``peer``: the common ones, and the receive
    window for its link (``receive_window``)."""
    return [*_CHANNEL_OPTIONS, ("grpc.http2.lookahead_bytes",
                                receive_window(peer.rtt_ms, peer.bandwidth_mbps))]
# A peer asked to wait for a blob answers within the wait; beyond it by this
# much, it is taken for unreachable.
WAIT_SLACK_S = 2.0
# A peer from before GetImageStatuses is asked per image, this many at once.
SINGLE_STATUS_CONCURRENCY = 8
SERVER_OPTIONS = [
    # gRPC sets SO_REUSEPORT by default: a second server on a port another one
    # (another cluster's node, say) holds would then bind without error and
    # share its connections with it. Without it, the bind fails as it should.
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


@dataclass(slots=True)
class _Abilities:
    batched_status: bool = True     # GetImageStatuses, until the peer says UNIMPLEMENTED


class PeerClient:
    def __init__(self, peer: Peer, me: NodeIdentity, rpc_timeout_s: float = 10.0,
                 credentials: PeerCredentials | None = None, *, my_name: str = "",
                 integrity_refused: Refused | None = None) -> None:
        self.peer = peer
        self._me = node_ref(me)
        self._my_name = my_name         # this node's name in its view (subscriptions say it)
        self._timeout = rpc_timeout_s
        self._wait_for_ready = True
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(peer.grpc, options=channel_options(peer))
        else:
            # The TLS bytes cross WAN links unchanged (TCP proxies on the
            # addresses node certificates name), so the address is the name checked.
            self.channel = grpc.aio.secure_channel(peer.grpc, credentials.channel(),
                                                   options=channel_options(peer))
        # Over plain gRPC every message is sealed and checked (wire.integrity);
        # over TLS the record layer already authenticates every byte.
        self.stub = sealed_stub(self.channel, sealed=credentials is None,
                                **({"refused": integrity_refused} if integrity_refused else {}))
        # Blob fetches running on the channel, at most (``fetch_streams``);
        # shared by ``hurried`` copies, which use the same channel.
        streams = fetch_streams(receive_window(peer.rtt_ms, peer.bandwidth_mbps))
        self._fetching = asyncio.Semaphore(streams) if streams else None
        # What the peer's version can answer, shared with ``hurried`` copies.
        self._abilities = _Abilities()

    def hurried(self) -> PeerClient:
        """This peer over the same channel, but whose calls fail at once while the
        channel cannot connect, instead of waiting out their timeout for it: for
        a client that is waiting (bounded staleness), where a peer that is down
        must cost a refused connect, not ten seconds per attempt."""
        hurried = copy.copy(self)
        hurried._wait_for_ready = False
        return hurried

    @property
    def name(self) -> str:
        return self.peer.name

    async def close(self) -> None:
        await self.channel.close(grace=None)

    def subscribe(self) -> grpc.aio.StreamStreamCall:
        # wait_for_ready: while the peer is down, the call waits for the channel
        # (which retries every ≤0.5 s) instead of failing and backing off twice.
        return self.stub.Subscribe(wait_for_ready=True)

    def start_message(self, expected_node_id: str, cursor: int) -> pb.SubscribeMessage:
        return pb.SubscribeMessage(start=pb.SubscribeStart(
            subscriber=self._me, expected_node_id=expected_node_id, cursor=cursor,
            name=self._my_name, attributes=True))

    async def fetch_blob(self, repository: str, digest: str, offset: int,
                         wait_ms: int = 0) -> AsyncIterator[bytes]:
        """The blob's bytes from ``offset`` on, as they arrive. With ``wait_ms``
        the peer may wait that long for the blob to land before it answers; if
        it has sent nothing by then (plus slack) it is unreachable or stalled,
        and this gives up on it (definite: nothing was stored). Over a WAN
        channel it may first wait for a fetch slot (``fetch_streams``); the
        wait for a first chunk starts once it has one."""
        async with self._fetching or contextlib.nullcontext():
            call = self.stub.FetchBlob(pb.FetchBlobRequest(
                requester=self._me, repository=repository, digest=digest, offset=offset,
                wait_ms=wait_ms))
            expected = offset
            first_within = wait_ms / 1000 + WAIT_SLACK_S if wait_ms else None
            try:
                while True:
                    if first_within is None:
                        chunk = await call.read()
                    else:
                        try:
                            chunk = await asyncio.wait_for(call.read(), first_within)
                        except TimeoutError:
                            raise definite(f"{self.name} sent nothing of {digest} within "
                                           f"{first_within:g}s") from None
                        first_within = None
                    if chunk is grpc.aio.EOF:
                        return
                    chunk = self.intact(chunk, f"a chunk of {digest}")
                    if chunk.offset != expected:
                        raise permanent(f"{self.name} sent offset {chunk.offset}, expected {expected}")
                    expected += len(chunk.data)
                    yield chunk.data
            except grpc.aio.AioRpcError as exc:
                raise from_grpc(exc, f"fetching {digest} from {self.name}") from None
            finally:
                call.cancel()

    async def fetch_manifest(self, repository: str, digest: str) -> pb.ManifestReply:
        return await self._unary(self.stub.FetchManifest, pb.FetchManifestRequest(
            requester=self._me, repository=repository, digest=digest), f"manifest {digest}")

    async def summarize(self, *, buckets_only: bool = False,
                        buckets: Sequence[int] = (),
                        scheme: int = fingerprints.SUMMED) -> pb.Summary:
        return await self._unary(self.stub.Summarize, pb.SummaryRequest(
            requester=self._me, fingerprint_scheme=scheme,
            buckets_only=buckets_only, buckets=buckets), "summary")

    async def repository_state(self, repository: str) -> pb.RepositoryState:
        return await self._unary(self.stub.GetRepositoryState, pb.RepositoryStateRequest(
            requester=self._me, repository=repository), f"state of {repository}")

    async def configuration_state(self) -> pb.ConfigurationState:
        return await self._unary(self.stub.GetConfiguration,
                                 pb.ConfigurationRequest(requester=self._me), "configuration")

    async def image_status_ref(self, repository: str, digest: str, tag: str,
                               timeout: float) -> pb.ImageStatusReply:
        return await self._unary(self.stub.GetImageStatus, pb.ImageStatusRequest(
            repository=repository, digest=digest, tag=tag, requester=self._me),
            f"status of {digest or tag}", timeout)

    async def image_statuses(self, images: Sequence[tuple[str, str]],
                             timeout: float) -> list[pb.ImageStatusReply]:
        """The peer's status of each ``(repository, digest)``, in order, in one
        call (``GetImageStatuses``; at most ``MAX_STATUS_BATCH`` images). A peer
        from before that call answers UNIMPLEMENTED: from then on it is asked
        one ``GetImageStatus`` per image (at most ``SINGLE_STATUS_CONCURRENCY``
        at once), as it always could be."""
        if self._abilities.batched_status:
            request = pb.ImageStatusesRequest(requester=self._me, images=[
                pb.ImageRef(repository=repository, digest=digest) for repository, digest in images])
            try:
                reply = await self.stub.GetImageStatuses(
                    request, timeout=timeout, wait_for_ready=self._wait_for_ready)
                return list(self.intact(reply, f"status of {len(images)} images").images)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.UNIMPLEMENTED:
                    raise from_grpc(exc, f"status of {len(images)} images from {self.name}") from None
            self._abilities.batched_status = False
        # Within the one timeout, as the batched call would be.
        ask = asyncio.Semaphore(SINGLE_STATUS_CONCURRENCY)

        async def one(repository: str, digest: str) -> pb.ImageStatusReply:
            async with ask:
                return await self.image_status_ref(repository, digest, "", timeout)

        try:
            async with asyncio.timeout(timeout):
                return list(await asyncio.gather(*(one(r, d) for r, d in images)))
        except TimeoutError:
            raise definite(f"status of {len(images)} images from {self.name}: no answer "
                           f"within {timeout:g}s") from None

    @property
    def statuses_batched(self) -> bool:
        """Whether the peer is asked many images' status in one call (it is,
        until it answers that it cannot)."""
        return self._abilities.batched_status

    async def health(self, timeout: float = 2.0) -> pb.HealthReply:
        return await self._unary(self.stub.Health, pb.HealthRequest(), "health", timeout)

    async def _unary(self, method, request, what: str, timeout: float | None = None):
        try:
            # wait_for_ready: a channel still connecting (a node just restarted)
            # waits up to the timeout rather than failing at once (unless hurried).
            reply = await method(request, timeout=timeout or self._timeout,
                                 wait_for_ready=self._wait_for_ready)
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc, f"{what} from {self.name}") from None
        return self.intact(reply, what)

    def intact(self, message, what: str):
        """``message`` as read from this peer, unless it did not open: refused
        by its seal (``wire.integrity.DAMAGED``) or unparseable (grpc.aio hands
        over ``None`` when a deserializer fails). Then the call failed as a
        broken stream does: indefinite, retried; the caller cancels a stream."""
        if message is None or message is DAMAGED:
            raise indefinite(f"{what} from {self.name}: damaged in transit (refused)")
        return message
