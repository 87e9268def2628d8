"""``georeg import`` (after ``az acr import``): the cluster copies an image
from another registry into itself, server-side, with no client in the middle.

The control plane does it, as in ACR (an import is a registry operation: it
needs the home region to answer): it pulls from the source
(``registry_node.upstream_http``) and pushes into one node of the target
region (the home region, or the one asked for) over that node's management
link with the cluster's internal credential; replication then carries the
image to every region residency allows, as it carries any push.

Invariants:

* digests are preserved: every manifest is stored as the bytes the source
  sent, and an index comes with every manifest it lists (every platform) and
  every blob of those;
* nothing partial: every manifest (and, with ``--include-referrers``, every
  referrer) is fetched before anything is pushed, so a missing one fails the
  import before any change; then blobs first (each checked against its
  digest by the node as it lands), child manifests next, the imported
  manifest after them, its referrers after it, and the target tags last of
  all. A source that dies mid-fetch therefore leaves at most blobs no manifest
  references (reclaimed by GC like any unreferenced blob), never a manifest
  or a tag, and the same import run again completes (blobs already there are
  not fetched again);
* what is fetched is bounded before it is held: indexes nest at most
  ``MAX_INDEX_DEPTH`` deep, an import holds at most ``MAX_MANIFESTS``
  manifests and ``MAX_MANIFEST_BYTES`` of them; past a limit it is refused
  (502, naming the limit) before anything is pushed;
* a blob is taken from the source only up to the size its descriptor gives;
* an existing target tag refuses the import before anything is copied,
  unless ``force`` (ACR's ``NoForce``/``Force`` modes, and its message);
  with ``force`` and several tags, the tags are set one after another, not
  all-or-nothing: a node that refuses the second leaves the first moved;
* the source's credentials are never in a repr (``ImportRequest`` hides them),
  so a traceback or a log line that shows the request does not show them;
* every refusal is a ``ClusterError`` with the status the management API
  answers: a malformed request or source 400, a source repository, tag or
  digest the source does not have 404, credentials the source refuses 400,
  an existing tag 409, a source that fails or cannot be reached 502; a node
  that refuses a write passes on its own status and reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp

from registry_node.errors import RegistryError
from registry_node.manifest import ParsedManifest, parse
from registry_node.reference import TAG_RE, validate_name
from registry_node.upstream import SourceReference, UpstreamError, UpstreamFailure, parse_source
from registry_node.upstream_http import FetchedManifest, UpstreamRegistry, upstream_session

from .errors import ClusterError, Conflict, NodeRefusal, NotFound, RegionUnavailable
from .regions import REGIONS, unknown_region_message

if TYPE_CHECKING:                      # a Cluster is handed in; it never imports this module
    from .cluster import Cluster

# Blobs copied at once (skopeo's default is 6 layers at a time).
PARALLEL_BLOBS = 6
# How deep referrers of referrers are followed (a signature of an SBOM of an image).
REFERRER_DEPTH = 3
# How deep indexes may nest. The image-spec allows an index in an index; what
# registries serve is an index of images (2 levels), at most an index of
# indexes of images (3). 4 leaves a level to spare, and stops a source that
# nests without end long before the stack runs out (it did, at ~1,000: a 500).
MAX_INDEX_DEPTH = 4
# What one import holds in memory before pushing: the largest multi-platform
# images list tens of manifests (a platform and an attestation each); a
# thousand, or 32 MiB of them (8 of the node's largest), is past anything real
# and bounds what a source listing 50,000 children can make georeg fetch.
MAX_MANIFESTS = 1000
MAX_MANIFEST_BYTES = 32 * 1024 * 1024
# A node answers a write within this (a blob upload has its own, per read).
NODE_TIMEOUT_S = 120.0


class SourceRefusal(ClusterError):
    """The source could not give what the import needs (``UpstreamFailure``)."""

    _STATUS = {UpstreamFailure.INVALID_SOURCE: (400, "InvalidSource"),
               UpstreamFailure.NOT_FOUND: (404, "SourceNotFound"),
               UpstreamFailure.UNAUTHORIZED: (400, "SourceUnauthorized"),
               UpstreamFailure.UNAVAILABLE: (502, "SourceUnavailable")}

    def __init__(self, failure: UpstreamError) -> None:
        super().__init__(str(failure))
        self.status, self.code = self._STATUS[failure.kind]


@dataclass(frozen=True, slots=True)
class ImportRequest:
    source: SourceReference
    tags: tuple[tuple[str, str], ...]          # (repository, tag) to set
    untagged: tuple[str, ...]                  # repositories that get the manifest, no tag
    force: bool = False
    include_referrers: bool = False
    region: str | None = None
    # Not in the repr: a traceback or log line showing the request must not
    # show the password (the CA is public, but long).
    credentials: tuple[str, str] | None = field(default=None, repr=False)
    ca_pem: str | None = field(default=None, repr=False)

    @property
    def repositories(self) -> list[str]:
        return list(dict.fromkeys([r for r, _ in self.tags] + list(self.untagged)))


def import_request(body: dict) -> ImportRequest:
    """The management API's body (ARM's ImportImageParameters, flattened):
    ``{"source", "targetTags": ["R:T"…], "untaggedTargetRepositories": ["R"…],
    "mode": "NoForce"|"Force", "includeReferrers", "region", "username",
    "password", "sourceCaPem"}``, checked; a ``ClusterError`` (400) says what
    is wrong."""
    known = {"source", "targetTags", "untaggedTargetRepositories", "mode", "includeReferrers",
             "region", "username", "password", "sourceCaPem"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise ClusterError(f"unknown fields {', '.join(unknown)[:200]}; send "
                           f"{', '.join(sorted(known))}")
    try:
        source = parse_source(_text(body, "source", required=True))
    except UpstreamError as exc:
        raise SourceRefusal(exc) from None
    tags_given = _texts(body, "targetTags")
    untagged = tuple(_repository(r, "untaggedTargetRepositories") for r in
                     _texts(body, "untaggedTargetRepositories"))
    if not tags_given and not untagged:
        # ACR's default: the source's repository and tag (a digest source: untagged).
        if source.digest:
            untagged = (source.repository,)
        else:
            tags_given = [f"{source.repository}:{source.reference}"]
    tags = tuple(dict.fromkeys(_target_tag(t, source) for t in tags_given))
    mode = body.get("mode", "NoForce")
    if mode not in ("NoForce", "Force"):
        raise ClusterError(f'mode is "NoForce" or "Force", not {mode!r}'[:200])
    include = body.get("includeReferrers", False)
    if not isinstance(include, bool):
        raise ClusterError("includeReferrers is true or false")
    region = _text(body, "region")
    if region is not None and region not in REGIONS:
        raise ClusterError(unknown_region_message(region))
    username, password = _text(body, "username"), _text(body, "password")
    if (username is None) != (password is None):
        raise ClusterError("give the source's username and password together")
    return ImportRequest(source, tags, untagged, mode == "Force", include, region,
                         (username, password) if username is not None else None,
                         _text(body, "sourceCaPem"))


def _text(body: dict, name: str, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise ClusterError(f"give {name!r}")
        return None
    if not isinstance(value, str):
        raise ClusterError(f"{name!r} is a string, not {value!r}"[:200])
    return value


def _texts(body: dict, name: str) -> list[str]:
    value = body.get(name) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ClusterError(f"{name!r} is a list of strings"[:200])
    return value


def _repository(name: str, where: str) -> str:
    try:
        return validate_name(name)
    except RegistryError:
        raise ClusterError(f"{where}: {name[:200]!r} is not a valid repository name") from None


def _target_tag(text: str, source: SourceReference) -> tuple[str, str]:
    """``R:T`` (``R`` alone: the source's tag, or ``latest``), as ``--image``."""
    if "@" in text:
        raise ClusterError(f"--image {text[:200]!r}: a target is REPOSITORY:TAG; a digest is "
                           "kept as the source has it")
    name, colon, tag = text.rpartition(":")
    if not colon or "/" in tag:
        name, tag = text, source.tag or "latest"
    if not TAG_RE.fullmatch(tag):
        raise ClusterError(f"--image {text[:200]!r}: {tag[:140]!r} is not a valid tag")
    return _repository(name, f"--image {text[:200]!r}"), tag


# -- the import ------------------------------------------------------------------------------


@dataclass
class _Graph:
    """What one import copies, fetched before anything is pushed: manifests in
    push order (every child before its index; referrers after their subject)."""

    manifests: list[FetchedManifest] = field(default_factory=list)
    parsed: dict[str, ParsedManifest] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)      # blob digest -> descriptor size
    referrers: int = 0
    fetched: int = 0             # manifests fetched (a repeat counts again)
    fetched_bytes: int = 0

    @property
    def blobs(self) -> list[str]:
        return list(dict.fromkeys(b for m in self.manifests for b in self.parsed[m.digest].blobs))


class ImageImports:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    async def run(self, request: ImportRequest) -> dict:
        await self.cluster.control_plane()     # an import is a registry operation (home up)
        region = request.region or self.cluster.spec.home_region
        node = await self._target_node(region)
        target = _Node(self.cluster.http(), self.cluster.management_link_url(node), node)
        replaced = await self._check_tags(target, request)
        try:
            session = upstream_session(request.ca_pem)
        except UpstreamError as exc:
            raise SourceRefusal(exc) from None
        async with session as http:
            source = UpstreamRegistry(http, request.source.registry,
                                      credentials=request.credentials,
                                      ca_given=request.ca_pem is not None)
            try:
                graph = await self._fetch(source, request)
                copied = await self._push(source, target, request, graph)
            except UpstreamError as exc:
                raise SourceRefusal(exc) from None
        top = graph.manifests[len(graph.manifests) - 1 - graph.referrers]
        return {"source": str(request.source), "digest": top.digest,
                "mediaType": graph.parsed[top.digest].media_type,
                "region": region, "node": node,
                "targetTags": [f"{r}:{t}" for r, t in request.tags],
                "untaggedTargetRepositories": list(request.untagged),
                "replacedTags": replaced, "manifests": len(graph.manifests),
                "referrers": graph.referrers, "blobs": len(graph.blobs), **copied}

    async def _target_node(self, region: str) -> str:
        if region not in {r.region for r in self.cluster.spec.all_replicas}:
            raise NotFound(f"the registry has no replica in {region}; `georeg replication "
                           "list` shows where it has")
        for plan in self.cluster.plan.nodes_in(region):
            if self.cluster.supervisor.nodes[plan.name].healthy \
                    and await self.cluster.answers(plan.name):
                return plan.name
        raise RegionUnavailable(f"no node of {region} answers (down, or cut off from the "
                                "network); import into another region with --region")

    async def _check_tags(self, target: _Node, request: ImportRequest) -> list[str]:
        """ACR's NoForce: an existing target tag fails the import before any copy."""
        existing = [f"{r}:{t}" for r, t in request.tags
                    if await target.manifest_digest(r, t) is not None]
        if existing and not request.force:
            raise Conflict(f"Tag {existing[0]} already exists in target registry. Give --force "
                           "(mode Force) to replace it")
        return existing

    async def _fetch(self, source: UpstreamRegistry, request: ImportRequest) -> _Graph:
        graph = _Graph()
        repo = request.source.repository
        await self._fetch_manifest(source, repo, request.source.reference, graph, ())
        if request.include_referrers:
            subjects = [m.digest for m in graph.manifests]
            for _depth in range(REFERRER_DEPTH):
                found: list[str] = []
                for subject in subjects:
                    for descriptor in await source.referrers(repo, subject):
                        if descriptor["digest"] not in graph.parsed:
                            before = len(graph.manifests)
                            await self._fetch_manifest(source, repo, descriptor["digest"], graph,
                                                       ())
                            graph.referrers += len(graph.manifests) - before
                            found.append(descriptor["digest"])
                if not found:
                    break
                subjects = found
        return graph

    async def _fetch_manifest(self, source: UpstreamRegistry, repo: str, reference: str,
                              graph: _Graph, path: tuple[str, ...]) -> str:
        where = f"{source.registry}/{repo}"
        if len(path) >= MAX_INDEX_DEPTH:
            raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                f"manifest {path[-1]} of {where}: indexes nested deeper than "
                                f"{MAX_INDEX_DEPTH} levels; georeg imports no deeper")
        if graph.fetched >= MAX_MANIFESTS:
            raise UpstreamError(UpstreamFailure.UNAVAILABLE, _too_many(where))
        fetched = await source.manifest(repo, reference)
        graph.fetched += 1
        graph.fetched_bytes += len(fetched.body)
        if graph.fetched_bytes > MAX_MANIFEST_BYTES:
            raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                f"{where}: the image's manifests add up to more than "
                                f"{MAX_MANIFEST_BYTES} bytes; georeg imports no more at once")
        if fetched.digest in path:
            raise UpstreamError(UpstreamFailure.UNAVAILABLE, f"manifest {fetched.digest} of "
                                f"{source.registry}/{repo} lists itself")
        if fetched.digest in graph.parsed:
            return fetched.digest
        try:
            parsed = parse(fetched.body, fetched.media_type)
        except RegistryError as exc:
            raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                f"manifest {fetched.digest} of {source.registry}/{repo}: "
                                f"georeg cannot store it: {exc.detail or exc.message}") from None
        if graph.fetched + len(parsed.children) > MAX_MANIFESTS:
            raise UpstreamError(UpstreamFailure.UNAVAILABLE, _too_many(where, fetched.digest))
        for child in parsed.children:
            await self._fetch_manifest(source, repo, child, graph, (*path, fetched.digest))
        graph.sizes.update(_blob_sizes(fetched.body, parsed))
        graph.parsed[fetched.digest] = parsed
        graph.manifests.append(fetched)
        return fetched.digest

    async def _push(self, source: UpstreamRegistry, target: _Node, request: ImportRequest,
                    graph: _Graph) -> dict:
        repos = request.repositories
        first, others = repos[0], repos[1:]
        copied = {"blobsCopied": 0, "bytesCopied": 0}
        limit = asyncio.Semaphore(PARALLEL_BLOBS)

        async def copy(digest: str) -> None:
            async with limit:
                if await target.has_blob(first, digest):
                    return
                # aclosing: a node that refuses mid-stream must not leave the
                # source's response open until the generator is collected.
                async with contextlib.aclosing(source.blob(
                        request.source.repository, digest, graph.sizes.get(digest))) as chunks:
                    copied["bytesCopied"] += await target.put_blob(first, digest, chunks)
                copied["blobsCopied"] += 1

        await _all(copy(d) for d in graph.blobs)
        for repo in others:                     # the same bytes, linked: no second transfer
            await _all(target.mount_blob(repo, d, first) for d in graph.blobs)
        for repo in repos:
            for manifest in graph.manifests:    # children, the image, then its referrers
                await target.put_manifest(repo, manifest.digest, manifest.body,
                                          graph.parsed[manifest.digest].media_type)
        top = graph.manifests[len(graph.manifests) - 1 - graph.referrers]
        for repo, tag in request.tags:          # the tags last of all
            await target.put_manifest(repo, tag, top.body, graph.parsed[top.digest].media_type)
        return copied


def _too_many(where: str, index: str | None = None) -> str:
    listing = f"index {index} of {where} lists" if index else f"{where}: the image has"
    return (f"{listing} more than {MAX_MANIFESTS} manifests (with those already fetched); "
            "georeg imports no more at once")


def _blob_sizes(body: bytes, parsed: ParsedManifest) -> dict[str, int]:
    """The size each of an image manifest's descriptors gives its blob
    (``parse`` has checked them: a non-negative integer each)."""
    if not parsed.blobs:
        return {}
    doc = json.loads(body)
    return {d["digest"]: d["size"] for d in [doc["config"], *doc["layers"]]
            if d["digest"] in parsed.blobs}


async def _all(coroutines) -> None:
    """Run them all; the first failure cancels the rest and is raised."""
    try:
        async with asyncio.TaskGroup() as group:
            for coroutine in coroutines:
                group.create_task(coroutine)
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None


class _Node:
    """The target node's data plane, as the cluster itself reaches it (the
    internal credential admits it without the data-plane gate)."""

    def __init__(self, http: aiohttp.ClientSession, url: str, name: str) -> None:
        self.http, self.url, self.name = http, url, name

    async def _send(self, method: str, path: str, what: str, ok: tuple[int, ...], **options
                    ) -> aiohttp.ClientResponse:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=NODE_TIMEOUT_S)
        try:
            response = await self.http.request(method, self.url + path, timeout=timeout,
                                               **options)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise NodeRefusal(f"{what}: {self.name} did not answer: {exc}", 503,
                              "NodeUnavailable") from None
        if response.status in ok:
            return response
        try:
            answer = await response.json(content_type=None)
        except (ValueError, aiohttp.ClientError):
            answer = None
        finally:
            response.release()
        error = (answer.get("errors") or [{}])[0] if isinstance(answer, dict) else {}
        detail = error.get("detail")
        reason = detail.get("reason") if isinstance(detail, dict) else detail
        message = error.get("message", f"HTTP {response.status}") + (f": {reason}" if reason
                                                                     else "")
        raise NodeRefusal(f"{what}: {self.name} refused: {message}", response.status,
                          error.get("code") or "NodeRefused")

    async def manifest_digest(self, repo: str, reference: str) -> str | None:
        r = await self._send("HEAD", f"/v2/{repo}/manifests/{reference}",
                             f"reading {repo}:{reference}", (200, 404))
        r.release()
        return r.headers.get("Docker-Content-Digest") if r.status == 200 else None

    async def has_blob(self, repo: str, digest: str) -> bool:
        r = await self._send("HEAD", f"/v2/{repo}/blobs/{digest}", f"reading blob {digest}",
                             (200, 404))
        r.release()
        return r.status == 200

    async def put_blob(self, repo: str, digest: str, chunks) -> int:
        """Stream ``chunks`` (the source's blob) into the node; the bytes sent.
        If the source fails mid-blob, the body ends short, the node refuses it
        (its digest does not match: nothing stored) and the source's failure is
        raised, naming what failed."""
        failure: list[UpstreamError] = []
        sent = 0

        async def body():
            nonlocal sent
            try:
                async for chunk in chunks:
                    sent += len(chunk)
                    yield chunk
            except UpstreamError as exc:
                failure.append(exc)

        try:
            r = await self._send("POST", f"/v2/{repo}/blobs/uploads/?digest={digest}",
                                 f"storing blob {digest}", (201,), data=body(),
                                 headers={"Content-Type": "application/octet-stream"})
            r.release()
        except NodeRefusal:
            if failure:
                raise failure[0] from None
            raise
        if failure:             # cannot be: the node checked the digest; never trust it stored
            raise failure[0]
        return sent

    async def mount_blob(self, repo: str, digest: str, source_repo: str) -> None:
        r = await self._send("POST", f"/v2/{repo}/blobs/uploads/?mount={digest}&from={source_repo}",
                             f"linking blob {digest} into {repo}", (201,))
        r.release()

    async def put_manifest(self, repo: str, reference: str, body: bytes, media_type: str) -> None:
        at = f"@{reference}" if ":" in reference else f":{reference}"
        r = await self._send("PUT", f"/v2/{repo}/manifests/{reference}",
                             f"storing manifest {repo}{at}", (201,), data=body,
                             headers={"Content-Type": media_type})
        r.release()
