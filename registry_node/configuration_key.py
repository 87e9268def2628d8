"""The configuration key: it seals the secrets that registry configuration
carries — a webhook's custom header values, which usually hold the receiver's
credential — so that they are ciphertext in every node's metastore, in its
event log and in replication, as blobs and manifests are (``crypto``), and
plaintext only in the process about to use them.

Who holds which key
    A cluster has one configuration key: 32 random bytes made at its first
    start in ``<data dir>/auth/configuration.key`` (mode 0600 from its first
    byte, under a 0700 directory; ``cluster.control.access``). The control
    plane holds it: it seals each value before it writes it through the home
    region, and opens them for ``get-config``. Each serving node is given the
    file's path by its plan (``georeg node --configuration-key-file``), never
    the key itself: it opens a value just before sending it, and its write
    route checks that a sealed value opens where it is written. A paired-region
    copy, which stores and relays but never delivers, is given none.
    A node given no file (a standalone ``georeg node``) uses a key of its own,
    derived from its node key: it seals a plaintext value written to it, and
    only it can open what it sealed.

A sealed value
    ``sealed:v1:`` followed by base64(nonce(12) ‖ AES-256-GCM ciphertext ‖
    tag(16)). Its place is the associated data — for a header, the webhook's
    name and the header's name exactly as written —, so a sealed value copied
    to another webhook or header does not open there. A value without the
    prefix is plaintext, stored before values were sealed: it reads as it is
    and is sealed the next time it is written.

Invariants
    * Neither a value nor the key appears in an exception, a repr or a log
      line: errors name the place (webhook, header), never what it holds.
    * Every seal draws a fresh random nonce (sealing a value twice gives two
      strings); a registry holds at most 500 × 16 values, far below the 2^32
      seals one key allows with random nonces.

Rotation (not built): a ``v2`` form would name its key (``sealed:v2:<key
id>:…``) and every holder would keep a key ring (the new key and the old);
the control plane would rewrite each webhook once (open with the old key,
seal with the new, an ordinary update, as it reseals a plaintext value now),
and the old key would leave the ring once every node holds the rewritten
values (replication converged, as ``georeg verify`` shows).
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .crypto import KEY_SIZE, NONCE_SIZE, TAG_SIZE, NodeKey, read_key_file

SEALED_PREFIX = "sealed:v1:"
OVERHEAD = NONCE_SIZE + TAG_SIZE
_AD = b"georeg/configuration-secret/v1"
_PART = struct.Struct(">H")


class SealedValueError(Exception):
    """A sealed value that is malformed or does not open with this key at this
    place. The message says which, never what the value holds."""


def is_sealed(value: str) -> bool:
    return value.startswith(SEALED_PREFIX)


def _decoded(value: str, max_plaintext_bytes: int) -> bytes:
    try:
        raw = base64.b64decode(value[len(SEALED_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise SealedValueError(f"is not well formed (base64 after {SEALED_PREFIX!r})") from None
    if not OVERHEAD <= len(raw) <= OVERHEAD + max_plaintext_bytes:
        raise SealedValueError("is not well formed (too short or too long)")
    return raw


def check_form(value: str, max_plaintext_bytes: int) -> None:
    """That ``value`` (sealed) is well formed and holds at most
    ``max_plaintext_bytes``; ``SealedValueError`` if not. Needs no key."""
    _decoded(value, max_plaintext_bytes)


def _associated(place: Sequence[str]) -> bytes:
    out = bytearray(_AD)
    for part in place:
        encoded = part.encode()
        out += _PART.pack(len(encoded)) + encoded
    return bytes(out)


class ConfigurationKey:
    """Seals and opens values of registry configuration (see the module docstring)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"a configuration key is {KEY_SIZE} bytes, got {len(key)}")
        # A key of its own for this purpose, should the file's key ever serve another.
        self._aead = AESGCM(HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None,
                                 info=b"georeg/configuration-secrets/v1").derive(key))

    def __repr__(self) -> str:     # never show key material in logs or tracebacks
        return "ConfigurationKey(<secret>)"

    @classmethod
    def load(cls, path: Path) -> ConfigurationKey:
        """The key in ``path`` (32 bytes: raw, hex or base64; mode 0600);
        ``crypto.KeyFileError`` says what is wrong with the file."""
        return cls(read_key_file(path))

    @classmethod
    def of_node(cls, node_key: NodeKey) -> ConfigurationKey:
        """A standalone node's own key, derived from its node key."""
        return cls(node_key.derive(b"configuration-key"))

    def seal(self, plaintext: str, place: Sequence[str]) -> str:
        nonce = os.urandom(NONCE_SIZE)
        sealed = nonce + self._aead.encrypt(nonce, plaintext.encode(), _associated(place))
        return SEALED_PREFIX + base64.b64encode(sealed).decode("ascii")

    def open(self, value: str, place: Sequence[str], max_plaintext_bytes: int) -> str:
        """The plaintext of sealed ``value`` at ``place``; ``SealedValueError``
        if it is malformed or was sealed elsewhere or with another key."""
        raw = _decoded(value, max_plaintext_bytes)
        try:
            plain = self._aead.decrypt(raw[:NONCE_SIZE], raw[NONCE_SIZE:], _associated(place))
        except InvalidTag:
            raise SealedValueError("does not open here") from None
        try:
            return plain.decode()
        except UnicodeDecodeError:
            raise SealedValueError("does not open here (not text)") from None
