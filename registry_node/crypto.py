"""Encryption at rest: AES-256-GCM envelope encryption of blobs and manifests.

Keys
    The *node key* (32 random bytes, a file of mode 0600) never encrypts data
    itself. It wraps one random *data key* per blob, and derives, through HKDF,
    the key that seals manifests. A data dir records a check value sealed with
    its node key, so starting it with another key fails at once instead of
    failing on every read.

Blob file format (all integers big-endian)::

    header, HEADER_SIZE bytes
      magic "GRB1" | version u8 | flags u8 (1 = sealed) | reserved u16
      segment size u32 | plaintext size u64 | blob id (16 random bytes)
      digest length u16 | digest (ascii, zero padded to 136)
      wrapped data key: nonce(12) ‖ AES-GCM(node key, data key)(32) ‖ tag(16)
    segment 0 .. n-1, each: nonce(12) ‖ ciphertext(≤ segment size) ‖ tag(16)

Invariants
    * The data key is wrapped with the header's first bytes (magic … digest) as
      associated data: a header whose digest, size or blob id was altered, or a
      file renamed to another digest, does not unwrap. That is how the digest
      is bound to every segment: only this file's key decrypts its segments.
    * Each segment's associated data is (blob id, segment index): segments
      cannot be reordered, dropped, or moved between files undetected.
    * Every segment but the last holds exactly ``segment size`` bytes, so the
      segments covering any byte range are computed, not searched, and a
      ranged read decrypts only those.
    * The file length is fully determined by the header's plaintext size; a
      truncated or extended file is refused before a byte is served.
    * Segment nonces are random. A segment is sometimes re-encrypted (an upload's
      last, short segment grows as more data arrives), which is safe with
      random nonces and a key that lives for one blob.

Uploads use the same format: while open, the header holds no digest and is not
sealed; committing rewrites the header with the digest and size.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
SEGMENT_OVERHEAD = NONCE_SIZE + TAG_SIZE
SEGMENT_SIZE = 64 * 1024
HEADER_SIZE = 256
MAGIC = b"GRB1"
VERSION = 1
FLAG_SEALED = 1
DIGEST_FIELD = 136
WRAPPED_KEY_SIZE = NONCE_SIZE + KEY_SIZE + TAG_SIZE

# magic, version, flags, reserved, segment size, size, blob id, digest length, digest
_HEADER = struct.Struct(f">4sBBHIQ16sH{DIGEST_FIELD}s")
_WRAP_AD = b"georeg/blob-key/v1"
_SEGMENT_AD = b"georeg/blob-segment/v1"
_SEGMENT_INDEX = struct.Struct(">Q")
_KEY_CHECK = b"georeg node key check v1"


class CryptoError(Exception):
    """Base of the errors below."""


class KeyFileError(CryptoError):
    """The node key file is missing, malformed, too open, or not this data dir's key."""


class BlobCorrupt(CryptoError):
    """A blob or manifest failed authentication: tampered, truncated, or wrong key.
    Its bytes are never served."""


class NodeKey:
    """The node's key-encryption key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise KeyFileError(f"a node key is {KEY_SIZE} bytes, got {len(key)}")
        self._aead = AESGCM(key)
        self._key = key

    def __repr__(self) -> str:  # never show key material in logs or tracebacks
        return "NodeKey(<secret>)"

    @classmethod
    def load_or_create(cls, path: Path) -> NodeKey:
        """Load the key at ``path``, or create one there (mode 0600) if absent."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls.load(path)
        key = os.urandom(KEY_SIZE)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        return cls(key)

    @classmethod
    def load(cls, path: Path) -> NodeKey:
        return cls(read_key_file(path))

    def wrap(self, data_key: bytes, associated: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, data_key, _WRAP_AD + associated)

    def unwrap(self, wrapped: bytes, associated: bytes) -> bytes:
        try:
            return self._aead.decrypt(wrapped[:NONCE_SIZE], wrapped[NONCE_SIZE:],
                                      _WRAP_AD + associated)
        except InvalidTag:
            raise BlobCorrupt("data key does not unwrap: header altered or wrong node key") from None

    def derive(self, purpose: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None,
                    info=b"georeg/" + purpose).derive(self._key)

    def check_value(self) -> bytes:
        """A value stored in the data dir to recognise this key later."""
        return Sealer(self.derive(b"key-check")).seal(_KEY_CHECK, b"")

    def matches(self, check_value: bytes) -> bool:
        try:
            return Sealer(self.derive(b"key-check")).open(check_value, b"") == _KEY_CHECK
        except BlobCorrupt:
            return False


def read_key_file(path: Path) -> bytes:
    """The 32-byte key in ``path``; ``KeyFileError`` if it is missing, malformed
    or readable by anyone but its owner."""
    try:
        mode = path.stat().st_mode
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"key file {path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
            f"run: chmod 600 {path}"
        )
    return _parse_key(raw, path)


def _parse_key(raw: bytes, path: Path) -> bytes:
    """Accept a key file of 32 raw bytes, 64 hex characters or 44 base64 characters."""
    if len(raw) == KEY_SIZE:
        return raw
    text = raw.strip()
    try:
        if len(text) == 2 * KEY_SIZE:
            return bytes.fromhex(text.decode())
        if len(text) == 44:
            import base64

            return base64.b64decode(text, validate=True)
    except ValueError:
        pass
    raise KeyFileError(
        f"key file {path} must hold a 32-byte key: raw, 64 hex characters or base64 "
        f"(e.g. `head -c 32 /dev/urandom > {path}`)"
    )


class Sealer:
    """Seals small values (manifests) in one piece: nonce ‖ ciphertext ‖ tag."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, associated: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, plaintext, associated)

    def open(self, sealed: bytes, associated: bytes) -> bytes:
        try:
            return self._aead.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], associated)
        except InvalidTag:
            raise BlobCorrupt("sealed value failed authentication") from None


def encrypted_size(size: int, segment_size: int = SEGMENT_SIZE) -> int:
    """The length of a sealed blob file holding ``size`` plaintext bytes."""
    segments = -(-size // segment_size)
    return HEADER_SIZE + size + segments * SEGMENT_OVERHEAD


class _Header:
    __slots__ = ("segment_size", "size", "blob_id", "digest", "sealed", "wrapped_key")

    def __init__(self, segment_size: int, size: int, blob_id: bytes, digest: str,
                 sealed: bool, wrapped_key: bytes = b"") -> None:
        self.segment_size = segment_size
        self.size = size
        self.blob_id = blob_id
        self.digest = digest
        self.sealed = sealed
        self.wrapped_key = wrapped_key

    def associated(self) -> bytes:
        digest = self.digest.encode()
        return _HEADER.pack(MAGIC, VERSION, FLAG_SEALED if self.sealed else 0, 0,
                            self.segment_size, self.size, self.blob_id, len(digest), digest)

    def pack(self) -> bytes:
        body = self.associated() + self.wrapped_key
        return body + bytes(HEADER_SIZE - len(body))

    @classmethod
    def unpack(cls, raw: bytes) -> _Header:
        if len(raw) < HEADER_SIZE:
            raise BlobCorrupt("file shorter than its header")
        magic, version, flags, _, segment_size, size, blob_id, dlen, digest = _HEADER.unpack_from(raw)
        if magic != MAGIC or version != VERSION or not 0 < segment_size <= 1 << 26 \
                or dlen > DIGEST_FIELD:
            raise BlobCorrupt("not a georeg blob file (bad magic, version or header)")
        wrapped = raw[_HEADER.size:_HEADER.size + WRAPPED_KEY_SIZE]
        return cls(segment_size, size, blob_id, digest[:dlen].decode("ascii", "replace"),
                   bool(flags & FLAG_SEALED), wrapped)


_IOV_MAX = os.sysconf("SC_IOV_MAX")


def _pwritev_all(fd: int, buffers: list[bytes], offset: int) -> None:
    """Write every buffer at ``offset`` in order, with as few syscalls as the
    kernel allows (``pwritev`` may write less than asked, and takes at most
    IOV_MAX buffers at a time)."""
    pending = [memoryview(b) for b in buffers]
    while pending:
        batch = pending[:_IOV_MAX]
        written = os.pwritev(fd, batch, offset)
        offset += written
        while pending and written >= len(pending[0]):
            written -= len(pending[0])
            pending.pop(0)
        if written:
            pending[0] = pending[0][written:]


def _segment_ad(blob_id: bytes, index: int) -> bytes:
    return _SEGMENT_AD + blob_id + _SEGMENT_INDEX.pack(index)


class SegmentWriter:
    """Encrypts a growing plaintext stream into an open file, segment by segment.

    Blocking (file IO and AES); callers on an event loop run it in a thread.
    Full segments are written as soon as they fill; the short remainder stays
    in memory until ``flush`` writes it as a (temporary) last segment, which the
    next ``write`` overwrites with a longer one.
    """

    def __init__(self, fd: int, node_key: NodeKey, *, data_key: bytes | None = None,
                 blob_id: bytes | None = None, segment_size: int = SEGMENT_SIZE,
                 segments: int = 0, tail: bytes = b"") -> None:
        self._fd = fd
        self._node_key = node_key
        self._data_key = data_key or os.urandom(KEY_SIZE)
        self._aead = AESGCM(self._data_key)
        self.blob_id = blob_id or os.urandom(16)
        self.segment_size = segment_size
        self._segments = segments          # full segments written
        self._tail = bytearray(tail)       # plaintext after the full segments

    @classmethod
    def create(cls, fd: int, node_key: NodeKey, segment_size: int = SEGMENT_SIZE) -> SegmentWriter:
        writer = cls(fd, node_key, segment_size=segment_size)
        writer._write_header(digest="", sealed=False)
        return writer

    @classmethod
    def resume(cls, fd: int, node_key: NodeKey) -> SegmentWriter:
        """Reopen an unsealed upload file, e.g. after a restart. The last segment
        is decrypted back into the tail; a torn (unauthenticated) last segment is
        dropped, so the upload resumes from the last intact byte."""
        raw = os.pread(fd, HEADER_SIZE, 0)
        header = _Header.unpack(raw)
        if header.sealed:
            raise BlobCorrupt("upload file is already sealed")
        data_key = node_key.unwrap(header.wrapped_key, header.associated())
        aead = AESGCM(data_key)
        file_size = os.fstat(fd).st_size
        stride = header.segment_size + SEGMENT_OVERHEAD
        body = max(0, file_size - HEADER_SIZE)
        count, rest = divmod(body, stride)
        if rest == 0 and count:
            count, rest = count - 1, stride
        tail = b""
        if rest > SEGMENT_OVERHEAD:
            raw_seg = os.pread(fd, rest, HEADER_SIZE + count * stride)
            try:
                plain = aead.decrypt(raw_seg[:NONCE_SIZE], raw_seg[NONCE_SIZE:],
                                     _segment_ad(header.blob_id, count))
            except InvalidTag:
                plain = b""
            if len(plain) == header.segment_size:
                count, plain = count + 1, b""
            tail = plain
        os.ftruncate(fd, HEADER_SIZE + count * stride)
        return cls(fd, node_key, data_key=data_key, blob_id=header.blob_id,
                   segment_size=header.segment_size, segments=count, tail=tail)

    @property
    def size(self) -> int:
        return self._segments * self.segment_size + len(self._tail)

    @property
    def pending(self) -> bytes:
        """Plaintext received after the last full segment (not yet on disk as one)."""
        return bytes(self._tail)

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        seg = self.segment_size
        if self._tail:
            take = min(seg - len(self._tail), len(view))
            self._tail += view[:take]
            view = view[take:]
            if len(self._tail) < seg:
                return
            self._put_segments(bytes(self._tail))
            self._tail.clear()
        full = len(view) - len(view) % seg
        if full:
            self._put_segments(view[:full])
        if full < len(view):
            self._tail += view[full:]

    def flush(self) -> None:
        """Write the in-memory remainder as the file's last segment."""
        if self._tail:
            self._put_segments(bytes(self._tail), advance=False)

    def seal(self, digest: str) -> None:
        """Write the final header naming ``digest``; the caller fsyncs and renames."""
        self.flush()
        self._write_header(digest=digest, sealed=True)

    def _put_segments(self, plain: bytes | memoryview, advance: bool = True) -> None:
        seg = self.segment_size
        stride = seg + SEGMENT_OVERHEAD
        parts: list[bytes] = []
        index = self._segments
        encrypt, blob_id = self._aead.encrypt, self.blob_id
        for start in range(0, len(plain), seg):
            nonce = os.urandom(NONCE_SIZE)
            parts.append(nonce)
            parts.append(encrypt(nonce, plain[start:start + seg], _segment_ad(blob_id, index)))
            index += 1
        # One vectored write: the segments go to the file without being joined first.
        _pwritev_all(self._fd, parts, HEADER_SIZE + self._segments * stride)
        if advance:
            self._segments = index

    def _write_header(self, digest: str, sealed: bool) -> None:
        header = _Header(self.segment_size, self.size if sealed else 0, self.blob_id, digest, sealed)
        header.wrapped_key = self._node_key.wrap(self._data_key, header.associated())
        os.pwrite(self._fd, header.pack(), 0)


class SealedBlob:
    """Read access to one sealed blob file; decrypts only the segments asked for."""

    def __init__(self, fd: int, header: _Header, data_key: bytes) -> None:
        self._fd = fd
        self._header = header
        self._aead = AESGCM(data_key)
        self.size = header.size
        self.digest = header.digest

    @classmethod
    def open(cls, path: str | os.PathLike, node_key: NodeKey, digest: str) -> SealedBlob:
        """Open and authenticate the header; raises ``FileNotFoundError`` or ``BlobCorrupt``."""
        fd = os.open(path, os.O_RDONLY)
        try:
            raw = os.pread(fd, HEADER_SIZE, 0)
            header = _Header.unpack(raw)
            # Padding, reserved bits and the digest field's tail are outside the
            # authenticated fields; a header that is not exactly what ``pack``
            # writes has been altered, and altered files are not served.
            if header.pack() != raw:
                raise BlobCorrupt("header altered outside its authenticated fields")
            if not header.sealed or header.digest != digest:
                raise BlobCorrupt(f"file does not hold {digest}")
            data_key = node_key.unwrap(header.wrapped_key, header.associated())
            expected = encrypted_size(header.size, header.segment_size)
            actual = os.fstat(fd).st_size
            if actual != expected:
                raise BlobCorrupt(f"file is {actual} bytes, its header says {expected}: truncated or extended")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, header, data_key)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SealedBlob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, start: int, end: int) -> bytes:
        """Plaintext bytes ``[start, end)``; blocking."""
        if not 0 <= start <= end <= self.size:
            raise ValueError(f"range {start}-{end} outside 0-{self.size}")
        if start == end:
            return b""
        seg = self._header.segment_size
        stride = seg + SEGMENT_OVERHEAD
        first, last = start // seg, (end - 1) // seg
        offset = HEADER_SIZE + first * stride
        length = (last - first) * stride + min(seg, self.size - last * seg) + SEGMENT_OVERHEAD
        raw = os.pread(self._fd, length, offset)
        if len(raw) != length:
            raise BlobCorrupt("file shrank while being read")
        view = memoryview(raw)
        decrypt, blob_id = self._aead.decrypt, self._header.blob_id
        parts: list[bytes] = []
        for i, pos in enumerate(range(0, length, stride)):
            try:
                parts.append(decrypt(view[pos:pos + NONCE_SIZE], view[pos + NONCE_SIZE:pos + stride],
                                     _segment_ad(blob_id, first + i)))
            except InvalidTag:
                raise BlobCorrupt(f"segment {first + i} of {self.digest} failed authentication") from None
        plain = parts[0] if len(parts) == 1 else b"".join(parts)  # the one copy
        skip = start - first * seg
        if skip or len(plain) != end - start:
            return plain[skip:skip + (end - start)]
        return plain

    def chunks(self, start: int, end: int, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        pos = start
        while pos < end:
            stop = min(end, pos + chunk_size)
            yield self.read(pos, stop)
            pos = stop


def read_unsealed(fd: int, node_key: NodeKey) -> Iterator[bytes]:
    """Plaintext of every segment of an unsealed (upload) file, in order.
    Used only on rare paths: recomputing a hash after a restart, or a digest
    in an algorithm that was not computed on the way in."""
    header = _Header.unpack(os.pread(fd, HEADER_SIZE, 0))
    aead = AESGCM(node_key.unwrap(header.wrapped_key, header.associated()))
    stride = header.segment_size + SEGMENT_OVERHEAD
    end = os.fstat(fd).st_size
    pos, index = HEADER_SIZE, 0
    while pos < end:
        raw = os.pread(fd, min(stride, end - pos), pos)
        try:
            yield aead.decrypt(raw[:NONCE_SIZE], raw[NONCE_SIZE:], _segment_ad(header.blob_id, index))
        except InvalidTag:
            raise BlobCorrupt(f"upload segment {index} failed authentication") from None
        pos += len(raw)
        index += 1
