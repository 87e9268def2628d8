"""The pull-through cache on a node (after ACR's artifact cache): a pull of a
manifest or blob this node does not hold, in a repository a cache rule
covers (``cache_rules``), is fetched from the rule's upstream
(``upstream_http``) with the rule's credential set, stored here as a push
would be, and then served from here — in the same request.

    cache = PullThrough(configuration, registry, key, http)
    if await cache.fetch_manifest("hub/library/alpine", "3.20"): ...   # now held here
    if await cache.fetch_blob("hub/library/alpine", digest): ...   # repair only

Both return False when no rule covers the repository (the caller answers its
404 as without a cache); ``fetch_blob`` also when no manifest held in the
repository references the digest (a manifest's pull stores its blobs, so a
blob is fetched alone only to repair one that is missing). Both raise
``RegistryError`` when a rule covers it but the upstream cannot give it.

Invariants:

* digests are preserved: a manifest is stored as the bytes upstream sent
  (its digest checked against the digest asked for and the one upstream
  claims), an index with every manifest it lists and every blob of those;
* nothing partial: every manifest is fetched before anything is stored; then
  blobs (each checked against its digest and descriptor size as it lands),
  child manifests, and the manifest asked for last, with its tag. An upstream
  that fails mid-fetch leaves at most blobs no manifest references (GC
  reclaims them), never a manifest without its blobs, and the next pull
  fetches again;
* stored content is content like any push: it is logged and replicated
  (residency holds), and later pulls, here or in any region that has it, are
  local. No automatic refresh: a tag already held is served as held, however
  upstream has moved it since (ACR's rule);
* the upstream gets the rule's credential set, never the client's
  credentials: the client's pull is authorised on the target repository by
  the request chain before this runs; the password is opened only here, just
  before use, and never logged;
* one fetch per (repository, reference) at a time on a node: concurrent pulls
  of the same missing tag wait for the first one's fetch and get its outcome,
  its error included (they do not each fetch again); blob copies share one
  transfer per (repository, digest) the same way;
* bounded upstream work: at most ``PARALLEL_FETCHES`` fetches at once per
  node, and an upstream's 404 believed for ``NOT_FOUND_TTL_S``;
* refusals, as ACR's: the upstream lacks it → ``MANIFEST_UNKNOWN`` /
  ``BLOB_UNKNOWN`` (404); the upstream is unreachable, failed, refused the
  credentials or sent bad content → ``424 Failed Dependency`` with a message
  naming the source, the cache rule and the reason ("request to pull from
  source … for cache rule … has failed: …").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from . import manifest as manifests
from .cache_rules import (
    CACHE_RULE,
    CREDENTIAL_SET,
    CacheRule,
    CredentialSet,
    Mapping,
    open_password,
    rule_for,
)
from .configuration import Configuration
from .configuration_key import ConfigurationKey
from .errors import ErrorCode, RegistryError
from .identities import InvalidValue
from .reference import TAG_RE, Digest, is_digest
from .registry import Registry
from .upstream import UpstreamError, UpstreamFailure
from .upstream_http import FetchedManifest, UpstreamRegistry

if TYPE_CHECKING:
    import aiohttp  # the session comes from the node (injected): only its type is named here

log = structlog.get_logger("georeg.cache")

# How deep indexes may nest and how many manifests one pull may hold: as
# ``georeg import`` (cluster.control.imports), for the same reasons.
MAX_INDEX_DEPTH = 4
MAX_MANIFESTS = 1000
MAX_MANIFEST_BYTES = 32 * 1024 * 1024
PARALLEL_BLOBS = 6
# At most this many pulls fetch from upstreams at once on a node (each with up
# to PARALLEL_BLOBS blob transfers), so clients asking for many missing tags
# cannot make the node open unbounded upstream connections. A pull past it
# waits up to FETCH_SLOT_WAIT_S for a slot (a burst, such as a fleet pulling a
# new image, is absorbed rather than refused: few clients retry a 429 on a
# manifest), then is refused 429 TOOMANYREQUESTS with Retry-After.
PARALLEL_FETCHES = 8
FETCH_SLOT_WAIT_S = 10.0
FETCH_RETRY_AFTER_S = 5
# An upstream's 404 is remembered this long per (rule, source, reference), so
# repeated pulls of a missing tag do not each ask the upstream; a tag pushed
# upstream meanwhile shows after at most this long. At most NOT_FOUND_ENTRIES
# are kept (the oldest forgotten first): memory stays bounded.
NOT_FOUND_TTL_S = 30.0
NOT_FOUND_ENTRIES = 10_000
# What a response served from upstream says (ACR sends X-Azure-Origin: upstream).
ORIGIN_HEADER = "X-Georeg-Origin"
FAILED_DEPENDENCY = 424


@dataclass
class _Graph:
    manifests: list[FetchedManifest] = field(default_factory=list)   # children first
    parsed: dict[str, manifests.ParsedManifest] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    fetched_bytes: int = 0

    @property
    def blobs(self) -> list[str]:
        return list(dict.fromkeys(b for m in self.manifests for b in self.parsed[m.digest].blobs))


@dataclass
class _Fetch:
    task: asyncio.Future[bool]
    waiters: int = 0


class PullThrough:
    def __init__(self, configuration: Configuration, registry: Registry, key: ConfigurationKey,
                 http: Callable[[], aiohttp.ClientSession]) -> None:
        self.configuration = configuration
        self.registry = registry
        self.key = key
        self._http = http
        # ("manifest" | "blob", repository, reference or digest) -> the one
        # fetch of it under way here
        self._inflight: dict[tuple[str, str, str], _Fetch] = {}
        # The rules as of a configuration generation: every 404 of a manifest
        # asks, and most repositories are covered by none.
        self._rules: tuple[int, list[tuple[str, CacheRule]]] = (-1, [])
        self._fetching = asyncio.Semaphore(PARALLEL_FETCHES)
        # (rule, upstream repository, reference) -> when its 404 stops being believed
        self._not_found: dict[tuple[str, str, str], float] = {}

    def mapping(self, repository: str) -> Mapping | None:
        generation = self.configuration.generation
        if self._rules[0] != generation:
            self._rules = (generation, [(n, r) for n, r in self.configuration.items(CACHE_RULE)
                                        if isinstance(r, CacheRule)])
        return rule_for(self._rules[1], repository) if self._rules[1] else None

    async def fetch_manifest(self, repository: str, reference: str) -> bool:
        if not (is_digest(reference) or TAG_RE.fullmatch(reference)):
            return False                # names nothing, here or upstream
        mapping = self.mapping(repository)
        if mapping is None:
            return False
        return await self._shared(("manifest", repository, reference),
                                  lambda: self._pull_manifest(mapping, repository, reference))

    async def _pull_manifest(self, mapping: Mapping, repository: str, reference: str) -> bool:
        try:
            self.registry.stat_manifest(repository, reference)
            return True                 # a fetch that ended just before this one brought it
        except RegistryError:
            pass
        self._check_not_found(mapping, reference)
        async with self._slot(mapping):
            source = self._source(mapping)
            try:
                graph = _Graph()
                await self._fetch(source, mapping, reference, graph, ())
                await self._store(source, mapping, repository, reference, graph)
            except UpstreamError as exc:
                self._remember_not_found(exc, mapping, reference)
                raise _refusal(exc, mapping, reference) from None
        log.info("cache_fetched", repository=repository, reference=reference, rule=mapping.rule,
                 manifests=len(graph.manifests))
        return True

    async def fetch_blob(self, repository: str, digest: str) -> bool:
        mapping = self.mapping(repository)
        if mapping is None or not self.registry.referenced(repository, digest):
            return False            # only a blob a held manifest needs is repaired
        try:
            # Shared with a manifest's pull copying the same blob: either's transfer serves both.
            return await self._shared(("blob", repository, digest),
                                      lambda: self._pull_blob(mapping, repository, digest))
        except UpstreamError as exc:
            raise _refusal(exc, mapping, digest, blob=True) from None

    async def _pull_blob(self, mapping: Mapping, repository: str, digest: str) -> bool:
        if self._holds_blob(repository, digest):
            return True
        self._check_not_found(mapping, digest, blob=True)
        async with self._slot(mapping):
            try:
                await self._store_blob(self._source(mapping), mapping, repository, digest, None)
            except UpstreamError as exc:
                self._remember_not_found(exc, mapping, digest)
                raise
        return True

    # -- internals --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _slot(self, mapping: Mapping):
        try:
            async with asyncio.timeout(FETCH_SLOT_WAIT_S):
                await self._fetching.acquire()
        except TimeoutError:
            raise RegistryError(
                ErrorCode.TOOMANYREQUESTS,
                {"reason": f"{PARALLEL_FETCHES} pulls are fetching from upstream on this node",
                 "cache_rule": mapping.rule},
                headers={"Retry-After": str(FETCH_RETRY_AFTER_S)}) from None
        try:
            yield
        finally:
            self._fetching.release()

    def _check_not_found(self, mapping: Mapping, reference: str, blob: bool = False) -> None:
        key = (mapping.rule, f"{mapping.host}/{mapping.repository}", reference)
        until = self._not_found.get(key)
        if until is None:
            return
        if self.registry.monotonic() >= until:
            del self._not_found[key]
            return
        raise _refusal(UpstreamError(UpstreamFailure.NOT_FOUND,
                                     f"{key[1]} had no {reference} when last asked (an "
                                     f"upstream's 404 is believed for {NOT_FOUND_TTL_S:.0f} s)"),
                       mapping, reference, blob=blob)

    def _remember_not_found(self, exc: UpstreamError, mapping: Mapping, reference: str) -> None:
        if exc.kind is not UpstreamFailure.NOT_FOUND:
            return
        now = self.registry.monotonic()
        if len(self._not_found) >= NOT_FOUND_ENTRIES:
            self._not_found = {k: t for k, t in self._not_found.items() if t > now}
            while len(self._not_found) >= NOT_FOUND_ENTRIES:
                del self._not_found[next(iter(self._not_found))]
        self._not_found[(mapping.rule, f"{mapping.host}/{mapping.repository}", reference)] = \
            now + NOT_FOUND_TTL_S

    async def _shared(self, key: tuple[str, str, str], work: Callable[[], Awaitable[bool]]) -> bool:
        """One fetch per key at a time on this node: the first caller starts
        ``work``; every caller, the first included, gets its result or its
        exception (a failed fetch is not repeated by each pull that waited for
        it). A caller that goes away (its client hung up, or the pull it is
        part of failed) leaves the fetch running for the others; when the last
        one goes, the fetch is cancelled, as a lone pull's would be."""
        entry = self._inflight.get(key)
        if entry is None:
            async def run() -> bool:
                try:
                    return await work()
                finally:
                    if self._inflight.get(key) is entry:
                        del self._inflight[key]     # a pull from now on starts afresh
            entry = _Fetch(asyncio.ensure_future(run()))
            self._inflight[key] = entry
            # Seen, so that a failure no caller is left to take is not reported as lost.
            entry.task.add_done_callback(lambda done: done.cancelled() or done.exception())
        entry.waiters += 1
        try:
            return await asyncio.shield(entry.task)
        finally:
            entry.waiters -= 1
            if entry.waiters == 0 and not entry.task.done():
                entry.task.cancel()
                if self._inflight.get(key) is entry:
                    del self._inflight[key]         # the next pull starts its own

    def _holds_blob(self, repository: str, digest: str) -> bool:
        return self.registry.blob_visible(repository, digest) and self.registry.blobs.exists(digest)

    def _source(self, mapping: Mapping) -> UpstreamRegistry:
        credentials = None
        if mapping.credential_set:
            stored = self.configuration.get(CREDENTIAL_SET, mapping.credential_set)
            if not isinstance(stored, CredentialSet):
                raise _failed(mapping, mapping.repository,
                              f"its credential set {mapping.credential_set!r} does not exist")
            if stored.login_server.lower() != mapping.host.lower():
                # The control plane checks this when the rule is made; a node
                # checks again before it opens the password, so that a set
                # changed since (or written by a racing writer) never sends one
                # host's credentials to another.
                raise _failed(mapping, mapping.repository,
                              f"its credential set {mapping.credential_set!r} is for "
                              f"{stored.login_server}, not the rule's source host {mapping.host}")
            try:
                password = open_password(self.key, mapping.credential_set, stored.password)
            except InvalidValue as exc:
                raise _failed(mapping, mapping.repository, str(exc)) from None
            credentials = (stored.username, password)
        return UpstreamRegistry(self._http(), mapping.host, credentials=credentials)

    async def _fetch(self, source: UpstreamRegistry, mapping: Mapping, reference: str,
                     graph: _Graph, path: tuple[str, ...]) -> None:
        where = f"{mapping.host}/{mapping.repository}"
        if len(path) >= MAX_INDEX_DEPTH:
            raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                f"{where}: indexes nested deeper than {MAX_INDEX_DEPTH} levels")
        if len(graph.manifests) >= MAX_MANIFESTS:
            raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                f"{where}: more than {MAX_MANIFESTS} manifests in one image")
        fetched = await source.manifest(mapping.repository, reference)
        graph.fetched_bytes += len(fetched.body)
        if graph.fetched_bytes > MAX_MANIFEST_BYTES:
            raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                f"{where}: the image's manifests add up to more than "
                                f"{MAX_MANIFEST_BYTES} bytes")
        if fetched.digest in graph.parsed:
            return
        try:
            parsed = manifests.parse(fetched.body, fetched.media_type or None)
        except RegistryError as exc:
            raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                f"manifest {fetched.digest} of {where}: georeg cannot store it: "
                                f"{exc.detail or exc.message}") from None
        for child in parsed.children:
            await self._fetch(source, mapping, child, graph, (*path, fetched.digest))
        if parsed.blobs:
            doc = json.loads(fetched.body)
            graph.sizes.update({d["digest"]: d["size"] for d in [doc["config"], *doc["layers"]]
                                if d["digest"] in parsed.blobs})
        graph.parsed[fetched.digest] = parsed
        graph.manifests.append(fetched)

    async def _store(self, source: UpstreamRegistry, mapping: Mapping, repository: str,
                     reference: str, graph: _Graph) -> None:
        # The storage limit, checked before any blob is fetched: an image that
        # cannot fit is refused (403 DENIED) without downloading or storing a
        # part of it. Each blob is checked again as it lands (others write too).
        self.registry.check_storage(sum(graph.sizes.get(d, 0) for d in graph.blobs
                                        if not self.registry.blobs.exists(d)))
        limit = asyncio.Semaphore(PARALLEL_BLOBS)

        async def copy(digest: str) -> bool:
            if self._holds_blob(repository, digest):
                return True
            await self._store_blob(source, mapping, repository, digest, graph.sizes.get(digest))
            return True

        async def shared_copy(digest: str) -> None:
            async with limit:
                # One transfer per (repository, digest): pulls of two tags of one
                # image, or a blob's repair, share the layers they have in common.
                await self._shared(("blob", repository, digest), lambda: copy(digest))

        try:
            async with asyncio.TaskGroup() as group:
                for digest in graph.blobs:
                    group.create_task(shared_copy(digest))
        except BaseExceptionGroup as failures:
            raise failures.exceptions[0] from None
        top = graph.manifests[-1]
        for fetched in graph.manifests[:-1]:       # every child before its index
            await self.registry.put_manifest(repository, fetched.digest, fetched.body,
                                             graph.parsed[fetched.digest].media_type)
        await self.registry.put_manifest(repository, reference if not is_digest(reference)
                                         else top.digest, top.body,
                                         graph.parsed[top.digest].media_type)

    async def _store_blob(self, source: UpstreamRegistry, mapping: Mapping, repository: str,
                          digest: str, size: int | None) -> None:
        async with contextlib.aclosing(source.blob(mapping.repository, digest, size)) as chunks:
            await self.registry.put_blob(repository, Digest.parse(digest), chunks, size)


def _failed(mapping: Mapping, what: str, reason: str) -> RegistryError:
    return RegistryError(
        ErrorCode.UNKNOWN,
        {"reason": reason, "source": f"{mapping.host}/{mapping.repository}",
         "cache_rule": mapping.rule},
        message=f"request to pull from source '{mapping.host}/{mapping.repository}' for cache "
                f"rule '{mapping.rule}' has failed: {reason}"[:1000],
        status=FAILED_DEPENDENCY)


def _refusal(exc: UpstreamError, mapping: Mapping, reference: str,
             blob: bool = False) -> RegistryError:
    if exc.kind is UpstreamFailure.UNAUTHORIZED:
        # upstream_http's advice is an import's (--username): a rule's is its credential set.
        return _failed(mapping, reference,
                       f"authentication required with source registry for cache rule "
                       f"'{mapping.rule}' ({str(exc).split('; give')[0]}); give the rule a "
                       "credential set the source accepts (`georeg credential-set create`, "
                       "then `georeg cache create --cred-set`)")
    if exc.kind is UpstreamFailure.NOT_FOUND:
        if blob:
            return RegistryError(ErrorCode.BLOB_UNKNOWN, {"digest": reference, "reason": str(exc)})
        return RegistryError(ErrorCode.MANIFEST_UNKNOWN,
                             {"reference": reference, "reason": f"not in the cache, and {exc}"})
    return _failed(mapping, reference, str(exc))
