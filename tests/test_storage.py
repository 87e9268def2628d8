"""Storage usage and the storage limit on a live in-process node.

The usage (``registry_node.usage``) is kept by every commit: after pushes,
mounts, deletes and garbage collection it equals the records summed the slow
way, and it survives a reopen. The limit (``Registry.check_storage``)
refuses, with ``403 DENIED``, the upload that would take the node past it —
monolithic, two-step, chunked, or a manifest — and keeps nothing of it, while
reads and deletes go on; a delete and a GC pass make room again. Time is the
test's (``ManualClock``): a GC pass reclaims exactly when the test says.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading

import aiohttp
import pytest

from registry_node import keys
from registry_node.config import NodeConfig
from registry_node.gc import GarbageCollector
from registry_node.metastore import MetadataStore
from registry_node.registry import PIPELINE_CHUNK, Limits
from registry_node.usage import StorageUsage

from .helpers import (
    ManualClock,
    assert_error,
    digest_of,
    eventually,
    make_image,
    push_blob,
    push_image,
    start_node,
    started_node,
)

GRACE_S = 60.0
LIMIT = 20_000


@pytest.fixture
async def limited(tmp_path, clock):
    """A node that may hold ``LIMIT`` bytes, on the test's clock."""
    async with started_node(NodeConfig(data_dir=tmp_path / "node", port=0,
                                       storage_limit=LIMIT), clock) as running:
        yield running


@pytest.fixture
async def node(node_config, clock):
    async with started_node(node_config, clock) as running:
        yield running


async def collect(node, clock: ManualClock) -> None:
    """One GC pass after the grace has passed for everything so far."""
    clock.advance(GRACE_S + 1)
    await GarbageCollector(node.registry, grace_s=GRACE_S, upload_ttl_s=3600,
                           interval_s=3600).collect()


def usage(node) -> StorageUsage:
    meta = node.node.meta
    assert meta.usage_discrepancies() == []
    return meta.usage


def leftovers(node) -> tuple[list[str], list[bytes]]:
    """Upload files and upload session records the node still has."""
    meta = node.node.meta
    return sorted(node.node.blobs.upload_ids()), [k for k, _ in meta.scan(keys.UPLOAD)]


# -- usage kept on write -----------------------------------------------------------------------


async def test_usage_counts_each_blob_once_and_each_manifest_record_through_pushes_deletes_and_gc(
        node, http, clock, tmp_path):
    image = make_image([3000, 5000], seed=1)
    blob_bytes = sum(len(b) for b in image.blobs)
    assert usage(node) == StorageUsage()
    await push_image(http, node.url, "team/a", image, tag="v1")
    assert usage(node) == StorageUsage(blob_bytes, 3, len(image.manifest), 1)
    # The same image in another repository: its blobs stay counted once, its
    # manifest is a second record (each repository holds its own copy).
    async with http.post(f"{node.url}/v2/team/b/blobs/uploads/",
                         params={"mount": digest_of(image.layers[0]), "from": "team/a"}) as r:
        assert r.status == 201
    await push_image(http, node.url, "team/b", image, tag="v1")
    assert usage(node) == StorageUsage(blob_bytes, 3, 2 * len(image.manifest), 2)
    # A tag moved onto a stored manifest renews its record: nothing more is stored.
    async with http.put(f"{node.url}/v2/team/b/manifests/v2", data=image.manifest,
                        headers={"Content-Type": image.media_type}) as r:
        assert r.status == 201
    assert usage(node) == StorageUsage(blob_bytes, 3, 2 * len(image.manifest), 2)
    for repo in ("team/a", "team/b"):
        async with http.delete(f"{node.url}/v2/{repo}/manifests/{image.digest}") as r:
            assert r.status == 202
    assert usage(node) == StorageUsage(blob_bytes, 3, 0, 0)     # layers wait for GC
    await collect(node, clock)
    assert usage(node) == StorageUsage()

    await push_image(http, node.url, "team/a", image, tag="v1")
    held = usage(node)
    await node.stop()
    # Reopened, the value is read, not summed again; a database without it
    # (written before it was kept) is summed once to the same value.
    meta = MetadataStore(node.config.data_dir / "meta")
    try:
        assert not meta.usage_rebuilt and meta.usage == held
        meta._db.delete(keys.USAGE)
    finally:
        meta.close()
    meta = MetadataStore(node.config.data_dir / "meta")
    try:
        assert meta.usage_rebuilt and meta.usage == held
    finally:
        meta.close()


# -- the storage limit -------------------------------------------------------------------------


async def test_an_upload_that_would_pass_the_limit_is_refused_whole_and_nothing_of_it_is_kept(
        limited, http, clock):
    first = make_image([6000, 6000], seed=2)
    await push_image(http, limited.url, "app", first, tag="v1")
    before = usage(limited)
    big = make_image([9000], seed=3).layers[0]        # fits alone, not beside ``first``
    digest = digest_of(big)
    base = f"{limited.url}/v2/app/blobs/uploads/"

    # Monolithic.
    async with http.post(base, params={"digest": digest}, data=big) as r:
        error = await assert_error(r, 403, "DENIED")
    assert error["message"].startswith("registry storage limit reached")
    assert error["detail"]["limit_bytes"] == LIMIT and error["detail"]["upload_bytes"] > 0
    assert "storage_limit" in error["detail"]["reason"]
    # Two steps: a session, then the whole body with the digest.
    async with http.post(base) as r:
        assert r.status == 202
        location = r.headers["Location"]
    async with http.put(f"{limited.url}{location}", params={"digest": digest}, data=big) as r:
        await assert_error(r, 403, "DENIED")
    async with http.get(f"{limited.url}{location}") as r:     # the session ended with it
        await assert_error(r, 404, "BLOB_UPLOAD_UNKNOWN")
    # Chunked: the chunk that would pass the limit ends the session.
    async with http.post(base) as r:
        location = r.headers["Location"]
    async with http.patch(f"{limited.url}{location}", data=big[:4000],
                          headers={"Content-Range": "0-3999"}) as r:
        assert r.status == 202
    async with http.patch(f"{limited.url}{location}", data=big[4000:],
                          headers={"Content-Range": f"4000-{len(big) - 1}"}) as r:
        await assert_error(r, 403, "DENIED")
    async with http.get(f"{limited.url}{location}") as r:
        await assert_error(r, 404, "BLOB_UPLOAD_UNKNOWN")

    assert usage(limited) == before
    assert limited.node.meta.get(keys.blob(digest)) is None
    assert not limited.node.blobs.path(digest).exists()
    assert leftovers(limited) == ([], [])
    # Reads, tag moves and deletes go on at the limit.
    async with http.get(f"{limited.url}/v2/app/manifests/v1",
                        headers={"Accept": first.media_type}) as r:
        assert r.status == 200 and await r.read() == first.manifest
    async with http.get(f"{limited.url}/v2/app/blobs/{digest_of(first.layers[0])}") as r:
        assert r.status == 200 and await r.read() == first.layers[0]
    async with http.put(f"{limited.url}/v2/app/manifests/stable", data=first.manifest,
                        headers={"Content-Type": first.media_type}) as r:
        assert r.status == 201
    async with http.delete(f"{limited.url}/v2/app/manifests/{first.digest}") as r:
        assert r.status == 202
    # Room again once garbage collection has reclaimed the deleted image's layers.
    async with http.post(base, params={"digest": digest}, data=big) as r:
        await assert_error(r, 403, "DENIED")
    await collect(limited, clock)
    assert usage(limited) == StorageUsage()
    await push_image(http, limited.url, "app", make_image([9000], seed=3), tag="v2")


async def test_a_manifest_that_would_pass_the_limit_is_refused_and_a_full_node_refuses_new_sessions(
        limited, http):
    image = make_image([LIMIT // 2, LIMIT // 2 - 600], seed=4)
    for blob in image.blobs:
        await push_blob(http, limited.url, "app", blob)
    room = LIMIT - usage(limited).bytes
    assert 0 < room < len(image.manifest)
    async with http.put(f"{limited.url}/v2/app/manifests/v1", data=image.manifest,
                        headers={"Content-Type": image.media_type}) as r:
        await assert_error(r, 403, "DENIED")
    async with http.get(f"{limited.url}/v2/app/manifests/v1") as r:
        assert r.status == 404
    assert usage(limited).manifests == 0
    filler = b"x" * room
    await push_blob(http, limited.url, "app", filler)               # exactly to the limit
    assert usage(limited).bytes == LIMIT
    async with http.post(f"{limited.url}/v2/app/blobs/uploads/") as r:
        await assert_error(r, 403, "DENIED")
    # A mount adds nothing: allowed at the limit.
    async with http.post(f"{limited.url}/v2/other/blobs/uploads/",
                         params={"mount": digest_of(filler), "from": "app"}) as r:
        assert r.status == 201


async def test_concurrent_uploads_cannot_pass_the_limit_together(limited, http):
    """Each fits alone, not both: the second is refused while the first, past
    its check, is still moving its file into place (held there by the test),
    as the first holds its room from its check to its record."""
    blobs = [make_image([LIMIT * 2 // 3], seed=s).layers[0] for s in (5, 6)]
    store = limited.node.blobs
    place = store.commit_upload
    in_commit, release = threading.Event(), threading.Event()

    def held_commit(file, digest):      # runs in the node's IO thread
        if digest == digest_of(blobs[0]):
            in_commit.set()
            release.wait()
        return place(file, digest)

    store.commit_upload = held_commit

    async def upload(data: bytes) -> int:
        async with http.post(f"{limited.url}/v2/app/blobs/uploads/",
                             params={"digest": digest_of(data)}, data=data) as r:
            return r.status

    first = asyncio.ensure_future(upload(blobs[0]))
    try:
        await eventually(in_commit.is_set, what="the first upload inside its commit")
        second = await upload(blobs[1])
    finally:
        release.set()
    assert (await first, second) == (201, 403)
    assert usage(limited).bytes <= LIMIT
    assert leftovers(limited) == ([], [])


# -- bodies longer than one pipelined write ----------------------------------------------------

MiB = 1024 * 1024
BIG = 3 * MiB          # three pipelined writes (``registry.PIPELINE_CHUNK``): some land mid-body


@pytest.mark.parametrize("room, status", [(1, 201), (-1, 403)])
async def test_a_body_of_several_pipelined_writes_counts_each_byte_once(tmp_path, http,
                                                                         room, status):
    """The storage check sees the body's real size while earlier pieces are
    written behind it: a limit a byte above it lets it in, a byte below refuses."""
    data = make_image([BIG], seed=7).layers[0]
    running = await start_node(NodeConfig(data_dir=tmp_path / "node", port=0,
                                          storage_limit=len(data) + room))
    try:
        async with http.post(f"{running.url}/v2/app/blobs/uploads/",
                             params={"digest": digest_of(data)}, data=data) as r:
            assert r.status == status, await r.text()
        assert usage(running).bytes == (len(data) if status == 201 else 0)
        assert leftovers(running) == ([], [])
    finally:
        await running.stop()


@pytest.mark.parametrize("ending", ["storage limit", "blob size limit", "client gone"])
async def test_a_body_ended_early_ends_after_its_queued_write_and_leaves_nothing(tmp_path, ending):
    """A body that ends mid-stream (refused for a limit, or its client gone)
    while a piece of it is still being written (slowed by the storage fault)
    is discarded only once that write is done: no write lands on a closed (or
    reused) descriptor, no error is left behind, no upload file is kept."""
    loop = asyncio.get_running_loop()
    unhandled: list[dict] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    data = make_image([BIG], seed=8).layers[0]
    running = await start_node(NodeConfig(
        data_dir=tmp_path / "node", port=0,
        storage_limit=BIG // 2 if ending == "storage limit" else None))
    if ending == "blob size limit":
        running.registry.limits = Limits(max_blob_size=BIG // 2)
    writing_at_discard = watch_discards(running.node.blobs)
    server_log = logging.getLogger("aiohttp.server")
    server_level = server_log.level
    try:
        # Its own session, closed before the node stops: the node would
        # otherwise linger reading the refused body's unread rest (aiohttp's
        # lingering_time) until the stop times out.
        async with aiohttp.ClientSession() as http:
            async with http.put(f"{running.url}/georeg/v1/faults/storage",
                                json={"slow_ms": 300}) as r:
                assert r.status == 200, await r.text()
            if ending == "client gone":
                # aiohttp logs the lost connection with a traceback, which the
                # console renders for seconds on a busy machine: not logged here.
                server_log.setLevel(logging.CRITICAL)
                await send_half_and_hang_up(running, data)
            else:
                async with http.post(f"{running.url}/v2/app/blobs/uploads/",
                                     params={"digest": digest_of(data)}, data=data) as r:
                    if ending == "storage limit":
                        await assert_error(r, 403, "DENIED")
                    else:
                        await assert_error(r, 413, "SIZE_INVALID")
        await eventually(lambda: writing_at_discard, what="the upload discarded")
        assert leftovers(running) == ([], [])
    finally:
        server_log.setLevel(server_level)
        await running.stop()       # waits for the node's IO threads
        try:
            for _ in range(3):     # the threads' results reach their futures
                await asyncio.sleep(0)
            gc.collect()           # a future's unretrieved error is reported when it goes
        finally:
            loop.set_exception_handler(previous)
    assert writing_at_discard == [0]            # no write of it was under way
    assert [c.get("message") for c in unhandled] == []


def watch_discards(store, writing: list[int] | None = None) -> list[int]:
    """How many writes into an upload were under way each time an upload was
    discarded (each upload's ``write`` counted as it runs, in the IO threads,
    into ``writing[0]``)."""
    writing, lock, seen = writing if writing is not None else [0], threading.Lock(), []
    create, discard = store.create_upload, store.discard_upload

    def counted_create(*args, **kwargs):
        file = create(*args, **kwargs)
        write = file.write

        def counted_write(data):
            with lock:
                writing[0] += 1
            try:
                return write(data)
            finally:
                with lock:
                    writing[0] -= 1

        file.write = counted_write
        return file

    def watched_discard(file):
        with lock:
            seen.append(writing[0])
        return discard(file)

    store.create_upload, store.discard_upload = counted_create, watched_discard
    return seen


async def send_half_and_hang_up(running, data: bytes) -> None:
    """A monolithic upload whose client closes its connection halfway through
    the body, once the node has begun to store it."""
    host, port = running.url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /v2/app/blobs/uploads/?digest={digest_of(data)} HTTP/1.1\r\n"
                 f"Host: {host}\r\nContent-Length: {len(data)}\r\n"
                 f"Content-Type: application/octet-stream\r\n\r\n".encode())
    writer.write(data[:len(data) // 2])
    await writer.drain()
    await eventually(lambda: leftovers(running)[0] != [], what="the upload's file")
    writer.close()
    await writer.wait_closed()


async def test_a_body_cancelled_twice_ends_only_once_its_queued_write_has_run(tmp_path):
    """A request cancelled mid-body (a node shutting down) while a piece is
    being written: the cancellation, even repeated, ends the body only once
    that write has run, so whatever discards the upload next finds none."""
    running = await start_node(NodeConfig(data_dir=tmp_path / "node", port=0))
    try:
        store = running.node.blobs
        writing = [0]
        watch_discards(store, writing)
        store.faults.slow_ms = 300
        file = store.create_upload("0b5e1b0e-3c2a-4e4f-9f0a-6c1f0e2d9a77")
        never = asyncio.Event()

        async def body():
            yield b"x" * PIPELINE_CHUNK        # handed to an IO thread at once
            yield b"y"
            await never.wait()

        receiving = asyncio.ensure_future(running.registry.receive(file, body(), None))
        await eventually(lambda: writing[0] == 1, what="the first piece being written")
        receiving.cancel()
        await asyncio.sleep(0)
        receiving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await receiving
        assert writing[0] == 0 and file.size == PIPELINE_CHUNK
        store.faults.slow_ms = 0
        await running.registry.run_blocking(lambda: store.discard_upload(file))
    finally:
        await running.stop()
