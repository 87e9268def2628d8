"""Every key in a node's metadata database is built here, and only here.

Components are joined by NUL (``\\x00``). No repository name, tag, digest or
upload id can contain NUL (see ``reference``), so a prefix scan over one
repository never runs into another: ``r\\0app\\0`` cannot match ``app/web``.
Sequence numbers are 8-byte big-endian so byte order is numeric order.

The key space::

    meta\\0schema                          → schema version (ascii int)
    meta\\0identity                        → NodeIdentity      which region/zone wrote this DB
    meta\\0hlc                             → last HLC stamp issued (ascii int)
    log\\0<seq:u64be>                       → Event             the replication log, seq from 1
    blob\\0<digest>                         → BlobRecord        the node holds this blob's file
    ref\\0<target>\\0<repo>\\0<manifest>      → b""               <manifest> in <repo> needs <target>
    user\\0<digest>\\0<repo>                → b""               <repo> links blob <digest>
    repo\\0<repo>                           → RepoRecord        the catalog
    r\\0<repo>\\0
    ├── b\\0<digest>                        → BlobLink          blob is visible in <repo>
    ├── m\\0<digest>                        → ManifestRecord    manifest (sealed body inside)
    ├── t\\0<tag>                           → TagRecord         tag → digest, with its HLC
    └── s\\0<subject>\\0<referrer>           → sealed Descriptor referrers of <subject> (annotations are client data)
    upload\\0<uuid>                         → UploadRecord      an open upload session
    tomb\\0<repo>\\0
    ├── t\\0<tag>                           → Tombstone         a deleted tag
    ├── m\\0<digest>                        → Tombstone         a deleted manifest
    └── b\\0<digest>                        → Tombstone         a deleted blob link
    cursor\\0<peer name>                    → Cursor            how far a peer's log is applied
    fail\\0<repo>\\0<digest>                → ReplicationFailure  why content could not replicate
    xfer\\0<digest>                         → upload id         an inbound blob transfer to resume

Blob bytes are not here: they live in ``blobs/<alg>/<hex[:2]>/<hex>`` under the
data dir, encrypted (see ``crypto``); uploads in progress in ``uploads/<uuid>``.
"""

from __future__ import annotations

import struct

SEP = b"\x00"
SCHEMA = b"meta\x00schema"
IDENTITY = b"meta\x00identity"
HLC = b"meta\x00hlc"

LOG = b"log\x00"
BLOB = b"blob\x00"
REF = b"ref\x00"
BLOB_USER = b"user\x00"
REPO = b"repo\x00"
REPO_DATA = b"r\x00"
UPLOAD = b"upload\x00"
TOMB = b"tomb\x00"
CURSOR = b"cursor\x00"
FAIL = b"fail\x00"
TRANSFER = b"xfer\x00"

_SEQ = struct.Struct(">Q")


def _b(text: str) -> bytes:
    return text.encode()


def log(seq: int) -> bytes:
    return LOG + _SEQ.pack(seq)


def log_seq(key: bytes) -> int:
    return _SEQ.unpack(key[len(LOG):])[0]


def blob(digest: str) -> bytes:
    return BLOB + _b(digest)


def ref_prefix(target: str) -> bytes:
    """All manifests, in any repository, that reference ``target``."""
    return REF + _b(target) + SEP


def ref_repo_prefix(target: str, repo: str) -> bytes:
    """Manifests of ``repo`` that reference ``target``."""
    return REF + _b(target) + SEP + _b(repo) + SEP


def ref(target: str, repo: str, manifest: str) -> bytes:
    return ref_repo_prefix(target, repo) + _b(manifest)


def blob_user(digest: str, repo: str) -> bytes:
    """Reverse of ``blob_link``: which repositories link a blob."""
    return blob_users_prefix(digest) + _b(repo)


def blob_users_prefix(digest: str) -> bytes:
    return BLOB_USER + _b(digest) + SEP


def repo(name: str) -> bytes:
    return REPO + _b(name)


def repo_prefix(name: str) -> bytes:
    """Everything stored under one repository (links, manifests, tags, referrers)."""
    return REPO_DATA + _b(name) + SEP


def blob_link(name: str, digest: str) -> bytes:
    return repo_prefix(name) + b"b" + SEP + _b(digest)


def manifest(name: str, digest: str) -> bytes:
    return repo_prefix(name) + b"m" + SEP + _b(digest)


def manifest_prefix(name: str) -> bytes:
    return repo_prefix(name) + b"m" + SEP


def tag(name: str, tag_name: str) -> bytes:
    return tag_prefix(name) + _b(tag_name)


def tag_prefix(name: str) -> bytes:
    return repo_prefix(name) + b"t" + SEP


def referrer(name: str, subject: str, referrer_digest: str) -> bytes:
    return referrer_prefix(name, subject) + _b(referrer_digest)


def referrer_prefix(name: str, subject: str) -> bytes:
    return repo_prefix(name) + b"s" + SEP + _b(subject) + SEP


def upload(uuid: str) -> bytes:
    return UPLOAD + _b(uuid)


def suffix(key: bytes, prefix: bytes) -> str:
    """The last component of ``key`` after ``prefix``, decoded."""
    return key[len(prefix):].decode()


def tomb_prefix(name: str) -> bytes:
    return TOMB + _b(name) + SEP


def tag_tomb(name: str, tag_name: str) -> bytes:
    return tomb_prefix(name) + b"t" + SEP + _b(tag_name)


def manifest_tomb(name: str, digest: str) -> bytes:
    return tomb_prefix(name) + b"m" + SEP + _b(digest)


def blob_tomb(name: str, digest: str) -> bytes:
    return tomb_prefix(name) + b"b" + SEP + _b(digest)


def cursor(peer: str) -> bytes:
    return CURSOR + _b(peer)


def failure(name: str, digest: str) -> bytes:
    return FAIL + _b(name) + SEP + _b(digest)


def transfer(digest: str) -> bytes:
    return TRANSFER + _b(digest)
