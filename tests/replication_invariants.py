"""Invariants of a replicated cluster, checked on running nodes of an
``InProcessCluster``, shared by the replication test files.

Each check returns a list of human-readable problems (empty: the invariant
holds), so a test can gather them from every node and fail with all of them.

* ``served_manifest_problems`` — through the HTTP API: every manifest a node
  stores is served, and every blob and child manifest it names is served too,
  with the right digest. A miss is confirmed (manifest still served, blob still
  missing) before it counts, since replication keeps running during the check.
* ``storage_problems`` — the same invariant straight from storage, in one
  event-loop step (so atomically with respect to every merge); and the
  anti-entropy sums kept beside each repository's registers equal a
  recomputation from them (``registry_node.fingerprints``).
* ``residency_problems`` — nothing of a confined region reaches another node:
  not in the API, not as a metadata key, an event, a blob record or file, or a
  partial transfer.
* ``disk_leaks`` — a whole data dir walked for confined names and digests:
  every metadata key and value, and every file under ``blobs/``.

Also: images to push, starting and stopping clusters robustly, a replay
model of last-writer-wins (``replay``), and reading ``/metrics``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from registry_node import keys
from registry_node.records import (
    EventKind,
    ManifestRecord,
    TagRecord,
    Tombstone,
    decode,
    stamp_of,
)

from .helpers import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, Image, digest_of
from .replication_harness import InProcessCluster

INDEX_TYPES = frozenset({"application/vnd.oci.image.index.v1+json",
                         "application/vnd.docker.distribution.manifest.list.v2+json"})


def stored_manifests(node, repo: str) -> set[str]:
    """Digests of the manifests ``node`` stores in ``repo`` (straight from storage)."""
    return {keys.parse(k, keys.ManifestKey).digest
            for k, _ in node.registry.meta.scan(keys.manifest_prefix(repo))}


def stored_repositories(node) -> set[str]:
    return {keys.parse(k, keys.RepoKey).repository for k, _ in node.registry.meta.scan(keys.REPO)}


def references_of(body: bytes) -> tuple[list[str], list[str]]:
    """(blobs, child manifests) a manifest body names."""
    doc = json.loads(body)
    if doc.get("mediaType") in INDEX_TYPES or "manifests" in doc:
        return [], [m["digest"] for m in doc.get("manifests", [])]
    blobs = [doc["config"]["digest"]] if "config" in doc else []
    blobs += [layer["digest"] for layer in doc.get("layers", [])]
    return blobs, []


async def _status(http: aiohttp.ClientSession, url: str,
                  timeout: float | None = None) -> tuple[int, bytes, str]:
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        return r.status, await r.read(), r.headers.get("Docker-Content-Digest", "")


# A manifest deleted (by replication) between listing and GET makes the node ask
# its peers before answering 404 (bounded staleness), and a peer behind a cut
# link answers only at its RPC deadline; such a manifest is simply not served.
MANIFEST_GET_TIMEOUT_S = 3.0


async def _bounded(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes, str]:
    try:
        return await _status(http, url, MANIFEST_GET_TIMEOUT_S)
    except TimeoutError:
        return 0, b"", ""


async def _served_manifest(http: aiohttp.ClientSession, node, repo: str, reference: str
                           ) -> tuple[int, bytes, str]:
    return await _bounded(http, f"{node.url}/v2/{repo}/manifests/{reference}")


async def served_manifest_problems(http: aiohttp.ClientSession, node) -> list[str]:
    """GET every manifest of every repository in the catalog, then GET every
    blob and child manifest it names: all must be served with the right digest."""
    problems: list[str] = []
    async with http.get(f"{node.url}/v2/_catalog") as r:
        if r.status != 200:
            return [f"{node.name}: catalog answered {r.status}"]
        repos = (await r.json())["repositories"]
    for repo in repos:
        digests = set(stored_manifests(node, repo))
        async with http.get(f"{node.url}/v2/{repo}/tags/list") as r:
            if r.status == 200:
                for tag in (await r.json())["tags"]:
                    status, _, digest = await _served_manifest(http, node, repo, tag)
                    if status == 200:
                        digests.add(digest)
        for digest in sorted(digests):
            problems += await _manifest_complete(http, node, repo, digest)
    return problems


async def _manifest_complete(http: aiohttp.ClientSession, node, repo: str, digest: str) -> list[str]:
    status, body, _ = await _served_manifest(http, node, repo, digest)
    if status != 200:
        return []  # not served (deleted meanwhile): nothing to be incomplete
    if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
        return [f"{node.name}: {repo}@{digest} served bytes with another digest"]
    blobs, children = references_of(body)
    problems = []
    for kind, ref in [("blob", b) for b in blobs] + [("manifest", c) for c in children]:
        url = f"{node.url}/v2/{repo}/{'blobs' if kind == 'blob' else 'manifests'}/{ref}"
        status, data, header = await _bounded(http, url)
        ok = status == 200 and header == ref and (
            kind == "manifest" or "sha256:" + hashlib.sha256(data).hexdigest() == ref)
        if ok:
            continue
        # Confirm: the parent still served, the reference still not.
        again, _, _ = await _served_manifest(http, node, repo, digest)
        status2, data2, header2 = await _bounded(http, url)
        still_bad = not (status2 == 200 and header2 == ref and (
            kind == "manifest" or "sha256:" + hashlib.sha256(data2).hexdigest() == ref))
        if again == 200 and still_bad:
            problems.append(f"{node.name}: {repo}@{digest} is served but its {kind} {ref} "
                            f"answers {status2}")
    return problems


def storage_problems(node) -> list[str]:
    """Every stored manifest has its blobs (record, file, visible in the
    repository) and its child manifests. Synchronous: one event-loop step."""
    registry = node.registry
    meta = registry.meta
    problems = []
    for repo in stored_repositories(node):
        for key, raw in meta.scan(keys.manifest_prefix(repo)):
            digest = keys.parse(key, keys.ManifestKey).digest
            record = decode(raw, ManifestRecord)
            for ref in record.references:
                if meta.get(keys.manifest(repo, ref)) is not None:
                    continue  # a child manifest, present
                if meta.get(keys.blob(ref)) is None or not registry.blobs.exists(ref) \
                        or not registry.blob_visible(repo, ref):
                    problems.append(f"{node.name}: {repo}@{digest} stored without {ref}")
    return problems + fingerprint_problems(node)


def fingerprint_problems(node) -> list[str]:
    """Every repository's and every bucket's maintained sums equal a
    recomputation from the registers, and nothing without registers keeps any."""
    return [f"{node.name}: fingerprint {problem}"
            for problem in node.registry.meta.fingerprint_discrepancies()]


async def residency_problems(http: aiohttp.ClientSession, node, confined_repos: Iterable[str],
                             confined_digests: Iterable[str], *,
                             probe_manifests: bool = True, through_api: bool = True) -> list[str]:
    """Nothing of ``confined_repos``/``confined_digests`` on ``node``, which is
    outside the confined region: checked through the API and in storage.

    A GET or HEAD of a manifest a node lacks makes it ask its peers first
    (bounded staleness) — which is worth checking too (a peer must refuse) but
    takes seconds while links are cut; ``probe_manifests=False`` skips it.
    ``through_api=False`` checks storage only (keys, records, files, the log)."""
    confined_repos, confined_digests = set(confined_repos), set(confined_digests)
    problems = []
    if through_api:
        problems += await _residency_api_problems(http, node, confined_repos, confined_digests,
                                                  probe_manifests)
    return problems + _residency_storage_problems(node, confined_repos, confined_digests)


async def _residency_api_problems(http: aiohttp.ClientSession, node, confined_repos: set[str],
                                  confined_digests: set[str], probe_manifests: bool) -> list[str]:
    problems = []
    async with http.get(f"{node.url}/v2/_catalog") as r:
        leaked = confined_repos & set((await r.json())["repositories"])
        if leaked:
            problems.append(f"{node.name}: catalog lists confined {sorted(leaked)}")
    for repo in sorted(confined_repos):
        async with http.get(f"{node.url}/v2/{repo}/tags/list") as r:
            if r.status != 404:
                problems.append(f"{node.name}: /v2/{repo}/tags/list answered {r.status}")
        for digest in sorted(confined_digests):
            for kind in ("manifests", "blobs") if probe_manifests else ("blobs",):
                async with http.head(f"{node.url}/v2/{repo}/{kind}/{digest}") as r:
                    if r.status != 404:
                        problems.append(f"{node.name}: HEAD {repo}/{kind}/{digest} → {r.status}")
    return problems


def _residency_storage_problems(node, confined_repos: set[str],
                                confined_digests: set[str]) -> list[str]:
    meta = node.registry.meta
    problems = []
    for repo in sorted(confined_repos):
        for prefix in (keys.repo_prefix(repo), keys.tomb_prefix(repo), keys.repo(repo)):
            if meta.has_prefix(prefix):
                problems.append(f"{node.name}: metadata under {prefix!r}")
    for digest in sorted(confined_digests):
        if meta.get(keys.blob(digest)) is not None:
            problems.append(f"{node.name}: blob record for confined {digest}")
        if meta.get(keys.transfer(digest)) is not None:
            problems.append(f"{node.name}: inbound transfer of confined {digest}")
        if node.registry.blobs.exists(digest):
            problems.append(f"{node.name}: blob file for confined {digest}")
        if meta.has_prefix(keys.ref_prefix(digest)) or meta.has_prefix(keys.blob_users_prefix(digest)):
            problems.append(f"{node.name}: reference keys for confined {digest}")
    for event in meta.read_log(0, 1 << 30):
        if event.repository in confined_repos or event.digest in confined_digests:
            problems.append(f"{node.name}: event {event.kind} {event.repository} {event.digest}")
    return problems


def disk_leaks(node, confined_repos: Iterable[str], confined_digests: Iterable[str]) -> list[str]:
    """Walk a running node's whole data dir: every metadata key and value (the
    log, records, cursors, failures, transfers) and every file under ``blobs/``
    and ``uploads/`` must be free of the confined names and digests."""
    needles = {r.encode() for r in confined_repos}
    hexes = {d.split(":", 1)[1] for d in confined_digests}
    needles |= {h.encode() for h in hexes}
    problems = []
    for key, value in node.registry.meta.scan(b""):
        for needle in needles:
            if needle in key or needle in value:
                problems.append(f"{node.name}: metadata {key[:60]!r} mentions {needle[:16]!r}")
    for root, _, files in os.walk(Path(node.data_dir) / "blobs"):
        for name in files:
            if name in hexes:
                problems.append(f"{node.name}: blob file {Path(root) / name}")
    return problems


# -- content --------------------------------------------------------------------


def layered_image(rng: random.Random, confined: bool, layers: int = 2,
                  layer_size: tuple[int, int] = (1, 6000)) -> Image:
    """An image of random layers. Confined and unconfined layers differ in their
    first bytes, so no unconfined image can share a confined region's layer."""
    mark = b"br:" if confined else b"gl:"
    blobs = [mark + rng.randbytes(rng.randint(*layer_size)) for _ in range(layers)]
    config = json.dumps({"os": "linux", "architecture": "amd64", "confined": confined,
                         "nonce": rng.random(),
                         "rootfs": {"type": "layers", "diff_ids": [digest_of(b) for b in blobs]}}
                        ).encode()
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
           "layers": [{"mediaType": OCI_LAYER, "digest": digest_of(b), "size": len(b)}
                      for b in blobs]}
    return Image(config, blobs, json.dumps(doc).encode())


def big_image(seed: int, size: int) -> tuple[Image, bytes]:
    """An image with one layer of ``size`` random bytes; returns it and the layer."""
    image = layered_image(random.Random(seed), False, 1, (size - 3, size - 3))
    return image, image.layers[0]


# -- clusters -------------------------------------------------------------------


async def start_cluster(root: Path, topology, **kwargs) -> InProcessCluster:
    """Start an ``InProcessCluster`` and wait until every subscription is up.

    The harness picks gRPC ports by binding port 0 and letting go of the
    socket, so another process (or one of the cluster's own link proxies,
    which also take ephemeral ports) can take one before its node binds it:
    then start again on fresh ports."""
    for attempt in range(3):
        cluster = InProcessCluster(Path(root) / f"cluster{attempt}", topology, **kwargs)
        try:
            await cluster.start()
            await cluster.wait_ready(timeout=30)
            return cluster
        except RuntimeError as exc:
            await stop_cluster(cluster)
            if "bind" not in str(exc) or attempt == 2:
                raise
    raise AssertionError("unreachable")


async def stop_cluster(cluster: InProcessCluster) -> None:
    """Stop every node at once (each takes about a second), then the links."""
    await cluster.close()


# -- a model of last-writer-wins ----------------------------------------------------


@dataclass(frozen=True)
class Write:
    """One client write, as its origin's log recorded it (with its stamp)."""

    stamp: tuple[int, str, str]
    kind: EventKind
    repo: str
    digest: str = ""
    tag: str = ""


def writes_since(node, after_seq: int, kinds: Iterable[EventKind], repo: str) -> list[Write]:
    """The writes ``node`` originated (not merely applied) after ``after_seq``."""
    kinds = set(kinds)
    out = []
    for event in node.registry.meta.read_log(after_seq, 1 << 20):
        if (event.origin_region, event.origin_zone) != (node.region, node.zone):
            continue
        if event.kind in kinds and event.repository == repo:
            out.append(Write(stamp_of(event), event.kind, repo, event.digest, event.tag))
    return out


def logged_writes(node) -> set[Write]:
    """Every write ``node``'s log holds, originated there or applied."""
    return {Write(stamp_of(e), e.kind, e.repository, e.digest, e.tag)
            for e in node.registry.meta.read_log(0, 1 << 30)}


def log_gaps(node) -> list[str]:
    """A node's own log runs 1..last_seq without a gap (after any crash too)."""
    seqs = [e.seq for e in node.registry.meta.read_log(0, 1 << 30)]
    if seqs != list(range(1, len(seqs) + 1)) or node.registry.meta.last_seq != len(seqs):
        return [f"{node.name}: log {seqs[:5]}…{seqs[-5:]} (last_seq "
                f"{node.registry.meta.last_seq}) has gaps"]
    return []


def tag_register_stamp(node, repo: str, tag: str) -> tuple[int, str, str] | None:
    """The stamp of ``repo:tag``'s register on ``node``: its value's, or its tombstone's."""
    raw = node.registry.meta.get(keys.tag(repo, tag))
    if raw is not None:
        return stamp_of(decode(raw, TagRecord))
    tomb = node.registry.meta.get(keys.tag_tomb(repo, tag))
    return stamp_of(decode(tomb, Tombstone)) if tomb is not None else None


def replay(writes: Iterable[Write]) -> tuple[dict[tuple[str, str], str], set[tuple[str, str]]]:
    """The state every replica must reach: the writes applied one after the
    other in stamp order. A tag set points its tag (and keeps its manifest
    alive); an untag removes the tag; a manifest delete removes the manifest
    and the tags that point at it *at that point of the order*.
    Returns ((repo, tag) → digest, {(repo, digest) of live manifests})."""
    tags: dict[tuple[str, str], str] = {}
    manifests: set[tuple[str, str]] = set()
    for w in sorted(set(writes), key=lambda w: (w.stamp, w.kind.value, w.tag, w.digest)):
        if w.kind is EventKind.MANIFEST_PUT:
            manifests.add((w.repo, w.digest))
        elif w.kind is EventKind.TAG_SET:
            tags[(w.repo, w.tag)] = w.digest
            manifests.add((w.repo, w.digest))
        elif w.kind is EventKind.TAG_DELETE:
            tags.pop((w.repo, w.tag), None)
        elif w.kind is EventKind.MANIFEST_DELETE:
            manifests.discard((w.repo, w.digest))
            for key, digest in list(tags.items()):
                if key[0] == w.repo and digest == w.digest:
                    del tags[key]
    return tags, manifests


# -- metrics ------------------------------------------------------------------------


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Samples of one metric in Prometheus text format: (labels, value)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out.append((dict(sample.labels), sample.value))
    return out


def metric_sum(text: str, name: str, **labels: str) -> float:
    return sum(v for got, v in metric_samples(text, name)
               if all(got.get(k) == want for k, want in labels.items()))


async def metrics_text(http: aiohttp.ClientSession, node) -> str:
    async with http.get(f"{node.url}/metrics") as r:
        assert r.status == 200, r.status
        return await r.text()
