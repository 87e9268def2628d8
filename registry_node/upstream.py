"""Another registry as a source of content: what georeg needs to know to pull
from any OCI registry (distribution-spec v1.1), with no I/O. The transport
that talks to one is ``registry_node.upstream_http``; ``georeg import``
(``cluster.control.imports``) uses both, and so can a pull-through cache.

Owned here:

* the grammar of a source, ``REGISTRY/REPOSITORY[:TAG|@DIGEST]`` (``az acr
  import --source``): the registry part must be a host (it has a dot or a
  port, or is ``localhost``), the rest is checked by ``registry_node.reference``;
* which scheme a source is reached with: plain HTTP only on a loopback host
  without a CA given, HTTPS everywhere else;
* the ``WWW-Authenticate`` challenges of the Docker token-auth spec (``Bearer
  realm=…,service=…,scope=…``, or ``Basic``) and the token request they ask
  for — a challenge without a ``scope`` gets the pull scope of the repository
  (ACR's import fails there, Azure/acr #449);
* the failures of a pull from upstream (``UpstreamError``), each naming what
  failed; ``kind`` says what the caller tells its own client.

Invariants: a manifest is identified by the digest of the bytes fetched, and
those bytes are what is stored (never re-serialised); a digest the source
claims (the reference asked for, or ``Docker-Content-Digest``) that the bytes
do not match is refused, never stored.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from enum import Enum

from .errors import RegistryError
from .reference import TAG_RE, Digest, validate_name

# What a manifest GET accepts: every kind georeg stores.

_HOST_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9]"
                      r"(?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
SOURCE_FORMAT = ("give the source as REGISTRY/REPOSITORY:TAG or REGISTRY/REPOSITORY@DIGEST, "
                 "e.g. registry.example.com/library/alpine:3.20 or localhost:5000/app@sha256:…")


class UpstreamFailure(Enum):
    """What went wrong, as the caller's own client should hear it."""

    INVALID_SOURCE = "invalid source"        # the request named no valid source: 400
    NOT_FOUND = "not found"                  # the source has no such repository/tag/digest: 404
    UNAUTHORIZED = "unauthorized"            # the source refused the credentials (or none): 400
    UNAVAILABLE = "unavailable"              # unreachable, cut off, 5xx, bad content: 502


class UpstreamError(Exception):
    """A pull from upstream failed; the message names the source and what failed."""

    def __init__(self, kind: UpstreamFailure, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class SourceReference:
    """``registry/repository`` and either a tag or a digest."""

    registry: str          # host[:port]
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        at = f"@{self.digest}" if self.digest else f":{self.tag}"
        return f"{self.registry}/{self.repository}{at}"


def parse_source(text: str) -> SourceReference:
    """``REGISTRY/REPOSITORY[:TAG|@DIGEST]``; no tag and no digest means
    ``latest`` (as ``az acr import``). ``UpstreamError(INVALID_SOURCE)`` says
    what is wrong."""
    def invalid(why: str) -> UpstreamError:
        return UpstreamError(UpstreamFailure.INVALID_SOURCE, f"--source {text[:200]!r}: {why}; "
                             f"{SOURCE_FORMAT}")

    if not isinstance(text, str) or not text:
        raise invalid("empty")
    if "://" in text:
        raise invalid("no scheme (the scheme follows from the host and the CA given)")
    registry, slash, rest = text.partition("/")
    if not slash or not rest:
        raise invalid("no repository after the registry")
    if not (_HOST_RE.fullmatch(registry)
            and ("." in registry or ":" in registry or registry == "localhost")):
        raise invalid(f"{registry[:100]!r} is not a registry host (a host name with a dot or a "
                      "port, or localhost)")
    _, colon, port = registry.rpartition(":")
    if colon and not registry.endswith("]") and not 0 < int(port) <= 65535:   # [::1] has none
        raise invalid(f"port {port} is not a TCP port (1 to 65535)")
    digest = tag = None
    if "@" in rest:
        rest, _, digest_text = rest.partition("@")
        try:
            digest = str(Digest.parse(digest_text))
        except RegistryError as exc:
            raise invalid(str(exc.detail or exc.message)) from None
    name, colon, tag_text = rest.rpartition(":")
    if colon and "/" not in tag_text:
        if not TAG_RE.fullmatch(tag_text):
            raise invalid(f"{tag_text[:140]!r} is not a valid tag")
        rest = name
        tag = tag_text
    if digest and tag:
        raise invalid("give a tag or a digest, not both")
    try:
        validate_name(rest)
    except RegistryError:
        raise invalid(f"{rest[:200]!r} is not a valid repository name") from None
    return SourceReference(registry, rest, tag if digest else (tag or "latest"), digest)


def is_loopback(registry: str) -> bool:
    host = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def base_url(registry: str, ca_given: bool) -> str:
    """Plain HTTP for a loopback registry when no CA is given (a local test
    registry), HTTPS for every other."""
    scheme = "http" if is_loopback(registry) and not ca_given else "https"
    return f"{scheme}://{registry}"


# -- the Docker token-auth spec ----------------------------------------------------------

_PARAM_RE = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str                      # "bearer" or "basic", lower case
    params: dict[str, str]


def parse_challenge(header: str | None) -> Challenge | None:
    """The first challenge of a ``WWW-Authenticate`` header (a registry sends
    one); None if there is none to answer."""
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    position = 0
    while position < len(rest):
        match = _PARAM_RE.match(rest, position)
        if match is None or match.end() == position:
            break
        value = match[2] if match[2] is not None else match[3]
        params[match[1].lower()] = re.sub(r"\\(.)", r"\1", value)
        position = match.end()
    return Challenge(scheme.lower(), params)


def basic_authorization(credentials: tuple[str, str]) -> str:
    """The ``Authorization`` value of HTTP Basic (RFC 7617, UTF-8)."""
    username, password = credentials
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def token_query(challenge: Challenge, repository: str) -> dict[str, str]:
    """The query of the token request a Bearer challenge asks for: its service,
    and its scope, or the repository's pull scope when it names none."""
    query = {"scope": challenge.params.get("scope") or f"repository:{repository}:pull"}
    if challenge.params.get("service"):
        query["service"] = challenge.params["service"]
    return query


# -- what the source sent -------------------------------------------------------------------


def digest_of(body: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"


def manifest_digest(body: bytes, asked: str, claimed: str | None, where: str) -> str:
    """The digest of manifest bytes fetched for ``asked`` (a tag or digest):
    computed with the algorithm of the digest asked for or claimed, and
    checked against both."""
    expected = [d for d in (asked if is_digest(asked) else None, claimed) if d]
    algorithm = expected[0].partition(":")[0] if expected else "sha256"
    if algorithm not in ("sha256", "sha512"):
        algorithm = "sha256"
    actual = digest_of(body, algorithm)
    for digest in expected:
        if digest.partition(":")[0] == algorithm and digest != actual:
            raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                f"{where}: the source sent a manifest whose digest is {actual}, "
                                f"not {digest}; nothing stored")
    return actual


def is_digest(text: object) -> bool:
    try:
        Digest.parse(text)
    except RegistryError:
        return False
    return True


def referrers_tag(digest: str) -> str:
    """The tag under which a registry without the referrers API keeps the
    referrers of ``digest`` (distribution-spec v1.1, the referrers tag schema)."""
    algorithm, _, encoded = digest.partition(":")
    return f"{algorithm}-{encoded}"[:128]
