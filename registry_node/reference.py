"""Repository names, tags and digests: the grammar of distribution-spec v1.1.1.

Every name, tag or digest that reaches storage has passed through here, and what
passes contains only ``[a-z0-9._/-]`` (names), ``[A-Za-z0-9._-]`` (tags) or
lowercase hex (digests). That is what makes it safe to build file paths and
metadata keys from them: no ``..`` component, no NUL, no absolute path.
"""

from __future__ import annotations

import hashlib
import re

from .errors import ErrorCode, RegistryError

# One path component of a repository name, and the whole name (spec, "Pulling").
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
# The general digest grammar; only the algorithms below are accepted.
DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")

# Clients commonly limit "<host>/<name>" to 255 characters; refusing longer names
# here gives a clear error instead of a client failing later.
MAX_NAME_LENGTH = 255

ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}
_HEX_RE = {alg: re.compile(f"[a-f0-9]{{{n}}}") for alg, n in ALGORITHMS.items()}


class Digest(str):
    """A validated content digest, ``<algorithm>:<lowercase hex>``."""

    __slots__ = ()

    @property
    def algorithm(self) -> str:
        return self.partition(":")[0]

    @property
    def hex(self) -> str:
        return self.partition(":")[2]

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Validate ``text`` or raise ``DIGEST_INVALID`` saying what is wrong with it."""
        if not isinstance(text, str) or not DIGEST_RE.fullmatch(text):
            raise RegistryError(ErrorCode.DIGEST_INVALID, f"{text!r} is not a digest",
                                message="invalid digest")
        algorithm, _, encoded = text.partition(":")
        pattern = _HEX_RE.get(algorithm)
        if pattern is None:
            raise RegistryError(
                ErrorCode.DIGEST_INVALID,
                f"unsupported digest algorithm {algorithm!r}; use sha256 or sha512",
                message="unsupported digest algorithm",
            )
        if not pattern.fullmatch(encoded):
            raise RegistryError(
                ErrorCode.DIGEST_INVALID,
                f"a {algorithm} digest is {ALGORITHMS[algorithm]} lowercase hex characters",
                message="invalid digest",
            )
        return cls(text)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}")


def is_digest(reference: str) -> bool:
    """True when a manifest reference is meant as a digest rather than a tag."""
    return ":" in reference


def validate_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name):
        raise RegistryError(
            ErrorCode.NAME_INVALID,
            {"name": name, "rule": "lowercase components [a-z0-9] joined by '.', '_', '__' or "
             "'-', separated by '/', at most 255 characters"},
        )
    return name


def validate_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise RegistryError(
            ErrorCode.MANIFEST_INVALID,
            {"tag": tag, "rule": "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}"},
            message="invalid tag",
        )
    return tag


def parse_reference(reference: str) -> tuple[str | None, Digest | None]:
    """A manifest reference is a tag or a digest: return ``(tag, None)`` or ``(None, digest)``."""
    if is_digest(reference):
        return None, Digest.parse(reference)
    return validate_tag(reference), None
