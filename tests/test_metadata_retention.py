"""Bounded metadata (replicator.retention): the event log is truncated behind
every live reader's persisted cursor, tombstones are collected only once every
reader — away or not — read past them and the grace has passed, and a replica
away past the horizon comes back by anti-entropy without bringing deleted
content back.

The rules are checked twice: on one standalone node whose clock the test moves
(``LogRetention`` driven directly, readers played by calls the service would
make), and on two in-process nodes with real subscriptions, links and
anti-entropy, horizons of a second or two.
"""

from __future__ import annotations

import random

import pytest

from cluster.control import spec as specs
from cluster.control.plan import plan
from cluster.faults.verify import NodeTarget, verify
from registry_node import keys, locks
from registry_node.config import NodeConfig
from registry_node.metastore import Batch, MetadataStore
from registry_node.records import Cursor, Event, EventKind, NodeIdentity, Tombstone, decode, encode
from replicator.antientropy import AntiEntropy
from replicator.peers import PeerClient
from replicator.quorum import ZoneQuorum
from replicator.retention import LogRetention
from replicator.topology import Peer, ReplicationSettings
from replicator.wire.v1 import replication_pb2 as pb

from .helpers import ManualClock, eventually, push_image, started_node
from .replication_invariants import (
    layered_image,
    metric_sum,
    metrics_text,
    start_cluster,
    stop_cluster,
)

PEER = "westeurope"


# -- the store ------------------------------------------------------------------------


def test_a_truncated_log_keeps_its_sequence_across_a_reopen(tmp_path):
    """With every event truncated the log holds no key; the next event must still
    follow the last one, not start again at 1 (subscribers' cursors would reset)."""
    meta = MetadataStore(tmp_path / "meta", sync=False)
    try:
        for i in range(5):
            batch = Batch()
            batch.event(Event(kind=EventKind.TAG_SET, repository="app", tag=f"t{i}"))
            meta.commit(batch)
        assert meta.truncate_log(3) == 3
        assert [e.seq for e in meta.read_log(0)] == [4, 5]
        assert meta.truncate_log(99) == 2 and meta.read_log(0) == []
        assert meta.truncate_log(5) == 0
    finally:
        meta.close()
    meta = MetadataStore(tmp_path / "meta", sync=False)
    try:
        assert (meta.last_seq, meta.log_floor) == (5, 5)
        batch = Batch()
        batch.event(Event(kind=EventKind.TAG_SET, repository="app", tag="next"))
        assert meta.commit(batch)[0].seq == 6
    finally:
        meta.close()


# -- one node, its clock moved by the test ----------------------------------------------


@pytest.fixture
async def standalone(tmp_path, http):
    clock = ManualClock()
    async with started_node(NodeConfig(data_dir=tmp_path / "node", port=0, sync=False,
                                       gc_interval_s=3600), clock) as running:
        yield running, clock


def _retention(running, clock: ManualClock, readers: list[str]) -> LogRetention:
    return LogRetention(running.node.meta, readers=lambda: readers, horizon_s=60, grace_s=10,
                        retain_events=0, interval_s=3600, wall_ns=clock.wall_ns)


def _scanned_tombstones(meta: MetadataStore) -> int:
    return sum(1 for _ in meta.scan(keys.TOMB))


async def _push_and_delete(http, url: str, n: int, rng: random.Random) -> None:
    """``n`` images pushed with a tag each, then the tag and the manifest deleted:
    two tombstones per image (the blob links stay)."""
    for i in range(n):
        image = layered_image(rng, False, layers=1, layer_size=(10, 50))
        digest = await push_image(http, url, "churn", image, tag=f"t{i}")
        async with http.delete(f"{url}/v2/churn/manifests/t{i}") as r:
            assert r.status == 202
        async with http.delete(f"{url}/v2/churn/manifests/{digest}") as r:
            assert r.status == 202


async def test_a_tombstone_waits_for_every_reader_and_the_grace(standalone, http):
    running, clock = standalone
    meta = running.node.meta
    retention = _retention(running, clock, [PEER])
    retention.connected(PEER, "peer-1")               # a subscriber that read nothing yet
    await _push_and_delete(http, running.url, 3, random.Random(1))
    held = meta.tombstones_held
    assert held == 6 == _scanned_tombstones(meta)

    await retention.compact()
    assert meta.tombstones_held == held and meta.log_floor == 0, "the peer has read nothing"
    retention.reported(PEER, "peer-1", meta.last_seq)  # it persisted the whole log
    await retention.compact()
    assert meta.log_floor == meta.last_seq, "read by every peer: the log goes"
    assert meta.tombstones_held == held, "within the grace, tombstones stay"

    clock.advance(11)
    await retention.compact()
    assert meta.tombstones_held == 0 == _scanned_tombstones(meta)
    assert retention.collected == held
    assert not meta.has_prefix(keys.TOMB_CANDIDATE)
    assert meta.fingerprint_discrepancies() == []


async def test_an_away_peer_holds_tombstones_back_but_not_the_log(standalone, http):
    """The strict rule: past the horizon a peer no longer holds the log back,
    but every tombstone waits for it (the price), until it is back and has read
    past them."""
    running, clock = standalone
    meta = running.node.meta
    retention = _retention(running, clock, [PEER])
    retention.connected(PEER, "peer-1")
    retention.disconnected(PEER)
    await _push_and_delete(http, running.url, 2, random.Random(2))
    last = meta.last_seq

    clock.advance(30)                                  # within the horizon: it holds both back
    await retention.compact()
    assert meta.log_floor == 0 and meta.tombstones_held == 4

    clock.advance(31)                                  # past it: the log goes, tombstones stay
    await retention.compact()
    assert meta.log_floor == last and meta.tombstones_held == 4
    clock.advance(3600)
    await retention.compact()
    assert meta.tombstones_held == 4, "an away peer holds every tombstone back"

    retention.connected(PEER, "peer-1")                # back; it resyncs, then reads the head
    await retention.compact()
    assert meta.tombstones_held == 4, "connecting is not reading"
    retention.reported(PEER, "peer-1", last)
    await retention.compact()
    assert meta.tombstones_held == 0 and retention.collected == 4
    assert meta.fingerprint_discrepancies() == []


async def test_a_new_incarnation_of_a_peer_starts_from_nothing(standalone, http):
    running, clock = standalone
    meta = running.node.meta
    retention = _retention(running, clock, [PEER])
    await _push_and_delete(http, running.url, 1, random.Random(3))
    retention.connected(PEER, "peer-1")
    retention.reported(PEER, "peer-1", meta.last_seq)
    retention.connected(PEER, "peer-2")                # wiped and recreated: read nothing here
    retention.reported(PEER, "peer-1", meta.last_seq)  # the old one's report does not count
    clock.advance(11)
    await retention.compact()
    assert meta.tombstones_held == 2 and retention.reader(PEER).seq == 0
    retention.reported(PEER, "peer-2", meta.last_seq - 1)
    retention.reported(PEER, "peer-2", 1)              # a lower report does not move it back
    assert retention.reader(PEER).seq == meta.last_seq - 1


async def test_the_paired_copy_is_a_reader_under_its_own_name(standalone, http, tmp_path):
    """A paired copy (placed in the pair region, no zone) subscribes to its
    region's nodes: the view names it a reader, and its record is kept by name,
    apart from the replica node of its region it shares a label with."""
    cluster_plan = plan(specs.load(None).seeded(1), tmp_path / "plan")
    for node in cluster_plan.nodes:
        pair = cluster_plan.pair_copy(node.region)
        view = cluster_plan.view(node)
        peers = [p.name for p in view.peers]
        assert view.readers == tuple(peers + ([pair.name] if pair else []))
        if pair is not None:
            assert pair.name not in peers, "a reader, not a peer"
    assert cluster_plan.pair_copies
    for copy in cluster_plan.pair_copies:
        assert cluster_plan.view(copy).readers == (), "nobody reads a copy outside a restore"

    running, clock = standalone
    meta = running.node.meta
    retention = _retention(running, clock, ["westus", "pair-eastus"])
    await _push_and_delete(http, running.url, 1, random.Random(8))
    retention.connected("westus", "westus-1")
    retention.reported("westus", "westus-1", meta.last_seq)
    retention.connected("pair-eastus", "pair-1")        # its label is westus too
    clock.advance(11)
    await retention.compact()
    assert meta.tombstones_held == 2, "the paired copy has not read them"
    retention.reported("pair-eastus", "pair-1", meta.last_seq)
    await retention.compact()
    assert meta.tombstones_held == 0


async def test_a_node_back_from_its_own_outage_finds_no_peer_away(standalone, http):
    """This node down past the horizon heard from nobody: on its first pass the
    peers count from its start, not from their last contact before it went."""
    running, clock = standalone
    meta = running.node.meta
    retention = _retention(running, clock, [PEER])
    await _push_and_delete(http, running.url, 1, random.Random(9))
    retention.connected(PEER, "peer-1")
    retention.disconnected(PEER)
    clock.advance(120)                                   # down, past the 60 s horizon
    restarted = _retention(running, clock, [PEER])      # as the node builds it at start
    await restarted.compact()
    assert meta.log_floor == 0, "the peer is not away: it could not reach a node that was down"


def test_the_tombstone_count_is_kept_and_old_tombstones_are_indexed_once(tmp_path):
    meta = MetadataStore(tmp_path / "meta", sync=False)
    try:
        batch = Batch()
        batch.put(keys.tag_tomb("app", "a"), encode(Tombstone(1)))
        batch.put(keys.tag_tomb("app", "b"), encode(Tombstone(2)))
        meta.commit(batch)
        batch = Batch()
        batch.put(keys.tag_tomb("app", "a"), encode(Tombstone(3)))  # replaced: still one
        batch.delete(keys.tag_tomb("app", "b"))
        meta.commit(batch)
        assert meta.tombstones_held == 1 == _scanned_tombstones(meta)
        # As a database from before the index: no candidate, no count, no marker.
        wiped = Batch()
        for key, _ in meta.scan(keys.TOMB_CANDIDATE):
            wiped.delete(key)
        wiped.delete(keys.TOMB_INDEX)
        wiped.delete(keys.TOMB_COUNT)
        wiped.put(keys.tag_tomb("app", "c"), encode(Tombstone(4)))
        meta.commit(wiped)
    finally:
        meta.close()
    meta = MetadataStore(tmp_path / "meta", sync=False)
    try:
        assert meta.tombstone_index_rebuilt and meta.tombstones_held == 2
        assert {k.tomb.tag for k, _ in meta.tombstone_candidates()} == {"a", "c"}
        assert all(k.seq == meta.last_seq for k, _ in meta.tombstone_candidates())
    finally:
        meta.close()
    meta = MetadataStore(tmp_path / "meta", sync=False)
    try:
        assert not meta.tombstone_index_rebuilt and meta.tombstones_held == 2
    finally:
        meta.close()


def test_a_resynced_zone_acknowledges_nothing_it_skipped():
    quorum = ZoneQuorum("eastus/1", ["eastus/2"], write_quorum=2)
    quorum.connected("eastus/2")
    quorum.truncated("eastus/2", 10)      # its cursor was below the floor; resync to 10
    quorum.acked("eastus/2", 12)          # then it applied 11 and 12 from the stream
    assert quorum._confirmations(12) == 1 and quorum._confirmations(11) == 1
    assert quorum._confirmations(10) == 0 and quorum._confirmations(3) == 0


# -- two nodes ----------------------------------------------------------------------


def _settings(**overrides) -> ReplicationSettings:
    base = dict(anti_entropy_interval_s=60.0, quorum_timeout_s=5.0, peer_horizon_s=3600.0,
                tombstone_grace_s=3600.0, log_retain_events=0, compaction_interval_s=0.2)
    return ReplicationSettings(**(base | overrides))


def _persisted_cursor(node, peer: str) -> int:
    raw = node.registry.meta.get(keys.cursor(peer))
    return decode(raw, Cursor).seq if raw is not None else 0


async def test_truncation_never_drops_an_event_a_live_peer_has_not_read(tmp_path, http):
    cluster = await start_cluster(tmp_path, [("eastus", ""), ("westeurope", "")],
                                  settings=_settings())
    try:
        east, west = cluster.nodes["eastus"], cluster.nodes["westeurope"]
        meta = east.registry.meta
        retention = east.replication.retention
        rng = random.Random(4)
        for i in range(6):
            await push_image(http, east.url, "app", layered_image(rng, False), tag=f"v{i}")
            # At every moment: nothing above what westeurope persisted is gone.
            assert meta.log_floor <= _persisted_cursor(west, "eastus")
        await eventually(lambda: meta.log_floor == meta.last_seq, timeout=15,
                         what="the log read by every peer to be truncated")

        # westeurope stops reading (the link it reads through is cut), but is live.
        cluster.links[("westeurope", "eastus")].cut()
        cut_at = _persisted_cursor(west, "eastus")
        for i in range(6, 10):
            await push_image(http, east.url, "app", layered_image(rng, False), tag=f"v{i}")
        passes = retention.passes
        await eventually(lambda: retention.passes >= passes + 5, timeout=10,
                         what="compaction passes")
        assert meta.log_floor <= cut_at < meta.last_seq
        assert meta.read_log(cut_at, 1)[0].seq == cut_at + 1, "an unread event is gone"

        cluster.links[("westeurope", "eastus")].heal()
        await eventually(lambda: west.replication.replica.resolve_tag("app", "v9") is not None,
                         timeout=15, what="westeurope to catch up")
        sub = next(s for s in west.replication.subscriptions if s.peer.name == "eastus")
        assert sub.resyncs == 0, "a live peer caught up by the log, not by a resync"
        await eventually(lambda: meta.log_floor == meta.last_seq, timeout=15,
                         what="the log to be truncated once read")
    finally:
        await stop_cluster(cluster)


async def _verify_clean(cluster) -> None:
    targets = [NodeTarget(n.name, n.region, n.url, n.zone, n.data_dir) for n in cluster.running()]
    report = await verify(targets, policy=cluster.residency, timeout=30)
    assert report.error is None and not report.divergences, report.as_dict()


def _tags(meta: MetadataStore, repo: str) -> set[str]:
    return {keys.parse(k, keys.TagKey).tag for k, _ in meta.scan(keys.tag_prefix(repo))}


async def test_a_replica_away_past_the_horizon_resyncs_by_anti_entropy(tmp_path, http,
                                                                       monkeypatch):
    """Only the resync can repair it: the rounds anti-entropy runs on its own (on
    connecting, and every minute) are switched off."""
    async def no_round(self, peer) -> int:
        return 0
    monkeypatch.setattr(AntiEntropy, "sync_with", no_round)
    cluster = await start_cluster(tmp_path, [("eastus", ""), ("westeurope", "")],
                                  settings=_settings(peer_horizon_s=1.0))
    try:
        east, west = cluster.nodes["eastus"], cluster.nodes["westeurope"]
        rng = random.Random(5)
        await push_image(http, east.url, "app", layered_image(rng, False), tag="before")
        await eventually(lambda: west.replication.replica.resolve_tag("app", "before"),
                         timeout=10, what="the first image in westeurope")
        await cluster.stop("westeurope")
        for i in range(3):
            await push_image(http, east.url, f"app{i}", layered_image(rng, False), tag="away")
        meta = east.registry.meta
        await eventually(lambda: meta.log_floor == meta.last_seq, timeout=15,
                         what="eastus to stop keeping its log for westeurope")

        await cluster.restart("westeurope")
        west = cluster.nodes["westeurope"]
        sub = next(s for s in west.replication.subscriptions if s.peer.name == "eastus")
        await eventually(lambda: sub.resyncs >= 1 and sub.cursor().seq >= meta.last_seq,
                         timeout=20, what="westeurope to resync from eastus")
        for i in range(3):
            assert west.replication.replica.resolve_tag(f"app{i}", "away") is not None
        # Then it reads on from the head by the log.
        await push_image(http, east.url, "app", layered_image(rng, False), tag="after")
        await eventually(lambda: west.replication.replica.resolve_tag("app", "after"),
                         timeout=10, what="the next image by the log")
        assert sub.resyncs == 1
        await _verify_clean(cluster)
    finally:
        await stop_cluster(cluster)


async def test_a_lock_set_while_a_replica_was_away_past_the_horizon_comes_back_by_resync(
        tmp_path, http, monkeypatch):
    """Attributes travel by the log, and by anti-entropy where the log cannot
    reach: westeurope is away while East US write-locks a tag, delete-locks
    its manifest and list-locks the repository, and East US truncates its log
    behind it. Its resync must bring every lock (a lock silently lost is the
    Azure/acr #592 bug), and a push to the locked tag there is then refused."""
    async def no_round(self, peer) -> int:
        return 0
    monkeypatch.setattr(AntiEntropy, "sync_with", no_round)
    cluster = await start_cluster(tmp_path, [("eastus", ""), ("westeurope", "")],
                                  settings=_settings(peer_horizon_s=1.0))
    try:
        east, west = cluster.nodes["eastus"], cluster.nodes["westeurope"]
        rng = random.Random(7)
        digest = await push_image(http, east.url, "app", layered_image(rng, False), tag="v1")
        await eventually(lambda: west.replication.replica.resolve_tag("app", "v1"),
                         timeout=10, what="the image in westeurope")
        await cluster.stop("westeurope")
        for path, body in (("/acr/v1/app/_tags/v1", {"writeEnabled": False}),
                           (f"/acr/v1/app/_manifests/{digest}", {"deleteEnabled": False}),
                           ("/acr/v1/app", {"listEnabled": False})):
            async with http.patch(east.url + path, json=body) as r:
                assert r.status == 200, await r.text()
        meta = east.registry.meta
        await eventually(lambda: meta.log_floor == meta.last_seq, timeout=15,
                         what="eastus to stop keeping its log for westeurope")

        await cluster.restart("westeurope")
        west = cluster.nodes["westeurope"]
        sub = next(s for s in west.replication.subscriptions if s.peer.name == "eastus")
        await eventually(lambda: sub.resyncs >= 1 and sub.cursor().seq >= meta.last_seq,
                         timeout=20, what="westeurope to resync from eastus")
        held = west.registry.locks
        assert held.of(locks.tag("app", "v1")).write_enabled is False
        assert held.of(locks.manifest("app", digest)).delete_enabled is False
        assert held.of(locks.repository("app")).list_enabled is False
        for what in (locks.tag("app", "v1"), locks.manifest("app", digest),
                     locks.repository("app")):
            assert held.record(what) == east.registry.locks.record(what), what
        image = layered_image(rng, False)
        await push_image(http, west.url, "app", image)
        async with http.put(f"{west.url}/v2/app/manifests/v1", data=image.manifest,
                            headers={"Content-Type": image.media_type}) as r:
            assert r.status == 405, await r.text()
        assert west.registry.meta.fingerprint_discrepancies() == []
        for node in (east, west):
            for peer in node.replication.clients:
                assert await AntiEntropy.resync(node.replication.anti_entropy, peer) == 0
        await _verify_clean(cluster)
    finally:
        await stop_cluster(cluster)


async def test_a_replica_back_after_the_tombstone_grace_does_not_resurrect_deletes(tmp_path, http):
    """The zombie: westeurope holds a tag and a manifest deleted while it was
    away past the horizon and the grace. eastus truncated its log, but held the
    tombstones back for it, so its resync brings the deletions and nothing
    comes back; once it has read past them they are collected."""
    cluster = await start_cluster(tmp_path, [("eastus", ""), ("westeurope", "")],
                                  settings=_settings(peer_horizon_s=1.0, tombstone_grace_s=0.5))
    try:
        east, west = cluster.nodes["eastus"], cluster.nodes["westeurope"]
        rng = random.Random(6)
        doomed = await push_image(http, east.url, "app", layered_image(rng, False), tag="doomed")
        await push_image(http, east.url, "app", layered_image(rng, False), tag="kept")
        await eventually(lambda: west.replication.replica.resolve_tag("app", "doomed"),
                         timeout=10, what="both images in westeurope")
        await eventually(lambda: west.replication.replica.resolve_tag("app", "kept"), timeout=10)
        await cluster.stop("westeurope")

        async with http.delete(f"{east.url}/v2/app/manifests/{doomed}") as r:
            assert r.status == 202
        await push_image(http, east.url, "app", layered_image(rng, False), tag="new")
        meta, retention = east.registry.meta, east.replication.retention
        held = meta.tombstones_held
        assert held >= 2                                   # the tag's and the manifest's
        await eventually(lambda: meta.log_floor == meta.last_seq, timeout=15,
                         what="eastus to stop keeping its log for westeurope (the horizon)")
        passes = retention.passes
        await eventually(lambda: retention.passes >= passes + 3, timeout=10,
                         what="compaction passes past the horizon and the grace")
        assert meta.tombstones_held == held, "the away replica holds the tombstones back"

        stored = MetadataStore(west.data_dir / "meta", sync=False)
        try:
            assert _tags(stored, "app") == {"doomed", "kept"}, "the zombie is on its disk"
        finally:
            stored.close()

        await cluster.restart("westeurope")
        west = cluster.nodes["westeurope"]
        sub = next(s for s in west.replication.subscriptions if s.peer.name == "eastus")
        await eventually(lambda: sub.resyncs >= 1, timeout=20, what="westeurope to resync")
        await eventually(lambda: west.replication.replica.resolve_tag("app", "new"), timeout=10)
        await eventually(lambda: meta.tombstones_held == 0, timeout=15,
                         what="eastus to collect the tombstones westeurope has now read")
        # Anti-entropy both ways, on purpose, once the dust has settled.
        for node in (east, west):
            for peer in node.replication.clients:
                await node.replication.anti_entropy.sync_with(peer)
        for node in (east, west):
            assert _tags(node.registry.meta, "app") == {"kept", "new"}, node.name
            assert node.replication.replica.manifest_record("app", doomed) is None, node.name
            assert node.registry.meta.fingerprint_discrepancies() == []
        await _verify_clean(cluster)
    finally:
        await stop_cluster(cluster)


async def test_a_forged_cursor_report_collects_nothing_unread(tmp_path, http):
    """A report beyond what the stream sent (a forgery, a bug, a stale
    session's cursor) is clamped: westeurope, stopped but within the horizon,
    still holds eastus's log and tombstones back."""
    cluster = await start_cluster(tmp_path, [("eastus", ""), ("westeurope", "")],
                                  settings=_settings(tombstone_grace_s=0.3))
    try:
        east, west = cluster.nodes["eastus"], cluster.nodes["westeurope"]
        await cluster.stop("westeurope")
        stored = MetadataStore(west.data_dir / "meta", sync=False)
        try:
            read = decode(stored.get(keys.cursor("eastus")), Cursor).seq
        finally:
            stored.close()
        await _push_and_delete(http, east.url, 2, random.Random(10))
        meta, retention = east.registry.meta, east.replication.retention

        east_peer = Peer(name="eastus", region="eastus", grpc=east.replication.grpc_address)
        forger = PeerClient(east_peer, NodeIdentity("westeurope", "",
                                                    retention.reader("westeurope").node_id),
                            my_name="westeurope")
        call = forger.subscribe()
        try:
            # It claims to be at the head (so nothing is sent), then to have
            # persisted far beyond it.
            await call.write(forger.start_message(east.registry.identity.node_id, meta.last_seq))
            await call.write(pb.SubscribeMessage(cursor=pb.SubscribeCursor(persisted=1 << 60)))
            passes = retention.passes
            await eventually(lambda: retention.passes >= passes + 5, timeout=10,
                             what="compaction passes")
            assert retention.reader("westeurope").seq <= read
            assert meta.log_floor <= read and meta.tombstones_held == 4
        finally:
            call.cancel()
            await forger.close()
    finally:
        await stop_cluster(cluster)


async def test_metadata_stays_bounded_under_push_delete_churn(tmp_path, http):
    cluster = await start_cluster(tmp_path, [("eastus", ""), ("westeurope", "")],
                                  settings=_settings(tombstone_grace_s=0.3))
    try:
        east = cluster.nodes["eastus"]
        await _push_and_delete(http, east.url, 20, random.Random(7))
        written = east.registry.meta.last_seq
        for node in cluster.running():
            meta = node.registry.meta
            await eventually(lambda m=meta: m.log_floor == m.last_seq and m.tombstones_held == 0,
                             timeout=20, what=f"{node.name}'s log and tombstones to be compacted")
            assert not meta.has_prefix(keys.TOMB_CANDIDATE)
            assert meta.fingerprint_discrepancies() == []
        # What the node reports of it, beside anti-entropy's counters.
        async with http.get(f"{east.url}/georeg/v1/node") as r:
            counts = (await r.json())["metadata"]
        assert counts["log_events"] == 0 and counts["tombstones_held"] == 0
        assert counts["log_floor"] >= written and counts["tombstones_collected"] >= 40
        text = await metrics_text(http, east)
        assert metric_sum(text, "georeg_metadata_compaction_total",
                          what="tombstones_collected") >= 40
        assert metric_sum(text, "georeg_metadata", what="log_events") == 0
    finally:
        await stop_cluster(cluster)
