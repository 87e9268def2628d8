"""Pulling from another registry over HTTP (aiohttp's client): manifests,
blobs as a stream, and the referrers of a manifest, with the Docker
token-auth spec's challenges answered (``registry_node.upstream`` has the
grammar, the challenge parsing and the failures; this module only talks).

    async with upstream_session(ca_pem) as http:
        source = UpstreamRegistry(http, "registry.example.com", credentials=("u", "p"))
        manifest = await source.manifest("library/alpine", "3.20")
        async for chunk in source.blob("library/alpine", digest): ...

Invariants:

* nothing here stores anything: a caller gets bytes it can check and decides
  where they go; a blob's stream raises ``UpstreamError`` at its end if its
  bytes do not match its digest or size, or if the connection is cut, so a
  caller that streams it on sees the failure before it commits;
* every failure is an ``UpstreamError`` naming the source, what was being
  fetched and what went wrong (HTTP status, refused credentials, a cut
  connection), never an aiohttp exception;
* credentials go to the source (Basic) or its token realm (Bearer), and to
  a realm only over HTTPS (a realm on another host is normal: Docker Hub's
  is auth.docker.io), except a realm on the source's own host when the source
  itself is reached over plain HTTP on loopback (a local test registry); a
  redirect to another host (a blob served from storage) loses the
  ``Authorization`` header (aiohttp drops it when the origin changes), and a
  redirect from HTTPS to plain HTTP is refused;
* what the source sends is bounded: a manifest, a referrers answer and a
  token answer are read whole up to the node's ``MAX_MANIFEST_SIZE`` (a
  larger one is refused, never truncated), and a blob given its size is
  refused once it exceeds it (by ``Content-Length`` before a byte is read,
  or as its bytes arrive);
* no proxy from the environment.
"""

from __future__ import annotations

import hashlib
import json
import re
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from .manifest import MANIFEST_ACCEPT, MAX_MANIFEST_SIZE
from .upstream import (
    Challenge,
    UpstreamError,
    UpstreamFailure,
    base_url,
    basic_authorization,
    is_digest,
    is_loopback,
    manifest_digest,
    parse_challenge,
    referrers_tag,
    token_query,
)

# A source that sends nothing for this long is treated as gone.
READ_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 15.0
# A bearer token goes into a header: visible ASCII only (RFC 6750's b64token
# is narrower; anything with CR, LF or a space would break or inject headers).
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")
# Whatever the source's connection can fail with (aiohttp.ClientError covers a
# reset, a payload cut short, a malformed answer, too many redirects).
_CUT = (aiohttp.ClientError, TimeoutError, OSError)


def upstream_session(ca_pem: str | None = None) -> aiohttp.ClientSession:
    """A session for pulling from sources: TLS verified against ``ca_pem``
    (PEM text) when given, else against the system's CAs."""
    tls: ssl.SSLContext | bool = True
    if ca_pem:
        try:
            tls = ssl.create_default_context(cadata=ca_pem)
        except (ssl.SSLError, ValueError) as exc:
            raise UpstreamError(UpstreamFailure.INVALID_SOURCE,
                                f"the source's CA is not a PEM certificate: {exc}") from None
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=tls, limit=0),
        timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S,
                                      sock_read=READ_TIMEOUT_S),
        trust_env=False, auto_decompress=False)


@dataclass(frozen=True, slots=True)
class FetchedManifest:
    body: bytes              # exactly as the source sent it
    media_type: str
    digest: str


class UpstreamRegistry:
    def __init__(self, http: aiohttp.ClientSession, registry: str, *,
                 credentials: tuple[str, str] | None = None, ca_given: bool = False) -> None:
        self.http = http
        self.registry = registry
        self.base = base_url(registry, ca_given)
        self.credentials = credentials
        self._authorization: dict[str, str] = {}    # repository -> Authorization header

    # -- what a caller fetches -----------------------------------------------------------

    async def manifest(self, repository: str, reference: str) -> FetchedManifest:
        where = f"manifest {self.registry}/{repository}{_at(reference)}"
        response = await self._open("GET", repository, f"/v2/{repository}/manifests/{reference}",
                                    where, {"Accept": MANIFEST_ACCEPT})
        body = await _read_whole(response, where)
        digest = manifest_digest(body, reference, response.headers.get("Docker-Content-Digest"),
                                 where)
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        return FetchedManifest(body, media_type, digest)

    async def blob(self, repository: str, digest: str, size: int | None = None
                   ) -> AsyncIterator[bytes]:
        """The blob's bytes as they arrive; raises ``UpstreamError`` (after the
        last chunk) if they do not hash to ``digest`` or add up to ``size``."""
        where = f"blob {digest} of {self.registry}/{repository}"
        response = await self._open("GET", repository, f"/v2/{repository}/blobs/{digest}", where)
        if size is not None and response.content_length is not None \
                and response.content_length > size:
            response.close()
            raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                f"{where}: the source offers {response.content_length} bytes "
                                f"(Content-Length) of a blob of {size} bytes")
        algorithm = digest.partition(":")[0]
        hasher = hashlib.new(algorithm if algorithm in ("sha256", "sha512") else "sha256")
        received = 0
        try:
            async for chunk in response.content.iter_chunked(1 << 20):
                received += len(chunk)
                if size is not None and received > size:
                    response.close()        # not a byte more of it
                    raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                        f"{where}: the source sent more than {size} bytes, "
                                        "the blob's size")
                hasher.update(chunk)
                yield chunk
        except _CUT as exc:
            raise _cut(where, exc, received) from None
        finally:
            response.release()
        actual = f"{algorithm}:{hasher.hexdigest()}"
        if actual != digest or (size is not None and received != size):
            raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                f"{where}: the source sent {received} bytes hashing to {actual}"
                                + (f" (expected {size} bytes)" if size is not None else ""))

    async def referrers(self, repository: str, digest: str) -> list[dict]:
        """The descriptors of the manifests whose subject is ``digest``: the
        referrers API, or, on a source without it (404), the referrers tag
        schema; [] if neither lists any."""
        where = f"referrers of {self.registry}/{repository}@{digest}"
        response = await self._open("GET", repository, f"/v2/{repository}/referrers/{digest}",
                                    where, {"Accept": "application/vnd.oci.image.index.v1+json"},
                                    missing_ok=True)
        found = response.status == 200
        body = await _read_whole(response, where)
        try:
            index = json.loads(body) if found else None
        except ValueError:
            raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                f"{where}: the answer is not a JSON index") from None
        if not found:
            try:
                fallback = await self.manifest(repository, referrers_tag(digest))
            except UpstreamError as exc:
                if exc.kind is UpstreamFailure.NOT_FOUND:
                    return []
                raise
            try:
                index = json.loads(fallback.body)
            except ValueError:
                raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                    f"{where}: the referrers tag is not a JSON index") from None
        manifests = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(manifests, list):
            raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                f"{where}: the answer has no manifests list")
        listed = [m for m in manifests if isinstance(m, dict)]
        if not all(is_digest(m.get("digest")) for m in listed):
            raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                f"{where}: the answer lists a manifest without a valid digest")
        return listed

    # -- one request, with the source's challenge answered ------------------------------

    async def _open(self, method: str, repository: str, path: str, where: str,
                    headers: dict[str, str] | None = None,
                    missing_ok: bool = False) -> aiohttp.ClientResponse:
        """An open response (the caller releases it) with a 2xx status (or a
        404, with ``missing_ok``); an ``UpstreamError`` otherwise."""
        for attempt in range(2):
            sent = dict(headers or {})
            if repository in self._authorization:
                sent["Authorization"] = self._authorization[repository]
            try:
                response = await self.http.request(method, self.base + path, headers=sent)
            except _CUT as exc:
                raise _cut(where, exc) from None
            if self.base.startswith("https:") and response.url.scheme != "https":
                response.close()
                raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                    f"{where}: the source redirected from HTTPS to plain HTTP "
                                    f"({str(response.url)[:200]}); refused")
            if response.status == 401 and attempt == 0:
                challenge = parse_challenge(response.headers.get("WWW-Authenticate"))
                response.release()
                await self._answer(challenge, repository, where)
                continue
            if 200 <= response.status < 300 or (missing_ok and response.status == 404):
                return response
            status = response.status
            detail = await _error_text(response)
            response.release()
            raise _refusal(status, where, detail, self.credentials is not None)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _answer(self, challenge: Challenge | None, repository: str, where: str) -> None:
        if challenge is not None and challenge.scheme == "basic":
            if self.credentials is None:
                raise UpstreamError(UpstreamFailure.UNAUTHORIZED,
                                    f"{where}: the source asks for credentials; give "
                                    "--username and --password")
            self._authorization[repository] = basic_authorization(self.credentials)
            return
        if challenge is None or challenge.scheme != "bearer" or not challenge.params.get("realm"):
            raise UpstreamError(UpstreamFailure.UNAUTHORIZED,
                                f"{where}: the source answered 401 without a challenge georeg "
                                "can answer (Bearer realm or Basic)")
        realm = challenge.params["realm"]
        refusal = self._realm_refusal(realm)
        if refusal:
            raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                f"{where}: the source's token realm {realm[:200]!r} {refusal}")
        token_where = f"{where}: the source's token service {realm}"
        try:
            async with self.http.get(realm, params=token_query(challenge, repository),
                                     headers=self._basic_header()) as r:
                if realm.startswith("https:") and r.url.scheme != "https":
                    raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                        f"{token_where} redirected to plain HTTP; refused")
                if r.status in (401, 403):
                    raise UpstreamError(UpstreamFailure.UNAUTHORIZED,
                                        f"{token_where} refused the credentials"
                                        + ("" if self.credentials else
                                           " (none given: --username, --password)"))
                if r.status != 200:
                    raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                        f"{token_where} answered HTTP {r.status}")
                answer = json.loads(await _read_whole(r, token_where))
        except _CUT as exc:
            raise _cut(token_where, exc) from None
        except ValueError:
            raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                f"{token_where} answered no JSON") from None
        token = (answer.get("token") or answer.get("access_token")) if isinstance(answer, dict) \
            else None
        if not isinstance(token, str) or not token:
            raise UpstreamError(UpstreamFailure.UNAVAILABLE, f"{token_where} gave no token")
        if not _TOKEN_RE.fullmatch(token):
            raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                f"{token_where} gave a token with characters a header cannot "
                                "carry (only visible ASCII)")
        self._authorization[repository] = f"Bearer {token}"

    def _basic_header(self) -> dict[str, str]:
        # Built where it is sent, so no caller's frame holds it (a traceback
        # that shows locals would show it).
        return {"Authorization": basic_authorization(self.credentials)} if self.credentials \
            else {}

    def _realm_refusal(self, realm: str) -> str | None:
        """Why credentials must not go to ``realm``; None if they may."""
        try:
            url = urlsplit(realm)
            host = url.hostname
        except ValueError:
            return "is not a URL"
        if url.scheme == "https" and host:
            return None
        if url.scheme != "http" or not host:
            return "is not an http(s) URL"
        source = urlsplit(self.base)
        if source.scheme == "http" and is_loopback(self.registry) and host == source.hostname:
            return None
        return ("is plain HTTP: a token realm must be https (plain HTTP only on the host of a "
                "loopback source reached over plain HTTP)")


async def _read_whole(response: aiohttp.ClientResponse, where: str) -> bytes:
    """The whole body (a read returns what is buffered, not what was asked),
    refused once it passes ``MAX_MANIFEST_SIZE``; releases the response."""
    try:
        if response.content_length is not None and response.content_length > MAX_MANIFEST_SIZE:
            raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                f"{where}: larger than {MAX_MANIFEST_SIZE} bytes")
        parts: list[bytes] = []
        received = 0
        async for chunk in response.content.iter_any():
            received += len(chunk)
            if received > MAX_MANIFEST_SIZE:
                raise UpstreamError(UpstreamFailure.UNAVAILABLE,
                                    f"{where}: larger than {MAX_MANIFEST_SIZE} bytes")
            parts.append(chunk)
        return b"".join(parts)
    except _CUT as exc:
        raise _cut(where, exc) from None
    finally:
        if response.content.at_eof():
            response.release()
        else:
            response.close()          # the rest is not wanted: drop the connection


def _at(reference: str) -> str:
    return f"@{reference}" if ":" in reference else f":{reference}"


def _cut(where: str, exc: BaseException, received: int | None = None) -> UpstreamError:
    what = str(exc) or type(exc).__name__
    after = f" after {received} bytes" if received else ""
    return UpstreamError(UpstreamFailure.UNAVAILABLE,
                         f"{where}: the connection to the source failed{after} ({what})")


async def _error_text(response: aiohttp.ClientResponse) -> str:
    try:
        body = await response.content.read(2048)
    except _CUT:
        return ""
    return body.decode(errors="replace").strip()[:300]


def _refusal(status: int, where: str, detail: str, with_credentials: bool) -> UpstreamError:
    if status == 404:
        return UpstreamError(UpstreamFailure.NOT_FOUND, f"{where}: not found at the source "
                             f"(HTTP 404{': ' + detail if detail else ''})")
    if status in (401, 403):
        given = "the credentials given" if with_credentials else "no credentials (give " \
                                                                  "--username and --password)"
        return UpstreamError(UpstreamFailure.UNAUTHORIZED,
                             f"{where}: the source refused {given} (HTTP {status}"
                             f"{': ' + detail if detail else ''})")
    return UpstreamError(UpstreamFailure.UNAVAILABLE,
                         f"{where}: the source answered HTTP {status}"
                         f"{': ' + detail if detail else ''}")
