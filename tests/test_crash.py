"""Crash safety of a `georeg node` process.

Several concurrent clients push distinct images (blobs monolithic, POST+PUT
and chunked, then manifests with tags) into a child process, which is killed
with SIGKILL at a moment chosen by a seeded trigger: after a random number of
acknowledged writes, in the middle of a large chunk or a large monolithic
body, or while a large upload commits (once the node has read the final PUT
off its socket, seen in ``/proc/net/tcp``). A write counts as acknowledged only
once its final response (201) has arrived.

After each kill, with the node down, the data dir is read directly
(``MetadataStore`` and ``BlobStore``); after the restart, through the API:
  * every acknowledged blob, manifest and tag is there, byte for byte;
  * nothing partial is visible: every manifest of every repository has all its
    blobs, every blob file decrypts to bytes that hash to its digest;
  * the event log runs 1..N without a gap and holds exactly one
    BLOB_PUT / MANIFEST_PUT / TAG_SET for each acknowledged write, and no
    event for anything that is not there;
  * a chunked upload cut by the crash resumes from the offset the node reports.
Each failure message names the round and its seed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import socket
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import aiohttp

from registry_node import keys
from registry_node.blobstore import BlobStore
from registry_node.crypto import SEGMENT_SIZE, NodeKey
from registry_node.metastore import MetadataStore
from registry_node.records import BlobRecord, EventKind, ManifestRecord, TagRecord, decode

from .helpers import (
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    descriptor,
    digest_of,
    eventually,
    start_node,
)

CLIENTS = 4
CHUNK = 512 * 1024
PIECE = 64 * 1024
# (seed, trigger). Triggers: "acks" (after N acknowledged writes), "mid-chunk"
# (inside a large PATCH body), "mid-monolithic" (inside a large POST ?digest=
# body), "commit" (once the node has read the final PUT of a large chunked upload).
# GEOREG_CRASH_SEED shifts every seed, to explore other moments; failures print theirs.
BASE_SEED = int(os.environ.get("GEOREG_CRASH_SEED", "0"))
ROUNDS = [(BASE_SEED + seed, trigger) for seed, trigger in
          [(101, "mid-chunk"), (202, "acks"), (303, "mid-monolithic"), (404, "commit"), (505, "acks")]]
NETWORK_ERRORS = (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError)


@dataclass
class Ledger:
    """What the node acknowledged, and what was attempted, across all rounds."""

    blobs: dict[tuple[str, str], bytes] = field(default_factory=dict)      # (repo, digest)
    manifests: dict[tuple[str, str], tuple[str, bytes]] = field(default_factory=dict)  # (repo, tag)
    attempted_blobs: set[tuple[str, str]] = field(default_factory=set)
    attempted_manifests: set[tuple[str, str]] = field(default_factory=set)
    attempted_tags: set[tuple[str, str, str]] = field(default_factory=set)
    # Chunked uploads cut by a kill: location, the whole blob, bytes acknowledged so far.
    open_uploads: list[tuple[str, str, bytes, int]] = field(default_factory=list)


class Round:
    def __init__(self, seed: int, trigger: str, base: str, ledger: Ledger, number: int) -> None:
        self.rng = random.Random(seed)
        self.seed, self.trigger, self.base, self.ledger, self.number = seed, trigger, base, ledger, number
        self.kill_after_acks = self.rng.randrange(4, 40)
        self.kill_at_piece = self.rng.randrange(1, CHUNK // PIECE)
        self.acks = 0
        self.fire = asyncio.Event()           # time to kill
        self.dead = asyncio.Event()           # the node is gone
        self.large_armed = True               # the next large upload carries the trigger

    def ack(self) -> None:
        self.acks += 1
        if self.trigger == "acks" and self.acks >= self.kill_after_acks:
            self.fire.set()

    def arm(self, trigger: str) -> bool:
        """True once, for the first large upload of a round whose trigger is ``trigger``."""
        if self.trigger == trigger and self.large_armed and not self.fire.is_set():
            self.large_armed = False
            return True
        return False

    async def cut_body(self, data: bytes, armed: bool):
        """A request body streamed in pieces; when armed, the node is killed mid-way."""
        for i, start in enumerate(range(0, len(data), PIECE)):
            if armed and i == self.kill_at_piece:
                self.fire.set()
                await self.dead.wait()
            yield data[start:start + PIECE]


# -- the workload --------------------------------------------------------------


def build_image(rng: random.Random, tag: str) -> tuple[bytes, list[bytes], bytes]:
    sizes = [rng.choice([700, 5_000, 70_000, 150_000]) for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.5:
        sizes.append(rng.randrange(1_500_000, 3_000_000))
    layers = [rng.randbytes(n) for n in sizes]
    config = json.dumps({"architecture": "amd64", "os": "linux", "tag": tag,
                         "nonce": rng.random()}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor(config, OCI_CONFIG),
        "layers": [descriptor(x, OCI_LAYER) for x in layers],
    }).encode()
    return config, layers, manifest


async def push_monolithic(http, rnd: Round, repo: str, data: bytes) -> bool:
    armed = len(data) > CHUNK and rnd.arm("mid-monolithic")
    body = rnd.cut_body(data, armed) if len(data) > CHUNK else data
    async with http.post(f"{rnd.base}/v2/{repo}/blobs/uploads/", params={"digest": digest_of(data)},
                         data=body, headers={"Content-Type": "application/octet-stream"}) as r:
        return r.status == 201


async def push_post_put(http, rnd: Round, repo: str, data: bytes) -> bool:
    async with http.post(f"{rnd.base}/v2/{repo}/blobs/uploads/") as r:
        assert r.status == 202, await r.text()
        location = rnd.base + r.headers["Location"]
    async with http.put(location, params={"digest": digest_of(data)}, data=data,
                        headers={"Content-Type": "application/octet-stream"}) as r:
        return r.status == 201


async def push_chunked(http, rnd: Round, repo: str, data: bytes) -> bool:
    large = len(data) > 2 * CHUNK
    mid_chunk = large and rnd.arm("mid-chunk")
    at_commit = large and not mid_chunk and rnd.arm("commit")
    async with http.post(f"{rnd.base}/v2/{repo}/blobs/uploads/") as r:
        assert r.status == 202, await r.text()
        location = rnd.base + r.headers["Location"]
    entry = [repo, location, data, 0]
    rnd.ledger.open_uploads.append(entry)            # taken out again once committed
    chunks = list(range(0, len(data), CHUNK))
    # A full chunk (not the last, which may be too short to reach the cut).
    cut_chunk = rnd.rng.randrange(1, len(chunks) - 1) if mid_chunk else -1
    for i, start in enumerate(chunks):
        piece = data[start:start + CHUNK]
        body = rnd.cut_body(piece, armed=True) if i == cut_chunk else piece
        async with http.patch(location, data=body, headers={
                "Content-Range": f"{start}-{start + len(piece) - 1}",
                "Content-Type": "application/octet-stream"}) as r:
            assert r.status == 202, await r.text()
            location = rnd.base + r.headers["Location"]
            entry[1], entry[3] = location, start + len(piece)
    if at_commit:
        ok = await _finish_then_kill(rnd, location, data)
    else:
        ok = await _finish(http, location, data)
    rnd.ledger.open_uploads.remove(entry)
    return ok


async def _finish(http, location: str, data: bytes) -> bool:
    async with http.put(location, params={"digest": digest_of(data)}) as r:
        return r.status == 201


async def _finish_then_kill(rnd: Round, location: str, data: bytes) -> bool:
    """The final PUT, on a connection of its own, and the kill once the node
    has read it off the socket: the kill lands in the commit, not before the
    request arrived. (The PUT has no body, so the whole request is one read.)"""
    url = urlsplit(location)     # the node's own Location: a path, no query
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        target = f"{url.path}?{urlencode({'digest': digest_of(data)})}"
        writer.write(f"PUT {target} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                     "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        ours, theirs = writer.get_extra_info("sockname"), writer.get_extra_info("peername")
        await eventually(lambda: read_by_peer(ours, theirs), timeout=30, interval=0.001,
                         what=f"round {rnd.number}: the node reading the commit request")
        rnd.fire.set()
        status = await reader.readline()
        if not status:
            raise ConnectionResetError("the node died before answering")
        return status.split()[1] == b"201"
    finally:
        writer.close()


def read_by_peer(ours: tuple[str, int], theirs: tuple[str, int]) -> bool:
    """Whether the process at the other end of a loopback TCP connection has
    read everything sent to it: the kernel has delivered it (nothing left
    unacknowledged on our side) and the receiving process has taken it out
    of its socket (nothing left in the receive queue on theirs)."""
    queues = tcp_queues()
    sent = queues.get((ours, theirs))
    received = queues.get((theirs, ours))
    return sent is not None and received is not None and sent[0] == 0 and received[1] == 0


def tcp_queues() -> dict[tuple[tuple[str, int], tuple[str, int]], tuple[int, int]]:
    """(local, remote) → (send queue, receive queue) of every IPv4 TCP socket,
    from ``/proc/net/tcp``: bytes not yet acknowledged by the peer, and bytes
    received but not yet read by the process."""
    def address(field: str) -> tuple[str, int]:
        host, port = field.split(":")
        return socket.inet_ntoa(struct.pack("<I", int(host, 16))), int(port, 16)

    out = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            tx, rx = fields[4].split(":")
            out[(address(fields[1]), address(fields[2]))] = (int(tx, 16), int(rx, 16))
    return out


async def client(http: aiohttp.ClientSession, rnd: Round, cid: int) -> None:
    ledger = rnd.ledger
    repo = f"crash/client{cid}"
    methods = [push_monolithic, push_post_put, push_chunked]
    n = 0
    try:
        while not rnd.fire.is_set():
            tag = f"r{rnd.number}-c{cid}-{n}"
            config, layers, manifest = build_image(rnd.rng, tag)
            for blob in [config, *layers]:
                ledger.attempted_blobs.add((repo, digest_of(blob)))
                method = push_chunked if len(blob) > 2 * CHUNK and rnd.rng.random() < 0.6 \
                    else rnd.rng.choice(methods)
                if not await method(http, rnd, repo, blob):
                    raise AssertionError(f"{method.__name__} of {len(blob)} bytes refused")
                ledger.blobs[(repo, digest_of(blob))] = blob
                rnd.ack()
            ledger.attempted_manifests.add((repo, digest_of(manifest)))
            ledger.attempted_tags.add((repo, tag, digest_of(manifest)))
            async with http.put(f"{rnd.base}/v2/{repo}/manifests/{tag}", data=manifest,
                                headers={"Content-Type": OCI_MANIFEST}) as r:
                assert r.status == 201, await r.text()
            ledger.manifests[(repo, tag)] = (digest_of(manifest), manifest)
            rnd.ack()
            n += 1
    except NETWORK_ERRORS:
        if not rnd.fire.is_set():
            raise


async def run_round(proc, rnd: Round) -> None:
    """Run the clients until the trigger fires, then SIGKILL the node."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        clients = [asyncio.create_task(client(http, rnd, cid)) for cid in range(CLIENTS)]
        firing = asyncio.create_task(rnd.fire.wait())
        done, _ = await asyncio.wait([firing, *clients], timeout=60,
                                     return_when=asyncio.FIRST_COMPLETED)
        assert firing in done, f"round {rnd.number} (seed {rnd.seed}): trigger never fired " \
                               f"({[c.exception() for c in clients if c.done()]})"
        proc.kill()
        rnd.dead.set()
        await asyncio.gather(*clients)        # they end on connection errors; others raise


# -- checks ---------------------------------------------------------------------


def check_offline(data_dir: Path, ledger: Ledger, where: str) -> None:
    """Read the stopped node's data dir: log, metadata and blob files agree."""
    meta = MetadataStore(data_dir / "meta")
    try:
        events = []
        while True:
            page = meta.read_log(events[-1].seq if events else 0, 5000)
            if not page:
                break
            events += page
        seqs = [e.seq for e in events]
        assert seqs == list(range(1, len(events) + 1)), f"{where}: log has gaps: {seqs[:50]}"
        assert meta.last_seq == len(events)

        counts = Counter()
        for e in events:
            if e.kind == EventKind.BLOB_PUT:
                counts[("blob", e.repository, e.digest)] += 1
                assert (e.repository, e.digest) in ledger.attempted_blobs, f"{where}: phantom {e}"
            elif e.kind == EventKind.MANIFEST_PUT:
                counts[("manifest", e.repository, e.digest)] += 1
                assert (e.repository, e.digest) in ledger.attempted_manifests, f"{where}: phantom {e}"
            elif e.kind == EventKind.TAG_SET:
                counts[("tag", e.repository, e.tag, e.digest)] += 1
                assert (e.repository, e.tag, e.digest) in ledger.attempted_tags, f"{where}: phantom {e}"
        for repo, digest in ledger.blobs:
            assert counts[("blob", repo, digest)] == 1, f"{where}: BLOB_PUT {repo} {digest}"
        for (repo, tag), (digest, _) in ledger.manifests.items():
            assert counts[("manifest", repo, digest)] == 1, f"{where}: MANIFEST_PUT {repo} {digest}"
            assert counts[("tag", repo, tag, digest)] == 1, f"{where}: TAG_SET {repo}:{tag}"
        # Every event describes something that is there (nothing is deleted here).
        for e in events:
            if e.kind == EventKind.BLOB_PUT:
                assert meta.get(keys.blob_link(e.repository, e.digest)) is not None, f"{where}: {e}"
            elif e.kind == EventKind.MANIFEST_PUT:
                assert meta.get(keys.manifest(e.repository, e.digest)) is not None, f"{where}: {e}"
            elif e.kind == EventKind.TAG_SET:
                raw = meta.get(keys.tag(e.repository, e.tag))
                assert raw is not None and decode(raw, TagRecord).digest == e.digest, f"{where}: {e}"

        store = BlobStore(data_dir, NodeKey.load(data_dir / "node.key"))
        records = {keys.parse(k, keys.BlobKey).digest: decode(v, BlobRecord)
                   for k, v in meta.scan(keys.BLOB)}
        for digest, record in records.items():
            with store.open(digest) as blob:
                assert blob.size == record.size, f"{where}: {digest} size"
                hasher = hashlib.sha256()
                for chunk in blob.chunks(0, blob.size):
                    hasher.update(chunk)
            assert f"sha256:{hasher.hexdigest()}" == digest, f"{where}: {digest} bytes"
        for repo, digest in ledger.blobs:
            assert digest in records and meta.get(keys.blob_link(repo, digest)) is not None, \
                f"{where}: acknowledged blob {repo} {digest} missing"
        # Every manifest of every repository has every blob it names.
        for key, raw in meta.scan(keys.REPO_DATA):
            if not isinstance(stored := keys.parse(key), keys.ManifestKey):
                continue
            repo = stored.repository
            record = decode(raw, ManifestRecord)
            for needed in record.references:
                assert needed in records, f"{where}: manifest in {repo} needs absent {needed}"
                assert meta.get(keys.blob_link(repo, needed)) is not None, f"{where}: {needed} unlinked"
        for (repo, tag), (digest, _) in ledger.manifests.items():
            raw = meta.get(keys.tag(repo, tag))
            assert raw is not None and decode(raw, TagRecord).digest == digest, f"{where}: {repo}:{tag}"
    finally:
        meta.close()


async def check_online(base: str, ledger: Ledger, where: str) -> None:
    async with aiohttp.ClientSession() as http:
        for (repo, digest), data in ledger.blobs.items():
            async with http.get(f"{base}/v2/{repo}/blobs/{digest}") as r:
                assert r.status == 200, f"{where}: {repo} {digest}: {r.status}"
                assert await r.read() == data, f"{where}: {repo} {digest} bytes differ"
        for (repo, tag), (digest, body) in ledger.manifests.items():
            async with http.get(f"{base}/v2/{repo}/manifests/{tag}") as r:
                assert r.status == 200, f"{where}: {repo}:{tag}: {r.status}"
                assert r.headers["Docker-Content-Digest"] == digest
                assert await r.read() == body, f"{where}: {repo}:{tag} body differs"
        # Whatever is visible is whole, acknowledged or not.
        async with http.get(f"{base}/v2/_catalog") as r:
            repos = (await r.json())["repositories"]
        assert {repo for repo, _ in ledger.blobs} <= set(repos)
        for repo in repos:
            async with http.get(f"{base}/v2/{repo}/tags/list") as r:
                tags = (await r.json())["tags"]
            for tag in tags:
                async with http.get(f"{base}/v2/{repo}/manifests/{tag}") as r:
                    assert r.status == 200
                    manifest = json.loads(await r.read())
                for d in [manifest["config"], *manifest["layers"]]:
                    async with http.get(f"{base}/v2/{repo}/blobs/{d['digest']}") as r:
                        assert r.status == 200, f"{where}: {repo}:{tag} lacks {d['digest']}"
                        assert digest_of(await r.read()) == d["digest"]


async def resume_cut_uploads(base: str, ledger: Ledger, where: str) -> int:
    """Finish the chunked uploads the kill interrupted, from the offset the node reports."""
    resumed = 0
    async with aiohttp.ClientSession() as http:
        for repo, location, data, acked in ledger.open_uploads:
            location = base + location[location.index("/v2/"):]   # the port changed
            async with http.get(location) as r:
                status = r.status
                offset = int(r.headers["Range"].split("-")[1]) + 1 \
                    if status == 204 and r.headers["Range"] != "0-0" else 0
            if status == 404:
                # The final PUT was under way: either it committed and only its answer
                # was lost, or the session is gone and, as the spec allows, the client
                # starts over (the node may already hold the sealed file: it keeps it).
                async with http.head(f"{base}/v2/{repo}/blobs/{digest_of(data)}") as h:
                    if h.status != 200:
                        async with http.post(f"{base}/v2/{repo}/blobs/uploads/", data=data,
                                             params={"digest": digest_of(data)}) as p:
                            assert p.status == 201, f"{where}: re-push: {await p.text()}"
                ledger.blobs[(repo, digest_of(data))] = data
                continue
            assert status == 204, f"{where}: upload status {status}"
            # Acknowledged full segments are never rewritten; a partly received chunk
            # may have added more (it is the same data).
            assert acked - acked % SEGMENT_SIZE <= offset <= len(data), (where, acked, offset)
            rest = data[offset:]
            async with http.put(location, params={"digest": digest_of(data)}, data=rest, headers={
                    "Content-Range": f"{offset}-{len(data) - 1}"} if rest else {}) as r:
                assert r.status == 201, f"{where}: resumed upload: {await r.text()}"
            ledger.blobs[(repo, digest_of(data))] = data
            resumed += 1
    ledger.open_uploads.clear()
    return resumed


# -- the tests -------------------------------------------------------------------


async def test_sigkill_at_random_moments_loses_nothing_acknowledged(node_process):
    proc = node_process("crash")
    ledger = Ledger()
    triggers_hit = Counter()
    resumed = 0
    # How much each round gets acknowledged before its trigger fires depends on
    # the machine's speed; rounds of "acks" are added (at most eight) until the
    # ledger is big enough for the checks below to mean something.
    extra = [(BASE_SEED + 606 + k, "acks") for k in range(8)]
    number = 0
    for seed, trigger in ROUNDS + extra:
        if (seed, trigger) in extra and len(ledger.manifests) >= 10 and len(ledger.blobs) >= 30:
            break
        rnd = Round(seed, trigger, proc.url, ledger, number)
        await run_round(proc, rnd)
        triggers_hit[trigger] += 1
        where = f"round {number} (seed {seed}, {trigger}, {rnd.acks} acks)"
        check_offline(proc.data_dir, ledger, where)
        proc.start()
        resumed += await resume_cut_uploads(proc.url, ledger, where)
        await check_online(proc.url, ledger, where)
        number += 1

    # The rounds did what they were meant to.
    assert len(ledger.manifests) >= 10 and len(ledger.blobs) >= 30, (len(ledger.manifests), len(ledger.blobs))
    assert any(len(b) > 2 * CHUNK for b in ledger.blobs.values())
    assert resumed >= 1, "no chunked upload was cut and resumed"

    # A clean stop after all that: exit code 0, and everything still there.
    assert proc.terminate(timeout=10) == 0
    check_offline(proc.data_dir, ledger, "after SIGTERM")
    proc.start()
    await check_online(proc.url, ledger, "after SIGTERM and restart")


async def test_sigterm_stops_cleanly_and_a_restart_keeps_everything(node_process):
    # An hour of grace: a stop that waited on the idle keep-alive connection
    # below would not end within the wait for it.
    proc = node_process("term", "--shutdown-grace", "3600")
    ledger = Ledger()
    rnd = Round(7, "acks", proc.url, ledger, 0)
    rnd.kill_after_acks = 12          # here it only stops the clients after their image
    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(client(http, rnd, cid) for cid in range(2)))
    assert len(ledger.manifests) >= 2
    # An upload left open must survive a clean stop as well; and the client keeps
    # its idle keep-alive connection open while the node stops.
    async with aiohttp.ClientSession() as http:
        data = random.Random(8).randbytes(300_000)
        async with http.post(f"{proc.url}/v2/term/open/blobs/uploads/") as r:
            location = proc.url + r.headers["Location"]
        async with http.patch(location, data=data[:200_000],
                              headers={"Content-Range": "0-199999"}) as r:
            assert r.status == 202
        ledger.open_uploads.append(("term/open", location, data, 200_000))

        code = await asyncio.to_thread(proc.terminate, 60)
        assert code == 0, proc.log_path.read_text()[-2000:]
    check_offline(proc.data_dir, ledger, "after SIGTERM")
    proc.start()
    assert await resume_cut_uploads(proc.url, ledger, "after SIGTERM") == 1
    await check_online(proc.url, ledger, "after SIGTERM and restart")


async def test_an_upload_sealed_but_not_yet_moved_into_place_is_dropped_not_a_500(node_config, http):
    """The narrowest window of a commit: the upload file is sealed and synced, and
    the process dies before the rename. Recreated exactly by sealing the file of an
    open session while the node is stopped."""
    data = random.Random(9).randbytes(200_000)
    running = await start_node(node_config)
    try:
        async with http.post(f"{running.url}/v2/sealed/app/blobs/uploads/") as r:
            path = r.headers["Location"]
        async with http.patch(running.url + path, data=data,
                              headers={"Content-Range": f"0-{len(data) - 1}"}) as r:
            assert r.status == 202
    finally:
        await running.stop()
    upload_id = path.rsplit("/", 1)[1]
    store = BlobStore(node_config.data_dir, NodeKey.load(node_config.key_path))
    upload = store.resume_upload(upload_id)
    upload.seal(digest_of(data))
    upload.close()

    running = await start_node(node_config)
    try:
        async with http.get(running.url + path) as r:
            assert r.status == 404, await r.text()
            assert (await r.json())["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
        assert not store.upload_path(upload_id).exists()
        async with http.put(running.url + path, params={"digest": digest_of(data)}) as r:
            assert r.status == 404
        # The client starts over, and that works.
        async with http.post(f"{running.url}/v2/sealed/app/blobs/uploads/", data=data,
                             params={"digest": digest_of(data)}) as r:
            assert r.status == 201, await r.text()
        async with http.get(f"{running.url}/v2/sealed/app/blobs/{digest_of(data)}") as r:
            assert await r.read() == data
    finally:
        await running.stop()
