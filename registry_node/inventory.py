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
         "deleted_manifests": {digest: {"stamp"}},
         "blob_links":        {digest: {"stamp"}},
         "deleted_blob_links": {digest: {"stamp"}}}},
     "blobs": {digest: size},                        # blob records (metadata)
     "blob_files": [digest, …]}                      # blob files on disk

A stamp is ``[hlc, origin region, origin zone]``, as ``records.Stamp`` orders them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from . import keys
from .records import (
    BlobLink,
    BlobRecord,
    ManifestRecord,
    NodeIdentity,
    TagRecord,
    Tombstone,
    decode,
    stamp_of,
)

Scan = Callable[[bytes], Iterable[tuple[bytes, bytes]]]
"""``scan(prefix)``: every (key, value) whose key starts with ``prefix``, in key order."""

_KINDS = {b"t": "tags", b"m": "manifests", b"b": "blob_links"}


def _repository(out: dict, name: str) -> dict:
    repo = out.get(name)
    if repo is None:
        repo = out[name] = {"tags": {}, "deleted_tags": {}, "manifests": {},
                            "deleted_manifests": {}, "blob_links": {}, "deleted_blob_links": {}}
    return repo


def _split(key: bytes, prefix: bytes) -> tuple[str, bytes, str] | None:
    """``<prefix><repo>\\0<kind>\\0<name>`` → (repo, kind, name)."""
    parts = key[len(prefix):].split(keys.SEP, 2)
    if len(parts) != 3:
        return None
    return parts[0].decode(), parts[1], parts[2].decode()


def build(scan: Scan, blob_files: Iterable[str], last_seq: int = 0) -> dict:
    """The inventory of one node's storage (see the module docstring)."""
    repositories: dict[str, dict] = {}
    for key, raw in scan(keys.REPO_DATA):
        parsed = _split(key, keys.REPO_DATA)
        if parsed is None or parsed[1] not in _KINDS:
            continue  # referrer entries: derivable from the manifests' subjects
        name, kind, item = parsed
        repo = _repository(repositories, name)
        if kind == b"t":
            tag = decode(raw, TagRecord)
            repo["tags"][item] = {"digest": tag.digest, "stamp": list(stamp_of(tag))}
        elif kind == b"m":
            record = decode(raw, ManifestRecord)
            repo["manifests"][item] = {
                "media_type": record.media_type, "size": record.size,
                "pushed_region": record.pushed_region or record.origin_region,
                "references": list(record.references), "subject": record.subject,
                "stamp": list(stamp_of(record))}
        else:
            repo["blob_links"][item] = {"stamp": list(stamp_of(decode(raw, BlobLink)))}
    for key, raw in scan(keys.TOMB):
        parsed = _split(key, keys.TOMB)
        if parsed is None or parsed[1] not in _KINDS:
            continue
        name, kind, item = parsed
        tomb = decode(raw, Tombstone)
        entry: dict = {"stamp": list(stamp_of(tomb))}
        if kind == b"t":
            entry["digest"] = tomb.digest
        _repository(repositories, name)["deleted_" + _KINDS[kind]][item] = entry
    identity = None
    for _, raw in scan(keys.IDENTITY):
        found = decode(raw, NodeIdentity)
        identity = {"region": found.region, "zone": found.zone, "node_id": found.node_id}
    return {
        "identity": identity,
        "last_seq": last_seq,
        "catalog": [keys.suffix(k, keys.REPO) for k, _ in scan(keys.REPO)],
        "repositories": repositories,
        "blobs": {keys.suffix(k, keys.BLOB): decode(raw, BlobRecord).size
                  for k, raw in scan(keys.BLOB)},
        "blob_files": sorted(blob_files),
    }

