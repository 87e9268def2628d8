"""A Hypothesis state machine over a real five-node cluster: pushes, re-tags,
deletes, partitions, degraded links, crashes and power cuts, checked against a
model after every step.

The cluster (``InProcessCluster``: real aiohttp and gRPC servers on loopback
sockets, real TCP links between every pair) is eastus with three zones,
westeurope, and brazilsouth (confined by default residency). It runs in one
event loop on a background thread for the whole test; rules submit coroutines
to it and wait for them.

One cluster per example: examples must not leak state into each other (a
crashed zone, a partition, a tombstone or an HLC from the previous example
would make a failure depend on which examples ran before it, and its replay
under shrinking meaningless). Starting five nodes costs ~0.5 s and stopping
them, in parallel, ~1.5 s — small next to the seconds each example spends.

Faults
    Partitions between regions (either way); links between regions, or between
    East US's zones, slowed (latency and jitter), stalled, or resetting
    connections; any node — a zone, westeurope, brazilsouth — killed
    (``crash``: SIGKILL's leftovers) or powered off (``power_cut``: part of its
    WAL's unsynced tail gone too), at most two at a time, and restarted; a
    re-tag racing a delete (of the manifest, or of the tag) across a partition,
    either first or both at once.

The model
    Every write is read back from the writing node's own event log (its stamp:
    HLC, region, zone), so the model knows the exact order in which
    last-writer-wins must resolve competing writes — including writes a 503
    left indefinite. Replaying the writes in stamp order (a tag set points
    the tag and keeps its manifest alive; an untag removes the tag; a manifest
    delete removes the manifest and the tags pointing at it *at that point of
    the order*) gives the state every replica must reach. A write the client
    never saw acknowledged may be lost by a power cut: at quiesce, one that no
    node's log holds any more leaves the model.

Invariants after every step, on every running node
    * no served manifest lacks a blob or child (through the API, and in storage);
    * nothing written in brazilsouth is on a node outside it (API and storage).
After every write
    * a 503 comes only when the zone quorum is really out of reach (fewer than
      two zones up, or the links between them degraded), and one that refuses
      up front ("write quorum unavailable") has logged nothing;
    * a zone that acknowledges a tag write has it (or a newer value) in
      another zone already.
After every restart
    * the restarted node's log runs 1..N without a gap.
After heal and quiesce (every fault healed, every node back)
    * no acknowledged write is missing from every log (none lost by a crash
      or power cut);
    * every replica allowed by residency has the same tags, the same manifests
      and the blobs they need, and that state is the model's.

Brazil's repositories are written only in brazilsouth and the others only
outside it, and the two kinds never share a layer, so "confined content" is
well defined: anything else would be a legitimate copy of unconfined content.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from cluster.faults.verify import NodeTarget, verify
from registry_node import keys, locks
from registry_node.records import EventKind, stamp_of
from replicator.topology import ReplicationSettings

from .helpers import OCI_CONFIG, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, digest_of, eventually
from .profiles import scaled, scaled_steps
from .replication_invariants import (
    Write,
    log_gaps,
    logged_writes,
    replay,
    residency_problems,
    served_manifest_problems,
    start_cluster,
    stop_cluster,
    storage_problems,
    stored_manifests,
    tag_register_stamp,
    writes_since,
)

TOPOLOGY = [("eastus", "1"), ("eastus", "2"), ("eastus", "3"), ("westeurope", ""),
            ("brazilsouth", "")]
ZONES = ["eastus-1", "eastus-2", "eastus-3"]
NODES = [*ZONES, "westeurope", "brazilsouth"]
REGIONS = ["eastus", "westeurope", "brazilsouth"]
# A confirmation later than this is a 503 (indefinite): short, since links
# here may be slowed or stalled on purpose.
SETTINGS = ReplicationSettings(anti_entropy_interval_s=1.0, quorum_timeout_s=3.0)
MAX_DOWN = 2
GLOBAL_REPOS = ["global/app", "global/lib"]
CONFINED_REPOS = ["brazil-only/app"]
TAGS = ["latest", "v1", "v2", "stable"]
STEP_TIMEOUT_S = 60.0
DISALLOWED = "REGISTRY_DISALLOWED_OPERATION"
CONVERGENCE_TIMEOUT_S = 40.0
SOFT_DELETE_POLICY = "/georeg/v1/configuration/registry/default"
# One delete_racing_restore per example: in the ci profile 3 races a run (about
# 4 s of race and verify) against 10 (9 s) at two per example, and neither
# draw meets the anti-entropy bug the rule once found (a soft delete repaired
# as hard from a node without the body) with its fix taken out; in-process tests
# pin that bug (test_replica_rules), and ``make soak`` draws ten times as many.
RACES_PER_EXAMPLE = 1


class LoopThread:
    """One asyncio loop on a background thread, for a synchronous Hypothesis test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="cluster-loop",
                                       daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = STEP_TIMEOUT_S):
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise AssertionError(f"a step took more than {timeout:g}s; what the cluster was "
                                 f"waiting on:\n{self._stacks()}") from None

    def _stacks(self) -> str:
        """Where every task of the loop is waiting (for a step that hangs)."""
        async def dump() -> str:
            out = []
            for task in asyncio.all_tasks():
                if task is asyncio.current_task():
                    continue
                chain, coro = [], task.get_coro()
                while coro is not None and len(chain) < 16:  # follow what each coroutine awaits
                    frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
                    if frame is not None:
                        known = {k: frame.f_locals[k] for k in ("repository", "reference", "peer")
                                 if k in frame.f_locals}
                        known = {k: getattr(v, "name", v) for k, v in known.items()}
                        chain.append(f"{frame.f_code.co_name}:{frame.f_lineno}"
                                     + (f"{known}" if known else ""))
                    coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
                out.append(f"{task.get_name()}: {' > '.join(chain)}")
            return "\n".join(sorted(out))

        try:
            return asyncio.run_coroutine_threadsafe(dump(), self.loop).result(10)
        except Exception as exc:  # the loop itself is stuck: say so
            return f"(no answer from the loop: {exc!r})"

    def close(self) -> None:
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(drain(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@dataclass(frozen=True)
class Image:
    repo: str
    manifest: bytes
    media_type: str
    blobs: tuple[bytes, ...] = ()
    children: tuple[str, ...] = ()        # indexes: child manifest digests

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)


@dataclass
class Model:
    images: dict[str, Image] = field(default_factory=dict)    # by digest
    writes: list[Write] = field(default_factory=list)
    unacknowledged: set[Write] = field(default_factory=set)   # a power cut may lose these
    confined_digests: set[str] = field(default_factory=set)   # manifests and blobs

    def add(self, write: Write, acknowledged: bool) -> None:
        if write not in self.writes:  # two concurrent plans on one node read the same log
            self.writes.append(write)
            if not acknowledged:
                self.unacknowledged.add(write)

    def forget(self, write: Write) -> None:
        self.writes.remove(write)
        self.unacknowledged.discard(write)

    def state(self) -> tuple[dict[tuple[str, str], str], set[tuple[str, str]]]:
        return replay(self.writes)

    def live_indexes(self, repo: str) -> list[Image]:
        _, manifests = self.state()
        return [self.images[d] for r, d in manifests if r == repo and self.images[d].children]


@dataclass(frozen=True)
class Raced:
    """A manifest a restore race wrote (``_restore_race``), and the nodes that
    held it when the race began: each keeps it in its bin if a soft delete wins."""

    repo: str
    digest: str
    holders: set[str]


@dataclass(frozen=True)
class Plan:
    """A client write about to happen on ``node``, and what it logs there;
    ``run`` answers whether every request of it was acknowledged (2xx)."""

    node: str
    repo: str
    kinds: frozenset[EventKind]
    run: Callable[[], Awaitable[bool]]


PUSH_KINDS = frozenset({EventKind.MANIFEST_PUT, EventKind.TAG_SET})
TAG_KINDS = frozenset({EventKind.TAG_SET, EventKind.TAG_DELETE})
WRITE_KINDS = st.sampled_from(["push", "push", "retag", "retag", "index", "untag", "delete",
                               "delete"])
CONFINED = st.sampled_from([False, False, False, True])
# Link trouble short of a cut: (field, value) pairs of ``LinkFaults``.
LINK_TROUBLE = st.sampled_from([
    (("extra_latency_ms", 30.0), ("extra_jitter_ms", 10.0)),
    (("extra_latency_ms", 300.0), ("extra_jitter_ms", 100.0)),
    (("stall", True),),
    (("reset_probability", 0.05),),
    (("reset_probability", 0.5),),
])
# Between two regions, or between East US's zones.
DEGRADABLE = [(a, b) for a in REGIONS for b in REGIONS if a != b] + [("eastus", "eastus")]


def _layer(confined: bool, seed: int, size: int) -> bytes:
    # The prefix keeps confined and unconfined layers apart even when
    # Hypothesis draws the same seed and size for both.
    return (b"br:" if confined else b"gl:") + random.Random(seed).randbytes(size)


def _image(repo: str, layers: list[bytes], confined: bool, nonce: int) -> Image:
    config = json.dumps({"architecture": "amd64", "os": "linux", "confined": confined,
                         "rootfs": {"type": "layers", "diff_ids": [digest_of(x) for x in layers]},
                         "nonce": nonce}).encode()
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
           "layers": [{"mediaType": OCI_LAYER, "digest": digest_of(x), "size": len(x)}
                      for x in layers]}
    return Image(repo, json.dumps(doc).encode(), OCI_MANIFEST, (config, *layers))


def _index(repo: str, children: list[Image]) -> Image:
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX,
           "manifests": [{"mediaType": c.media_type, "digest": c.digest, "size": len(c.manifest),
                          "platform": {"architecture": f"arch{i}", "os": "linux"}}
                         for i, c in enumerate(children)]}
    return Image(repo, json.dumps(doc).encode(), OCI_INDEX, (), tuple(c.digest for c in children))


class ReplicationMachine(RuleBasedStateMachine):
    loop: LoopThread  # set by the test function
    # lock_racing_push over a whole run: applied (True) or met no tag (False).
    locks_tried: dict[bool, int] = {True: 0, False: 0}
    # delete_racing_restore over a whole run: the restore restored (True), or
    # found nothing to restore (False).
    restores_tried: dict[bool, int] = {True: 0, False: 0}
    # Seconds the restore races and the verify after them took over the run.
    restore_cost: dict[str, float] = {"race": 0.0, "verify": 0.0}

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.layers: dict[bool, list[bytes]] = {False: [], True: []}
        self.down: list[str] = []           # crashed or powered off, in that order
        # (repo, tag) a lock was applied to: its origin logged the lock (a PATCH
        # that met no tag there, 404, locked nothing and is not counted).
        self.locked: set[tuple[str, str]] = set()
        self.soft_delete = False            # the policy is on (``_soft_delete_on``)
        self.raced: list[Raced] = []        # manifests restore races wrote (``_bins_agree``)
        self.verified = 0                   # of them, how many a ``georeg verify`` followed
        self.root = Path(tempfile.mkdtemp(prefix="georeg-stateful-"))
        self.cluster = None
        self.http: aiohttp.ClientSession | None = None
        try:
            self.run(self._start())
        except BaseException:
            self._cleanup()
            raise

    # -- plumbing ----------------------------------------------------------------

    def run(self, coro, timeout: float = STEP_TIMEOUT_S):
        return self.loop.run(coro, timeout)

    def on_loop(self, action: Callable[..., None], *args, **kwargs) -> None:
        """Run a synchronous cluster action (a partition, a heal) on the
        cluster's loop: links are that loop's objects, not thread-safe ones."""
        async def call() -> None:
            action(*args, **kwargs)
        self.run(call())

    async def _start(self) -> None:
        self.http = aiohttp.ClientSession(auto_decompress=False,
                                          timeout=aiohttp.ClientTimeout(total=30))
        self.cluster = await start_cluster(self.root, TOPOLOGY, settings=SETTINGS)

    async def _stop(self) -> None:
        if self.http is not None:
            await self.http.close()
        if self.cluster is not None:
            await stop_cluster(self.cluster)

    def _cleanup(self) -> None:
        try:
            self.run(self._stop())
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def teardown(self) -> None:
        try:
            self.run(self._quiesce_and_check(), timeout=CONVERGENCE_TIMEOUT_S + 30)
        finally:
            self._cleanup()

    def node(self, name: str):
        return self.cluster.nodes[name]

    def writers(self, confined: bool) -> list[str]:
        return [n.name for n in self.cluster.running() if (n.region == "brazilsouth") == confined]

    def zone_links_degraded(self) -> bool:
        return any(self.cluster.links[(a, b)].faults.any for a in ZONES for b in ZONES if a != b)

    # -- writes ------------------------------------------------------------------

    async def _request(self, method: str, url: str, **kwargs) -> tuple[int, dict]:
        async with self.http.request(method, url, **kwargs) as r:
            body = await r.read()
            try:
                doc = json.loads(body) if body else {}
            except ValueError:
                doc = {}
            return r.status, doc

    def _refusal_expected(self, name: str, status: int, doc: dict, before: int,
                          repo: str, tags: frozenset[str] | None = frozenset()) -> None:
        """A 503 is acceptable only when the zone quorum really is out of reach,
        a 405 only for a tag of ``repo`` that a lock was applied to, and one of
        ``tags`` (the tags this write would move or remove; None: any, for a
        manifest delete, which removes the tags naming it wherever it is done);
        one refused up front (definite) must have written nothing: no event
        since ``before`` in ``repo`` originated here."""
        node = self.node(name)
        if status == 405:
            error = (doc.get("errors") or [{}])[0]
            reason = str((error.get("detail") or {}).get("reason", ""))
            assert error.get("code") == DISALLOWED and reason.startswith("tag "), (name, doc)
            locked_repo, _, locked_tag = reason.split(" ", 2)[1].rpartition(":")
            assert (locked_repo, locked_tag) in self.locked and locked_repo == repo and (
                tags is None or locked_tag in tags), (
                f"{name} refused a write to {repo} (tags {tags}) for a lock no rule applied "
                f"there: {reason}; locks applied: {sorted(self.locked)}")
            logged = writes_since(node, before, set(EventKind), repo)
            assert not logged, f"{name} refused a write for a lock, yet logged {logged}"
            return
        assert status == 503, (name, status, doc)
        zones_up = [z for z in ZONES if self.node(z).running]
        assert node.zone and (len(zones_up) < 2 or self.zone_links_degraded()), (
            f"{name} answered 503 while zones {zones_up} were running on healthy links: {doc}")
        message = (doc.get("errors") or [{}])[0].get("message")
        if message == "write quorum unavailable":
            logged = writes_since(node, before, set(EventKind), repo)
            assert not logged, f"{name} refused a write up front, yet logged {logged}"
        else:
            assert message == "write not confirmed by a second zone", doc

    async def _write(self, name: str, repo: str, method: str, url: str,
                     ok: tuple[int, ...], tags: frozenset[str] | None = frozenset(),
                     **kwargs) -> tuple[int, dict]:
        """One write request; anything but ``ok`` must be a justified 503, or
        a 405 for a lock on one of ``tags`` (``_refusal_expected``)."""
        before = self.node(name).registry.meta.last_seq
        status, doc = await self._request(method, url, **kwargs)
        if status not in ok:
            self._refusal_expected(name, status, doc, before, repo, tags)
        return status, doc

    async def _push(self, name: str, image: Image, tag: str | None) -> bool:
        """Push like a client does: HEAD each blob, upload what is missing,
        push child manifests, then the manifest. False when refused."""
        node = self.node(name)
        base = f"{node.url}/v2/{image.repo}"
        for _attempt in range(3):
            for child in image.children:
                if not await self._push(name, self.model.images[child], None):
                    return False
            for blob in image.blobs:
                digest = digest_of(blob)
                async with self.http.head(f"{base}/blobs/{digest}") as r:
                    if r.status == 200:
                        continue
                status, _ = await self._write(
                    name, image.repo, "POST", f"{base}/blobs/uploads/", (201,),
                    params={"digest": digest}, data=blob,
                    headers={"Content-Type": "application/octet-stream"})
                if status != 201:
                    return False
            before = node.registry.meta.last_seq
            status, doc = await self._request(
                "PUT", f"{base}/manifests/{tag or image.digest}", data=image.manifest,
                headers={"Content-Type": image.media_type})
            if status == 201:
                return True
            codes = [e.get("code") for e in doc.get("errors", [])]
            if status == 400 and "MANIFEST_BLOB_UNKNOWN" in codes:
                # A blob seen by HEAD was only visible through a manifest that a
                # replicated delete has just removed: upload again, as clients do.
                continue
            self._refusal_expected(name, status, doc, before, image.repo,
                                   frozenset({tag}) if tag else frozenset())
            return False
        raise AssertionError(f"{name}: {image.repo}@{image.digest} kept lacking blobs")

    def _run_writes(self, plans: list[Plan]) -> None:
        """Run the planned writes at once (several: concurrently, as clients in
        different regions would), then record what each node's log says happened."""
        async def one(plan: Plan) -> None:
            node = self.node(plan.node)
            before = node.registry.meta.last_seq
            acknowledged = False
            try:
                acknowledged = await plan.run()
            finally:
                # Whatever the answer (even an indefinite 503), what the log holds happened.
                writes = writes_since(node, before, plan.kinds, plan.repo)
                for write in writes:
                    self.model.add(write, acknowledged)
            if acknowledged and node.zone:
                self._confirmed_by_another_zone(plan.node, writes)

        async def all_of() -> None:
            results = await asyncio.gather(*(one(p) for p in plans), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result

        self.run(all_of())

    def _confirmed_by_another_zone(self, name: str, writes: list[Write]) -> None:
        """A zone acknowledges a write only once another zone holds it: for a tag
        write, that zone's register for the tag carries its stamp or a newer one."""
        others = [self.node(z) for z in ZONES if z != name and self.node(z).running]
        for write in writes:
            if write.kind not in TAG_KINDS:
                continue
            stamps = {o.name: tag_register_stamp(o, write.repo, write.tag) for o in others}
            assert any(s is not None and s >= write.stamp for s in stamps.values()), (
                f"{name} acknowledged {write}, which no other zone holds: {stamps}")

    # -- planning writes ----------------------------------------------------------

    def _plan(self, data, kind: str, confined: bool) -> Plan | None:
        return getattr(self, f"_plan_{kind}")(data, confined)

    @staticmethod
    def _pick(data, items: list, label: str):
        """One of ``items``, or None. Always draws exactly one integer, whatever
        ``items`` holds: what the model holds depends on what the cluster did
        (a delete answered 404, a push lost a race), and Hypothesis needs the
        same draws in the same order when it replays an example."""
        index = data.draw(st.integers(0, 1 << 16), label)
        return items[index % len(items)] if items else None

    def _plan_push(self, data, confined: bool) -> Plan | None:
        repo = data.draw(st.sampled_from(CONFINED_REPOS if confined else GLOBAL_REPOS), "repo")
        name = self._pick(data, self.writers(confined), "node")
        count = data.draw(st.integers(1, 3), "layers")
        layers = []
        for _ in range(3):
            share = data.draw(st.booleans(), "share a layer")
            shared = self._pick(data, self.layers[confined], "shared layer")
            seed = data.draw(st.integers(0, 1 << 16), "seed")
            size = data.draw(st.integers(1, 4096), "size")
            layers.append(shared if share and shared is not None else _layer(confined, seed, size))
        layers = layers[:count]
        image = _image(repo, layers, confined, data.draw(st.integers(0, 3), "nonce"))
        tag = data.draw(st.sampled_from(TAGS), "tag")
        if name is None:
            return None
        self._add_image(image, confined)
        self.layers[confined].extend(x for x in layers if x not in self.layers[confined])
        return Plan(name, repo, PUSH_KINDS, lambda: self._push(name, image, tag))

    def _add_image(self, image: Image, confined: bool) -> None:
        self.model.images[image.digest] = image
        if confined:
            self.model.confined_digests.add(image.digest)
            self.model.confined_digests.update(digest_of(b) for b in image.blobs)

    def _live(self, confined: bool, indexes: bool = True) -> list[Image]:
        _, manifests = self.model.state()
        repos = CONFINED_REPOS if confined else GLOBAL_REPOS
        return sorted((self.model.images[d] for r, d in manifests if r in repos
                       and (indexes or not self.model.images[d].children)),
                      key=lambda i: (i.repo, i.digest))

    def _plan_index(self, data, confined: bool) -> Plan | None:
        candidates = self._live(confined, indexes=False)
        first = self._pick(data, candidates, "child")
        same_repo = [i for i in candidates if first and i.repo == first.repo]
        more = [self._pick(data, same_repo, "another child") for _ in range(2)]
        count = data.draw(st.integers(0, 2), "more children")
        name = self._pick(data, self.writers(confined), "node")
        tag = data.draw(st.sampled_from([*TAGS, None]), "tag")
        if first is None or name is None:
            return None
        children = [first]
        for child in more[:count]:
            if child.digest not in {c.digest for c in children}:
                children.append(child)
        index = _index(first.repo, children)
        self._add_image(index, confined)
        return Plan(name, index.repo, PUSH_KINDS, lambda: self._push(name, index, tag))

    def _plan_retag(self, data, confined: bool) -> Plan | None:
        """Point a tag at a manifest that exists, pushing from any replica."""
        image = self._pick(data, self._live(confined), "image")
        name = self._pick(data, self.writers(confined), "node")
        tag = data.draw(st.sampled_from(TAGS), "tag")
        if image is None or name is None:
            return None
        return Plan(name, image.repo, PUSH_KINDS, lambda: self._push(name, image, tag))

    def _plan_untag(self, data, confined: bool) -> Plan | None:
        tags, _ = self.model.state()
        repos = CONFINED_REPOS if confined else GLOBAL_REPOS
        chosen = self._pick(data, sorted(k for k in tags if k[0] in repos), "tag")
        name = self._pick(data, self.writers(confined), "node")
        if chosen is None or name is None:
            return None
        return self._untag(name, *chosen)

    def _untag(self, name: str, repo: str, tag: str) -> Plan:
        async def untag() -> bool:
            url = f"{self.node(name).url}/v2/{repo}/manifests/{tag}"
            # 404: not there (yet, or any more)
            status, _ = await self._write(name, repo, "DELETE", url, (202, 404),
                                          tags=frozenset({tag}))
            return status != 503

        return Plan(name, repo, frozenset({EventKind.TAG_DELETE}), untag)

    def _plan_delete(self, data, confined: bool) -> Plan | None:
        in_index = {c for repo in [*GLOBAL_REPOS, *CONFINED_REPOS]
                    for i in self.model.live_indexes(repo) for c in i.children}
        candidates = [i for i in self._live(confined) if i.digest not in in_index]
        image = self._pick(data, candidates, "manifest")
        name = self._pick(data, self.writers(confined), "node")
        if image is None or name is None:
            return None
        return self._delete(name, image.repo, image.digest)

    def _delete(self, name: str, repo: str, digest: str) -> Plan:
        async def delete() -> bool:
            url = f"{self.node(name).url}/v2/{repo}/manifests/{digest}"
            # 404: not there yet; 403: an index being deleted elsewhere still holds it here.
            status, _ = await self._write(name, repo, "DELETE", url, (202, 404, 403),
                                          tags=None)
            return status != 503

        # Only the manifest delete is the client's write: the tags it removes
        # follow from the replay, whatever this replica happened to know.
        return Plan(name, repo, frozenset({EventKind.MANIFEST_DELETE}), delete)

    # -- rules: writes ------------------------------------------------------------

    @initialize(data=st.data())
    def first_images(self, data) -> None:
        """Something to re-tag and delete from the first step on."""
        plans = [self._plan_push(data, False), self._plan_push(data, True)]
        self._run_writes([p for p in plans if p is not None])

    @rule(data=st.data(), kind=WRITE_KINDS, confined=CONFINED)
    def write(self, data, kind: str, confined: bool) -> None:
        plan = self._plan(data, kind, confined)
        if plan is not None:
            self._run_writes([plan])

    @rule(data=st.data(), kinds=st.tuples(WRITE_KINDS, WRITE_KINDS))
    def concurrent_writes(self, data, kinds: tuple[str, str]) -> None:
        """Two unconfined writes at once, in two regions: the races that
        last-writer-wins must settle the same way everywhere."""
        plans = [self._plan(data, k, False) for k in kinds]
        plans = [p for p in plans if p is not None]
        if len(plans) == 2 and self.node(plans[0].node).region == self.node(plans[1].node).region:
            plans = plans[:1]
        if plans:
            self._run_writes(plans)

    @rule(data=st.data())
    def retag_racing_delete(self, data) -> None:
        """The coupling of tags to manifests under a race. With the two regions
        cut apart (they stay so until healed, and hear nothing through
        brazilsouth either), a tag is moved to another image — or set again on
        the same one, renewing it — in one region, while in the other, which
        has not heard of the move, the manifest the tag pointed at is deleted
        (or the tag itself): after the re-tag, before it, or both at once.
        Whichever is stamped later wins what both touch, and only that: a
        later delete of the old manifest no longer concerns a moved tag."""
        tags, _ = self.model.state()
        chosen = self._pick(data, sorted((r, t, d) for (r, t), d in tags.items()
                                         if r in GLOBAL_REPOS), "tag")
        repo, tag, old = chosen or ("", "", "")
        target = self._pick(data, [i for i in self._live(False)
                                   if i.repo == repo and i.digest != old], "new target")
        renew = data.draw(st.booleans(), "same image")
        retag_at = self._pick(data, self.writers(False), "retag at")
        delete_at = self._pick(data, [n for n in self.writers(False) if retag_at and
                                      self.node(n).region != self.node(retag_at).region],
                               "delete at")
        erase = data.draw(st.sampled_from(["manifest", "tag"]), "what the other side deletes")
        order = data.draw(st.sampled_from(["re-tag first", "delete first", "at once"]), "order")
        in_index = {c for i in self.model.live_indexes(repo) for c in i.children}
        if chosen is None or delete_at is None or old in in_index:
            return
        if renew or target is None:
            target = self.model.images[old]
        regions = (self.node(retag_at).region, self.node(delete_at).region)
        self.on_loop(self.cluster.partition, *regions)
        # Not even through brazilsouth, which relays whatever is not confined.
        for region in regions:
            self.on_loop(self.cluster.partition, region, "brazilsouth", one_way=True)
        retag = Plan(retag_at, repo, PUSH_KINDS, lambda: self._push(retag_at, target, tag))
        delete = self._delete(delete_at, repo, old) if erase == "manifest" \
            else self._untag(delete_at, repo, tag)
        if order == "at once":
            self._run_writes([retag, delete])
        else:
            for plan in ([retag, delete] if order == "re-tag first" else [delete, retag]):
                self._run_writes([plan])

    def _lock(self, name: str, repo: str, tag: str, outcome: list[bool]) -> Plan:
        """The plan of a write lock on ``repo:tag`` at ``name``; whether its
        origin applied it is appended to ``outcome`` (read on the rule's thread:
        Hypothesis's ``note``/``event`` do not work on the cluster's loop)."""
        async def lock() -> bool:
            node = self.node(name)
            url = f"{node.url}/acr/v1/{repo}/_tags/{tag}"
            before = node.registry.meta.last_seq
            try:
                # 404: the tag has not reached this replica yet (or was deleted here).
                status, _ = await self._write(name, repo, "PATCH", url, (200, 404),
                                              json={"writeEnabled": False})
            finally:
                # Applied is what its log says (an indefinite 503 may have applied it).
                applied = any(w.tag == tag for w in writes_since(
                    node, before, {EventKind.ATTRIBUTES_SET}, repo))
                if applied:
                    self.locked.add((repo, tag))
                outcome.append(applied)
            return status != 503

        return Plan(name, repo, frozenset({EventKind.ATTRIBUTES_SET}), lock)

    @rule(data=st.data())
    def lock_racing_push(self, data) -> None:
        """The race of Azure/acr #592. With two regions cut apart, a tag is
        write-locked in one while, in the other (which has not heard of the
        lock), the same tag is pushed to another image: lock first, push
        first, or both at once. The tag's value goes to whichever write is
        stamped later, as any two writes of it; the lock is a register of its
        own that no push writes, so every replica ends with the lock."""
        tags, _ = self.model.state()
        chosen = self._pick(data, sorted((r, t, d) for (r, t), d in tags.items()
                                         if r in GLOBAL_REPOS), "tag")
        repo, tag, _ = chosen or ("", "", "")
        # A new build pushed by the same tag (what a CI pipeline racing a release lock does).
        seed = data.draw(st.integers(0, 1 << 16), "seed")
        target = _image(repo, [_layer(False, seed, 512)], False, seed) if chosen else None
        lock_at = self._pick(data, self.writers(False), "lock at")
        push_at = self._pick(data, [n for n in self.writers(False) if lock_at and
                                    self.node(n).region != self.node(lock_at).region], "push at")
        order = data.draw(st.sampled_from(["lock first", "push first", "at once"]), "order")
        if chosen is None or target is None or push_at is None:
            return
        self._add_image(target, False)
        regions = (self.node(lock_at).region, self.node(push_at).region)
        self.on_loop(self.cluster.partition, *regions)
        for region in regions:
            self.on_loop(self.cluster.partition, region, "brazilsouth", one_way=True)
        outcome: list[bool] = []
        lock = self._lock(lock_at, repo, tag, outcome)
        push = Plan(push_at, repo, PUSH_KINDS, lambda: self._push(push_at, target, tag))
        if order == "at once":
            self._run_writes([lock, push])
        else:
            for plan in ([lock, push] if order == "lock first" else [push, lock]):
                self._run_writes([plan])
        applied = bool(outcome and outcome[0])
        note(f"lock of {repo}:{tag} at {lock_at}: {'applied' if applied else 'not applied'}; "
             f"locks applied so far: {len(self.locked)}")
        # Over the whole run (printed at its end): a run whose every lock met
        # no tag tested no refusal, and says so.
        ReplicationMachine.locks_tried[applied] += 1

    # -- rules: soft delete --------------------------------------------------------

    async def _soft_delete_on(self) -> None:
        """The soft delete policy on, written at one node and held by every running
        node (so whichever takes a delete from here on keeps it in its bin). Once
        per example: the deletes before it stay hard ones."""
        if self.soft_delete:
            return
        node = min(self.cluster.running(), key=lambda n: bool(n.zone))   # no quorum to wait for
        status, doc = await self._request("PUT", f"{node.url}{SOFT_DELETE_POLICY}",
                                          json={"soft_delete": {"enabled": True, "days": 7}})
        if status == 503:           # East US without its quorum: no policy yet
            return
        assert status == 200, (node.name, status, doc)
        await eventually(lambda: all(n.node.configuration.soft_delete().enabled
                                     for n in self.cluster.running()),
                         timeout=20, what="the soft delete policy on every node")
        self.soft_delete = True

    def _restore(self, name: str, repo: str, reference: str, outcome: list[bool]) -> Plan:
        """The plan of a restore of ``repo@reference`` from the bin at ``name``:
        what it logs is the push and tag sets it amounts to. Whether it restored
        (200) is appended to ``outcome``; 404: the delete it would undo never
        happened there (a 503 refused it up front)."""
        async def restore() -> bool:
            url = f"{self.node(name).url}/acr/v1/{repo}/_deleted/{reference}"
            status, _ = await self._write(name, repo, "POST", url, (200, 404), tags=None)
            outcome.append(status == 200)
            return status != 503

        return Plan(name, repo, PUSH_KINDS, restore)

    def _restore_race(self, data, rival: str) -> None:
        """A fresh image ``M`` is pushed with a tag and reaches every running node
        (every link healed first); then the two writable regions are cut apart
        and, in one, ``M`` is soft-deleted and restored again while the other,
        which has heard of neither, ``rival``s: deletes ``M`` ("delete"), or
        pushes another image by the same tag ("re-push") — before the restore,
        after it, or at once. At the next quiesce (every fault healed) every
        region must hold one answer: the model's (``M`` live with its tags, or
        not), and the bins to match (``_bins_agree``: ``M`` in the bin of every
        node that held it, kept by the winning delete, when that is the last
        write of its register; in no bin otherwise); ``georeg verify`` clean."""
        repo = data.draw(st.sampled_from(GLOBAL_REPOS), "repo")
        tag = self._pick(data, [t for t in TAGS if (repo, t) not in self.locked], "tag")
        seed = data.draw(st.integers(0, 1 << 16), "seed")
        restore_at = self._pick(data, self.writers(False), "restore at")
        rival_at = self._pick(data, [n for n in self.writers(False) if restore_at and
                                     self.node(n).region != self.node(restore_at).region],
                              "rival at")
        order = data.draw(st.sampled_from(["rival first", "restore first", "at once"]), "order")
        if tag is None or rival_at is None:
            return
        image = _image(repo, [_layer(False, seed, 512)], False, seed)
        other = _image(repo, [_layer(False, seed + 1, 512)], False, seed + 1)
        self.heal()                    # every link: the image must reach every node
        self.run(self._soft_delete_on())
        if not self.soft_delete:
            return
        self._add_image(image, False)
        self._run_writes([Plan(restore_at, repo, PUSH_KINDS,
                               lambda: self._push(restore_at, image, tag))])

        def holds(node) -> bool:
            return node.registry.meta.get(keys.manifest(repo, image.digest)) is not None

        with contextlib.suppress(AssertionError):   # a 503 may have left it nowhere
            self.run(eventually(lambda: all(holds(n) for n in self.cluster.running()),
                                timeout=10, what="the image on every node"))
        holders = {n.name for n in self.cluster.running() if holds(n)}
        if restore_at not in holders:
            return
        regions = (self.node(restore_at).region, self.node(rival_at).region)
        self.on_loop(self.cluster.partition, *regions)
        for region in regions:
            self.on_loop(self.cluster.partition, region, "brazilsouth", one_way=True)
        self._run_writes([self._delete(restore_at, repo, image.digest)])
        outcome: list[bool] = []
        restore = self._restore(restore_at, repo, image.digest, outcome)
        if rival == "delete":
            against = self._delete(rival_at, repo, image.digest)
        else:
            self._add_image(other, False)
            against = Plan(rival_at, repo, PUSH_KINDS, lambda: self._push(rival_at, other, tag))
        if order == "at once":
            self._run_writes([restore, against])
        else:
            for plan in ([against, restore] if order == "rival first" else [restore, against]):
                self._run_writes([plan])
        applied = bool(outcome and outcome[0])
        note(f"restore of {repo}@{image.digest} at {restore_at} against a {rival} at "
             f"{rival_at}: {'applied' if applied else 'not applied'}")
        ReplicationMachine.restores_tried[applied] += 1
        # Checked at the next quiesce (``_bins_agree``), when every region has
        # heard of both: a quiesce here would cost seconds per race.
        self.raced.append(Raced(repo, image.digest, holders))

    def _bins_agree(self) -> None:
        """After quiesce, for each manifest a restore race wrote: it is in the
        bin of every node that held it (and has not crashed since), with the
        stamp and tags of one delete, exactly when the model's last write of its
        register is a delete and that delete was a soft one; in no bin
        otherwise. Synchronous: one event-loop step, when called on the loop."""
        problems = []
        for raced in self.raced:
            repo, digest = raced.repo, raced.digest
            writes = sorted((w for w in self.model.writes if w.repo == repo
                             and w.digest == digest and w.kind in (
                                 EventKind.MANIFEST_PUT, EventKind.TAG_SET,
                                 EventKind.MANIFEST_DELETE)),
                            key=lambda w: (w.stamp, w.kind.value, w.tag))
            last = writes[-1] if writes else None
            soft = last is not None and last.kind is EventKind.MANIFEST_DELETE and any(
                e.recycled for n in self.cluster.running()
                for e in n.registry.meta.read_log(0, 1 << 30)
                if e.kind is EventKind.MANIFEST_DELETE and stamp_of(e) == last.stamp)
            bins = {}
            for node in self.cluster.running():
                entry = node.registry.bin.manifest(repo, digest)
                bins[node.name] = None if entry is None else (stamp_of(entry), entry.tags)
            expected = {n for n in bins if n in raced.holders} if soft else set()
            kept = {n for n, e in bins.items() if e is not None}
            if not (expected <= kept <= set(bins) if soft else not kept) or any(
                    bins[n][0] != last.stamp for n in kept) or len({bins[n] for n in kept}) > 1:
                problems.append(f"{repo}@{digest}: last write {last} (soft: {soft}); bins "
                                f"{bins}, nodes that held it {sorted(raced.holders)}")
                for n in self.cluster.running():  # what each node applied of it
                    problems.append(f"  {n.name} log: " + "; ".join(
                        f"#{e.seq} {e.kind.value} {stamp_of(e)} rec={e.recycled} {e.tag}"
                        for e in n.registry.meta.read_log(0, 1 << 30) if e.digest == digest))
        assert not problems, "recycle bins disagree with the model:\n" + "\n".join(problems)

    async def _verify_clean(self) -> None:
        """``georeg verify`` over every running node finds nothing."""
        started = time.monotonic()
        report = await verify([NodeTarget(n.name, n.region, n.url, n.zone, n.data_dir)
                               for n in self.cluster.running()],
                              policy=self.cluster.residency, timeout=30)
        ReplicationMachine.restore_cost["verify"] += time.monotonic() - started
        assert report.error is None and not report.divergences, report.as_dict()

    @precondition(lambda self: len(self.raced) < RACES_PER_EXAMPLE)
    @rule(data=st.data(), rival=st.sampled_from(["delete", "delete", "re-push"]))
    def delete_racing_restore(self, data, rival: str) -> None:
        """Issue 19's race: a soft delete in one region, a restore of the same
        manifest in another that has not heard of it — or a restore racing a
        push of another image by its tag (see ``_restore_race``). Both write the
        same register (the restore as the push it amounts to), so the later
        stamp wins everywhere: live with its tags, or deleted and in every bin.
        At most ``RACES_PER_EXAMPLE`` times per example: a race costs a heal and
        a wait for the image to reach every node, and Hypothesis's swarm
        (which enables a random subset of rules per example) would otherwise
        draw it tens of times in some runs."""
        started = time.monotonic()
        try:
            self._restore_race(data, rival)
        finally:
            ReplicationMachine.restore_cost["race"] += time.monotonic() - started

    # -- rules: faults -----------------------------------------------------------

    @rule(pair=st.sampled_from([(a, b) for a in REGIONS for b in REGIONS if a != b]),
          one_way=st.booleans())
    def partition(self, pair: tuple[str, str], one_way: bool) -> None:
        self.on_loop(self.cluster.partition, *pair, one_way=one_way)

    @rule(pair=st.sampled_from(DEGRADABLE), trouble=LINK_TROUBLE, one_way=st.booleans())
    def degrade(self, pair: tuple[str, str], trouble: tuple, one_way: bool) -> None:
        """Slow, stall or reset the links from one region to another (or
        between East US's zones), on top of whatever else is broken there."""
        self.on_loop(self.cluster.degrade, *pair, one_way=one_way, **dict(trouble))

    @rule()
    def heal(self) -> None:
        zones_were_degraded = self.zone_links_degraded()
        self.on_loop(self.cluster.heal)
        if zones_were_degraded:
            self.run(self._zones_settled())

    @precondition(lambda self: len(self.down) < MAX_DOWN)
    @rule(name=st.sampled_from(NODES), power=st.booleans(), seed=st.integers(0, 1 << 16))
    def crash(self, name: str, power: bool, seed: int) -> None:
        """SIGKILL, or a power cut (which may also lose unsynced WAL bytes)."""
        if name in self.down:
            return
        if power:
            self.run(self.cluster.power_cut(name, random.Random(seed)))
        else:
            self.run(self.cluster.crash(name))
        self.down.append(name)
        for raced in self.raced:      # what it held may be lost (a power cut)
            raced.holders.discard(name)
        if name in ZONES:
            self.run(self._zones_settled())

    @precondition(lambda self: self.down)
    @rule(data=st.data())
    def restart(self, data) -> None:
        name = self._pick(data, self.down, "node")
        self.down.remove(name)
        self._restart(name)

    def _restart(self, name: str) -> None:
        async def restart() -> None:
            node = await self.cluster.restart(name)
            problems = log_gaps(node)
            assert not problems, "\n".join(problems)
            if name in ZONES:
                await self._zones_settled()

        self.run(restart())

    async def _zones_settled(self) -> None:
        """Every running zone sees exactly the other running zones as live
        (quorum) — unless the links between them are degraded on purpose."""
        if self.zone_links_degraded():
            return

        def settled() -> bool:
            up = {z for z in ZONES if self.node(z).running}
            for z in up:
                quorum = self.node(z).replication.quorum
                labels = {f"eastus/{o.split('-')[1]}" for o in up - {z}}
                if quorum is None or quorum.live_peers != labels:
                    return False
            return True

        try:
            await eventually(settled, timeout=20, what="zones to see each other")
        except AssertionError:
            raise AssertionError("zones never saw each other: " + "; ".join(
                f"{z} sees {sorted(self.node(z).replication.quorum.live_peers)}, subscribed "
                + ", ".join(f"{s.peer.name}:{'up' if s.connected else s.last_error or 'down'}"
                            for s in self.node(z).replication.subscriptions
                            if s.peer.name in ZONES)
                for z in ZONES if self.node(z).running)) from None

    @precondition(lambda self: len(self.model.writes) >= 4)
    @rule()
    def heal_and_quiesce(self) -> None:
        self.run(self._quiesce_and_check(), timeout=CONVERGENCE_TIMEOUT_S + 30)

    def _expected_locks(self) -> dict[tuple[str, str], tuple[int, str, str]]:
        """(repo, tag) → the stamp of its newest lock write (every lock write
        here sets writeEnabled false, so the newest is a lock too)."""
        out: dict[tuple[str, str], tuple[int, str, str]] = {}
        for w in self.model.writes:
            if w.kind is EventKind.ATTRIBUTES_SET:
                out[(w.repo, w.tag)] = max(out.get((w.repo, w.tag), w.stamp), w.stamp)
        return out

    def _drop_lost_writes(self) -> None:
        """With every node up, a write no log holds is gone for good: allowed
        only for one its client never saw acknowledged (a power cut took it
        before it was synced or replicated)."""
        logged = set().union(*(logged_writes(n) for n in self.cluster.running()))
        lost = [w for w in self.model.writes if w not in logged]
        acknowledged = [w for w in lost if w not in self.model.unacknowledged]
        assert not acknowledged, f"acknowledged writes lost: {acknowledged}"
        for write in lost:
            self.model.forget(write)

    # -- invariants --------------------------------------------------------------

    @invariant()
    def every_node_consistent_and_resident(self) -> None:
        self.run(self._step_invariants())

    async def _step_invariants(self, probe_manifests: bool = False) -> None:
        running = self.cluster.running()
        problems: list[str] = []
        for node in running:
            problems += storage_problems(node)
        results = await asyncio.gather(*(served_manifest_problems(self.http, n) for n in running))
        for found in results:
            problems += found
        confined = sorted(self.model.confined_digests)
        for node in running:
            if node.region != "brazilsouth":
                problems += await residency_problems(self.http, node, CONFINED_REPOS, confined,
                                                     probe_manifests=probe_manifests)
        assert not problems, "\n".join(problems)

    async def _quiesce_and_check(self) -> None:
        self.cluster.heal()
        while self.down:
            node = await self.cluster.restart(self.down.pop(0))
            problems = log_gaps(node)
            assert not problems, "\n".join(problems)

        def disconnected() -> list[str]:
            return [f"{n.name}→{s.peer.name} ({s.last_error or 'no error'})"
                    for n in self.cluster.running() for s in n.replication.subscriptions
                    if not s.connected and self.node(s.peer.name).running]

        try:
            await eventually(lambda: not disconnected(), timeout=20, what="subscriptions")
        except AssertionError:
            raise AssertionError(f"subscriptions never reconnected: {disconnected()}") from None
        self._drop_lost_writes()
        tags, manifests = self.model.state()
        expected = {}
        for repo in [*GLOBAL_REPOS, *CONFINED_REPOS]:
            expected[repo] = (
                {t: d for (r, t), d in tags.items() if r == repo},
                {d for r, d in manifests if r == repo})

        async def observed(node, repo):
            return await self.cluster.tags(self.http, node, repo), stored_manifests(node, repo)

        last: dict = {}

        async def converged() -> bool:
            last.clear()
            for node in self.cluster.running():
                for repo in GLOBAL_REPOS + (CONFINED_REPOS if node.region == "brazilsouth" else []):
                    last[(node.name, repo)] = await observed(node, repo)
            return all(last[(n, r)] == expected[r] for n, r in last)

        try:
            await eventually(converged, timeout=CONVERGENCE_TIMEOUT_S, interval=0.2,
                             what="every replica to reach the model's state")
        except AssertionError:
            lines = [f"expected {r}: {expected[r]}" for r in expected]
            lines += [f"{n} {r}: {v}" for (n, r), v in sorted(last.items()) if v != expected[r]]
            raise AssertionError("no convergence to the model:\n" + "\n".join(lines)) from None
        expected_locks = self._expected_locks()
        seen: dict = {}

        def locks_converged() -> bool:
            seen.clear()
            for node in self.cluster.running():
                for (repo, tag) in expected_locks:
                    record = node.registry.locks.record(locks.tag(repo, tag))
                    seen[(node.name, repo, tag)] = None if record is None else (
                        stamp_of(record), record.attributes.write_enabled)
            return all(seen[(n, r, t)] == (expected_locks[(r, t)], False) for n, r, t in seen)

        try:
            await eventually(locks_converged, timeout=CONVERGENCE_TIMEOUT_S, interval=0.2,
                             what="every replica to hold every lock")
        except AssertionError:
            raise AssertionError(f"locks not kept everywhere: expected {expected_locks}, "
                                 f"held {seen}") from None
        await self._step_invariants(probe_manifests=True)
        if self.raced:
            self._bins_agree()
            if self.verified < len(self.raced):      # once after each race
                await self._verify_clean()
            self.verified = len(self.raced)


@pytest.mark.hypothesis
def test_replication_state_machine() -> None:
    """16 programs of up to 25 steps in the ``ci`` profile; ``make soak`` (the ``soak``
    profile) runs ten times as many, twice as long."""
    loop = LoopThread()
    ReplicationMachine.loop = loop
    ReplicationMachine.locks_tried = {True: 0, False: 0}
    ReplicationMachine.restores_tried = {True: 0, False: 0}
    ReplicationMachine.restore_cost = {"race": 0.0, "verify": 0.0}
    try:
        run_state_machine_as_test(ReplicationMachine, settings=settings(
            max_examples=scaled(16), stateful_step_count=scaled_steps(25), deadline=None,
            print_blob=True, suppress_health_check=list(HealthCheck)))
    finally:
        loop.close()
        tried = ReplicationMachine.locks_tried
        print(f"lock_racing_push: {tried[True]} locks applied, {tried[False]} met no tag")
        tried = ReplicationMachine.restores_tried
        print(f"delete_racing_restore: {tried[True]} restores applied, "
              f"{tried[False]} found nothing to restore; "
              + ", ".join(f"{s:.1f}s {k}" for k, s in ReplicationMachine.restore_cost.items()))


def test_model_replays_in_stamp_order() -> None:
    """The model itself: a re-tag stamped between a tag set and a delete of its
    old target survives the delete; a re-tag of the deleted manifest after it
    brings it back."""
    m = Model()
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    m.writes = [
        Write((1, "eastus", "1"), EventKind.TAG_SET, "r", a, "t"),
        Write((3, "eastus", "1"), EventKind.MANIFEST_DELETE, "r", a),
        Write((2, "westeurope", ""), EventKind.TAG_SET, "r", b, "t"),
        Write((1, "eastus", "1"), EventKind.TAG_SET, "r", a, "u"),
    ]
    assert m.state() == ({("r", "t"): b}, {("r", b)})
    m.writes.append(Write((4, "westeurope", ""), EventKind.TAG_SET, "r", a, "u"))
    assert m.state() == ({("r", "t"): b, ("r", "u"): a}, {("r", a), ("r", b)})
