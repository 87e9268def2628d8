"""The access chain on a real node (in process, real sockets, a real CA, the node's
own in-memory identity source): challenges, the token server, and the refusals of
the security battery — each its own test, none a 500, nothing touched."""

from __future__ import annotations

import base64
import dataclasses
import json
import re

import aiohttp
import pytest

from registry_node.app import init_app
from registry_node.auth import gate as gate_module
from registry_node.auth.gate import NULL_GUID, Gate
from registry_node.auth.identities import (
    DISABLED,
    Password,
    ScopeMapRecord,
    TokenRecord,
    hash_secret,
)
from registry_node.auth.scopes import PULL, repository
from registry_node.auth.tokens import (
    ACCESS,
    ACCESS_LIFETIME_S,
    LEEWAY_S,
    AuthConfigError,
    SigningKey,
    TokenAuthority,
    Trust,
)

from .auth_helpers import (
    ADMIN_PASSWORD,
    ADMIN_PASSWORD2,
    DISABLED_PASSWORD,
    EXPIRED_PASSWORD,
    IDENTITY_ID,
    IDENTITY_SECRET,
    PULL_PASSWORD,
    PUSH_PASSWORD,
    READER_ID,
    READER_SECRET,
    REGISTRY,
    SERVICE,
    TEAM_PASSWORD,
    auth_files,
    basic,
    bearer,
    identities,
    start_auth_node,
)
from .helpers import ManualClock, assert_error, digest_of, make_image, push_image


@pytest.fixture
def files(tmp_path):
    return auth_files(tmp_path, "node-a", "node-b")


@pytest.fixture
def source():
    return identities()


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
async def node(files, source, clock, tmp_path):
    running = await start_auth_node(files.config("node-a", tmp_path / "data-a"), source, clock)
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def parse_challenge(header: str) -> dict[str, str]:
    scheme, _, params = header.partition(" ")
    assert scheme == "Bearer", header
    return dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', params))


async def token_for(http, node, username, password, *scopes) -> str:
    async with http.get(f"{node.url}/oauth2/token", headers=basic(username, password),
                        params=[("service", SERVICE), *(("scope", s) for s in scopes)]) as r:
        assert r.status == 200, await r.text()
        doc = await r.json()
    assert doc["token"] == doc["access_token"]
    return doc["access_token"]


def token_access(token: str) -> list[dict]:
    body = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))["access"]


async def seed(http, node, repo: str = "team/app", tag: str = "v1"):
    """An image pushed with admin credentials (Basic straight on registry routes)."""
    image = make_image(seed=len(repo))
    async with aiohttp.ClientSession(headers=basic(REGISTRY, ADMIN_PASSWORD)) as admin:
        await push_image(admin, node.url, repo, image, tag=tag)
    return image


# -- challenges ------------------------------------------------------------------------


async def test_no_credentials_get_401_with_a_bearer_challenge_naming_the_scope(http, node):
    async with http.get(f"{node.url}/v2/team/app/manifests/v1") as r:
        error = await assert_error(r, 401, "UNAUTHORIZED")
        challenge = parse_challenge(r.headers["WWW-Authenticate"])
    assert challenge == {"realm": f"{node.url}/oauth2/token", "service": SERVICE,
                         "scope": "repository:team/app:pull"}
    assert error["detail"] == [{"Type": "repository", "Name": "team/app", "Action": "pull"}]
    async with http.get(f"{node.url}/v2/") as r:
        await assert_error(r, 401, "UNAUTHORIZED")
        assert "scope" not in parse_challenge(r.headers["WWW-Authenticate"])
    async with http.get(f"{node.url}/v2/_catalog") as r:
        await assert_error(r, 401, "UNAUTHORIZED")
        assert parse_challenge(r.headers["WWW-Authenticate"])["scope"] == "registry:catalog:*"


@pytest.mark.parametrize(("method", "path", "scope"), [
    ("HEAD", "/v2/a/blobs/sha256:" + "0" * 64, "repository:a:pull"),
    ("GET", "/v2/a/tags/list", "repository:a:pull"),
    ("POST", "/v2/a/blobs/uploads/", "repository:a:pull,push"),
    ("PATCH", "/v2/a/blobs/uploads/some-uuid", "repository:a:pull,push"),
    ("PUT", "/v2/a/manifests/v1", "repository:a:pull,push"),
    ("DELETE", "/v2/a/manifests/v1", "repository:a:delete"),
    ("DELETE", "/acr/v1/a", "repository:a:delete"),
    ("POST", "/v2/a/blobs/uploads/?mount=sha256:" + "0" * 64 + "&from=b",
     "repository:a:pull,push repository:b:pull"),
])
async def test_each_route_asks_for_what_the_reference_registry_asks(http, node, method, path, scope):
    async with http.request(method, node.url + path) as r:
        assert r.status == 401
        assert parse_challenge(r.headers["WWW-Authenticate"])["scope"] == scope


@pytest.mark.parametrize("name", ["a%0Ab", "a%0D%0AX-Injected:%20yes", "a%20b", "a%09b"])
async def test_a_repository_name_with_whitespace_gets_401_and_no_scope_never_500(http, node, name):
    async with http.get(f"{node.url}/v2/{name}/tags/list") as r:
        await assert_error(r, 401, "UNAUTHORIZED")
        assert "X-Injected" not in r.headers
        assert "scope" not in parse_challenge(r.headers["WWW-Authenticate"])


async def test_unknown_routes_and_methods_need_a_principal_first(http, node):
    for method, path in (("GET", "/v2/nothing/here"), ("OPTIONS", "/v2/a/manifests/v1"),
                         ("POST", "/v2/_catalog")):
        async with http.request(method, node.url + path) as r:
            await assert_error(r, 401, "UNAUTHORIZED")
        async with http.request(method, node.url + path, headers=basic("puller", PULL_PASSWORD)) as r:
            assert r.status in (404, 405, 403), r.status


async def test_the_realm_is_the_address_the_client_used(http, node):
    async with http.get(f"{node.url}/v2/", headers={"Host": "registry.example:8443"}) as r:
        assert r.status == 401
        assert parse_challenge(r.headers["WWW-Authenticate"])["realm"] == \
            "http://registry.example:8443/oauth2/token"


async def test_without_an_internal_credential_internal_routes_answer_no_one(http, node, source):
    """A node with auth but no internal credential (``georeg node --auth-ca``
    alone) has no caller for its internal routes: were they open, anyone could
    write a token of their own into the registry configuration."""
    planted = {"scope_map": "_repositories_admin", "status": "enabled", "passwords": []}
    for headers in ({}, basic(REGISTRY, ADMIN_PASSWORD)):
        async with http.get(f"{node.url}/georeg/v1/inventory", headers=headers) as r:
            await assert_error(r, 401, "UNAUTHORIZED")
        async with http.put(f"{node.url}/georeg/v1/configuration/token/planted", json=planted,
                            headers=headers) as r:
            await assert_error(r, 401, "UNAUTHORIZED")
        async with http.get(f"{node.url}/metrics", headers=headers) as r:
            await assert_error(r, 401, "UNAUTHORIZED")
    async with http.get(f"{node.url}/v2/", headers=basic(REGISTRY, ADMIN_PASSWORD)) as r:
        assert r.status == 200                      # the registry itself serves on


# -- the token flow, as a plain HTTP client follows it --------------------------------------


async def test_with_the_internal_credential_one_middleware_does_both_checks(
        http, files, source, clock, tmp_path):
    secret = tmp_path / "internal.secret"
    secret.write_text("cluster-internal-credential-0123")
    config = dataclasses.replace(files.config("node-a", tmp_path / "data-i"),
                                 internal_credential_file=secret)
    running = await start_auth_node(config, source, clock)
    internal = {"Authorization": "Bearer cluster-internal-credential-0123"}
    try:
        token = await token_for(http, running, "puller", PULL_PASSWORD, "repository:a:pull")
        for headers in ({}, bearer(token), basic(REGISTRY, ADMIN_PASSWORD)):
            async with http.get(f"{running.url}/georeg/v1/inventory", headers=headers) as r:
                await assert_error(r, 401, "UNAUTHORIZED")
        async with http.get(f"{running.url}/georeg/v1/inventory", headers=internal) as r:
            assert r.status == 200
        # The cluster itself on a registry route: no gate (a token could not list the catalog).
        async with http.get(f"{running.url}/v2/_catalog", headers=internal) as r:
            assert r.status == 200
        async with http.get(f"{running.url}/v2/_catalog", headers=bearer(token)) as r:
            await assert_error(r, 403, "DENIED")
        async with http.get(f"{running.url}/v2/a/tags/list", headers=bearer(token)) as r:
            assert r.status == 404                  # allowed; nothing there
    finally:
        await running.stop()


async def test_the_token_flow_end_to_end_with_a_plain_client(http, node):
    image = make_image(seed=1)
    async with http.post(f"{node.url}/v2/team/app/blobs/uploads/") as r:
        challenge = parse_challenge(r.headers["WWW-Authenticate"])
    async with http.get(challenge["realm"], headers=basic("team", TEAM_PASSWORD),
                        params={"service": challenge["service"], "scope": challenge["scope"]}) as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["expires_in"] == ACCESS_LIFETIME_S and doc["issued_at"].endswith("Z")
    async with aiohttp.ClientSession(headers=bearer(doc["token"])) as client:
        digest = await push_image(client, node.url, "team/app", image, tag="v1")
        async with client.get(f"{node.url}/v2/team/app/manifests/v1",
                              headers={"Accept": image.media_type}) as r:
            assert r.status == 200 and await r.read() == image.manifest
    assert digest == image.digest


async def test_basic_credentials_work_straight_on_registry_routes(http, node):
    image = await seed(http, node)
    async with http.get(f"{node.url}/v2/team/app/manifests/v1", headers=basic("puller", PULL_PASSWORD)) as r:
        assert r.status == 200 and await r.read() == image.manifest
    async with http.get(f"{node.url}/v2/_catalog", headers=basic(REGISTRY, ADMIN_PASSWORD2)) as r:
        assert r.status == 200 and (await r.json())["repositories"] == ["team/app"]
    async with http.get(f"{node.url}/v2/", headers=basic("puller", PULL_PASSWORD)) as r:
        assert r.status == 200


async def test_oauth2_post_password_then_refresh_grant(http, node):
    await seed(http, node)
    form = {"grant_type": "password", "service": SERVICE, "username": "puller",
            "password": PULL_PASSWORD, "scope": "repository:team/app:pull,push",
            "access_type": "offline", "client_id": "test"}
    async with http.post(f"{node.url}/oauth2/token", data=form) as r:
        assert r.status == 200, await r.text()
        first = await r.json()
    assert first["scope"] == "repository:team/app:pull"         # asked pull,push; holds pull
    assert first["expires_in"] == ACCESS_LIFETIME_S and first["refresh_token"]
    # containers/image repeats `scope` in the body.
    form = aiohttp.FormData([("grant_type", "refresh_token"), ("service", SERVICE),
                             ("refresh_token", first["refresh_token"]),
                             ("client_id", "containers/image"),
                             ("scope", "repository:team/app:pull"), ("scope", "repository:x:pull")])
    async with http.post(f"{node.url}/oauth2/token", data=form) as r:
        assert r.status == 200, await r.text()
        second = await r.json()
    assert second["scope"] == "repository:team/app:pull repository:x:pull"
    async with http.get(f"{node.url}/v2/team/app/tags/list", headers=bearer(second["access_token"])) as r:
        assert r.status == 200 and (await r.json())["tags"] == ["v1"]


async def test_an_identity_exchanges_its_secret_for_a_refresh_token_as_az_acr_login(http, node):
    async with http.post(f"{node.url}/oauth2/exchange", data={
            "grant_type": "password", "service": SERVICE, "username": IDENTITY_ID,
            "password": IDENTITY_SECRET}) as r:
        assert r.status == 200, await r.text()
        refresh = (await r.json())["refresh_token"]
    # docker logs in with the null GUID and the refresh token; AcrPush may push.
    token = await token_for(http, node, NULL_GUID, refresh, "repository:ci/app:pull,push")
    assert token_access(token) == [{"type": "repository", "name": "ci/app", "actions": ["pull", "push"]}]
    async with aiohttp.ClientSession(headers=bearer(token)) as client:
        await push_image(client, node.url, "ci/app", make_image(seed=2), tag="v1")
    # The exchange is for identities: a token's password is refused there.
    async with http.post(f"{node.url}/oauth2/exchange", data={
            "grant_type": "password", "service": SERVICE, "username": "puller",
            "password": PULL_PASSWORD}) as r:
        await assert_error(r, 401, "UNAUTHORIZED")


async def test_an_empty_grant_is_a_token_not_an_error(http, node):
    token = await token_for(http, node, "puller", PULL_PASSWORD, "registry:catalog:*")
    assert token_access(token) == []
    async with http.get(f"{node.url}/v2/", headers=bearer(token)) as r:
        assert r.status == 200


# -- the security battery --------------------------------------------------------------------


async def test_bad_password_gets_401(http, node):
    for headers in (basic("puller", "wrong"), basic(REGISTRY, "wrong"), basic("nobody", "x"),
                    basic(IDENTITY_ID, "wrong"), {"Authorization": "Basic !!!"},
                    {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}):
        async with http.get(f"{node.url}/v2/", headers=headers) as r:
            await assert_error(r, 401, "UNAUTHORIZED")
            assert r.headers["WWW-Authenticate"].startswith("Bearer ")
        async with http.get(f"{node.url}/oauth2/token", headers=headers,
                            params={"service": SERVICE, "scope": "repository:a:pull"}) as r:
            await assert_error(r, 401, "UNAUTHORIZED")


async def test_an_expired_token_gets_401_invalid_token(http, node, clock):
    await seed(http, node)
    token = await token_for(http, node, "puller", PULL_PASSWORD, "repository:team/app:pull")
    clock.advance(ACCESS_LIFETIME_S + LEEWAY_S + 1)
    async with http.get(f"{node.url}/v2/team/app/manifests/v1", headers=bearer(token)) as r:
        await assert_error(r, 401, "UNAUTHORIZED")
        assert parse_challenge(r.headers["WWW-Authenticate"])["error"] == "invalid_token"


async def test_an_expired_password_cannot_log_in(http, node):
    async with http.get(f"{node.url}/v2/", headers=basic("old", EXPIRED_PASSWORD)) as r:
        await assert_error(r, 401, "UNAUTHORIZED")


async def test_a_token_for_another_registry_gets_401(http, node, files, clock):
    cert = files.certificates["node-b"]
    trust = Trust.load(cert.ca_file, lambda: clock.wall_ns() / 1e9)
    other = TokenAuthority(SigningKey.load(cert.key_file, cert.cert_file, trust), trust,
                           "other.azurecr.test", trust.now)
    token = other.mint(f"admin:{REGISTRY}", "x", ACCESS, []).token
    async with http.get(f"{node.url}/v2/", headers=bearer(token)) as r:
        await assert_error(r, 401, "UNAUTHORIZED")
        assert parse_challenge(r.headers["WWW-Authenticate"])["error"] == "invalid_token"
    async with http.get(f"{node.url}/oauth2/token", headers=basic("puller", PULL_PASSWORD),
                        params={"service": "other.azurecr.test"}) as r:
        await assert_error(r, 400)


async def test_alg_none_gets_401(http, node):
    token = await token_for(http, node, REGISTRY, ADMIN_PASSWORD, "repository:a:pull")
    head, body, _ = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    forged_head = base64.urlsafe_b64encode(json.dumps({**header, "alg": "none"}).encode()).rstrip(b"=")
    async with http.get(f"{node.url}/v2/a/tags/list",
                        headers=bearer(f"{forged_head.decode()}.{body}.")) as r:
        await assert_error(r, 401, "UNAUTHORIZED")


async def test_a_tampered_signature_gets_401(http, node):
    token = await token_for(http, node, "puller", PULL_PASSWORD, "repository:a:pull")
    head, body, sig = token.split(".")
    flipped = sig[:10] + ("A" if sig[10] != "A" else "B") + sig[11:]
    async with http.get(f"{node.url}/v2/a/tags/list", headers=bearer(f"{head}.{body}.{flipped}")) as r:
        await assert_error(r, 401, "UNAUTHORIZED")


async def test_scope_escalation_a_pull_token_asking_push_gets_only_pull_and_403(http, node):
    await seed(http, node)
    token = await token_for(http, node, "puller", PULL_PASSWORD, "repository:team/app:pull,push,delete")
    assert token_access(token) == [{"type": "repository", "name": "team/app", "actions": ["pull"]}]
    image = make_image(seed=9)
    async with http.post(f"{node.url}/v2/team/app/blobs/uploads/", headers=bearer(token),
                         params={"digest": image.digest}, data=image.config) as r:
        error = await assert_error(r, 403, "DENIED")
        challenge = parse_challenge(r.headers["WWW-Authenticate"])
    assert error["detail"] == [{"Type": "repository", "Name": "team/app", "Action": "push"}]
    assert challenge["error"] == "insufficient_scope"
    assert challenge["scope"] == "repository:team/app:pull,push"
    async with http.delete(f"{node.url}/v2/team/app/manifests/v1", headers=bearer(token)) as r:
        await assert_error(r, 403, "DENIED")
    # Nothing was touched.
    async with http.get(f"{node.url}/v2/team/app/tags/list", headers=bearer(token)) as r:
        assert (await r.json())["tags"] == ["v1"]


async def test_a_token_carries_only_what_it_was_granted_even_for_admin(http, node):
    token = await token_for(http, node, REGISTRY, ADMIN_PASSWORD, "repository:a:pull")
    async with http.get(f"{node.url}/v2/a/tags/list", headers=bearer(token)) as r:
        assert r.status == 404                  # allowed; nothing there
    for method, path in (("GET", "/v2/b/tags/list"), ("PUT", "/v2/a/manifests/v1"),
                         ("DELETE", "/v2/a/manifests/v1"), ("GET", "/v2/_catalog")):
        async with http.request(method, node.url + path, headers=bearer(token)) as r:
            await assert_error(r, 403, "DENIED")


async def test_a_disabled_token_can_neither_log_in_nor_use_its_tokens(http, node, source):
    async with http.get(f"{node.url}/v2/", headers=basic("off", DISABLED_PASSWORD)) as r:
        await assert_error(r, 401, "UNAUTHORIZED")
    token = await token_for(http, node, "puller", PULL_PASSWORD, "repository:a:pull")
    source.put_token(TokenRecord("puller", "_repositories_pull", status=DISABLED,
                                 passwords=source.token("puller").passwords))
    async with http.get(f"{node.url}/v2/a/tags/list", headers=bearer(token)) as r:
        await assert_error(r, 401, "UNAUTHORIZED")
    async with http.get(f"{node.url}/oauth2/token", headers=basic("puller", PULL_PASSWORD),
                        params={"service": SERVICE}) as r:
        await assert_error(r, 401, "UNAUTHORIZED")


async def test_a_deleted_token_ends_its_access_tokens(http, node, source):
    token = await token_for(http, node, "pusher", PUSH_PASSWORD, "repository:a:pull")
    async with http.get(f"{node.url}/v2/a/tags/list", headers=bearer(token)) as r:
        assert r.status == 404                  # allowed; the repository is just not there
    source.delete_token("pusher")
    async with http.get(f"{node.url}/v2/a/tags/list", headers=bearer(token)) as r:
        await assert_error(r, 401, "UNAUTHORIZED")


async def test_a_regenerated_password_ends_the_tokens_it_gave(http, node, source):
    token = await token_for(http, node, "puller", PULL_PASSWORD, "repository:a:pull")
    source.put_token(TokenRecord("puller", "_repositories_pull",
                                 passwords=(Password("password1", hash_secret("a-new-one")),)))
    async with http.get(f"{node.url}/v2/", headers=bearer(token)) as r:
        await assert_error(r, 401, "UNAUTHORIZED")


async def test_a_scope_map_change_applies_at_once(http, node, source):
    await seed(http, node)
    token = await token_for(http, node, "team", TEAM_PASSWORD, "repository:team/app:pull")
    async with http.get(f"{node.url}/v2/team/app/tags/list", headers=bearer(token)) as r:
        assert r.status == 200
    source.put_scope_map(ScopeMapRecord("team-rw", ("repositories/other/content/read",)))
    async with http.get(f"{node.url}/v2/team/app/tags/list", headers=bearer(token)) as r:
        await assert_error(r, 403, "DENIED")


# -- remembered bearer admissions (Gate._recalled): each test uses the token first, so
# the admission is remembered, then changes what it stood on -----------------------------


async def test_a_used_token_disabled_afterwards_is_refused(http, node, source):
    token = await token_for(http, node, "puller", PULL_PASSWORD, "repository:a:pull")
    async with http.get(f"{node.url}/v2/a/tags/list", headers=bearer(token)) as r:
        assert r.status == 404                  # allowed; nothing there
    source.put_token(TokenRecord("puller", "_repositories_pull", status=DISABLED,
                                 passwords=source.token("puller").passwords))
    async with http.get(f"{node.url}/v2/a/tags/list", headers=bearer(token)) as r:
        await assert_error(r, 401, "UNAUTHORIZED")


async def test_a_used_admin_token_is_refused_once_admin_is_switched_off(http, node, source):
    token = await token_for(http, node, REGISTRY, ADMIN_PASSWORD, "repository:a:pull")
    async with http.get(f"{node.url}/v2/a/tags/list", headers=bearer(token)) as r:
        assert r.status == 404
    source.update_registry(admin_enabled=False)
    async with http.get(f"{node.url}/v2/a/tags/list", headers=bearer(token)) as r:
        await assert_error(r, 401, "UNAUTHORIZED")


async def test_a_used_token_is_refused_once_it_expires(http, node, clock):
    token = await token_for(http, node, "puller", PULL_PASSWORD, "repository:a:pull")
    async with http.get(f"{node.url}/v2/a/tags/list", headers=bearer(token)) as r:
        assert r.status == 404
    clock.advance(ACCESS_LIFETIME_S + LEEWAY_S + 1)
    async with http.get(f"{node.url}/v2/a/tags/list", headers=bearer(token)) as r:
        await assert_error(r, 401, "UNAUTHORIZED")
        assert parse_challenge(r.headers["WWW-Authenticate"])["error"] == "invalid_token"


async def test_a_used_token_is_refused_once_the_password_it_came_from_expires(
        http, node, source, clock):
    expiry = clock.wall_ns() / 1e9 + 600          # well inside the access token's lifetime
    source.put_token(TokenRecord("brief", "_repositories_pull", passwords=(
        Password("password1", hash_secret(PULL_PASSWORD), expiry=expiry),)))
    token = await token_for(http, node, "brief", PULL_PASSWORD, "repository:a:pull")
    async with http.get(f"{node.url}/v2/a/tags/list", headers=bearer(token)) as r:
        assert r.status == 404
    clock.advance(601)
    async with http.get(f"{node.url}/v2/a/tags/list", headers=bearer(token)) as r:
        await assert_error(r, 401, "UNAUTHORIZED")


async def test_a_remembered_admission_admits_only_what_it_was_decided_for(http, node):
    await seed(http, node)
    token = await token_for(http, node, "puller", PULL_PASSWORD, "repository:team/app:pull,push")
    async with http.get(f"{node.url}/v2/team/app/tags/list", headers=bearer(token)) as r:
        assert r.status == 200
    image = make_image(seed=11)
    async with http.post(f"{node.url}/v2/team/app/blobs/uploads/", headers=bearer(token),
                         params={"digest": image.digest}, data=image.config) as r:
        await assert_error(r, 403, "DENIED")
    async with http.get(f"{node.url}/v2/other/tags/list", headers=bearer(token)) as r:
        await assert_error(r, 403, "DENIED")


def test_remembered_admissions_are_bounded(files, tmp_path, monkeypatch):
    monkeypatch.setattr(gate_module, "ADMISSIONS_LIMIT", 3)
    clock = ManualClock()
    now = lambda: clock.wall_ns() / 1e9          # noqa: E731
    trust = Trust.load(files.certificates["node-a"].ca_file, now)
    cert = files.certificates["node-a"]
    gate = Gate(identities(), TokenAuthority(SigningKey.load(cert.key_file, cert.cert_file, trust),
                                             trust, SERVICE, now), now)
    admin = gate.login(REGISTRY, ADMIN_PASSWORD)
    needed = (repository("a", PULL),)
    tokens = [gate.issue(admin, needed)[0].token for _ in range(5)]
    for token in tokens:
        gate.admit(f"Bearer {token}", needed)
    assert len(gate._admissions) == 3
    assert [key[0] for key in gate._admissions] == [f"Bearer {t}" for t in tokens[2:]]


async def test_refusals_do_not_reveal_whether_a_repository_exists(http, node):
    await seed(http, node, "secret/app")
    answers = []
    for repo in ("secret/app", "secret/nothing-here"):
        async with http.get(f"{node.url}/v2/{repo}/manifests/v1", headers=basic("team", TEAM_PASSWORD)) as r:
            answers.append((r.status, (await r.json())["errors"][0]["code"]))
        async with http.get(f"{node.url}/v2/{repo}/manifests/v1") as r:
            answers.append((r.status, (await r.json())["errors"][0]["code"]))
    assert answers == [(403, "DENIED"), (401, "UNAUTHORIZED")] * 2


async def test_a_mount_needs_pull_on_the_source(http, node):
    image = await seed(http, node, "secret/app")
    async with http.post(f"{node.url}/v2/team/app/blobs/uploads/", headers=basic("team", TEAM_PASSWORD),
                         params={"mount": digest_of(image.layers[0]), "from": "secret/app"}) as r:
        error = await assert_error(r, 403, "DENIED")
    assert error["detail"] == [{"Type": "repository", "Name": "secret/app", "Action": "pull"}]


async def test_a_role_limited_to_one_repository(http, node):
    await seed(http, node, "shared")
    await seed(http, node, "team/app")
    reader = basic(READER_ID, READER_SECRET)
    async with http.get(f"{node.url}/v2/shared/manifests/v1", headers=reader) as r:
        assert r.status == 200
    async with http.get(f"{node.url}/v2/team/app/manifests/v1", headers=reader) as r:
        await assert_error(r, 403, "DENIED")
    async with http.get(f"{node.url}/v2/_catalog", headers=reader) as r:
        await assert_error(r, 403, "DENIED")


async def test_tokens_never_list_the_catalog(http, node):
    async with http.get(f"{node.url}/v2/_catalog", headers=basic("team", TEAM_PASSWORD)) as r:
        await assert_error(r, 403, "DENIED")


async def test_admin_disabled_cannot_log_in(http, node, source):
    source.update_registry(admin_enabled=False)
    async with http.get(f"{node.url}/v2/", headers=basic(REGISTRY, ADMIN_PASSWORD)) as r:
        await assert_error(r, 401, "UNAUTHORIZED")


@pytest.mark.parametrize("value", ["Bearer " + "A" * 8000, "Basic " + "A" * 8000,
                                   "Bearer", "Negotiate abc", "Bearer a.b", ""])
async def test_malformed_authorization_gets_401_never_500(http, node, value):
    async with http.get(f"{node.url}/v2/a/tags/list", headers={"Authorization": value}) as r:
        await assert_error(r, 401, "UNAUTHORIZED")


async def test_unknown_grant_type_and_garbage_forms_get_400(http, node):
    async with http.post(f"{node.url}/oauth2/token", data={"grant_type": "authorization_code"}) as r:
        await assert_error(r, 400, "UNSUPPORTED")
    async with http.post(f"{node.url}/oauth2/token", data=b"\xff\xfe", headers={
            "Content-Type": "application/x-www-form-urlencoded"}) as r:
        assert r.status == 400
    async with http.post(f"{node.url}/oauth2/token", data={"grant_type": "refresh_token",
                                                           "refresh_token": "junk"}) as r:
        await assert_error(r, 401, "UNAUTHORIZED")


def test_a_node_with_auth_but_no_signing_key_does_not_start(files, tmp_path):
    config = files.config("node-a", tmp_path / "d")
    with pytest.raises(AuthConfigError, match="signing key and certificate"):
        init_app(dataclasses.replace(config, auth_key_file=None))


# -- anonymous pull ----------------------------------------------------------------------------


async def test_anonymous_pull_reads_only_and_the_catalog_stays_closed(http, node, source):
    image = await seed(http, node)
    async with http.get(f"{node.url}/v2/team/app/manifests/v1") as r:
        assert r.status == 401
    async with http.get(f"{node.url}/oauth2/token", params={"service": SERVICE}) as r:
        await assert_error(r, 401, "UNAUTHORIZED")            # disabled: no anonymous tokens
    source.update_registry(anonymous_pull_enabled=True)
    async with http.get(f"{node.url}/v2/team/app/manifests/v1") as r:
        assert r.status == 200 and await r.read() == image.manifest
    async with http.get(f"{node.url}/oauth2/token",
                        params={"service": SERVICE, "scope": "repository:team/app:pull,push"}) as r:
        token = (await r.json())["token"]
    assert token_access(token) == [{"type": "repository", "name": "team/app", "actions": ["pull"]}]
    async with http.get(f"{node.url}/v2/team/app/manifests/v1", headers=bearer(token)) as r:
        assert r.status == 200
    for method, path in (("PUT", "/v2/team/app/manifests/v2"), ("DELETE", "/v2/team/app/manifests/v1"),
                         ("GET", "/v2/_catalog")):
        async with http.request(method, node.url + path, data=image.manifest,
                                headers={"Content-Type": image.media_type}) as r:
            await assert_error(r, 401, "UNAUTHORIZED")
        async with http.request(method, node.url + path, headers=bearer(token)) as r:
            await assert_error(r, 401, "UNAUTHORIZED")
