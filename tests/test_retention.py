"""Retention of untagged manifests (``registry_node.untagged``) on one
in-process node with the test's clock: what is kept, what goes and when; the
policy's checks; the sweep route and its metric; a retention delete meeting a
tag made in another region (two in-process nodes, events carried by hand).
The CLI and management API: ``test_lifecycle_commands``."""

from __future__ import annotations

import asyncio

import pytest

from cluster.control.lifecycle import RegistryLifecycle
from cluster.control.schedules import iso
from cluster.faults.verify import NodeTarget, Snapshot, compare_registers
from registry_node import keys
from registry_node.api.common import RETENTION
from registry_node.config import NodeConfig
from registry_node.records import EventKind, Tombstone, decode
from registry_node.replica import MissingContent, Replica, register_event
from registry_node.untagged import DAY_NS
from replicator.convert import register_from_wire, register_to_wire
from replicator.residency import ResidencyPolicy

from .helpers import (
    ManualClock,
    make_image,
    push_blob,
    push_image,
    push_index_and_signed_image,
    started_node,
)


async def set_policy(http, node, clock: ManualClock, *, days: int, enabled: bool = True,
                     enabled_ns: int | None = None, soft_delete: bool = False) -> None:
    value = {"retention_enabled": enabled, "retention_days": days,
             "retention_enabled_ns": clock.wall_ns() if enabled_ns is None else enabled_ns,
             "soft_delete": {"enabled": soft_delete, "days": 7}}
    async with http.put(f"{node.url}/georeg/v1/configuration/registry/default",
                        json=value) as r:
        assert r.status == 200, await r.text()


async def sweep(http, node, settle: float = 0) -> dict:
    async with http.post(f"{node.url}/georeg/v1/retention/sweep",
                         json={"origins": [node.registry.identity.region],
                               "settleSeconds": settle}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def exists(http, node, repo: str, digest: str) -> bool:
    async with http.head(f"{node.url}/v2/{repo}/manifests/{digest}") as r:
        return r.status == 200


async def untag(http, node, repo: str, tag: str) -> None:
    async with http.delete(f"{node.url}/v2/{repo}/manifests/{tag}") as r:
        assert r.status == 202, await r.text()


async def push_untagged(http, node, repo: str, image) -> str:
    """Pushed and untagged: retention's clock starts at an untag, not at a push."""
    digest = await push_image(http, node.url, repo, image, tag="gone")
    await untag(http, node, repo, "gone")
    return digest


@pytest.fixture
async def clocked(tmp_path, clock):
    async with started_node(NodeConfig(data_dir=tmp_path / "node", port=0), clock) as running:
        yield running


async def test_a_manifest_untagged_after_enabling_goes_once_its_days_pass(clocked, clock, http):
    node = clocked
    before = await push_image(http, node.url, "app", make_image(seed=1), tag="old")
    await untag(http, node, "app", "old")                 # untagged before the policy
    clock.advance(1)
    await set_policy(http, node, clock, days=2)
    clock.advance(1)
    moved = await push_image(http, node.url, "app", make_image(seed=2), tag="v1")
    await push_image(http, node.url, "app", make_image(seed=3), tag="v1")   # v1 moves off
    kept_tagged = await push_image(http, node.url, "app", make_image(seed=4), tag="stable")
    clock.advance(2 * 86_400 - 10)
    report = await sweep(http, node)
    assert report["deleted"] == [] and report["notDue"] == 1
    assert await exists(http, node, "app", moved)
    clock.advance(20)
    report = await sweep(http, node)
    assert report["deleted"] == [{"repository": "app", "digest": moved}]
    assert not await exists(http, node, "app", moved)
    assert await exists(http, node, "app", before)         # untagged before: never its
    assert await exists(http, node, "app", kept_tagged)
    async with http.get(f"{node.url}/metrics") as r:
        assert "georeg_retention_manifests_deleted_total 1.0" in await r.text()
    # What was looked at and kept is not looked at again: the notes are gone.
    clock.advance(86_400)
    again = await sweep(http, node)
    assert again["examined"] == 0 and again["deleted"] == []


async def test_locked_held_and_referring_manifests_are_kept(clocked, clock, http):
    node = clocked
    await set_policy(http, node, clock, days=0)
    locked = await push_untagged(http, node, "app", make_image(seed=10))
    async with http.patch(f"{node.url}/acr/v1/app/_manifests/{locked}",
                          json={"deleteEnabled": False}) as r:
        assert r.status == 200, await r.text()
    pushed = await push_index_and_signed_image(http, node.url, "app", seed=11, index_tag="multi",
                                               subject_tag="signed", signature_layers=(16,))
    child_digest, subject_digest = pushed["child"], pushed["subject"]
    signature_digest = pushed["signature"]
    clock.advance(1)
    report = await sweep(http, node)
    assert report["deleted"] == []
    assert report["locked"] == [{"repository": "app", "digest": locked}]
    assert report["examined"] == 1        # a push by digest (the child, the signature) starts nothing
    for digest in (locked, child_digest, signature_digest):
        assert await exists(http, node, "app", digest)
    # Unlocked, it goes at the next sweep; the index untagged goes, and its
    # child at the sweep after; the subject deleted, its referrer goes too.
    async with http.patch(f"{node.url}/acr/v1/app/_manifests/{locked}",
                          json={"deleteEnabled": True}) as r:
        assert r.status == 200
    await untag(http, node, "app", "multi")
    await untag(http, node, "app", "signed")
    async with http.delete(f"{node.url}/v2/app/manifests/{subject_digest}") as r:
        assert r.status == 202
    clock.advance(1)
    first = {d["digest"] for d in (await sweep(http, node))["deleted"]}
    assert first == {locked, pushed["index"], signature_digest}
    clock.advance(1)
    assert {d["digest"] for d in (await sweep(http, node))["deleted"]} == {child_digest}
    for digest in (locked, child_digest, signature_digest):
        assert not await exists(http, node, "app", digest)


async def test_days_out_of_range_are_refused_and_nothing_changes(clocked, clock, http):
    node = clocked
    await set_policy(http, node, clock, days=7)
    for days in (-1, 366, "x", 1.5, True):
        async with http.put(f"{node.url}/georeg/v1/configuration/registry/default",
                            json={"retention_enabled": True, "retention_days": days}) as r:
            assert r.status == 400, (days, await r.text())
            assert "retention" in (await r.text()) or "int" in (await r.text())
    assert node.node.configuration.retention().days == 7


async def test_a_disabled_policy_deletes_nothing(clocked, clock, http):
    node = clocked
    digest = await push_image(http, node.url, "app", make_image(seed=20))
    await set_policy(http, node, clock, days=0, enabled=False)
    clock.advance(400 * DAY_NS / 1e9)
    assert (await sweep(http, node)) == {"enabled": False, "examined": 0, "deleted": [],
                                         "locked": [], "notDue": 0, "dropped": 0, "failed": 0,
                                         "partial": False}
    assert await exists(http, node, "app", digest)


async def test_a_sweep_is_bounded_and_the_next_goes_on_where_it_stopped(clocked, clock, http):
    """Locked notes first in key order do not stall the sweeps behind them."""
    node = clocked
    await set_policy(http, node, clock, days=0)
    for i in range(2):
        locked = await push_untagged(http, node, "a-locked", make_image([8], seed=30 + i))
        async with http.patch(f"{node.url}/acr/v1/a-locked/_manifests/{locked}",
                              json={"deleteEnabled": False}) as r:
            assert r.status == 200
    digests = {await push_untagged(http, node, "many", make_image([8], seed=40 + i))
               for i in range(3)}
    clock.advance(1)
    deleted: set[str] = set()
    for _ in range(3):
        report = await node.runner.app[RETENTION].sweep([node.registry.identity.region],
                                                        limit=2, settle_s=0)
        assert report.examined <= 2
        deleted |= {d for _, d in report.deleted}
    assert deleted == digests
    # Out of time after its first note, a sweep says so; the next goes on after it.
    more = {await push_untagged(http, node, "more", make_image([8], seed=50 + i))
            for i in range(2)}
    clock.advance(1)
    sweeper = node.runner.app[RETENTION]
    first = await sweeper.sweep([node.registry.identity.region], settle_s=0, budget_s=-1)
    assert first.partial and first.examined == 1
    second = await sweeper.sweep([node.registry.identity.region], settle_s=0)
    assert {d for _, d in first.deleted + second.deleted} == more and not second.partial


async def test_a_tag_made_elsewhere_after_the_untag_beats_retentions_delete(clocked, clock, http,
                                                                             tmp_path):
    """Retention's delete carries the untag's stamp: a tag set in another
    region after the untag, that the deciding region has not seen (lag, or a
    confined region whose tags never leave it), keeps the manifest and the tag
    there, and wins where it arrives later (its manifest is fetched again)."""
    decider = clocked
    image, locked_image = make_image(seed=50), make_image(seed=51)
    await set_policy(http, decider, clock, days=1)
    digest = await push_untagged(http, decider, "app", image)
    locked = await push_untagged(http, decider, "app", locked_image)
    config = NodeConfig(data_dir=tmp_path / "other", port=0, region="brazilsouth")
    async with started_node(config, clock) as other:
        bodies = {digest: image.manifest, locked: locked_image.manifest}
        for blob in [*image.blobs, *locked_image.blobs]:
            await push_blob(http, other.url, "app", blob)
        replica = Replica(other.registry, other.node.configuration)
        for event in decider.registry.meta.read_log(0):
            if event.kind is EventKind.MANIFEST_PUT:
                replica.apply_manifest(event, bodies[event.digest])
            elif event.kind is EventKind.TAG_SET:
                replica.apply_tag(event)
            elif event.kind is EventKind.TAG_DELETE:
                replica.apply_tag_delete(event)
        # brazilsouth holds notes of what was first pushed elsewhere; its sweep never reads them.
        await set_policy(http, other, clock, days=1, enabled_ns=0)
        assert other.registry.meta.has_prefix(keys.untagged_prefix("local"))
        assert (await sweep(http, other))["examined"] == 0
        clock.advance(86_400 + 60)
        # Neither seen by the decider: a tag, and a lock.
        kept = await push_image(http, other.url, "app", image, tag="kept")
        async with http.patch(f"{other.url}/acr/v1/app/_manifests/{locked}",
                              json={"deleteEnabled": False}) as r:
            assert r.status == 200, await r.text()
        clock.advance(1)
        seen = decider.registry.meta.last_seq
        report = await sweep(http, decider)
        assert {d["digest"] for d in report["deleted"]} == {digest, locked}
        for delete in decider.registry.meta.read_log(seen):
            replica.apply_manifest_delete(delete)
        assert kept == digest and await exists(http, other, "app", digest)
        assert await exists(http, other, "app", locked)
        # Anti-entropy brings the same deletes as registers (a node that missed
        # the log): over the wire they still say they are retention's, so the
        # lock keeps its manifest as it did against the event.
        state = Replica(decider.registry, decider.node.configuration).repository_state(
            "app", lambda _region: True)
        for register in state["manifests"]:
            if register.deleted:
                received = register_from_wire(register_to_wire(register))
                replica.apply_manifest_delete(
                    register_event("app", EventKind.MANIFEST_DELETE, received))
        assert await exists(http, other, "app", locked)
        async with http.head(f"{other.url}/v2/app/manifests/kept") as r:
            assert r.status == 200
        # georeg verify agrees: each region holds what it should.
        snapshots = []
        for running, region in ((decider, "local"), (other, "brazilsouth")):
            async with http.get(f"{running.url}/georeg/v1/inventory") as r:
                snapshots.append(Snapshot(NodeTarget(region, region, running.url),
                                          await r.json()))
        assert compare_registers(snapshots, ResidencyPolicy()) == []
        (tag_set,) = [e for e in other.registry.meta.read_log(0)
                      if e.kind is EventKind.TAG_SET and e.tag == "kept"]
        with pytest.raises(MissingContent):     # the decider fetches the manifest again
            Replica(decider.registry, decider.node.configuration).apply_tag(tag_set)


async def test_a_confined_regions_tag_older_than_the_untag_keeps_the_manifest_there(
        clocked, clock, http, tmp_path):
    """A tag set in a confined region (its tags never leave it) *before* the
    deciding region's untag: the decider saw the manifest untagged, but the
    confined region holds it tagged, and a retention delete never deletes a
    tagged manifest (ACR) — it is refused there, as on a lock, whatever the
    stamps say (the tag is older than the untag, so by stamp alone it would go)."""
    decider = clocked
    image = make_image(seed=52)
    await set_policy(http, decider, clock, days=0)
    digest = await push_image(http, decider.url, "app", image, tag="v1")
    config = NodeConfig(data_dir=tmp_path / "confined", port=0, region="brazilsouth")
    async with started_node(config, clock) as confined:
        for blob in image.blobs:
            await push_blob(http, confined.url, "app", blob)
        replica = Replica(confined.registry, confined.node.configuration)
        seen = decider.registry.meta.last_seq
        for event in decider.registry.meta.read_log(0):
            if event.kind is EventKind.MANIFEST_PUT:
                replica.apply_manifest(event, image.manifest)
            elif event.kind is EventKind.TAG_SET:
                replica.apply_tag(event)
        clock.advance(1)
        assert await push_image(http, confined.url, "app", image, tag="prod") == digest
        clock.advance(1)
        await untag(http, decider, "app", "v1")
        clock.advance(61)
        assert [d["digest"] for d in (await sweep(http, decider))["deleted"]] == [digest]
        for event in decider.registry.meta.read_log(seen):
            if event.kind is EventKind.TAG_DELETE:
                replica.apply_tag_delete(event)
            elif event.kind is EventKind.MANIFEST_DELETE:
                assert replica.apply_manifest_delete(event) is None
        assert await exists(http, confined, "app", digest)
        async with http.head(f"{confined.url}/v2/app/manifests/prod") as r:
            assert r.status == 200


async def test_with_soft_delete_on_a_retention_delete_goes_to_the_recycle_bin(clocked, clock,
                                                                             http):
    """The policies meet as every delete meets soft delete (docs/lifecycle.md):
    retention's delete is soft, restorable, its days counted from the delete;
    its tombstone keeps the untag's stamp, not one lifted over the manifest."""
    node = clocked
    await set_policy(http, node, clock, days=0, soft_delete=True)
    digest = await push_untagged(http, node, "app", make_image(seed=60))
    (untag_event,) = [e for e in node.registry.meta.read_log(0)
                      if e.kind is EventKind.TAG_DELETE]
    clock.advance(1)
    report = await sweep(http, node)
    assert [d["digest"] for d in report["deleted"]] == [digest]
    tomb = decode(node.registry.meta.get(keys.manifest_tomb("app", digest)), Tombstone)
    assert tomb.recycled and tomb.hlc == untag_event.hlc
    entry = node.registry.bin.manifest("app", digest)
    assert entry is not None and entry.deleted_ns == clock.wall_ns()
    async with http.post(f"{node.url}/acr/v1/app/_deleted/{digest}") as r:
        assert r.status == 200, await r.text()
    assert await exists(http, node, "app", digest)


async def test_a_clock_fenced_node_refuses_retentions_delete_and_the_next_sweep_makes_it(
        clocked, clock, http):
    """A node whose clock is off from most of its peers stamps nothing
    (``clock``): the sweep counts the delete as failed, keeps the note, and
    a sweep once the fence lifts deletes."""
    node = clocked
    await set_policy(http, node, clock, days=0)
    digest = await push_untagged(http, node, "app", make_image(seed=61))
    clock.advance(1)
    guard = node.registry.clock
    for peer in ("a", "b"):
        guard.record(peer, offset_s=-3_600, uncertainty_s=0)
    report = await sweep(http, node)
    assert report["failed"] == 1 and report["deleted"] == []
    assert await exists(http, node, "app", digest)
    for peer in ("a", "b"):
        guard.forget(peer)
    report = await sweep(http, node)
    assert [d["digest"] for d in report["deleted"]] == [digest]


async def test_enabling_through_update_retention_dates_the_policy_by_the_injected_clock(
        clocked, clock, http):
    """The control plane's enabling (``RegistryLifecycle.update_retention``)
    on the test's clock, a day ahead of the machine's: a manifest untagged
    before it is kept, one untagged after goes (with the machine's clock the
    first would count as untagged after enabling, and go)."""
    node = clocked
    region = node.registry.identity.region
    url = f"{node.url}/georeg/v1/configuration/registry/default"

    async def current(_node: str) -> dict:
        async with http.get(url) as r:
            return (await r.json())["value"] if r.status == 200 else {}

    async def update(changes) -> dict:      # Cluster.update_registry_object, on one node
        value = await current("home")
        value = {**value, **await changes("home", value)}
        async with http.put(url, json=value) as r:
            assert r.status == 200, await r.text()
        return value

    async def unused(*_args, **_kwargs):
        raise AssertionError("an update asks no node for a sweep")

    lifecycle = RegistryLifecycle(
        update=update, reader=lambda: asyncio.sleep(0, "home"), current=current,
        plan=lambda: None, regions=lambda: [region], home_region=lambda: region,
        tier=lambda: "Premium", answers=unused, request=unused, wall_ns=clock.wall_ns)
    clock.advance(86_400)
    before = await push_untagged(http, node, "app", make_image(seed=62))
    clock.advance(1)
    view = await lifecycle.update_retention(days=0, status="enabled")
    assert view["enabledSince"] == iso(clock.wall_ns() / 1e9)
    after = await push_untagged(http, node, "app", make_image(seed=63))
    clock.advance(1)
    report = await sweep(http, node)
    assert [d["digest"] for d in report["deleted"]] == [after] and report["dropped"] == 1
    assert await exists(http, node, "app", before)


async def test_a_bad_sweep_request_is_a_400_saying_what_to_send(clocked, http):
    for body in (b"[", b"[]", b'{"origins": "x"}', b'{"origins": [1]}',
                 b'{"origins": [], "limit": 0}', b'{"origins": [], "limit": true}',
                 b'{"origins": [], "settleSeconds": -1}', b'{"origins": [], "other": 1}'):
        async with http.post(f"{clocked.url}/georeg/v1/retention/sweep", data=body) as r:
            assert r.status == 400, (body, await r.text())
            assert "invalid sweep request" in await r.text()
