"""Anti-entropy fingerprints maintained on write (registry_node.fingerprints).

The invariant: after any commit, the sums stored beside a repository's
registers equal a recomputation from those registers. Driven on a real node
(its Registry for local pushes and deletes, its Replica for what other regions
did, replays of events already applied, deletes of things never there, and
reopening the database) by Hypothesis; and after SIGKILLs of a node process in
the middle of writes, read back from the data dir it left.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
from pathlib import Path

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry_node import fingerprints, hlc, keys, locks
from registry_node.config import NodeConfig
from registry_node.errors import ErrorCode, RegistryError
from registry_node.metastore import Batch, MetadataStore
from registry_node.node import Node
from registry_node.records import ChangeableAttributes, Event, EventKind
from registry_node.reference import Digest
from registry_node.replica import MissingContent, Replica
from replicator.retention import LogRetention

from .helpers import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, descriptor, digest_of, eventually
from .profiles import scaled

REPOS = ("team/app", "web")
TAGS = ("latest", "v1", "v2")
REGIONS = ("westeurope", "brazilsouth", "eastus")
HERE = "eastus"
WALL_MS = 1_700_000_000_000          # the node's wall clock stands still: stamps interleave
CONFIG_BLOB = b'{"architecture":"amd64","os":"linux"}'
LAYER_BLOB = b"a layer"


def manifest_body(i: int) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": descriptor(CONFIG_BLOB, OCI_CONFIG),
                       "layers": [descriptor(LAYER_BLOB, OCI_LAYER)],
                       "annotations": {"n": str(i)}}).encode()


MANIFESTS = [manifest_body(i) for i in range(3)]
DIGESTS = [digest_of(body) for body in MANIFESTS]

repo_i = st.integers(0, len(REPOS) - 1)
manifest_i = st.integers(0, len(MANIFESTS) - 1)
tag_i = st.integers(0, len(TAGS) - 1)
stamp = st.tuples(st.integers(0, 40), st.sampled_from(REGIONS), st.sampled_from(["", "1", "2"]))

operations = st.one_of(
    st.tuples(st.just("push"), repo_i, manifest_i, st.none() | tag_i),
    st.tuples(st.just("delete tag"), repo_i, tag_i),
    st.tuples(st.just("delete manifest"), repo_i, manifest_i),
    st.tuples(st.just("delete repository"), repo_i),
    st.tuples(st.just("remote manifest"), repo_i, manifest_i, stamp),
    st.tuples(st.just("remote tag"), repo_i, tag_i, manifest_i, stamp),
    st.tuples(st.just("remote tag delete"), repo_i, tag_i, manifest_i, stamp),
    st.tuples(st.just("remote manifest delete"), repo_i, manifest_i, stamp),
    st.tuples(st.just("lock"), repo_i, st.integers(0, 2), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("remote lock"), repo_i, st.integers(0, 2), st.integers(0, 2),
              st.booleans(), stamp),
    st.tuples(st.just("replay"), st.integers(0, 1000)),
    st.tuples(st.just("reopen")),
    st.tuples(st.just("collect tombstones")),
)


def remote(kind: EventKind, repo: str, digest: str, at: tuple[int, str, str], tag: str = "") -> Event:
    logical, region, zone = at
    return Event(kind=kind, repository=repo, digest=digest, tag=tag, media_type=OCI_MANIFEST,
                 size=len(MANIFESTS[DIGESTS.index(digest)]), origin_region=region,
                 origin_zone=zone, hlc=hlc.pack(WALL_MS, logical), acked_ns=1)


def assert_maintained(meta: MetadataStore, where: str) -> None:
    """Stored sums equal a recomputation, for every repository, and a fingerprint
    read from them equals one recomputed under every residency filter."""
    for repo in REPOS:
        stored, recomputed = meta.fingerprint_sums(repo), fingerprints.recompute(meta.scan, repo)
        assert stored == recomputed, f"{where}: {repo}: stored {stored} != recomputed {recomputed}"
        for hidden in (None, *REGIONS):
            def visible(region: str, hidden=hidden) -> bool:
                return region != hidden
            assert (fingerprints.visible_fingerprint(stored, visible)
                    == fingerprints.visible_fingerprint(recomputed, visible))
    held = [r for r in REPOS if fingerprints.recompute(meta.scan, r)]
    assert meta.fingerprinted_repositories() == sorted(held), where
    assert meta.fingerprint_discrepancies() == [], where      # the buckets' sums too
    # The tombstone count is kept by commits as well (bounded metadata reads it).
    assert meta.tombstones_held == sum(1 for _ in meta.scan(keys.TOMB)), where


class Subject:
    """One real node, opened and reopened on one data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.config = NodeConfig(data_dir=data_dir, region=HERE, sync=False)
        self.node: Node | None = None
        self.replica: Replica | None = None
        self.applied: list[tuple[str, Event]] = []     # remote events, to replay

    def open(self) -> None:
        self.node = Node.open(self.config, wall_ns=lambda: WALL_MS * 1_000_000)
        self.replica = Replica(self.node.registry, self.node.configuration)

    def close(self) -> None:
        self.node.close()

    async def seed_blobs(self) -> None:
        async def chunks(data: bytes):
            yield data
        for repo in REPOS:
            for blob in (CONFIG_BLOB, LAYER_BLOB):
                await self.node.registry.put_blob(repo, Digest.parse(digest_of(blob)),
                                                  chunks(blob), len(blob))

    def apply(self, kind: str, event: Event) -> None:
        replica = self.replica
        try:
            match kind:
                case "manifest":
                    replica.apply_manifest(event, MANIFESTS[DIGESTS.index(event.digest)])
                case "tag":
                    replica.apply_tag(event)
                case "tag delete":
                    replica.apply_tag_delete(event)
                case "manifest delete":
                    replica.apply_manifest_delete(event)
                case "attributes":
                    replica.apply_attributes(event)
        except MissingContent:
            return   # a tag whose manifest is not here: refused, nothing written
        self.applied.append((kind, event))

    async def run(self, op: tuple) -> None:
        registry = self.node.registry
        match op:
            case ("push", r, m, t):
                try:
                    await registry.put_manifest(REPOS[r], DIGESTS[m] if t is None else TAGS[t],
                                                MANIFESTS[m], OCI_MANIFEST)
                except RegistryError as exc:      # a lock refuses it, and nothing is written
                    assert exc.code is ErrorCode.REGISTRY_DISALLOWED_OPERATION, exc
            case ("lock", r, what, i, value):
                # A repository's, a tag's or a manifest's attributes (registers of their own).
                await _refused_or_done(registry.update_attributes(
                    _target(REPOS[r], what, i), {"writeEnabled": value}))
            case ("remote lock", r, what, i, value, at):
                target = _target(REPOS[r], what, i)
                logical, region, zone = at
                self.apply("attributes", Event(
                    kind=EventKind.ATTRIBUTES_SET, repository=REPOS[r],
                    tag=target.name if target.kind == locks.TAG else "",
                    digest=target.name if target.kind == locks.MANIFEST else "",
                    origin_region=region, origin_zone=zone, hlc=hlc.pack(WALL_MS, logical),
                    acked_ns=1, attributes=ChangeableAttributes(delete_enabled=value,
                                                                list_enabled=not value)))
            case ("delete tag", r, t):
                await _refused_or_done(registry.delete_manifest(REPOS[r], TAGS[t]))
            case ("delete manifest", r, m):
                await _refused_or_done(registry.delete_manifest(REPOS[r], DIGESTS[m]))
            case ("delete repository", r):
                await _refused_or_done(registry.delete_repository(REPOS[r]))
                await self.seed_blobs()     # links go with it; later pushes need them
            case ("remote manifest", r, m, at):
                self.apply("manifest", remote(EventKind.MANIFEST_PUT, REPOS[r], DIGESTS[m], at))
            case ("remote tag", r, t, m, at):
                self.apply("tag", remote(EventKind.TAG_SET, REPOS[r], DIGESTS[m], at, TAGS[t]))
            case ("remote tag delete", r, t, m, at):
                self.apply("tag delete",
                           remote(EventKind.TAG_DELETE, REPOS[r], DIGESTS[m], at, TAGS[t]))
            case ("remote manifest delete", r, m, at):
                self.apply("manifest delete",
                           remote(EventKind.MANIFEST_DELETE, REPOS[r], DIGESTS[m], at))
            case ("replay", i):
                if self.applied:
                    self.apply(*self.applied[i % len(self.applied)])
            case ("reopen",):
                self.close()
                self.open()
            case ("collect tombstones",):
                # No peer to wait for and a clock far past every grace: all of them go.
                await LogRetention(self.node.meta, readers=list, horizon_s=1, grace_s=0,
                                   retain_events=0, interval_s=1,
                                   wall_ns=lambda: (WALL_MS << 2) * 1_000_000).compact()
                assert not self.node.meta.has_prefix(keys.TOMB)


def _target(repo: str, what: int, i: int) -> locks.Target:
    if what == 0:
        return locks.repository(repo)
    return locks.tag(repo, TAGS[i]) if what == 1 else locks.manifest(repo, DIGESTS[i])


async def _refused_or_done(call) -> None:
    try:
        await call
    except RegistryError:
        pass    # deleting what is not there (or is in use) is refused, and writes nothing


@settings(max_examples=scaled(80), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ops=st.lists(operations, max_size=40))
def test_the_maintained_fingerprint_equals_a_recomputation_after_any_writes(ops):
    with tempfile.TemporaryDirectory(prefix="georeg-fp-") as tmp:
        subject = Subject(Path(tmp) / "node")

        async def scenario() -> None:
            subject.open()
            try:
                await subject.seed_blobs()
                for n, op in enumerate(ops):
                    await subject.run(op)
                    assert_maintained(subject.node.meta, f"after step {n}: {op}")
            finally:
                subject.close()

        asyncio.run(scenario())


def test_a_database_without_sums_is_summed_when_opened(tmp_path):
    """A data dir written before fingerprints were kept: opening it sums what it holds."""
    subject = Subject(tmp_path / "node")

    async def fill() -> None:
        subject.open()
        await subject.seed_blobs()
        for i, body in enumerate(MANIFESTS):
            await subject.node.registry.put_manifest(REPOS[i % 2], TAGS[i], body, OCI_MANIFEST)
        await subject.node.registry.delete_manifest(REPOS[0], TAGS[0])
        expected = {r: subject.node.meta.fingerprint_sums(r) for r in REPOS}
        assert all(expected.values())
        # What an older georeg leaves: the registers, and no sums.
        batch = Batch()
        for r in REPOS:
            batch.delete(keys.fingerprint(r))
        batch.delete(keys.FINGERPRINTS)
        subject.node.meta.commit(batch)
        assert not subject.node.meta.fingerprint_sums(REPOS[0])
        subject.close()
        subject.open()
        assert {r: subject.node.meta.fingerprint_sums(r) for r in REPOS} == expected
        subject.close()

    asyncio.run(fill())


# -- crashes ---------------------------------------------------------------------

CRASH_REPOS = ("crash/a", "crash/b", "crash/c")


def offline_problems(data_dir: Path, where: str) -> list[str]:
    """The stopped node's data dir, read directly: sums stored, not rebuilt on
    this open, and equal to a recomputation for every repository and bucket."""
    meta = MetadataStore(data_dir / "meta")
    try:
        if meta.fingerprints_rebuilt:
            return [f"{where}: the data dir had no maintained sums"]
        problems = [f"{where}: {problem}" for problem in meta.fingerprint_discrepancies()]
        if not any(meta.fingerprint_sums(r) for r in CRASH_REPOS):
            problems.append(f"{where}: nothing was written before the kill")
        return problems
    finally:
        meta.close()


async def churn(http: aiohttp.ClientSession, base: str, rng: random.Random,
                acks: list[int]) -> None:
    """Push, re-tag and delete manifests and tags until the node dies."""
    try:
        while True:
            repo = rng.choice(CRASH_REPOS)
            body = manifest_body(rng.randrange(12))
            roll = rng.random()
            if roll < 0.55:
                ref = rng.choice([*TAGS, digest_of(body)])
                async with http.put(f"{base}/v2/{repo}/manifests/{ref}", data=body,
                                    headers={"Content-Type": OCI_MANIFEST}) as r:
                    assert r.status == 201, await r.text()
            else:
                ref = rng.choice([*TAGS, digest_of(body)])
                async with http.delete(f"{base}/v2/{repo}/manifests/{ref}") as r:
                    assert r.status in (202, 404), await r.text()
            acks[0] += 1
    except (TimeoutError, aiohttp.ClientError, ConnectionError):
        return      # the node is gone


async def test_a_kill_9_in_the_middle_of_writes_never_parts_sums_from_registers(node_process):
    """SIGKILL at a random moment of concurrent pushes, re-tags and deletes:
    whatever the WAL kept, the sums beside the registers agree with them."""
    proc = node_process("fingerprints")
    rng = random.Random(2511)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for round_ in range(4):
            for repo in CRASH_REPOS:     # links (again: a round may have deleted them all)
                for blob in (CONFIG_BLOB, LAYER_BLOB):
                    async with http.post(f"{proc.url}/v2/{repo}/blobs/uploads/",
                                         params={"digest": digest_of(blob)}, data=blob) as r:
                        assert r.status == 201, await r.text()
            acks = [0]
            target = rng.randrange(40, 400)
            clients = [asyncio.create_task(churn(http, proc.url, random.Random(rng.random()), acks))
                       for _ in range(4)]
            await eventually(lambda acks=acks, target=target: acks[0] >= target, timeout=60,
                             what=f"{target} acknowledged writes")
            proc.kill()
            await asyncio.gather(*clients)
            problems = offline_problems(proc.data_dir, f"round {round_} (killed after {acks[0]} acks)")
            assert not problems, "\n".join(problems)
            proc.start()
