"""A repository delete on one node racing the replicated deletes of the same
repository from another region, the events ordered by hand on a real node.

``georeg repository delete`` asks every region at once. A confined region
(Brazil South) holds what replication brought it from East US as well as its
own content under the same name: its delete and East US's replicated deletes
of the replicated part interleave, one commit at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import pytest
import pytest_asyncio

from cluster.control import repositories
from registry_node import keys
from registry_node.config import NodeConfig
from registry_node.records import ChangeableAttributes, Event, EventKind
from registry_node.replica import Replica

from .helpers import Image, assert_error, digest_of, make_image, push_image, started_node

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Two images, by digest; a repository's delete takes its manifests in digest
# order, so each may be East US's (deleted by replication meanwhile) or Brazil's.
IMAGES = sorted((make_image([2300], seed=82), make_image([2400], seed=83)),
                key=lambda image: image.digest)
# Brazil South's delete commits once per manifest and once per blob link.
COMMITS = sum(1 + len(image.blobs) for image in IMAGES)


def from_east(kind: EventKind, repo: str, hlc: int, **fields) -> Event:
    return Event(kind=kind, repository=repo, origin_region="eastus", hlc=hlc, acked_ns=1,
                 **fields)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def brazil(tmp_path_factory):
    async with started_node(NodeConfig(data_dir=tmp_path_factory.mktemp("br") / "node", port=0,
                                       region="brazilsouth")) as node:
        yield node


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def _hold_east_and_its_own(node, http, repo: str, east: Image, own: Image) -> list[Event]:
    """``repo`` as Brazil South holds it in test_cluster's residency test:
    East US's image ``east`` (tagged v1 there) by replication, then v1
    re-tagged here to ``own``, which stays here. Returns East US's repository
    delete, as its events reach Brazil South."""
    replica = Replica(node.registry, node.node.configuration)
    base = node.registry.hlc.last
    for i, blob in enumerate(east.blobs):
        await replica.store_sent_blob(digest_of(blob), blob)
        assert replica.apply_blob_link(from_east(EventKind.BLOB_PUT, repo, base + 1 + i,
                                                 digest=digest_of(blob), size=len(blob)))
    assert replica.apply_manifest(from_east(EventKind.MANIFEST_PUT, repo, base + 10,
                                            digest=east.digest, media_type=east.media_type,
                                            size=len(east.manifest)), east.manifest)
    assert replica.apply_tag(from_east(EventKind.TAG_SET, repo, base + 11, tag="v1",
                                       digest=east.digest))
    await push_image(http, node.url, repo, own, tag="v1")
    later = node.registry.hlc.last + 100
    return [from_east(EventKind.MANIFEST_DELETE, repo, later, digest=east.digest),
            *(from_east(EventKind.BLOB_DELETE, repo, later + 1 + i, digest=digest_of(blob))
              for i, blob in enumerate(east.blobs))]


def arriving_during_commit(monkeypatch, registry, k: int, arrives: Callable[[], None]) -> None:
    """``arrives()`` during the ``k``-th commit of what ``registry`` does next
    (none if ``k`` is 0): wraps the injected durability, whose await after each
    commit is where the replicator, on the same event loop, applies what
    arrived meanwhile."""
    wait_durable, commits = registry.quorum.wait_durable, 0

    async def arriving(seq: int) -> None:
        nonlocal commits
        commits += 1
        if commits == k:
            arrives()
        await wait_durable(seq)

    monkeypatch.setattr(registry.quorum, "wait_durable", arriving)


@pytest.mark.parametrize("east_first", [True, False],
                         ids=["east's image sorts first", "brazil's image sorts first"])
@pytest.mark.parametrize("arrival", range(COMMITS + 1),
                         ids=lambda k: f"east's deletes land during commit {k}" if k
                         else "east's deletes land first")
async def test_a_repository_delete_racing_replicated_deletes_deletes_what_this_region_holds(
        brazil, http, monkeypatch, arrival, east_first):
    """Whichever of Brazil South's commits East US's replicated deletes land
    during, Brazil South's own delete answers 202, says it deleted its own
    image (which only it holds, so only it can report), and leaves nothing of
    the repository: what replication took first is gone already, not an
    error. Before the fix a delete found gone by replication midway answered
    404, which ``georeg repository delete`` read as "not in this region": it
    did not count Brazil South's image, and the rest of the repository (its
    own image or its blob links) stayed behind."""
    east, own = IMAGES if east_first else IMAGES[::-1]
    repo = f"residency/shared-{arrival}-{east_first:d}"
    east_deletes = await _hold_east_and_its_own(brazil, http, repo, east, own)
    replica = Replica(brazil.registry, brazil.node.configuration)

    def east_arrives() -> None:
        for event in east_deletes:
            if event.kind is EventKind.MANIFEST_DELETE:
                replica.apply_manifest_delete(event)
            else:
                replica.apply_blob_unlink(event)

    if arrival == 0:
        east_arrives()
    arriving_during_commit(monkeypatch, brazil.registry, arrival, east_arrives)
    async with http.delete(f"{brazil.url}/acr/v1/{repo}") as r:
        assert r.status == 202, await r.text()
        body = await r.json()
    monkeypatch.undo()
    # East US's manifest is Brazil South's to report only if its own delete
    # took it: East's deletes landed after the commit that deleted it (the
    # first when East's image sorts first, else the second).
    took_east = arrival >= (1 if east_first else 2)
    assert sorted(body["manifestsDeleted"]) == sorted(
        {own.digest} | ({east.digest} if took_east else set()))
    assert body["tagsDeleted"] == ["v1"]
    assert not brazil.registry.meta.has_prefix(keys.repo_prefix(repo))
    async with http.get(f"{brazil.url}/v2/{repo}/tags/list") as r:
        assert r.status == 404


async def test_a_lock_landing_midway_stops_the_delete_and_the_answer_says_what_was_done(
        brazil, http, monkeypatch):
    """A lock East US set on the second of two manifests reaches Brazil South
    during its repository delete's first commit: the delete stops there (the
    lock is honoured), and since one manifest is gone already its 405 is
    indefinite and says what was done — never a plain refusal that reads as
    "nothing changed" while half the repository is deleted."""
    repo = "residency/locked-midway"
    first, second = IMAGES
    for image in IMAGES:
        await push_image(http, brazil.url, repo, image)
    replica = Replica(brazil.registry, brazil.node.configuration)
    lock = from_east(EventKind.ATTRIBUTES_SET, repo, brazil.registry.hlc.last + 100,
                     digest=second.digest, attributes=ChangeableAttributes(delete_enabled=False))
    arriving_during_commit(monkeypatch, brazil.registry, 1,
                           lambda: replica.apply_attributes(lock))
    async with http.delete(f"{brazil.url}/acr/v1/{repo}") as r:
        error = await assert_error(r, 405, "REGISTRY_DISALLOWED_OPERATION")
    monkeypatch.undo()
    assert error["detail"]["outcome"] == "indefinite"
    assert error["detail"]["done"]["manifestsDeleted"] == [first.digest]
    async with http.get(f"{brazil.url}/v2/{repo}/manifests/{second.digest}") as r:
        assert r.status == 200
    async with http.get(f"{brazil.url}/v2/{repo}/manifests/{first.digest}") as r:
        assert r.status == 404


async def test_only_name_unknown_passes_a_region_over_as_not_holding_the_repository(brazil, http):
    """``georeg repository delete`` reads a region's 404 ``NAME_UNKNOWN`` as
    "not here" (never had it, or replication took it first), as a real node
    answers it; any other 404 (a node of an older version that found something
    gone midway, as before the fix above) is that region's refusal, named as
    such, not a region silently left out."""
    assert await repositories._delete(http, brazil.url, "never/here") is None
    midway = {"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown to registry"}]}
    with pytest.raises(repositories._Refused, match="HTTP 404: blob unknown"):
        repositories._region_answer(404, midway)
    deleted = {"manifestsDeleted": [], "tagsDeleted": []}
    assert repositories._region_answer(202, deleted) == deleted
