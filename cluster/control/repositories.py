"""The registry's repositories as ``georeg repository`` shows them: across every
replica region, because no single node holds them all. A repository pushed in
a confined region (Brazil South, Southeast Asia) never leaves it, and one
pushed elsewhere reaches each region only as replication gets there.

Invariants:

* every replica region is asked, all at once, each through one of its nodes
  (the zones of a region hold the same content), over the node's management
  link, so a region cut off from the network is as unreachable here as it is
  for clients;
* a region none of whose nodes answers, or whose node refuses, is never
  silently left out: it is listed in the answer's ``unavailable``, with the
  reason (``refused`` when a node answered with an error);
* a repository is deleted in every region that holds it, each with the node's
  own replicated delete (ACR's ``DELETE /acr/v1/{name}``), so what a region
  keeps to itself goes as well as what replication spread; a region whose
  copy replication removed first answers ``NAME_UNKNOWN`` and is not an
  error, any other failure of a region's delete is reported as such.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

import aiohttp

from .errors import ClusterError, NodeRefusal, NotFound, RegionUnavailable

if TYPE_CHECKING:                      # a Cluster is handed in; it never imports this module
    from .cluster import Cluster

T = TypeVar("T")

# A node answers within this or counts as unreachable for this request.
REGION_TIMEOUT_S = 30.0
TAGS_PAGE = 1000          # tags per page of a node's _tags listing (its maximum)


@dataclass(frozen=True, slots=True)
class Unavailable:
    """A region that could not be asked, or (``refused``) that was asked and
    answered with an error — a delete refused midway may have deleted part of
    what the region holds — and why."""

    region: str
    reason: str
    refused: bool = False

    def as_dict(self) -> dict:
        return {"region": self.region, "reason": self.reason, "refused": self.refused}


class _Unreachable(Exception):
    """A node did not answer (connection refused or reset, or timed out): ask another."""


class _Refused(Exception):
    """A node answered with an error (e.g. a delete in a zone-redundant region
    that lost its write quorum): the region could not do what was asked."""


class Repositories:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    # -- the three commands ------------------------------------------------------------

    async def list(self) -> dict:
        """Every repository, with the regions that hold it (in the spec's order)."""
        answers, unavailable = await self._each_region(_catalog)
        held: dict[str, list[str]] = {}
        for region, names in answers.items():
            for name in names:
                held.setdefault(name, []).append(region)
        return {"repositories": [{"name": name, "regions": held[name]} for name in sorted(held)],
                "unavailable": [u.as_dict() for u in unavailable]}

    async def show_tags(self, name: str) -> dict:
        """A repository's tags: per tag, the digest each region resolves it to.
        Regions disagree while replication catches up, and for good where a
        confined region tagged its own content."""
        answers, unavailable = await self._each_region(lambda http, url: _tags(http, url, name))
        holding = {region: tags for region, tags in answers.items() if tags is not None}
        if not holding:
            raise _absent(name, unavailable)
        by_tag: dict[str, dict[str, list[str]]] = {}
        for region, tags in holding.items():
            for tag, digest in tags.items():
                by_tag.setdefault(tag, {}).setdefault(digest, []).append(region)
        order = self._regions()
        out = []
        for tag in sorted(by_tag):
            digests = by_tag[tag]
            # The digest most regions resolve; on a tie, the one nearest the home region.
            digest = min(digests, key=lambda d: (-len(digests[d]), order.index(digests[d][0])))
            out.append({"name": tag, "digest": digest,
                        "regions": sorted((r for rs in digests.values() for r in rs), key=order.index),
                        "digests": digests, "agreed": len(digests) == 1})
        return {"repository": name, "regions": list(holding), "tags": out,
                "unavailable": [u.as_dict() for u in unavailable]}

    async def delete(self, name: str) -> dict:
        """Delete the repository in every region that holds it."""
        answers, unavailable = await self._each_region(lambda http, url: _delete(http, url, name))
        deleted = {region: body for region, body in answers.items() if body is not None}
        if not deleted:
            raise _absent(name, unavailable)
        manifests = sorted({d for body in deleted.values() for d in body["manifestsDeleted"]})
        tags = sorted({t for body in deleted.values() for t in body["tagsDeleted"]})
        return {"repository": name, "manifestsDeleted": manifests, "tagsDeleted": tags,
                "regions": deleted, "unavailable": [u.as_dict() for u in unavailable]}

    async def on_data_plane(self, name: str, method: str, path: str,
                            body: dict | None = None) -> tuple[int, dict]:
        """One request of ACR's data plane about repository ``name`` (``path``:
        ``/acr/v1/…`` or ``/v2/…``), to a node of the first region, in the
        spec's order, that holds it: a region answering 404 is passed over
        (it has not got the repository, or it is confined elsewhere). The
        node's answer is returned as it is (status, body): an attribute change
        made in any region replicates to every other like a push."""
        last: tuple[int, dict] | None = None
        unavailable: list[Unavailable] = []
        for region in self._regions():
            async def ask(http: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
                status, answer, _ = await _request(http, method, url + path, body)
                return status, answer

            answer = await self._in_region(region, ask)
            if isinstance(answer, Unavailable):
                unavailable.append(answer)
                continue
            if answer[0] != 404:
                return answer
            last = answer
        if last is None:
            raise _absent(name, unavailable)
        return last

    # -- one request per region ------------------------------------------------------

    def _regions(self) -> list[str]:
        return [r.region for r in self.cluster.spec.all_replicas]

    async def _each_region(self, ask: Callable[[aiohttp.ClientSession, str], Awaitable[T]]
                           ) -> tuple[dict[str, T], list[Unavailable]]:
        """``ask(session, node_url)`` in every region at once; the answers by
        region (in the spec's order), and the regions that could not be asked."""
        regions = self._regions()
        results = await asyncio.gather(*(self._in_region(region, ask) for region in regions))
        answers = {region: r for region, r in zip(regions, results, strict=True)
                   if not isinstance(r, Unavailable)}
        return answers, [r for r in results if isinstance(r, Unavailable)]

    async def _in_region(self, region: str,
                         ask: Callable[[aiohttp.ClientSession, str], Awaitable[T]]) -> T | Unavailable:
        """``ask`` through the region's first healthy node that answers."""
        nodes = [self.cluster.supervisor.nodes[n.name] for n in self.cluster.plan.nodes_in(region)]
        healthy = [n for n in nodes if n.healthy]
        if not healthy:
            states = ", ".join(f"{n.name} {n.state}" for n in nodes)
            return Unavailable(region, f"every node is down ({states})")
        failures = []
        for node in healthy:
            try:
                return await ask(self.cluster.http(), self.cluster.management_link_url(node.name))
            except _Unreachable as exc:
                failures.append(f"{node.name}: {exc}")
            except _Refused as exc:
                return Unavailable(region, f"{node.name}: {exc}", refused=True)
        return Unavailable(region, "cannot be reached over the network (" + "; ".join(failures) + ")")


# -- what is asked of a node ----------------------------------------------------------


async def _request(http: aiohttp.ClientSession, method: str, url: str,
                   body: dict | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body or {}, headers); ``_Unreachable`` if the node does not
    answer; a ``NodeRefusal`` (502) if its answer is not JSON: the node's
    failure, not bad input of whoever asked (a ValueError would be a 400)."""
    try:
        async with http.request(method, url, json=body,
                                timeout=aiohttp.ClientTimeout(total=REGION_TIMEOUT_S)) as r:
            try:
                body = await r.json(content_type=None) if method != "HEAD" else {}
            except ValueError:        # JSONDecodeError, UnicodeDecodeError
                raise NodeRefusal(f"the node answered {method} {urlsplit(url).path} with HTTP "
                                  f"{r.status} and a body that is not JSON", 502,
                                  "NodeError") from None
            return r.status, body or {}, dict(r.headers)
    except (aiohttp.ClientConnectionError, TimeoutError, OSError) as exc:
        raise _Unreachable(str(exc) or type(exc).__name__) from None


async def _catalog(http: aiohttp.ClientSession, url: str) -> list[str]:
    status, body, _ = await _request(http, "GET", f"{url}/v2/_catalog")
    if status != 200:
        raise _Refused(f"HTTP {status}: {_error_text(body)}")
    return body["repositories"]


async def _tags(http: aiohttp.ClientSession, url: str, name: str) -> dict[str, str] | None:
    """Tag → digest as this node stores them; None if it has no such repository.
    Read from ACR's ``_tags`` listing (metadata, paged), not by resolving each
    tag: a tag locked against reads refuses a pull, yet is a tag of the
    repository all the same (one locked against listing is left out here as
    from ``tags/list``)."""
    tags: dict[str, str] = {}
    page = f"/acr/v1/{name}/_tags?n={TAGS_PAGE}"
    while page:
        status, body, headers = await _request(http, "GET", url + page)
        if status == 404:
            return None
        if status != 200:
            raise _Refused(f"HTTP {status}: {_error_text(body)}")
        tags.update((t["name"], t["digest"]) for t in body.get("tags") or [])
        link = headers.get("Link", "")
        page = link.split(";", 1)[0].strip().strip("<>") if 'rel="next"' in link else ""
    return tags


async def _delete(http: aiohttp.ClientSession, url: str, name: str) -> dict | None:
    """What the node deleted; None if it has no such repository."""
    status, body, _ = await _request(http, "DELETE", f"{url}/acr/v1/{name}")
    return _region_answer(status, body)


def _region_answer(status: int, body: dict) -> dict | None:
    """A node's answer to a repository delete: what it deleted; None if it has
    no such repository (``NAME_UNKNOWN``: never had it, or replication took it
    all before the delete arrived). Any other 404 (an older node that found
    something gone midway) or refusal leaves the region refused, part of it
    perhaps deleted, never passed over as not holding the repository."""
    if status == 404 and _error_code(body) == "NAME_UNKNOWN":
        return None
    if status != 202:
        raise _Refused(f"HTTP {status}: {_error_text(body)}")
    return body


def _error_code(body: dict) -> str:
    return (body.get("errors") or [{}])[0].get("code", "")


def _error_text(body: dict) -> str:
    error = (body.get("errors") or [{}])[0]
    return ": ".join(str(part) for part in (error.get("message"), error.get("detail")) if part) \
        or "no detail"


def _reasons(unavailable: list[Unavailable]) -> str:
    return "; ".join(f"{u.region}: {'refused: ' if u.refused else ''}{u.reason}"
                     for u in unavailable)


def _absent(name: str, unavailable: list[Unavailable]) -> ClusterError:
    """No region that answered holds ``name``: it does not exist, unless a
    region that could not be asked holds it, which the message then names."""
    if not unavailable:
        return NotFound(f"repository {name} does not exist")
    return RegionUnavailable(f"repository {name} is in no region that answered; "
                             f"unavailable: {_reasons(unavailable)}")
