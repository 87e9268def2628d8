"""``georeg purge``, after ACR's ``acr purge``: delete the tags that match a
filter and are older than a duration, optionally keeping the newest few,
optionally the manifests left with no tag, and say exactly what was deleted,
what would be (``--dry-run``) and what was skipped and why.

It is a client of the registry's own data plane, authorised like any other
(the admin user, or any identity with ``metadata/read`` and
``content/delete`` on the repositories): ``GET /v2/_catalog``, ACR's
``GET /acr/v1/{repo}/_tags`` and ``_manifests`` (with times and attributes),
``GET /v2/{repo}/manifests/{digest}`` for an index's children and a
referrer's subject, ``DELETE /acr/v1/{repo}/_tags/{tag}`` (untag: ACR's purge
deletes tags, the manifests only with ``--untagged``) and ``DELETE
/v2/{repo}/manifests/{digest}``. Its deletes are ordinary deletes: they
replicate, and a node's own rules (locks, an index's children) still hold
whatever this client decided. Deletes run ``--concurrency`` at a time.

The rules, ACR's where ACR states one:

* ``--filter REPO_REGEX:TAG_REGEX`` (repeatable; at the first ``:`` outside
  a group or a bracket, since no repository name holds one): both regexes
  match a whole name, as if between ``^`` and ``$`` (so ``app`` is not
  ``myapp``). They are ``regex`` patterns (re's syntax, plus POSIX classes
  such as ``[[:alpha:]]`` that acr-cli's Go regexes have), each match with a
  time limit. A filter whose repository
  regex matches no repository is an error, before anything is deleted.
* ``--ago`` is ACR's duration: whole days then Go's units, ``2d3h6m``,
  ``7d``, ``30m``, ``0d``; a tag goes when its ``lastUpdateTime`` is older.
* ``--keep N``: of the tags that would go (matching, older than ``--ago``,
  not locked), the N most recently updated of each repository stay (ACR's
  rule: fresh and locked tags use no keep slot).
* ``--untagged``: also every manifest of the matched repositories that has no
  tag once the tag deletes are done, and is older than ``--ago``, except one
  an index (that stays) holds — its index goes first when the index goes too —
  and a referrer whose subject stays (a signature goes with its image).
* Locked (``writeEnabled`` or ``deleteEnabled`` false on the tag, the
  manifest or the repository) is skipped and reported, never unlocked: ACR's
  purge does not delete what is write-disabled (georeg has no
  ``--include-locked``).
* What another purge, client or replicated delete took between the listing
  and the delete (a 404) is skipped as "already gone": the report lists as
  deleted only what this purge deleted.

Bad input (a regex that does not compile, a filter without ``:``, an
``--ago`` that is no duration) is a ``ValueError`` saying what is wrong;
an unknown repository a ``PurgeError``: the CLI makes each exit status 2.
A delete the registry refuses for another reason (401, 403, 503 without
quorum, a connection lost) is recorded in the report's ``failed`` and the
purge goes on: the report says what was deleted all the same.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import quote

import aiohttp
import regex

INDEX_TYPES = frozenset({"application/vnd.oci.image.index.v1+json",
                         "application/vnd.docker.distribution.manifest.list.v2+json"})
ACCEPT = ", ".join(["application/vnd.oci.image.manifest.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json", *INDEX_TYPES])
PAGE = 100
MAX_PAGES = 10_000             # a listing longer than a million entries is not believed
DEFAULT_CONCURRENCY = 5       # ACR's
MATCH_TIMEOUT_S = 5.0         # one regex on one name (acr-cli times out each match)
_AGO = re.compile(r"(?:(\d+)d)?((?:\d+(?:\.\d+)?(?:h|m|s|ms|us|µs|ns))*)")
_AGO_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


class PurgeError(Exception):
    """A purge that cannot start (unknown repository) or a registry's refusal
    that is no lock; nothing was deleted if it is raised before the first delete."""


@dataclass(frozen=True)
class Filter:
    text: str
    repository: regex.Pattern
    tag: regex.Pattern


def _split_filter(text: str) -> tuple[str, str] | None:
    """``REPO_REGEX:TAG_REGEX`` at the first ``:`` outside a group and a
    bracket (no repository name holds one; ``(?:…)`` and ``[[:alpha:]]`` in
    either part keep theirs). None when there is no ``:``."""
    depth, in_class, i = 0, False, 0
    while i < len(text):                       # bounded: i only grows
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            if text.startswith("[:", i) and (end := text.find(":]", i + 2)) > 0:
                i = end + 2
                continue
            in_class = c != "]"
        elif c == "[":
            in_class = True
            i += 1 + text.startswith("^", i + 1)
            i += text.startswith("]", i)       # a ']' first in a class is literal
            continue
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == ":" and depth == 0:
            return text[:i], text[i + 1:]
        i += 1
    # Unbalanced: the first ':', so that the regex's own error is what is shown.
    repo, sep, tag = text.partition(":")
    return (repo, tag) if sep else None


def parse_filter(text: str) -> Filter:
    parts = _split_filter(text)
    if parts is None or not all(parts):
        raise ValueError(f"--filter {text!r} is REPO_REGEX:TAG_REGEX, both parts given "
                         f"(e.g. 'hello-world:.*')")
    patterns = []
    for part, what in zip(parts, ("repository", "tag"), strict=True):
        try:
            patterns.append(regex.compile(part))
        except regex.error as exc:
            raise ValueError(f"--filter {text!r}: the {what} regex {part!r} does not compile: "
                             f"{exc}") from None
    return Filter(text, *patterns)


def parse_ago(text: str) -> float:
    """ACR's ``--ago``: ``[N d][Go duration]``, in seconds."""
    whole = _AGO.fullmatch(text)
    if not text or whole is None or (whole.group(1) is None and not whole.group(2)):
        raise ValueError(f"--ago {text!r} is a duration such as 2d3h6m, 7d, 90m or 0d "
                         f"(days, then h, m, s, ms, us, ns)")
    seconds = int(whole.group(1) or 0) * 86_400.0
    for number, unit in _AGO_PART.findall(whole.group(2)):
        seconds += float(number) * _UNIT_S[unit]
    return seconds


@dataclass(frozen=True)
class PurgeRequest:
    filters: tuple[Filter, ...]
    ago_s: float
    untagged: bool = False
    keep: int = 0
    dry_run: bool = False
    concurrency: int = DEFAULT_CONCURRENCY
    region: str | None = None        # whose regional endpoint (None: the home region's)


def _non_negative(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"a whole number from 0 up, not {value!r}")
    return number


def _concurrency(value: str) -> int:
    number = _non_negative(value)
    if not 1 <= number <= 64:
        raise argparse.ArgumentTypeError(f"from 1 to 64, not {value!r}")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The purge options, shared by ``georeg purge`` and a schedule's command."""
    parser.add_argument("--filter", dest="filters", action="append", required=True,
                        metavar="REPO_REGEX:TAG_REGEX",
                        help="repositories and their tags to purge, each regex matching a whole "
                             "name; repeatable")
    parser.add_argument("--ago", required=True, metavar="DURATION",
                        help="delete tags last updated longer ago than this: 2d3h6m, 7d, 90m, 0d")
    parser.add_argument("--untagged", action="store_true",
                        help="also delete the manifests left with no tag (older than --ago)")
    parser.add_argument("--keep", type=_non_negative, default=0, metavar="N",
                        help="keep the N most recently updated matching tags of each repository")
    parser.add_argument("--dry-run", action="store_true",
                        help="say what would be deleted, delete nothing")
    parser.add_argument("--concurrency", type=_concurrency, default=DEFAULT_CONCURRENCY,
                        metavar="N", help="deletes in flight at once (1 to 64, default 5)")
    parser.add_argument("--region", help="the replica whose regional endpoint is used "
                                         "(default: the home region); content confined to a "
                                         "region is purged only there")


def request_of(args: argparse.Namespace) -> PurgeRequest:
    """The request the parsed options make; ``ValueError`` for a bad filter or --ago."""
    return PurgeRequest(tuple(parse_filter(f) for f in args.filters), parse_ago(args.ago),
                        args.untagged, args.keep, args.dry_run, args.concurrency, args.region)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):    # raise, never exit: a spec names the problem
        raise ValueError(message)


def parse_command(text: str) -> PurgeRequest:
    """A schedule's command, ``purge --filter … --ago …``, as a request;
    ``ValueError`` saying what is wrong."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"cannot split {text!r} into words: {exc}") from None
    if not words or words[0] != "purge":
        raise ValueError(f"the command is 'purge …' (the one command a schedule runs), "
                         f"not {words[0] if words else 'nothing'!r}")
    parser = _Parser(prog="purge", add_help=False)
    add_arguments(parser)
    return request_of(parser.parse_args(words[1:]))


# -- the registry, as a client sees it ---------------------------------------------------


class RegistryClient:
    """The data-plane routes purge uses, over ``session`` to ``base`` (an
    endpoint or a node), with ``headers`` (its credentials)."""

    def __init__(self, session: aiohttp.ClientSession, base: str,
                 headers: dict[str, str] | None = None) -> None:
        self.session, self.base, self.headers = session, base.rstrip("/"), headers or {}

    async def _get(self, path: str, params: dict | None = None,
                   accept: str = "application/json") -> tuple[dict, str | None]:
        async with self.session.get(f"{self.base}{path}", params=params,
                                    headers={**self.headers, "Accept": accept}) as r:
            if r.status != 200:
                raise PurgeError(f"GET {path}: {r.status} {(await r.text())[:300]}")
            return await r.json(content_type=None), r.headers.get("Link")

    async def _pages(self, path: str, key: str, field: str) -> list[dict]:
        out: list[dict] = []
        params: dict = {"n": PAGE}
        for _ in range(MAX_PAGES):
            body, link = await self._get(path, params)
            page = body.get(key) or []
            out += page
            if not link or not page:
                return out
            params = {"n": PAGE, "last": page[-1] if field == "" else page[-1][field]}
        raise PurgeError(f"{path}: more than {MAX_PAGES} pages")

    async def repositories(self) -> list[str]:
        return await self._pages("/v2/_catalog", "repositories", "")

    async def tags(self, repo: str) -> list[dict]:
        return await self._pages(f"/acr/v1/{repo}/_tags", "tags", "name")

    async def manifests(self, repo: str) -> list[dict]:
        return await self._pages(f"/acr/v1/{repo}/_manifests", "manifests", "digest")

    async def repository(self, repo: str) -> dict:
        return (await self._get(f"/acr/v1/{repo}"))[0]

    async def manifest(self, repo: str, digest: str) -> dict:
        return (await self._get(f"/v2/{repo}/manifests/{digest}", accept=ACCEPT))[0]

    async def has_manifest(self, repo: str, digest: str) -> bool:
        """Whether ``digest`` is in ``repo``, listed or not (a HEAD)."""
        async with self.session.head(f"{self.base}/v2/{repo}/manifests/{digest}",
                                     headers={**self.headers, "Accept": ACCEPT}) as r:
            return r.status != 404      # a refusal (a read lock) is no proof it is gone

    async def delete(self, path: str) -> tuple[int, str]:
        async with self.session.delete(f"{self.base}{path}", headers=self.headers) as r:
            return r.status, await r.text()

    async def untag(self, repo: str, tag: str) -> tuple[int, str]:
        return await self.delete(f"/acr/v1/{repo}/_tags/{quote(tag, safe='')}")

    async def delete_manifest(self, repo: str, digest: str) -> tuple[int, str]:
        return await self.delete(f"/v2/{repo}/manifests/{digest}")


# -- the purge -------------------------------------------------------------------------


def _image(repo: str, ref: str) -> str:
    return f"{repo}{'@' if ref.startswith('sha256:') else ':'}{ref}"


@dataclass
class PurgeReport:
    dry_run: bool
    tags: list[tuple[str, str]] = field(default_factory=list)         # (repo, tag) deleted
    manifests: list[tuple[str, str]] = field(default_factory=list)    # (repo, digest) deleted
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (repo, ref, why)
    failed: list[tuple[str, str, str]] = field(default_factory=list)   # (repo, ref, why)

    def as_dict(self) -> dict:
        return {"dryRun": self.dry_run,
                "tagsDeleted": [_image(r, t) for r, t in self.tags],
                "manifestsDeleted": [_image(r, d) for r, d in self.manifests],
                "skipped": [{"image": _image(r, ref), "reason": why}
                            for r, ref, why in self.skipped],
                "failed": [{"image": _image(r, ref), "reason": why}
                           for r, ref, why in self.failed]}


def _time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _locked(attributes: dict) -> bool:
    return attributes.get("writeEnabled") is False or attributes.get("deleteEnabled") is False


def _lock_reason(what: str) -> str:
    return f"locked: the {what} is write- or delete-disabled"


def _in_use(text: str) -> str | None:
    """A node's 403 that a manifest is part of an index (what the listing
    could not show: an unlisted index), as the reason to skip it."""
    try:
        errors = json.loads(text).get("errors") or []
    except (ValueError, AttributeError):
        return None
    for error in errors:
        if isinstance(error, dict) and error.get("message") == "manifest is in use":
            return f"in use: {str(error.get('detail') or 'part of an index')[:200]}"
    return None


async def _attempt(report: PurgeReport, limit: asyncio.Semaphore, repo: str, ref: str,
                   delete: Callable[[], Awaitable[tuple[int, str]]], locked_what: str) -> bool:
    """One delete: True when this delete did it. Already gone (404: another
    purge, a client or a replicated delete took it first), a lock or an index
    refusing it is a skip, anything else a failure recorded with its reason.
    Never raises for one item: the others go on and the report keeps them."""
    try:
        async with limit:
            status, text = await delete()
    except (aiohttp.ClientError, TimeoutError) as exc:
        report.failed.append((repo, ref, f"{type(exc).__name__}: {exc}"[:300]))
        return False
    if status in (200, 202):
        return True
    if status == 404:
        report.skipped.append((repo, ref, "already gone"))
    elif status == 405:
        report.skipped.append((repo, ref, _lock_reason(locked_what)))
    elif status == 403 and (why := _in_use(text)):
        report.skipped.append((repo, ref, why))
    else:
        report.failed.append((repo, ref, f"{status} {text[:300]}"))
    return False


async def _matching(names: list[str], patterns: list[regex.Pattern], what: str) -> list[str]:
    """The names some pattern matches whole, in a thread that lets go of the
    GIL, each match with a time limit (as acr-cli's): a regex that backtracks
    without end (``(a|aa)+``) fails the purge, saying why, and never freezes
    the event loop (the control process serves the management API on it)."""
    def match() -> list[str]:
        return [n for n in names if any(p.fullmatch(n, timeout=MATCH_TIMEOUT_S, concurrent=True)
                                        for p in patterns)]
    try:
        return await asyncio.to_thread(match)
    except TimeoutError:
        raise PurgeError(f"matching {what} against {', '.join(repr(p.pattern) for p in patterns)}"
                         f" took longer than {MATCH_TIMEOUT_S:g} s; simplify the regex "
                         f"(nested repeats such as (a|aa)+ backtrack without end)"[:400]) from None


async def purge(client: RegistryClient, request: PurgeRequest, now: float) -> PurgeReport:
    """Run ``request`` against ``client``'s registry at time ``now`` (seconds).
    A delete the registry refuses (other than a lock) is in ``failed``; the
    others still run."""
    catalog = await client.repositories()
    matched: dict[str, list[Filter]] = {}
    for f in request.filters:
        names = await _matching(catalog, [f.repository], "repositories")
        if not names:
            raise PurgeError(f"--filter {f.text!r}: no repository matches "
                             f"{f.repository.pattern!r} (this registry has "
                             f"{len(catalog)} repositories)")
        for name in names:
            matched.setdefault(name, []).append(f)
    report = PurgeReport(request.dry_run)
    limit = asyncio.Semaphore(request.concurrency)
    cutoff = now - request.ago_s
    for repo in sorted(matched):
        try:
            await _purge_repository(client, repo, matched[repo], request, cutoff, limit, report)
        except (PurgeError, aiohttp.ClientError, TimeoutError) as exc:
            # A listing that failed: this repository stops, the others go on.
            report.failed.append((repo, "*", str(exc)[:300] or type(exc).__name__))
    return report


async def _purge_repository(client: RegistryClient, repo: str, filters: list[Filter],
                            request: PurgeRequest, cutoff: float, limit: asyncio.Semaphore,
                            report: PurgeReport) -> None:
    """ACR's rule (acr-cli's getTagsToDelete): of the matching tags older than
    the cutoff and not locked, all but the ``keep`` most recently updated go."""
    repo_locked = _locked((await client.repository(repo)).get("changeableAttributes", {}))
    listed = await client.tags(repo)
    matching = set(await _matching([t["name"] for t in listed], [f.tag for f in filters],
                                   f"the tags of {repo}"))
    old = [t for t in listed if t["name"] in matching and _time(t["lastUpdateTime"]) < cutoff]
    old.sort(key=lambda t: (_time(t["lastUpdateTime"]), t["name"]), reverse=True)
    eligible = []
    for entry in old:
        if repo_locked or _locked(entry.get("changeableAttributes", {})):
            report.skipped.append((repo, entry["name"], _lock_reason(
                "repository" if repo_locked else "tag")))
        else:
            eligible.append(entry["name"])
    gone: set[str] = set()

    async def untag(tag: str) -> None:
        if request.dry_run or await _attempt(report, limit, repo, tag,
                                             lambda: client.untag(repo, tag), "tag"):
            gone.add(tag)
            report.tags.append((repo, tag))

    async with asyncio.TaskGroup() as group:
        for tag in eligible[request.keep:]:
            group.create_task(untag(tag))
    if request.untagged:
        await _purge_untagged(client, repo, request, cutoff, limit, report, gone, repo_locked)


async def _purge_untagged(client: RegistryClient, repo: str, request: PurgeRequest,
                          cutoff: float, limit: asyncio.Semaphore, report: PurgeReport,
                          gone: set[str], repo_locked: bool) -> None:
    """The manifests with no tag left (in a dry run: none but the tags it
    would delete), older than the cutoff, neither held by an index that stays
    nor referrers of a subject that stays; an index before its children. The
    listing hides unlisted manifests: a subject is looked up by itself, and an
    unlisted index holding a child makes the node refuse it (skipped, in use)."""
    listed = {m["digest"]: m for m in await client.manifests(repo)}
    untagged = {d for d, m in listed.items()
                if not set(m.get("tags") or ()) - gone and _time(m["lastUpdateTime"]) < cutoff}
    # What each index holds and what each referrer describes: from the bodies.
    children: dict[str, list[str]] = {}
    subject: dict[str, str] = {}
    for digest, m in listed.items():
        if m.get("mediaType") in INDEX_TYPES or digest in untagged:
            body = await client.manifest(repo, digest)
            children[digest] = [c["digest"] for c in body.get("manifests") or []]
            if isinstance(body.get("subject"), dict):
                subject[digest] = body["subject"].get("digest", "")
    present = {d: d in listed or await client.has_manifest(repo, d)
               for d in set(subject.values()) if d}
    doomed = set(untagged)
    for _ in range(len(listed) + 1):     # until nothing more is held back (bounded)
        held = {c for d, cs in children.items() if d not in doomed for c in cs}
        keep = {d for d in doomed if d in held or present.get(subject.get(d, ""), False)
                and subject[d] not in doomed}
        if not keep:
            break
        for digest in keep:
            why = "held by an index that stays" if digest in held else \
                "a referrer of an image that stays"
            report.skipped.append((repo, digest, why))
        doomed -= keep
    # Indexes first (their children are refused while they stand), then the rest.
    waves = [[d for d in doomed if children.get(d)], [d for d in doomed if not children.get(d)]]

    async def delete(digest: str) -> None:
        if repo_locked or _locked(listed[digest].get("changeableAttributes", {})):
            report.skipped.append((repo, digest, _lock_reason("repository" if repo_locked
                                                              else "manifest")))
            return
        if request.dry_run or await _attempt(report, limit, repo, digest,
                                             lambda: client.delete_manifest(repo, digest),
                                             "manifest or a tag on it"):
            report.manifests.append((repo, digest))

    for wave in waves:
        async with asyncio.TaskGroup() as group:
            for digest in sorted(wave):
                group.create_task(delete(digest))


async def run_purge(base: str, headers: dict[str, str], request: PurgeRequest, now: float,
                    tls: ssl.SSLContext | None = None) -> PurgeReport:
    """``purge`` over a session of its own to ``base`` (``tls``: the context an
    ``https`` endpoint needs; the CLI's and the control process's purges)."""
    connector = aiohttp.TCPConnector(ssl=tls) if tls is not None else None
    async with aiohttp.ClientSession(connector=connector) as session:
        return await purge(RegistryClient(session, base, headers), request, now)


def summary(report: PurgeReport) -> Iterable[str]:
    """The report as lines a person reads."""
    verb = "would delete" if report.dry_run else "deleted"
    for repo, tag in report.tags:
        yield f"{verb} tag {repo}:{tag}"
    for repo, digest in report.manifests:
        yield f"{verb} manifest {repo}@{digest}"
    for repo, ref, why in report.skipped:
        yield f"skipped {_image(repo, ref)}: {why}"
    for repo, ref, why in report.failed:
        yield f"failed {_image(repo, ref)}: {why}"
    done = "would be deleted (dry run: nothing deleted)" if report.dry_run else "deleted"
    yield (f"{len(report.tags)} tags and {len(report.manifests)} manifests {done}, "
           f"{len(report.skipped)} skipped" + (f", {len(report.failed)} failed"
                                              if report.failed else ""))


Runner = Callable[[PurgeRequest], Awaitable[PurgeReport]]
