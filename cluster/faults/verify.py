"""``georeg verify``: is the cluster converged, complete and resident?

It looks at every live replica from outside, through its HTTP API and its
data dir, and names every divergence it finds:

* **Registers** — tags and manifests are last-writer-wins registers (deletes
  are tombstones). For every node, the write it should hold is the newest
  write, on any checked node, whose origin region residency lets into the
  node's region; what it holds must be that write (a tag's digest, a
  manifest's presence). Changeable attributes (locks) are registers too: every
  node holds, for the repository and each tag and manifest, the newest set
  residency lets reach it (a node without one where another has one
  diverges). Recycle bins too (soft delete): an entry is the state of its
  register, so it must match the node's tombstone and the entry of every
  other node holding the same delete, and nodes holding the same manifest
  delete agree on whether it was soft. A manifest that a present index of
  the node needs is kept whatever its deletes say, as replication keeps it.
  Unreferenced blob
  links are not compared: each node's garbage collector reclaims them on its
  own schedule. Blobs are compared through the manifests that need them.
* **Served and stored agree** — the catalog, each tags list, each tag's
  resolution and each referrers listing served by the OCI API match what the
  node stores (its inventory, ``GET /georeg/v1/inventory``), as its locks
  have them served: a list-disabled repository or tag is left out of its
  listing, and a read-disabled one answers ``405`` (its bytes are then
  checked no further).
* **Completeness** — every manifest a node stores is served byte-exact, and
  every blob it names answers ``HEAD`` with 200 and the descriptor's size,
  every child manifest is stored and answers 200; every tag points at a
  stored manifest. A blob record without its file is a divergence too.
* **Residency** — no node holds a register whose origin region may not reach
  its region; and on disk (blob files named by digest, and every key and log
  event of the metadata database, opened read-only beside the running node),
  no digest or repository that only content confined elsewhere explains.

* **Bit rot** — what each node found rotten and did about it
  (``GET /georeg/v1/blobs/repairs``, ``registry_node.blob_repair``): repaired
  blobs are reported, not divergent; a blob whose rotten file was quarantined
  and that no replica residency allows could replace is a ``rot``
  divergence, with the node's reason. With ``scrub``, each node first reads
  and authenticates its blobs (bounded, ``POST /georeg/v1/blobs/scrub``),
  repairing what fails, so rot no client has met yet is found too.

Nodes that are down, or stop answering during the check, are reported as
not checked, never as divergent; fewer than two checked replica nodes make the
whole check inconclusive (exit code 2). Paired-region copies (storage-only
nodes, ``copy_of``) are checked for completeness and residency but are not
compared as replicas. Verify reads only, and asks a node only for what it
stores, so bounded staleness never fetches anything on its behalf and hides
a gap. It is a snapshot: run it on a quiet cluster (scenario runs end with
it), as writes in flight show up as divergences.

The result, ``VerifyReport``, is JSON-serialisable (``as_dict``): the CLI
(``georeg verify``), the management API (``GET /georeg/v1/verify``),
``Cluster.verify`` and ``RunningCluster.verify`` all hand it out.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import json
import ssl
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from registry_node import hlc, keys
from registry_node import inventory as inventories
from registry_node.errors import RegistryError
from registry_node.manifest import MANIFEST_ACCEPT
from registry_node.manifest import parse as parse_manifest
from registry_node.records import (
    CONFIG_KINDS,
    Event,
    EventKind,
    TagRecord,
    Tombstone,
    TombstoneCandidate,
    UploadRecord,
    decode,
)
from replicator.residency import ResidencyPolicy

REQUESTS_PER_NODE = 16
DISALLOWED = 405       # what a node answers a read of content its locks forbid
DISK_OPEN_ATTEMPTS = 5


# -- what verify looks at, and what it says --------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeTarget:
    """One node to check: where its API answers and where its data lives."""

    name: str
    region: str
    url: str
    zone: str = ""
    data_dir: Path | None = None
    healthy: bool = True
    reason: str = ""
    copy_of: str = ""      # a paired-region copy (storage only): not compared as a replica


@dataclass(frozen=True, slots=True)
class Divergence:
    """One thing that is not as it should be, on one node.

    kind: ``tag`` | ``manifest`` | ``attributes`` (a register differs from
    the write it should hold) | ``recycle bin`` (an entry that is not its
    register's soft delete, or differs from another node's of the same one) | ``served`` (the API disagrees with storage) | ``incomplete`` (a
    served manifest lacks something it names) | ``storage`` (a blob record
    without its file) | ``rot`` (a blob file that failed authentication, quarantined,
    and no allowed replica could replace) | ``residency`` (data outside the
    regions it may be in).
    """

    kind: str
    node: str
    region: str
    repository: str
    detail: str
    tag: str | None = None
    digest: str | None = None
    expected: object = None
    actual: object = None
    source: str | None = None      # the node whose state sets the expectation
    location: str | None = None    # residency on disk: the file or key

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class VerifyReport:
    checked: list[str] = field(default_factory=list)
    not_checked: list[dict] = field(default_factory=list)   # {"node", "region", "reason"}
    divergences: list[Divergence] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None         # why the check is inconclusive
    counts: dict[str, dict[str, int]] = field(default_factory=dict)   # per checked node
    # Per checked node: bit rot repaired, unrepairable, quarantined (and the scrub's pass).
    repairs: dict[str, dict] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def status(self) -> str:
        if self.error:
            return "unverifiable"
        return "divergent" if self.divergences else "clean"

    @property
    def ok(self) -> bool:
        return self.status == "clean"

    @property
    def exit_code(self) -> int:
        return {"clean": 0, "divergent": 1}.get(self.status, 2)

    def as_dict(self) -> dict:
        return {
            "status": self.status, "ok": self.ok, "error": self.error,
            "checked": self.checked, "not_checked": self.not_checked,
            "divergences": [d.as_dict() for d in self.divergences],
            "notes": self.notes, "counts": self.counts, "repairs": self.repairs,
            "elapsed_s": round(self.elapsed_s, 3),
        }


# -- entry point ------------------------------------------------------------------------


def targets_from_status(status: dict) -> list[NodeTarget]:
    """Targets from the management API's ``GET /georeg/v1/cluster`` (a node on a
    host of its own, ``host``, has its data dir there: none to read here)."""
    nodes = [{**n, "copy_of": ""} for n in status["nodes"]]
    nodes += [{**n, "copy_of": n["keeps"]} for n in status.get("paired_copies") or ()]
    return [NodeTarget(n["name"], n["region"], n["http"], n.get("zone") or "",
                       Path(n["data_dir"]) if n.get("data_dir") and not n.get("host") else None,
                       bool(n["healthy"]),
                       "" if n["healthy"] else down_reason(n.get("health", ""), n.get("reason")),
                       n["copy_of"])
            for n in nodes]


def down_reason(state: str, reason: str | None) -> str:
    return f"down ({state}{': ' + reason if reason else ''})"


async def verify(nodes: Iterable[NodeTarget], *, policy: ResidencyPolicy | None = None,
                 timeout: float = 60.0, disk: bool = True,
                 headers: dict[str, str] | None = None,
                 tls: ssl.SSLContext | None = None, scrub: bool = False) -> VerifyReport:
    """Check every live replica against the others (see the module docstring).

    ``nodes``: what to check (``Cluster.verify_targets`` for a cluster in this
    process, ``targets_from_status`` for one behind a management API);
    ``policy``: the cluster's residency policy (default: Azure's). ``disk``:
    also walk the data dirs the targets name. ``headers``: what every request to a
    node carries (the internal credential of a cluster with auth); ``tls``: what
    verifies nodes' certificates on a TLS cluster (the CA's context); ``scrub``:
    have every node read and authenticate its blobs first. Never raises for what it finds;
    an inconclusive check is a report whose ``error`` says why."""
    started = time.monotonic()
    targets = list(nodes)
    policy = policy or ResidencyPolicy()
    report = VerifyReport()
    try:
        async with asyncio.timeout(timeout):
            await _verify(targets, policy, disk, report, headers or {}, tls, scrub)
    except TimeoutError:
        report.error = f"the check did not finish within {timeout:g}s (raise --timeout)"
    report.elapsed_s = time.monotonic() - started
    return report


async def _verify(targets: list[NodeTarget], policy: ResidencyPolicy, disk: bool,
                  report: VerifyReport, headers: dict[str, str],
                  tls: ssl.SSLContext | None = None, scrub: bool = False) -> None:
    live = [t for t in targets if t.healthy]
    for t in targets:
        if not t.healthy:
            report.not_checked.append({"node": t.name, "region": t.region,
                                       "reason": t.reason or "down"})
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False, headers=headers,
                                     connector=aiohttp.TCPConnector(ssl=tls or True)) as http:
        results = await asyncio.gather(*(_collect(http, t, scrub) for t in live),
                                       return_exceptions=True)
    snapshots: list[Snapshot] = []
    for target, result in zip(live, results, strict=True):
        if isinstance(result, Snapshot):
            snapshots.append(result)
        elif isinstance(result, (aiohttp.ClientError, OSError, _Unreachable, TimeoutError,
                                 ValueError)):
            report.not_checked.append({"node": target.name, "region": target.region,
                                       "reason": f"did not answer: {_describe(result)}"})
        else:
            raise result
    report.checked = [s.target.name for s in snapshots]
    replicas = [s for s in snapshots if not s.target.copy_of]
    if len(replicas) < 2:
        names = ", ".join(s.name for s in replicas) or "none"
        report.error = (f"only {len(replicas)} replica node(s) could be checked ({names}); "
                        f"comparing replicas needs at least two")
    for s in snapshots:
        report.divergences += s.problems
        report.counts[s.target.name] = s.counts
        if s.repairs:
            report.repairs[s.target.name] = s.repairs
    report.divergences += compare_registers(replicas, policy)
    report.divergences += register_residency(snapshots, policy)
    if disk:
        await _check_disks(targets, snapshots, policy, report)
    regions = {t.region for t in targets if not t.copy_of}
    for region in sorted(regions):
        if not any(s.target.region == region for s in snapshots):
            report.notes.append(f"no node of {region} was checked: content written there is "
                                "compared and residency-checked only as far as other "
                                "replicas hold it")
    report.divergences.sort(key=lambda d: (d.kind, d.repository, d.tag or "", d.digest or "",
                                           d.node, d.location or ""))


async def _check_disks(targets: list[NodeTarget], snapshots: list[Snapshot],
                       policy: ResidencyPolicy, report: VerifyReport) -> None:
    """Residency on the disks of checked nodes. Down nodes' data dirs are read
    too, but only to learn what they hold (what is confined where), never judged."""
    checked = {s.name: s for s in snapshots}
    for s in snapshots:
        if s.target.data_dir is None:
            report.notes.append(f"{s.name}: no data dir to read here (none given, or on "
                                f"another host); residency on disk not checked")
    readable = [t for t in targets if t.data_dir is not None
                and (t.name in checked or (t.data_dir / "meta").is_dir())]
    found = await asyncio.gather(*(asyncio.to_thread(read_disk, t.data_dir) for t in readable),
                                 return_exceptions=True)
    views: dict[str, DiskView] = {}
    for t, view in zip(readable, found, strict=True):
        if not isinstance(view, BaseException):
            views[t.name] = view
        elif t.name in checked:
            report.notes.append(f"{t.name}: data dir {t.data_dir} unreadable "
                                f"({_describe(view)}); residency on disk not checked")
    reference = [s.inventory for s in snapshots]
    reference += [views[t.name].inventory() for t in readable
                  if t.name in views and t.name not in checked]
    for name, s in checked.items():
        if name in views:
            report.divergences += disk_residency(s, views[name], reference, policy)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


# -- one node, through its HTTP API ---------------------------------------------------------


class _Unreachable(Exception):
    pass


@dataclass
class Snapshot:
    """What one node stores (its inventory) and what checking its API found."""

    target: NodeTarget
    inventory: dict
    problems: list[Divergence] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    repairs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def region(self) -> str:
        return self.target.region

    def repo(self, name: str) -> dict:
        return self.inventory["repositories"].get(name) or {}

    def problem(self, kind: str, repository: str, detail: str, **fields) -> None:
        self.problems.append(Divergence(kind, self.name, self.region, repository, detail, **fields))


class _Node:
    """HTTP to one node, at most ``REQUESTS_PER_NODE`` requests at a time."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url.rstrip("/")
        self.gate = asyncio.Semaphore(REQUESTS_PER_NODE)

    async def get(self, path: str, *, head: bool = False,
                  headers: dict | None = None) -> tuple[int, bytes, dict]:
        async with self.gate:
            method = self.http.head if head else self.http.get
            async with method(self.url + path, headers=headers, allow_redirects=False) as r:
                return r.status, await r.read(), dict(r.headers)

    async def post(self, path: str) -> dict | None:
        """POST ``{}`` to ``path``; its JSON answer, or None if it has no such route."""
        async with self.gate, self.http.post(self.url + path, json={}) as r:
            if r.status == 404:
                return None
            if r.status != 200:
                raise _Unreachable(f"POST {path} answered {r.status}")
            return await r.json()

    async def listing(self, path: str, field_name: str) -> list[str] | None:
        """A paginated OCI listing (``Link: rel="next"``); None on 404."""
        items: list[str] = []
        while path:
            status, body, headers = await self.get(path)
            if status == 404:
                return None
            if status != 200:
                raise _Unreachable(f"GET {path} answered {status}")
            items += json.loads(body).get(field_name) or []
            link = headers.get("Link", "")
            path = link.split(";", 1)[0].strip().strip("<>") if 'rel="next"' in link else ""
        return items


async def _collect(http: aiohttp.ClientSession, target: NodeTarget,
                   scrub: bool = False) -> Snapshot:
    node = _Node(http, target.url)
    scrubbed = await node.post("/georeg/v1/blobs/scrub") if scrub else None
    status, body, _ = await node.get("/georeg/v1/inventory")
    if status != 200:
        raise _Unreachable(f"GET /georeg/v1/inventory answered {status}")
    snap = Snapshot(target, json.loads(body))
    catalog = await node.listing("/v2/_catalog", "repositories") or []
    listed = [r for r in snap.inventory["catalog"] if _enabled(snap, r, "repository", "list")]
    if sorted(catalog) != sorted(listed):
        served, stored = set(catalog), set(listed)
        for repo in sorted(served ^ stored):
            snap.problem("served", repo, "the catalog " + ("lists a repository the node does not "
                         "store" if repo in served else "omits a repository the node stores"),
                         expected=repo in stored, actual=repo in served)
    repos = sorted(set(catalog) | set(snap.inventory["repositories"]))
    await asyncio.gather(*(_check_repository(node, snap, repo) for repo in repos))
    blobs, files = snap.inventory["blobs"], set(snap.inventory["blob_files"])
    rotten = await _collect_repairs(node, snap, scrubbed, files)
    for digest in sorted(set(blobs) - files):
        if digest in rotten:
            snap.problem("rot", "", f"the blob's file failed authentication and was "
                         f"quarantined; not repaired: {rotten[digest]}",
                         digest=digest, expected="file", actual="quarantined")
        else:
            snap.problem("storage", "", "the node has a record of this blob but no file for it",
                         digest=digest, expected="file", actual="missing")
    inv = snap.inventory["repositories"]
    # What the node stores, counted from its records as its storage usage is
    # (``registry_node.usage``, ``georeg registry show-usage``): each blob once,
    # each repository's manifest record, in plaintext bytes.
    snap.counts = {
        "repositories": len(snap.inventory["catalog"]),
        "tags": sum(len(r["tags"]) for r in inv.values()),
        "manifests": sum(len(r["manifests"]) for r in inv.values()),
        "blobs": len(blobs), "blob_files": len(files),
        "blob_bytes": sum(blobs.values()),
        "manifest_bytes": sum(m["size"] for r in inv.values() for m in r["manifests"].values()),
        "recycled_bytes": sum(m["size"] for r in inv.values()
                              for m in r.get("recycled_manifests", {}).values()),
    }
    return snap


async def _collect_repairs(node: _Node, snap: Snapshot, scrubbed: dict | None,
                           files: set[str]) -> dict[str, str]:
    """What the node found rotten and did about it, into ``snap.repairs``;
    returns the digests whose file is still missing after it, with why."""
    status, body, _ = await node.get("/georeg/v1/blobs/repairs")
    if status != 200:
        return {}
    found = json.loads(body)
    open_ = {r["digest"]: r.get("detail") or r["state"]
             for r in found["unrepairable"] + found["failed"] + found["repairing"]}
    for q in found["quarantine"]:
        if not q["blob_file_back"]:
            open_.setdefault(q["digest"], "quarantined before the node's last start")
    open_ = {d: why for d, why in open_.items() if d not in files}
    if found["repaired"] or open_ or found["quarantine"] or scrubbed:
        snap.repairs = {"repaired": [{k: r[k] for k in ("digest", "source") if k in r}
                                     for r in found["repaired"]],
                        "unrepairable": [{"digest": d, "reason": why} for d, why in open_.items()],
                        "quarantined": len(found["quarantine"]), "totals": found["totals"]}
        if scrubbed:
            snap.repairs["scrub"] = {k: scrubbed[k] for k in ("checked", "bytes", "complete")}
    return open_


async def _check_repository(node: _Node, snap: Snapshot, repo: str) -> None:
    stored = snap.repo(repo)
    stored_tags = {t: v for t, v in stored.get("tags", {}).items()
                   if _enabled(snap, repo, f"tag:{t}", "list")}
    served_tags = await node.listing(f"/v2/{repo}/tags/list", "tags") or []
    manifests = stored.get("manifests", {})
    for tag in sorted(set(served_tags) | set(stored_tags)):
        expected = stored_tags[tag]["digest"] if tag in stored_tags else None
        if tag not in served_tags:
            snap.problem("served", repo, "the tags list omits a tag the node stores", tag=tag,
                         expected=expected, actual=None)
            continue
        if expected is not None and expected not in manifests:
            # Resolving it would make the node fetch the manifest from a peer.
            snap.problem("incomplete", repo, "the tag points at a manifest the node does not "
                         "store", tag=tag, digest=expected, expected="present", actual="absent")
            continue
        # Only tags the node lists are resolved: asking for others would make it
        # fetch them from a peer.
        status, _, headers = await node.get(f"/v2/{repo}/manifests/{tag}", head=True,
                                            headers={"Accept": MANIFEST_ACCEPT})
        if not _readable(snap, repo, f"tag:{tag}") or (
                expected and not _readable(snap, repo, f"manifest:{expected}")):
            if status != DISALLOWED:
                snap.problem("served", repo, f"a read-disabled tag answers HEAD with {status}",
                             tag=tag, expected=DISALLOWED, actual=status)
            continue
        actual = headers.get("Docker-Content-Digest") if status == 200 else None
        if actual != expected:
            snap.problem("served", repo, f"the tag resolves (HEAD: {status}) to something "
                         "other than what the node stores", tag=tag, expected=expected,
                         actual=actual)
    await asyncio.gather(*(_check_manifest(node, snap, repo, d, manifests) for d in manifests))
    subjects = sorted({m["subject"] for m in manifests.values() if m.get("subject")})
    for subject in subjects:
        status, body, _ = await node.get(f"/v2/{repo}/referrers/{subject}")
        listed = {m["digest"] for m in json.loads(body).get("manifests", [])} \
            if status == 200 else set()
        wanted = {d for d, m in manifests.items() if m.get("subject") == subject}
        if listed != wanted:
            snap.problem("served", repo, f"the referrers listing (status {status}) differs from "
                         "the referrers the node stores", digest=subject,
                         expected=sorted(wanted), actual=sorted(listed))


async def _check_manifest(node: _Node, snap: Snapshot, repo: str, digest: str,
                          stored: dict[str, dict]) -> None:
    record = stored[digest]
    status, body, headers = await node.get(f"/v2/{repo}/manifests/{digest}",
                                           headers={"Accept": MANIFEST_ACCEPT})
    if not _readable(snap, repo, f"manifest:{digest}"):
        if status != DISALLOWED:
            snap.problem("served", repo, f"a read-disabled manifest answers GET with {status}",
                         digest=digest, expected=DISALLOWED, actual=status)
        return
    if status != 200:
        snap.problem("incomplete", repo, f"a stored manifest is not served (GET: {status})",
                     digest=digest, expected=200, actual=status)
        return
    algorithm, _, _ = digest.partition(":")
    served = f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"
    if served != digest:
        snap.problem("incomplete", repo, "the manifest is served with bytes of another digest",
                     digest=digest, expected=digest, actual=served)
        return
    try:
        parsed = parse_manifest(body, headers.get("Content-Type"))
        sizes = _descriptor_sizes(json.loads(body))
    except (RegistryError, ValueError) as exc:
        snap.problem("incomplete", repo, f"the served manifest does not parse: {exc}",
                     digest=digest)
        return
    checks = [_check_blob(node, snap, repo, digest, b, sizes.get(b)) for b in parsed.blobs]
    for child in parsed.children:
        if child not in stored:
            snap.problem("incomplete", repo, f"the manifest names child manifest {child}, which "
                         "the node does not store", digest=digest, expected=child, actual=None)
        else:
            checks.append(_check_child(node, snap, repo, digest, child, sizes.get(child)))
    await asyncio.gather(*checks)
    if list(parsed.references) != record["references"]:
        snap.problem("served", repo, "the served manifest names other references than the "
                     "node stores for it", digest=digest, expected=record["references"],
                     actual=list(parsed.references))


async def _check_blob(node: _Node, snap: Snapshot, repo: str, manifest: str, blob: str,
                      size: int | None) -> None:
    status, _, headers = await node.get(f"/v2/{repo}/blobs/{blob}", head=True)
    length = int(headers.get("Content-Length", -1)) if status == 200 else None
    if status != 200:
        snap.problem("incomplete", repo, f"manifest {manifest} is served but its blob {blob} "
                     f"answers HEAD with {status}", digest=manifest, expected=200, actual=status)
    elif size is not None and length != size:
        snap.problem("incomplete", repo, f"blob {blob} of manifest {manifest} has the wrong size",
                     digest=manifest, expected=size, actual=length)


async def _check_child(node: _Node, snap: Snapshot, repo: str, manifest: str, child: str,
                       size: int | None) -> None:
    status, _, headers = await node.get(f"/v2/{repo}/manifests/{child}", head=True,
                                        headers={"Accept": MANIFEST_ACCEPT})
    length = int(headers.get("Content-Length", -1)) if status == 200 else None
    if status == DISALLOWED and not _readable(snap, repo, f"manifest:{child}"):
        return      # read-disabled: stored (checked by the caller), and not served
    if status != 200:
        snap.problem("incomplete", repo, f"index {manifest} is served but its child {child} "
                     f"answers HEAD with {status}", digest=manifest, expected=200, actual=status)
    elif size is not None and length != size:
        snap.problem("incomplete", repo, f"child {child} of index {manifest} has the wrong size",
                     digest=manifest, expected=size, actual=length)


def _enabled(snap: Snapshot, repo: str, name: str, what: str) -> bool:
    """Whether the attributes register ``name`` of ``repo`` (``repository``,
    ``tag:<tag>``, ``manifest:<digest>``) leaves ``what`` enabled on the node."""
    entry = snap.repo(repo).get("attributes", {}).get(name)
    return entry is None or entry["attributes"][f"{what}Enabled"]


def _readable(snap: Snapshot, repo: str, name: str) -> bool:
    """Whether the node serves the tag or manifest ``name`` (its repository's
    read lock and its own)."""
    return _enabled(snap, repo, "repository", "read") and _enabled(snap, repo, name, "read")


def _descriptor_sizes(doc: dict) -> dict[str, int]:
    descriptors = [doc.get("config"), *(doc.get("layers") or []), *(doc.get("manifests") or [])]
    return {d["digest"]: d["size"] for d in descriptors
            if isinstance(d, dict) and isinstance(d.get("size"), int)}


# -- across replicas ---------------------------------------------------------------------


Stamp = tuple[int, str, str]


@dataclass(frozen=True, slots=True, eq=False)
class _Write:
    """A register's value on one node: ``value`` None for a delete."""

    node: Snapshot
    stamp: Stamp
    value: str | None
    region: str            # the origin region residency judges it by


def compare_registers(snapshots: list[Snapshot], policy: ResidencyPolicy) -> list[Divergence]:
    """Every node holds, for each tag and manifest, the newest write residency lets reach it."""
    out: list[Divergence] = []
    repos = sorted({r for s in snapshots for r in s.inventory["repositories"]})
    for repo in repos:
        tags = sorted({t for s in snapshots for part in ("tags", "deleted_tags")
                       for t in s.repo(repo).get(part, {})})
        for tag in tags:
            writes = {}
            for s in snapshots:
                live, dead = s.repo(repo).get("tags", {}).get(tag), \
                    s.repo(repo).get("deleted_tags", {}).get(tag)
                if live is not None:
                    stamp = _stamp(live)
                    writes[s.name] = _Write(s, stamp, live["digest"], stamp[1])
                elif dead is not None:
                    stamp = _stamp(dead)
                    writes[s.name] = _Write(s, stamp, None, stamp[1])
            for s in snapshots:
                held, winner = _expectation(s, repo, writes, policy)
                if winner is not None and winner.value != held:
                    out.append(Divergence(
                        "tag", s.name, s.region, repo, _tag_detail(winner, held), tag=tag,
                        expected=winner.value, actual=held, source=winner.node.name))
        digests = sorted({d for s in snapshots for part in ("manifests", "deleted_manifests")
                          for d in s.repo(repo).get(part, {})})
        for digest in digests:
            writes = {}
            for s in snapshots:
                live = s.repo(repo).get("manifests", {}).get(digest)
                dead = s.repo(repo).get("deleted_manifests", {}).get(digest)
                if live is not None:
                    # Judged by where it was pushed and, when a tag there renewed it,
                    # where it was renewed: a confined region's tag keeps it there
                    # against an older delete (retention's), and never leaves.
                    stamp = _stamp(live)
                    region = stamp[1] if policy.confined(stamp[1], repo) else live["pushed_region"]
                    writes[s.name] = _Write(s, stamp, digest, region)
                elif dead is not None:
                    stamp = _stamp(dead)
                    writes[s.name] = _Write(s, stamp, None, stamp[1])
            for s in snapshots:
                held, winner = _expectation(s, repo, writes, policy)
                if winner is None or winner.value == held:
                    continue
                if held is not None and (_needed_by_index(s, repo, digest)
                                         or _delete_locked(s, repo, digest)):
                    # An index here needs it, or a lock here kept it from retention's
                    # delete (``Replica.apply_manifest_delete``): kept, rightly.
                    continue
                out.append(Divergence(
                    "manifest", s.name, s.region, repo, _manifest_detail(winner, held),
                    digest=digest, expected="present" if winner.value else "absent",
                    actual="present" if held else "absent", source=winner.node.name))
        out += _compare_attributes(snapshots, policy, repo)
        out += compare_bins(snapshots, policy, repo)
    return out


_BIN_PARTS = (("recycled_manifests", "deleted_manifests", "manifest"),
              ("recycled_tags", "deleted_tags", "tag"))


def compare_bins(snapshots: list[Snapshot], policy: ResidencyPolicy,
                 repo: str) -> list[Divergence]:
    """The recycle bins of ``repo`` (``registry_node.recycle_bin``). An entry
    is the state of its register: a node holds one only while the register's
    write there is the soft delete the entry records (same stamp), and every
    node that holds that write holds the same entry — a tag's always, a
    manifest's where the node has one (a node that never held the body keeps
    none, a documented gap; the registers' comparison above already makes
    every node hold the same delete, and its tombstone says whether it was
    soft: nodes holding the same one must agree on that)."""
    out: list[Divergence] = []
    tombs = sorted({d for s in snapshots for d in s.repo(repo).get("deleted_manifests", {})})
    for digest in tombs:
        held = {s.name: s.repo(repo).get("deleted_manifests", {}).get(digest) for s in snapshots}
        for s in snapshots:
            mine = held[s.name]
            if mine is None:
                continue
            for other, theirs in held.items():
                if theirs is not None and _stamp(theirs) == _stamp(mine) and \
                        _softness(theirs) != _softness(mine):
                    out.append(_bin_divergence(
                        s, repo, "manifest", digest, f"holds the same delete as {other}, "
                        "which says otherwise whether it was soft", _softness(theirs),
                        _softness(mine), other))
                    break
    for bin_part, tomb_part, what in _BIN_PARTS:
        names = sorted({n for s in snapshots for n in s.repo(repo).get(bin_part, {})})
        for name in names:
            entries = {s.name: s.repo(repo).get(bin_part, {}).get(name) for s in snapshots}
            for s in snapshots:
                entry = entries[s.name]
                tomb = s.repo(repo).get(tomb_part, {}).get(name)
                if entry is not None and (tomb is None or _stamp(tomb) != _stamp(entry)):
                    out.append(_bin_divergence(
                        s, repo, what, name, "holds a recycle bin entry of a delete that is "
                        "not the register's write here", entry, tomb, None))
                    continue
                if tomb is None:
                    continue
                due = [(n, e) for n, e in entries.items() if e is not None and n != s.name
                       and _stamp(e) == _stamp(tomb)
                       and policy.allows(_stamp(e)[1], repo, s.region)]
                if not due or (entry is None and what == "manifest"):
                    continue
                source, expected = due[0]
                if entry != expected:
                    out.append(_bin_divergence(
                        s, repo, what, name, f"holds the same delete as {source} but not the "
                        "same recycle bin entry", expected, entry, source))
    return out


def _softness(tomb: dict) -> dict:
    return {"recycled": tomb.get("recycled", False), "tags": tomb.get("recycled_tags", [])}


def _bin_divergence(s: Snapshot, repo: str, what: str, name: str, detail: str,
                    expected: object, actual: object, source: str | None) -> Divergence:
    return Divergence("recycle bin", s.name, s.region, repo, f"the {what} {detail}",
                      tag=name if what == "tag" else None,
                      digest=name if what == "manifest" else None,
                      expected=expected, actual=actual, source=source)


def _compare_attributes(snapshots: list[Snapshot], policy: ResidencyPolicy,
                        repo: str) -> list[Divergence]:
    """Every node holds, for each attributes register of ``repo``, the newest
    set residency lets reach it; holding none where one is due diverges (a
    lock lost), and so does holding an older one (a lock reverted)."""
    out = []
    names = sorted({n for s in snapshots for n in s.repo(repo).get("attributes", {})})
    for name in names:
        writes = {}
        for s in snapshots:
            entry = s.repo(repo).get("attributes", {}).get(name)
            if entry is not None:
                stamp = _stamp(entry)
                writes[s.name] = _Write(s, stamp, json.dumps(entry["attributes"], sort_keys=True),
                                        stamp[1])
        kind, _, which = name.partition(":")
        for s in snapshots:
            held, winner = _expectation(s, repo, writes, policy)
            if winner is None or winner.value == held:
                continue
            out.append(Divergence(
                "attributes", s.name, s.region, repo,
                f"the newest attributes of the {kind} this node may hold ({_when(winner)}, on "
                f"{winner.node.name}) are not what it holds",
                tag=which if kind == "tag" else None,
                digest=which if kind == "manifest" else None,
                expected=json.loads(winner.value), actual=json.loads(held) if held else None,
                source=winner.node.name))
    return out


def _expectation(s: Snapshot, repo: str, writes: dict[str, _Write],
                 policy: ResidencyPolicy) -> tuple[str | None, _Write | None]:
    """(what ``s`` holds, the write it should hold) for one register."""
    mine = writes.get(s.name)
    visible = [w for w in writes.values() if policy.allows(w.region, repo, s.region)]
    if mine is not None and all(w is not mine for w in visible):
        visible.append(mine)  # its own write is what it holds; residency is judged elsewhere
    winner = max(visible, key=lambda w: w.stamp, default=None)
    return (mine.value if mine else None), winner


def _needed_by_index(s: Snapshot, repo: str, digest: str) -> bool:
    return any(digest in m["references"] for m in s.repo(repo).get("manifests", {}).values())


def _delete_locked(s: Snapshot, repo: str, digest: str) -> bool:
    attributes = s.repo(repo).get("attributes", {})
    return any(attributes.get(name, {}).get("attributes", {}).get(flag) is False
               for name in ("repository", f"manifest:{digest}")
               for flag in ("deleteEnabled", "writeEnabled"))


def _stamp(entry: dict) -> Stamp:
    hlc, region, zone = entry["stamp"]
    return int(hlc), region, zone


def _when(w: _Write) -> str:
    wall_ms, logical = hlc.unpack(w.stamp[0])
    at = datetime.fromtimestamp(wall_ms / 1000, UTC).isoformat(timespec="milliseconds")
    where = f"{w.stamp[1] or '?'}{' zone ' + w.stamp[2] if w.stamp[2] else ''}"
    return f"written in {where} at {at}{f' (+{logical})' if logical else ''}"


def _tag_detail(winner: _Write, held: str | None) -> str:
    newest = (f"points at {winner.value}" if winner.value else "was deleted")
    has = f"points at {held}" if held else "is absent"
    return f"the newest write this node may hold ({_when(winner)}, on {winner.node.name}) " \
           f"says the tag {newest}; here it {has}"


def _manifest_detail(winner: _Write, held: str | None) -> str:
    newest = "stores it" if winner.value else "deleted it"
    return f"the newest write this node may hold ({_when(winner)}, on {winner.node.name}) " \
           f"{newest}; here it is {'present' if held else 'absent'}"


# -- residency ------------------------------------------------------------------------------


def register_residency(snapshots: list[Snapshot], policy: ResidencyPolicy) -> list[Divergence]:
    """No node stores a register whose origin region may not reach its region."""
    out = []
    for s in snapshots:
        for repo, stored in sorted(s.inventory["repositories"].items()):
            for part, what in (("tags", "tag"), ("deleted_tags", "tag deletion"),
                               ("manifests", "manifest"), ("deleted_manifests", "manifest deletion"),
                               ("blob_links", "blob link"), ("deleted_blob_links", "blob unlink")):
                for name, entry in sorted(stored.get(part, {}).items()):
                    origin = entry.get("pushed_region") or entry["stamp"][1]
                    if not origin or policy.allows(origin, repo, s.region):
                        continue
                    is_tag = part.endswith("tags")
                    out.append(Divergence(
                        "residency", s.name, s.region, repo,
                        f"a {what} written in {origin}, which residency keeps in {origin}, is "
                        f"stored in {s.region}", tag=name if is_tag else None,
                        digest=entry.get("digest") if is_tag else name,
                        expected=f"only in {origin}", actual=s.region, location="metadata"))
    return out


@dataclass
class DiskView:
    """A node's data dir as read from outside: its blob files and every
    metadata key (with the values verify decodes)."""

    blob_files: dict[str, str]                  # digest → path
    keys: list[tuple[bytes, bytes]]

    def inventory(self) -> dict:
        """The inventory of this data dir, as the node itself would serve it."""
        ordered = self.keys

        def scan(prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
            start = bisect.bisect_left(ordered, (prefix,))
            for key, value in ordered[start:]:
                if not key.startswith(prefix):
                    return
                yield key, value
        return inventories.build(scan, self.blob_files)


def read_disk(data_dir: Path) -> DiskView:
    """Blob files under ``blobs/<alg>/<xx>/<hex>`` and the metadata database
    (``meta/``), opened read-only: RocksDB lets a read-only instance open a
    database another process holds; an open racing a compaction can fail, so
    it is retried."""
    from rocksdict import AccessType, Options, Rdict

    files: dict[str, str] = {}
    root = data_dir / "blobs"
    if root.is_dir():
        for alg in sorted(p for p in root.iterdir() if p.is_dir()):
            for shard in sorted(p for p in alg.iterdir() if p.is_dir()):
                for entry in sorted(shard.iterdir()):
                    files[f"{alg.name}:{entry.name}"] = str(entry)
    meta = data_dir / "meta"
    if not meta.is_dir():
        raise FileNotFoundError(f"{meta} does not exist")
    last: Exception | None = None
    for attempt in range(DISK_OPEN_ATTEMPTS):
        try:
            db = Rdict(str(meta), Options(raw_mode=True), access_type=AccessType.read_only())
        except Exception as exc:  # noqa: BLE001 - rocksdict raises plain Exceptions
            last = exc
            time.sleep(0.05 * (attempt + 1))
            continue
        try:
            it = db.iter()
            it.seek_to_first()
            pairs = []
            while it.valid():
                pairs.append((it.key(), it.value()))
                it.next()
            del it
            return DiskView(files, pairs)
        except Exception as exc:  # noqa: BLE001
            last = exc
        finally:
            db.close()
    raise OSError(f"cannot open {meta} read-only: {last}")


@dataclass
class _Content:
    """What content the inventories name, split by whether a region may hold it."""

    allowed_digests: set[str] = field(default_factory=set)
    allowed_repos: set[str] = field(default_factory=set)
    confined_digests: dict[str, tuple[str, str]] = field(default_factory=dict)  # → (origin, repo)
    confined_repos: dict[str, str] = field(default_factory=dict)                # → origin

    def leaked_digest(self, digest: str) -> tuple[str, str] | None:
        """(origin, repository) if only content confined elsewhere explains ``digest``."""
        if digest in self.allowed_digests:
            return None
        return self.confined_digests.get(digest)

    def leaked_repo(self, repo: str) -> str | None:
        return None if repo in self.allowed_repos else self.confined_repos.get(repo)


def _content(reference: list[dict], policy: ResidencyPolicy, region: str) -> _Content:
    """Digests and repositories that content allowed in ``region`` explains,
    and those that content confined elsewhere names — from every inventory."""
    found = _Content()
    for inventory in reference:
        for repo, stored in inventory["repositories"].items():
            for part in ("tags", "deleted_tags", "manifests", "deleted_manifests",
                         "blob_links", "deleted_blob_links"):
                for name, entry in stored.get(part, {}).items():
                    origin = entry.get("pushed_region") or entry["stamp"][1]
                    named = [entry.get("digest")] if part.endswith("tags") else \
                        [name, *entry.get("references", ())]
                    if not origin or policy.allows(origin, repo, region):
                        found.allowed_repos.add(repo)
                        found.allowed_digests.update(d for d in named if d)
                    else:
                        found.confined_repos.setdefault(repo, origin)
                        for digest in filter(None, named):
                            found.confined_digests.setdefault(digest, (origin, repo))
    return found


def disk_residency(s: Snapshot, disk: DiskView, reference: list[dict],
                   policy: ResidencyPolicy) -> list[Divergence]:
    """Blob files and metadata keys of ``s`` that only content confined to
    another region explains (what is confined is learnt from the ``reference``
    inventories), and log events from regions that may not reach it."""
    content = _content(reference, policy, s.region)
    parsed = [(_parsed(key), key, value) for key, value in disk.keys]
    events = []
    for typed, key, value in parsed:
        if isinstance(typed, keys.LogKey):
            event = decode(value, Event)
            events.append((key, event))
            if event.origin_region and event.kind is not EventKind.BLOB_RECLAIMED and \
                    policy.allows(event.origin_region, event.repository, s.region):
                # Events the node was allowed to receive explain what they name,
                # even after what they made is deleted and collected.
                content.allowed_repos.add(event.repository)
                content.allowed_digests.update(_event_digests(event))
    out = []

    def leak(what: str, location: str, origin: str, repository: str = "",
             digest: str | None = None) -> None:
        out.append(Divergence(
            "residency", s.name, s.region, repository,
            f"{what} of content confined to {origin} is stored in {s.region}", digest=digest,
            expected=f"only in {origin}", actual=f"in {s.region}", location=location))

    for digest, path in sorted(disk.blob_files.items()):
        if found := content.leaked_digest(digest):
            leak("a blob file", path, found[0], found[1], digest)
    for key, event in events:
        origin = event.origin_region
        if event.kind in CONFIG_KINDS:      # registry-wide: residency never applies
            continue
        if origin and not policy.allows(origin, event.repository, s.region):
            leak(f"a {event.kind} event", keys.render(key), origin, event.repository,
                 event.digest or None)
            continue
        hits = [content.leaked_digest(d) for d in _event_digests(event)]
        hit = content.leaked_repo(event.repository) or next((h[0] for h in hits if h), None)
        if hit:
            leak(f"a {event.kind} event naming it", keys.render(key), hit, event.repository,
                 event.digest or None)
    for typed, key, value in parsed:
        if isinstance(typed, keys.LogKey):
            continue
        repos, digests = _key_names(typed, value)
        for repo in repos:
            if origin := content.leaked_repo(repo):
                leak("a metadata key naming a repository", keys.render(key), origin, repo)
                break
        else:
            for digest in digests:
                if found := content.leaked_digest(digest):
                    leak("a metadata key naming a digest", keys.render(key), found[0], found[1],
                         digest)
                    break
    return out


def _event_digests(event: Event) -> Iterator[str]:
    yield from (d for d in (event.digest, event.subject) if d)
    yield from event.references


def _parsed(key: bytes) -> keys.Key | None:
    """``key`` parsed, or None: a key outside the grammar names nothing verify
    can judge (it is not a divergence of residency)."""
    try:
        return keys.parse(key)
    except keys.MalformedKey:
        return None


def _key_names(key: keys.Key | None, value: bytes) -> tuple[list[str], list[str]]:
    """(repositories, digests) a metadata key (and, for tags, its value) names."""
    match key:
        case (keys.BlobKey(digest=digest) | keys.TransferKey(digest=digest)
              | keys.UnreferencedKey(digest=digest)):
            return [], [digest]
        case keys.RefKey(target=target, repository=repo, manifest=manifest):
            return [repo], [target, manifest]
        case keys.BlobUserKey(digest=digest, repository=repo):
            return [repo], [digest]
        case keys.RepoKey(repository=repo) | keys.FingerprintKey(repository=repo):
            return [repo], []
        case keys.UploadKey():
            with contextlib.suppress(Exception):
                return [decode(value, UploadRecord).repository], []
        case keys.FailureKey(repository=repo, digest=digest) \
                | keys.UntaggedKey(repository=repo, digest=digest):
            return [repo], [digest]
        case keys.ManifestKey(repository=repo, digest=digest) \
                | keys.BlobLinkKey(repository=repo, digest=digest) \
                | keys.ManifestTombKey(repository=repo, digest=digest) \
                | keys.BlobTombKey(repository=repo, digest=digest):
            return [repo], [digest]
        case keys.ReferrerKey(repository=repo, subject=subject, referrer=referrer):
            return [repo], [subject, referrer]
        case keys.TagKey(repository=repo):
            return [repo], _pointed(value, TagRecord)
        case keys.TagTombKey(repository=repo):
            return [repo], _pointed(value, Tombstone)
        case keys.ManifestAttributesKey(repository=repo, digest=digest):
            return [repo], [digest]
        case keys.AttributesKey(repository=repo):
            return [repo], []
        case keys.TombstoneCandidateKey(tomb=tomb):   # names what its tombstone names
            with contextlib.suppress(Exception):
                return _key_names(tomb, decode(value, TombstoneCandidate).tombstone)
            return [tomb.repository], []
    return [], []


def _pointed(value: bytes, record: type[TagRecord] | type[Tombstone]) -> list[str]:
    """The digest a tag (or a deleted tag) points at, if its value says."""
    with contextlib.suppress(Exception):
        if digest := decode(value, record).digest:
            return [digest]
    return []
