"""Redirected blob downloads on a node with auth (``registry_node.api.redirects``,
``registry_node.auth.grants``): a blob GET marked as a routing endpoint marks it
is answered, after the access chain admitted it, with a 307 to the node's own
address carrying a grant; the grant admits a GET or HEAD of that blob there and
nothing else. A real node in this process (real sockets, a real CA, its own
clock, moved by the test), as ``test_auth_api`` runs it; each refusal its own
test, each a 401 with the challenge, none a 500, nothing touched."""

from __future__ import annotations

import dataclasses
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest

from registry_node.auth.grants import GRANT_TTL_S, REDIRECT_HEADER

from .auth_helpers import (
    ADMIN_PASSWORD,
    PULL_PASSWORD,
    REGISTRY,
    TEAM_PASSWORD,
    auth_files,
    basic,
    identities,
    start_auth_node,
)
from .helpers import ManualClock, assert_error, digest_of, make_image, push_image
from .test_auth_api import parse_challenge

ADMIN = basic(REGISTRY, ADMIN_PASSWORD)
MARK = {REDIRECT_HEADER: "127.0.0.1"}


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
async def node(tmp_path, clock):
    files = auth_files(tmp_path, "node-a")
    running = await start_auth_node(files.config("node-a", tmp_path / "data"), identities(),
                                    clock)
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def images(node):
    """Two images in ``team/app`` and one, sharing a layer, in ``team/other``."""
    app, second = make_image([3000, 700], seed=1), make_image([900], seed=2)
    other = make_image([3000, 700], seed=1)
    async with aiohttp.ClientSession(headers=ADMIN) as admin:
        await push_image(admin, node.url, "team/app", app, tag="v1")
        await push_image(admin, node.url, "team/app", second, tag="v2")
        await push_image(admin, node.url, "team/other", other, tag="v1")
    return app, second


def blob_url(node, repo: str, blob: bytes) -> str:
    return f"{node.url}/v2/{repo}/blobs/{digest_of(blob)}"


async def redirected(http, node, repo: str, blob: bytes, headers=ADMIN) -> str:
    """The Location of the node's redirect for ``blob``, asked as an endpoint asks."""
    async with http.get(blob_url(node, repo, blob), headers={**headers, **MARK},
                        allow_redirects=False) as r:
        assert r.status == 307, (r.status, (await r.read())[:300])
        assert await r.read() == b""
        return r.headers["Location"]


def grant_of(location: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(location).query))


def with_grant(url: str, grant: dict[str, str]) -> str:
    return url + "?" + "&".join(f"{k}={v}" for k, v in grant.items())


async def assert_refused(r: aiohttp.ClientResponse, scope: str) -> None:
    """A refused grant is refused as a bad credential is: 401, the challenge with
    the scope the request needs and ``invalid_token``."""
    await assert_error(r, 401, "UNAUTHORIZED")
    challenge = parse_challenge(r.headers["WWW-Authenticate"])
    assert challenge["scope"] == scope and challenge["error"] == "invalid_token", challenge


# -- the redirect -------------------------------------------------------------------------


async def test_a_marked_blob_get_is_redirected_to_the_node_itself_with_a_grant(http, node,
                                                                               images):
    app, _ = images
    layer = app.blobs[1]
    location = await redirected(http, node, "team/app", layer)
    assert location.startswith(blob_url(node, "team/app", layer) + "?")
    assert set(grant_of(location)) == {"expires", "signature"}
    # No credentials where it points: the grant is the credential, for GET and HEAD.
    async with http.get(location) as r:
        assert r.status == 200 and await r.read() == layer
    async with http.get(location, headers={"Range": "bytes=10-19"}) as r:
        assert r.status == 206 and await r.read() == layer[10:20]
    async with http.head(location) as r:
        assert r.status == 200 and r.headers["Content-Length"] == str(len(layer))
    # Unmarked, the same credentials get the bytes, as always.
    async with http.get(blob_url(node, "team/app", layer), headers=ADMIN) as r:
        assert r.status == 200 and await r.read() == layer


async def test_a_marked_get_is_authenticated_before_anything_is_redirected(http, node, images):
    """A client marking its own request (as an endpoint does) gets no more than its
    credentials read: none is a 401 challenge, a token without pull there a 403,
    and neither says whether the blob exists."""
    app, _ = images
    missing = b"no such blob"
    for blob in (app.blobs[1], missing):
        async with http.get(blob_url(node, "team/app", blob), headers=MARK,
                            allow_redirects=False) as r:
            await assert_error(r, 401, "UNAUTHORIZED")
            assert parse_challenge(r.headers["WWW-Authenticate"])["scope"] == \
                "repository:team/app:pull"
        async with http.get(blob_url(node, "elsewhere/app", blob),
                            headers={**basic("team", TEAM_PASSWORD), **MARK},
                            allow_redirects=False) as r:
            await assert_error(r, 403, "DENIED")
    # Credentials that read it get the redirect; a blob that is not here is not redirected.
    await redirected(http, node, "team/app", app.blobs[1], basic("puller", PULL_PASSWORD))
    async with http.get(blob_url(node, "team/app", missing), headers={**ADMIN, **MARK},
                        allow_redirects=False) as r:
        await assert_error(r, 404, "BLOB_UNKNOWN")


async def test_a_request_admitted_by_a_grant_is_not_redirected_again(http, node, images):
    """A grant cannot be renewed into a later one by asking for a redirect with it."""
    app, _ = images
    location = await redirected(http, node, "team/app", app.blobs[1])
    async with http.get(location, headers=MARK, allow_redirects=False) as r:
        assert r.status == 200 and await r.read() == app.blobs[1]


# -- the security battery: every grant but the right one is a 401 -------------------------


async def test_a_tampered_grant_is_refused(http, node, images):
    app, _ = images
    url = blob_url(node, "team/app", app.blobs[1])
    grant = grant_of(await redirected(http, node, "team/app", app.blobs[1]))
    signature = grant["signature"]
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    later = str(int(grant["expires"]) + 3600)
    for forged in ({**grant, "signature": flipped}, {**grant, "expires": later},
                   {**grant, "signature": signature[:-1]}, {**grant, "signature": "%FF" * 43},
                   {"expires": grant["expires"]}, {"signature": signature},
                   {**grant, "expires": "9" * 400}, {**grant, "expires": "-1"}):
        async with http.get(with_grant(url, forged)) as r:
            await assert_refused(r, "repository:team/app:pull")


async def test_an_expired_grant_is_refused(http, node, images, clock):
    app, _ = images
    location = await redirected(http, node, "team/app", app.blobs[1])
    clock.advance(GRANT_TTL_S - 1)
    async with http.get(location) as r:
        assert r.status == 200 and await r.read() == app.blobs[1]
    clock.advance(1)
    async with http.get(location) as r:
        await assert_refused(r, "repository:team/app:pull")
    async with http.head(location) as r:
        assert r.status == 401


async def test_a_grant_for_another_digest_is_refused(http, node, images):
    app, second = images
    grant = grant_of(await redirected(http, node, "team/app", app.blobs[1]))
    for blob in (second.blobs[1], app.blobs[0]):       # both in team/app
        async with http.get(with_grant(blob_url(node, "team/app", blob), grant)) as r:
            await assert_refused(r, "repository:team/app:pull")


async def test_a_grant_for_another_repository_is_refused(http, node, images):
    """The same digest, stored in both repositories: the grant names one."""
    app, _ = images
    grant = grant_of(await redirected(http, node, "team/app", app.blobs[1]))
    async with http.get(blob_url(node, "team/other", app.blobs[1]), headers=ADMIN) as r:
        assert r.status == 200
    async with http.get(with_grant(blob_url(node, "team/other", app.blobs[1]), grant)) as r:
        await assert_refused(r, "repository:team/other:pull")


async def test_a_grant_from_another_node_is_refused(http, node, images, tmp_path):
    """Each node signs with its own key: a grant is good only where it points."""
    app, _ = images
    files = auth_files(tmp_path / "b", "node-b")
    other = await start_auth_node(files.config("node-b", tmp_path / "data-b"), identities())
    try:
        async with aiohttp.ClientSession(headers=ADMIN) as admin:
            await push_image(admin, other.url, "team/app", app, tag="v1")
        grant = grant_of(await redirected(http, node, "team/app", app.blobs[1]))
        async with http.get(with_grant(blob_url(other, "team/app", app.blobs[1]), grant)) as r:
            await assert_refused(r, "repository:team/app:pull")
    finally:
        await other.stop()


async def test_a_grant_admits_no_write(http, node, images):
    """DELETE, POST, PUT and PATCH with a grant in the query are requests without
    credentials; nothing is touched."""
    app, _ = images
    layer = app.blobs[1]
    url = blob_url(node, "team/app", layer)
    grant = grant_of(await redirected(http, node, "team/app", layer))
    base = f"{node.url}/v2/team/app"
    for method, target in (("DELETE", url),
                           ("POST", f"{base}/blobs/uploads/"),
                           ("PUT", f"{base}/manifests/v9"),
                           ("DELETE", f"{base}/manifests/v1"),
                           ("PUT", url),
                           ("PATCH", f"{base}/blobs/uploads/x")):
        async with http.request(method, with_grant(target, grant), data=b"{}") as r:
            await assert_error(r, 401, "UNAUTHORIZED")
            assert "WWW-Authenticate" in r.headers
    # A grant opens no other route either.
    for target in (f"{node.url}/v2/", f"{node.url}/v2/_catalog", f"{base}/tags/list",
                   f"{base}/manifests/v1"):
        async with http.get(with_grant(target, grant)) as r:
            await assert_error(r, 401, "UNAUTHORIZED")
    async with http.get(url, headers=ADMIN) as r:
        assert r.status == 200 and await r.read() == layer
    async with http.get(f"{base}/manifests/v1", headers=ADMIN) as r:
        assert r.status == 200


async def test_on_a_node_listening_everywhere_the_endpoints_mark_names_the_host_not_the_clients(
        http, tmp_path, clock):
    """A node on 0.0.0.0 points its redirect at the address the endpoint says the
    client reached; the endpoint appends its mark after the client's headers, so
    a mark a client sent of its own (an address of its choosing) is not used."""
    files = auth_files(tmp_path, "node-w")
    config = dataclasses.replace(files.config("node-w", tmp_path / "data-w"), host="0.0.0.0")
    node = await start_auth_node(config, identities(), clock)
    try:
        image = make_image([1500], seed=9)
        async with aiohttp.ClientSession(headers=ADMIN) as admin:
            await push_image(admin, node.url, "team/app", image, tag="v1")
        forged_then_endpoint = [(REDIRECT_HEADER, "203.0.113.9"), (REDIRECT_HEADER, "127.0.0.1"),
                                *ADMIN.items()]
        async with http.get(blob_url(node, "team/app", image.blobs[0]),
                            headers=forged_then_endpoint, allow_redirects=False) as r:
            assert r.status == 307
            assert urlsplit(r.headers["Location"]).hostname == "127.0.0.1"
    finally:
        await node.stop()
