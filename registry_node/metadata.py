"""ACR's metadata views of a repository (``/acr/v1/``): its properties, its
tags and its manifests, each with times and changeable attributes, in the
JSON shapes of ACR's data-plane API (2021-07-01).

Times
    ``createdTime`` is when the tag's value or the manifest was acknowledged
    at its origin (the same in every region); ``lastUpdateTime`` the wall
    time of the newest stamp among the register and its attributes (HLC
    milliseconds: the same in every region once they agree). A repository's
    ``createdTime`` is when this node first held it.

Listings
    ``orderby`` is ``timedesc`` or ``timeasc`` (by ``lastUpdateTime``, ties by
    name) or absent (by name, byte order); ``n`` caps a page and ``last``
    continues after the entry it names, in the same order. Ordered by time,
    a page's ``Link`` also carries ``stamp``, the HLC stamp of that entry:
    a ``last`` no longer listed (untagged, deleted, hidden, moved) continues
    after where it was, not at the end. List-disabled
    tags and manifests are left out (``locks``).

No HTTP here; refusals are ``RegistryError``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from . import hlc, keys, locks
from .errors import ErrorCode, RegistryError
from .records import (
    AttributesRecord,
    BlobRecord,
    ManifestRecord,
    RepoRecord,
    TagRecord,
    decode,
)
from .registry import Registry

ORDERS = ("timedesc", "timeasc")


def _time(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _stamp_ns(stamp_hlc: int) -> int:
    return hlc.unpack(stamp_hlc)[0] * 1_000_000


def _newest(register_hlc: int, attributes: AttributesRecord | None) -> int:
    return max(register_hlc, attributes.hlc if attributes is not None else 0)


# An entry's HLC stamp, for ordering (a rendered time has milliseconds, and
# two pushes in one millisecond are ordered by their stamps' counters);
# removed before the entry is sent.
_ORDER = "_stamp"


def check_order(orderby: str | None) -> str | None:
    if orderby in (None, "", *ORDERS):
        return orderby or None
    raise RegistryError(ErrorCode.UNSUPPORTED, f"orderby must be one of {', '.join(ORDERS)}",
                        message="invalid orderby", status=400)


def _tag_entry(registry: Registry, name: str, tag: str, record: TagRecord) -> dict[str, Any]:
    attributes = registry.locks.record(locks.tag(name, tag))
    created = record.origin_acked_ns or record.arrived_ns
    newest = _newest(record.hlc, attributes)
    return {"name": tag, "digest": record.digest, _ORDER: newest,
            "createdTime": _time(created),
            "lastUpdateTime": _time(max(_stamp_ns(newest), created)),
            "changeableAttributes": (attributes.attributes if attributes is not None
                                     else locks.DEFAULT).to_acr()}


def _manifest_entry(registry: Registry, name: str, digest: str, record: ManifestRecord,
                    tags: list[str]) -> dict[str, Any]:
    attributes = registry.locks.record(locks.manifest(name, digest))
    size = record.size
    for reference in record.references:
        raw = registry.meta.get(keys.blob(reference))
        if raw is not None:
            size += decode(raw, BlobRecord).size
    created = record.origin_acked_ns or record.created_ns
    newest = _newest(record.hlc, attributes)
    return {"digest": digest, "imageSize": size, "mediaType": record.media_type, _ORDER: newest,
            "createdTime": _time(created),
            "lastUpdateTime": _time(max(_stamp_ns(newest), created)),
            "tags": tags,
            "changeableAttributes": (attributes.attributes if attributes is not None
                                     else locks.DEFAULT).to_acr()}


def _tags(registry: Registry, name: str) -> dict[str, TagRecord]:
    return {keys.parse(k, keys.TagKey).tag: decode(v, TagRecord)
            for k, v in registry.meta.scan(keys.tag_prefix(name))}


def _tags_by_digest(tags: dict[str, TagRecord]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for tag, record in tags.items():
        out.setdefault(record.digest, []).append(tag)
    return out


def repository_properties(registry: Registry, name: str, login_server: str) -> dict[str, Any]:
    raw = registry.meta.get(keys.repo(name))
    if raw is None:
        raise RegistryError(ErrorCode.NAME_UNKNOWN, {"name": name})
    created = decode(raw, RepoRecord).created_ns
    tags = _tags(registry, name)
    manifests = [decode(v, ManifestRecord) for _, v in registry.meta.scan(keys.manifest_prefix(name))]
    attributes = registry.locks.record(locks.repository(name))
    newest = max([r.hlc for r in tags.values()] + [r.hlc for r in manifests]
                 + [attributes.hlc if attributes is not None else 0])
    return {"registry": login_server, "imageName": name, "createdTime": _time(created),
            "lastUpdateTime": _time(max(_stamp_ns(newest), created) if newest else created),
            "manifestCount": len(manifests), "tagCount": len(tags),
            "changeableAttributes": (attributes.attributes if attributes is not None
                                     else locks.DEFAULT).to_acr()}


def tag_properties(registry: Registry, name: str, tag: str, login_server: str) -> dict[str, Any]:
    registry.attributes_target_exists(locks.tag(name, tag))
    record = decode(registry.meta.get(keys.tag(name, tag)), TagRecord)
    entry = _tag_entry(registry, name, tag, record)
    del entry[_ORDER]
    return {"registry": login_server, "imageName": name, "tag": entry}


def manifest_properties(registry: Registry, name: str, digest: str,
                        login_server: str) -> dict[str, Any]:
    registry.attributes_target_exists(locks.manifest(name, digest))
    record = decode(registry.meta.get(keys.manifest(name, digest)), ManifestRecord)
    tags = sorted(_tags_by_digest(_tags(registry, name)).get(digest, []))
    entry = _manifest_entry(registry, name, digest, record, tags)
    del entry[_ORDER]
    return {"registry": login_server, "imageName": name, "manifest": entry}


def _page(entries: list[dict[str, Any]], key: str, orderby: str | None, n: int | None,
          last: str | None, stamp: int | None) -> tuple[list[dict[str, Any]], bool, int | None]:
    """One page, whether more follow, and the stamp of its last entry (with
    ``orderby``: a continuation names it beside ``last``, so that it goes on
    from where that entry was even once it is no longer listed)."""
    if orderby is not None:
        entries.sort(key=lambda e: (e[_ORDER], e[key]), reverse=orderby == "timedesc")
    if last:
        at = next((i for i, e in enumerate(entries) if e[key] == last), None)
        if at is not None:
            entries = entries[at + 1:]
        elif orderby is None:     # a name no longer listed: continue after it in byte order
            entries = [e for e in entries if e[key] > last]
        elif stamp is not None:   # no longer listed (or moved): after where it was
            after = (stamp, last)
            entries = [e for e in entries if ((e[_ORDER], e[key]) < after if orderby == "timedesc"
                                               else (e[_ORDER], e[key]) > after)]
        else:                     # where it was is unknown
            entries = []
    more = n is not None and len(entries) > n
    if more:
        entries = entries[:n]
    end = entries[-1][_ORDER] if entries and orderby is not None else None
    for entry in entries:
        del entry[_ORDER]
    return entries, more, end


def list_tags(registry: Registry, name: str, login_server: str, orderby: str | None,
              n: int | None, last: str | None,
              stamp: int | None = None) -> tuple[dict[str, Any], bool, int | None]:
    if not registry.repository_exists(name):
        raise RegistryError(ErrorCode.NAME_UNKNOWN, {"name": name})
    hidden = registry.locks.unlisted_tags(name)
    entries = [_tag_entry(registry, name, tag, record)
               for tag, record in _tags(registry, name).items() if tag not in hidden]
    page, more, end = _page(entries, "name", check_order(orderby), n, last, stamp)
    return {"registry": login_server, "imageName": name, "tags": page}, more, end


def list_manifests(registry: Registry, name: str, login_server: str, orderby: str | None,
                   n: int | None, last: str | None,
                   stamp: int | None = None) -> tuple[dict[str, Any], bool, int | None]:
    if not registry.repository_exists(name):
        raise RegistryError(ErrorCode.NAME_UNKNOWN, {"name": name})
    hidden = registry.locks.unlisted_manifests(name)
    by_digest = _tags_by_digest(_tags(registry, name))
    entries = []
    for key, raw in registry.meta.scan(keys.manifest_prefix(name)):
        digest = keys.parse(key, keys.ManifestKey).digest
        if digest not in hidden:
            entries.append(_manifest_entry(registry, name, digest, decode(raw, ManifestRecord),
                                           sorted(by_digest.get(digest, []))))
    page, more, end = _page(entries, "digest", check_order(orderby), n, last, stamp)
    return {"registry": login_server, "imageName": name, "manifests": page}, more, end


# A recycle bin entry's name in its listing's one order: a manifest's digest
# or a tag's name (they cannot collide: a tag has no ``:``); removed before
# the entry is sent.
_BINNED = "_binned"


def deleted(registry: Registry, repo: str, login_server: str, n: int | None = None,
            last: str | None = None, stamp: int | None = None
            ) -> tuple[dict[str, Any], bool, int | None, str | None]:
    """ACR's ``list-deleted`` and ``list-deleted-tags`` of one repository (its
    recycle bin, ``recycle_bin``), oldest delete first (by the deletes'
    stamps, as last-writer-wins orders them): each manifest with the tags it
    had, each untagged tag with what it named, and when each was deleted (at
    the delete's origin) and goes. Paged as the other listings are (``n``,
    ``last``, ``stamp``), over manifests and tags together in that order:
    ``last`` names a digest or a tag. Returns the page, whether more follow,
    and the stamp and name of its last entry (for the next page's link).
    404 ``NAME_UNKNOWN`` for a repository this node holds neither content nor
    a bin of."""
    bin_ = registry.bin
    if not registry.repository_exists(repo) and not bin_.holds(repo):
        raise RegistryError(ErrorCode.NAME_UNKNOWN, {"name": repo})

    def times(deleted_ns: int) -> dict[str, str]:
        return {"deletedTime": _time(deleted_ns), "purgeTime": _time(bin_.purge_ns(deleted_ns))}

    entries = [{"digest": digest, "tags": list(entry.tags),
                "mediaType": entry.record.media_type, "imageSize": entry.record.size,
                **times(entry.deleted_ns), _ORDER: entry.hlc, _BINNED: digest}
               for digest, entry in bin_.manifests(repo)]
    entries += [{"name": tag, "digest": entry.digest, **times(entry.deleted_ns),
                 _ORDER: entry.hlc, _BINNED: tag}
                for tag, entry in bin_.tags(repo)]
    page, more, end = _page(entries, _BINNED, "timeasc", n, last, stamp)
    last_name = page[-1][_BINNED] if page else None
    for entry in page:
        del entry[_BINNED]
    return ({"registry": login_server, "imageName": repo, "region": registry.identity.region,
             "manifests": [e for e in page if "tags" in e],
             "tags": [e for e in page if "tags" not in e]}, more, end, last_name)
