"""Garbage collection on a live in-process node: what is reclaimed, what is
spared, and when.

Each test drives ``GarbageCollector.collect()`` itself, and time itself: the
node reads a ``ManualClock`` that only the test moves, so a grace period or an
upload TTL has passed exactly when the test says, however slow the machine
(the node's own background collector runs every 60 s with an hour of grace,
so it never interferes). Blobs are checked on disk and through the API.
"""

from __future__ import annotations

import json
import os
import random
import uuid

import pytest

from registry_node import keys
from registry_node.blobstore import BlobStore
from registry_node.crypto import NodeKey
from registry_node.gc import GarbageCollector
from registry_node.records import EventKind

from .helpers import (
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    Image,
    ManualClock,
    descriptor,
    digest_of,
    push_blob,
    push_image,
    start_node,
    started_node,
)

GRACE_S = 60.0
UPLOAD_TTL_S = 600.0


@pytest.fixture
async def node(node_config, clock):
    """A real node in this process, on the test's clock."""
    async with started_node(node_config, clock) as running:
        yield running


def collector(node, grace_s: float = GRACE_S, upload_ttl_s: float = UPLOAD_TTL_S) -> GarbageCollector:
    return GarbageCollector(node.registry, grace_s=grace_s, upload_ttl_s=upload_ttl_s,
                            interval_s=3600)


def image_of(layers: list[bytes], seed: int) -> Image:
    config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor(config, OCI_CONFIG),
        "layers": [descriptor(x, OCI_LAYER) for x in layers],
    }).encode()
    return Image(config, layers, manifest)


def on_disk(node, data: bytes) -> bool:
    return node.node.blobs.path(digest_of(data)).exists()


async def blob_status(http, node, repo: str, data: bytes) -> int:
    """HEAD status of a blob on ``node`` (a fixture node or a ``start_node`` result)."""
    async with http.head(f"{node.url}/v2/{repo}/blobs/{digest_of(data)}") as r:
        return r.status


async def assert_blob_served(http, node, repo: str, data: bytes) -> None:
    async with http.get(f"{node.url}/v2/{repo}/blobs/{digest_of(data)}") as r:
        assert r.status == 200, await r.text()
        assert await r.read() == data


def reclaimed_in_log(node) -> set[str]:
    return {e.digest for e in node.registry.meta.read_log(0, 100_000)
            if e.kind == EventKind.BLOB_RECLAIMED}


async def test_unreferenced_blobs_are_reclaimed_after_grace_referenced_ones_stay(node, http, clock):
    rng = random.Random(1)
    image = image_of([rng.randbytes(20_000), rng.randbytes(70_000)], seed=1)
    await push_image(http, node.url, "gc/app", image, tag="v1")
    orphan = rng.randbytes(40_000)
    lonely = rng.randbytes(1_000)                # the only content of its repository
    await push_blob(http, node.url, "gc/app", orphan)
    await push_blob(http, node.url, "gc/lonely", lonely)

    gc = collector(node)
    # Within the grace period nothing goes, up to its last moment.
    clock.advance(GRACE_S - 1)
    report = await gc.collect()
    assert report.blobs_reclaimed == 0
    assert all(on_disk(node, b) for b in [*image.blobs, orphan, lonely])

    clock.advance(2)
    report = await gc.collect()
    assert report.blobs_reclaimed == 2
    assert report.bytes_reclaimed == len(orphan) + len(lonely)
    assert not on_disk(node, orphan) and not on_disk(node, lonely)
    assert await blob_status(http, node, "gc/app", orphan) == 404
    assert await blob_status(http, node, "gc/lonely", lonely) == 404
    assert node.registry.meta.get(keys.blob(digest_of(orphan))) is None
    assert reclaimed_in_log(node) == {digest_of(orphan), digest_of(lonely)}
    async with http.get(f"{node.url}/v2/_catalog") as r:
        assert (await r.json())["repositories"] == ["gc/app"]

    # Everything the manifest needs is still there, and stays on further passes.
    await gc.collect()
    for blob in image.blobs:
        assert on_disk(node, blob)
        await assert_blob_served(http, node, "gc/app", blob)
    async with http.get(f"{node.url}/v2/gc/app/manifests/v1") as r:
        assert r.status == 200 and await r.read() == image.manifest


async def test_blob_found_by_head_within_grace_survives_for_the_manifest_push(node, http, clock):
    """A client that finds its layers present (HEAD) and then pushes the manifest
    must not lose them in between, even though nothing references them yet."""
    rng = random.Random(2)
    image = image_of([rng.randbytes(25_000), rng.randbytes(35_000)], seed=2)
    control = rng.randbytes(5_000)               # same history, but nobody asks for it
    for blob in [*image.blobs, control]:
        await push_blob(http, node.url, "gc/push", blob)
    gc = collector(node)
    clock.advance(2 * GRACE_S)                   # every blob is old, none referenced
    for blob in image.blobs:
        assert await blob_status(http, node, "gc/push", blob) == 200
    clock.advance(GRACE_S - 1)                   # the HEADs are still within the grace
    await gc.collect()
    assert not on_disk(node, control)
    assert all(on_disk(node, b) for b in image.blobs)

    async with http.put(f"{node.url}/v2/gc/push/manifests/v1", data=image.manifest,
                        headers={"Content-Type": OCI_MANIFEST}) as r:
        assert r.status == 201, await r.text()
    clock.advance(10 * GRACE_S)
    await gc.collect()                           # referenced now: kept for good
    for blob in image.blobs:
        await assert_blob_served(http, node, "gc/push", blob)
    assert digest_of(control) in reclaimed_in_log(node)
    assert not reclaimed_in_log(node) & {digest_of(b) for b in image.blobs}


async def test_deleting_manifests_frees_their_unique_layers_not_shared_ones(node, http, clock):
    rng = random.Random(3)
    shared, unique1, unique2 = rng.randbytes(30_000), rng.randbytes(31_000), rng.randbytes(32_000)
    first = image_of([shared, unique1], seed=31)
    second = image_of([shared, unique2], seed=32)
    elsewhere = image_of([shared], seed=33)     # the shared layer, in another repository
    await push_image(http, node.url, "gc/a", first, tag="one")
    await push_image(http, node.url, "gc/a", second, tag="two")
    await push_image(http, node.url, "gc/b", elsewhere, tag="v1")
    gc = collector(node)

    async with http.delete(f"{node.url}/v2/gc/a/manifests/{first.digest}") as r:
        assert r.status == 202, await r.text()
    clock.advance(GRACE_S + 1)
    await gc.collect()
    assert not on_disk(node, unique1) and not on_disk(node, first.config)
    for blob in second.blobs:
        assert on_disk(node, blob)
        await assert_blob_served(http, node, "gc/a", blob)
    async with http.get(f"{node.url}/v2/gc/a/manifests/two") as r:
        assert r.status == 200 and await r.read() == second.manifest
    assert await blob_status(http, node, "gc/a", unique1) == 404

    # Deleting by tag only untags (OCI): the manifest still holds its blobs.
    async with http.delete(f"{node.url}/v2/gc/a/manifests/two") as r:
        assert r.status == 202, await r.text()
    await gc.collect()
    assert on_disk(node, unique2) and on_disk(node, second.config)
    # Deleting it by digest frees its unique blobs too, while the shared layer
    # stays for the image in gc/b.
    async with http.delete(f"{node.url}/v2/gc/a/manifests/{second.digest}") as r:
        assert r.status == 202, await r.text()
    clock.advance(GRACE_S + 1)
    await gc.collect()
    assert not on_disk(node, unique2) and not on_disk(node, second.config)
    assert on_disk(node, shared)
    for blob in elsewhere.blobs:
        await assert_blob_served(http, node, "gc/b", blob)
    assert digest_of(shared) not in reclaimed_in_log(node)


async def test_abandoned_uploads_expire_and_active_ones_stay(node, http, clock):
    rng = random.Random(4)
    base = node.url

    async def open_upload(first_chunk: bytes) -> str:
        async with http.post(f"{base}/v2/gc/up/blobs/uploads/") as r:
            assert r.status == 202
            location = base + r.headers["Location"]
        async with http.patch(location, data=first_chunk,
                              headers={"Content-Range": f"0-{len(first_chunk) - 1}"}) as r:
            assert r.status == 202, await r.text()
        return location

    abandoned = await open_upload(rng.randbytes(100_000))
    active_data = bytearray(rng.randbytes(70_000))
    active = await open_upload(bytes(active_data))
    store = node.node.blobs
    abandoned_file = store.upload_path(abandoned.rsplit("/", 1)[1])
    active_file = store.upload_path(active.rsplit("/", 1)[1])
    # A single-request upload cut short by a crash leaves a file with no session.
    leftover = store.upload_path(str(uuid.uuid4()))
    leftover.write_bytes(os.urandom(1000))
    assert abandoned_file.exists() and active_file.exists()

    gc = collector(node)
    # Younger than the TTL: all stay.
    clock.advance(UPLOAD_TTL_S / 2)
    report = await gc.collect()
    assert report.uploads_expired == 0 and abandoned_file.exists() and leftover.exists()

    # The active one goes on; past the TTL, only the idle ones go.
    chunk = rng.randbytes(1_000)
    start = len(active_data)
    async with http.patch(active, data=chunk,
                          headers={"Content-Range": f"{start}-{start + len(chunk) - 1}"}) as r:
        assert r.status == 202, await r.text()
    active_data.extend(chunk)
    clock.advance(UPLOAD_TTL_S / 2 + 1)
    report = await gc.collect()
    assert report.uploads_expired == 1
    assert not abandoned_file.exists() and not leftover.exists()
    async with http.get(abandoned) as r:
        assert r.status == 404
        assert (await r.json())["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
    assert active_file.exists()
    async with http.get(active) as r:
        assert r.status == 204 and r.headers["Range"] == f"0-{len(active_data) - 1}"
    async with http.put(active, params={"digest": digest_of(bytes(active_data))}) as r:
        assert r.status == 201, await r.text()
    await assert_blob_served(http, node, "gc/up", bytes(active_data))


async def test_blob_file_left_without_metadata_by_a_crash_is_swept(node_config, http):
    """A crash between moving a sealed upload into blobs/ and committing its
    metadata leaves a blob file no record names (tests/test_crash.py produces a
    few per run). Nothing can serve or reference it; the first collection of a
    process past the grace walks the blob files and sweeps it. Recreated here
    exactly: an open upload's file is committed into place with the node stopped."""
    data = random.Random(6).randbytes(120_000)
    running = await start_node(node_config)
    try:
        async with http.post(f"{running.url}/v2/gc/orphan/blobs/uploads/") as r:
            upload_id = r.headers["Location"].rsplit("/", 1)[1]
        async with http.patch(f"{running.url}{r.headers['Location']}", data=data,
                              headers={"Content-Range": f"0-{len(data) - 1}"}) as r:
            assert r.status == 202
    finally:
        await running.stop()
    store = BlobStore(node_config.data_dir, NodeKey.load(node_config.key_path))
    store.commit_upload(store.resume_upload(upload_id), digest_of(data))
    orphan = store.path(digest_of(data))
    assert orphan.exists()

    clock = ManualClock()                        # from now on: the file is older than it
    running = await start_node(node_config, clock)
    try:
        assert await blob_status(http, running, "gc/orphan", data) == 404   # invisible
        gc = collector(running)
        clock.advance(GRACE_S - 1)               # the node started within the grace
        await gc.collect()
        assert orphan.exists()
        clock.advance(2)
        await gc.collect()
        assert not orphan.exists()
    finally:
        await running.stop()
