"""A node's inventory: everything it stores, by repository, with the stamps and
origin regions that decide what every other replica should hold. Read-only.

``georeg verify`` compares inventories across replicas (tags and manifests as
last-writer-wins registers, deletes included), checks each against what the
OCI API serves, and uses origin regions to judge residency. The same builder
reads a running node's database (``GET /georeg/v1/inventory``) or a data dir
opened read-only from outside, so both views have one shape::

    {"identity": {"region", "zone", "node_id"} | None,
     "last_seq": int,
     "catalog": [repository, …],                     # repositories with live content
     "repositories": {repository: {
         "tags":              {tag: {"digest", "stamp"}},
         "deleted_tags":      {tag: {"digest", "stamp"}},
         "manifests":         {digest: {"media_type", "size", "pushed_region",
                                        "references", "subject", "stamp"}},
         "deleted_manifests": {digest: {"stamp", "recycled", "recycled_tags"}},
         "blob_links":        {digest: {"stamp"}},
         "deleted_blob_links": {digest: {"stamp"}},
         "attributes":        {"repository" | "tag:<tag>" | "manifest:<digest>":
                               {"attributes": {deleteEnabled, writeEnabled, readEnabled,
                                               listEnabled}, "stamp"}},
         "recycled_manifests": {digest: {"tags", "size", "deleted_ns", "stamp"}},  # bin
         "recycled_tags":      {tag: {"digest", "deleted_ns", "stamp"}}}},
     "blobs": {digest: size},                        # blob records (metadata)
     "blob_files": [digest, …]}                      # blob files on disk

A stamp is ``[hlc, origin region, origin zone]``, as ``records.Stamp`` orders them.
A recycle bin entry's stamp is the soft delete's it records (``recycle_bin``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from . import keys
from .records import (
    AttributesRecord,
    BlobLink,
    BlobRecord,
    ManifestRecord,
    NodeIdentity,
    RecycledManifest,
    RecycledTag,
    TagRecord,
    Tombstone,
    decode,
    stamp_of,
)

Scan = Callable[[bytes], Iterable[tuple[bytes, bytes]]]
"""``scan(prefix)``: every (key, value) whose key starts with ``prefix``, in key order."""

_K = TypeVar("_K")


def _repository(out: dict, name: str) -> dict:
    repo = out.get(name)
    if repo is None:
        repo = out[name] = {"tags": {}, "deleted_tags": {}, "manifests": {},
                            "deleted_manifests": {}, "blob_links": {}, "deleted_blob_links": {},
                            "attributes": {}, "recycled_manifests": {}, "recycled_tags": {}}
    return repo


def _keys(scan: Scan, prefix: bytes, kind: type[_K]) -> Iterator[tuple[_K, bytes]]:
    """The keys of ``kind`` under ``prefix``, parsed. A key that does not parse
    names no content this inventory can describe: it is left out, not fatal (the
    builder also reads data dirs from outside, where one odd key must not hide
    the rest)."""
    for key, raw in scan(prefix):
        try:
            yield keys.parse(key, kind), raw
        except keys.MalformedKey:
            continue


def attributes_name(key: keys.AttributesKey) -> str:
    """How the inventory names an attributes register: ``repository``,
    ``tag:<tag>`` or ``manifest:<digest>``."""
    match key:
        case keys.TagAttributesKey(tag=tag):
            return f"tag:{tag}"
        case keys.ManifestAttributesKey(digest=digest):
            return f"manifest:{digest}"
    return "repository"


def build(scan: Scan, blob_files: Iterable[str], last_seq: int = 0) -> dict:
    """The inventory of one node's storage (see the module docstring)."""
    repositories: dict[str, dict] = {}
    for key, raw in _keys(scan, keys.REPO_DATA, keys.RepoDataKey):
        match key:
            case keys.TagKey(repository=name, tag=tag_name):
                tag = decode(raw, TagRecord)
                _repository(repositories, name)["tags"][tag_name] = {
                    "digest": tag.digest, "stamp": list(stamp_of(tag))}
            case keys.ManifestKey(repository=name, digest=digest):
                record = decode(raw, ManifestRecord)
                _repository(repositories, name)["manifests"][digest] = {
                    "media_type": record.media_type, "size": record.size,
                    "pushed_region": record.residency_region,
                    "references": list(record.references), "subject": record.subject,
                    "stamp": list(stamp_of(record))}
            case keys.BlobLinkKey(repository=name, digest=digest):
                _repository(repositories, name)["blob_links"][digest] = {
                    "stamp": list(stamp_of(decode(raw, BlobLink)))}
            # Referrer entries are left out: derivable from the manifests' subjects.
    for key, raw in _keys(scan, keys.TOMB, keys.TombKey):
        tomb = decode(raw, Tombstone)
        entry: dict = {"stamp": list(stamp_of(tomb))}
        deleted = _repository(repositories, key.repository)
        match key:
            case keys.TagTombKey(tag=tag_name):
                entry["digest"] = tomb.digest
                deleted["deleted_tags"][tag_name] = entry
            case keys.ManifestTombKey(digest=digest):
                entry["recycled"] = tomb.recycled
                entry["recycled_tags"] = list(tomb.recycled_tags)
                deleted["deleted_manifests"][digest] = entry
            case keys.BlobTombKey(digest=digest):
                deleted["deleted_blob_links"][digest] = entry
    for key, raw in _keys(scan, keys.ATTRIBUTES, keys.AttributesKey):
        record = decode(raw, AttributesRecord)
        _repository(repositories, key.repository)["attributes"][attributes_name(key)] = {
            "attributes": record.attributes.to_acr(), "stamp": list(stamp_of(record))}
    for key, raw in _keys(scan, keys.RECYCLE_BIN, keys.RecycledKey):
        binned = _repository(repositories, key.repository)
        match key:
            case keys.RecycledManifestKey(digest=digest):
                kept = decode(raw, RecycledManifest)
                binned["recycled_manifests"][digest] = {
                    "tags": list(kept.tags), "size": kept.record.size,
                    "deleted_ns": kept.deleted_ns,
                    "stamp": list(stamp_of(kept))}
            case keys.RecycledTagKey(tag=tag_name):
                untagged = decode(raw, RecycledTag)
                binned["recycled_tags"][tag_name] = {
                    "digest": untagged.digest, "deleted_ns": untagged.deleted_ns,
                    "stamp": list(stamp_of(untagged))}
    identity = None
    for _, raw in scan(keys.IDENTITY):
        found = decode(raw, NodeIdentity)
        identity = {"region": found.region, "zone": found.zone, "node_id": found.node_id}
    return {
        "identity": identity,
        "last_seq": last_seq,
        "catalog": [k.repository for k, _ in _keys(scan, keys.REPO, keys.RepoKey)],
        "repositories": repositories,
        "blobs": {k.digest: decode(raw, BlobRecord).size
                  for k, raw in _keys(scan, keys.BLOB, keys.BlobKey)},
        "blob_files": sorted(blob_files),
    }

