"""Identities written at home work on a replica once replication brings them:
the replica (an in-process node with auth on, so its gate reads
``ConfigurationIdentities`` over its own configuration) lets a token in by
Basic and by bearer, and stops letting it in once a change made at home —
disabled, password regenerated, deleted — reaches it; an identity gets what
its role assignment gives; a scope map's change applies to its tokens; the
admin user logs in under the registry's name. The home node runs without
auth: it only writes (as the management API makes it do)."""

from __future__ import annotations

import msgspec
import pytest

from registry_node.auth.identities import hash_secret
from registry_node.configuration import RegistryProperties
from registry_node.identities import Assignment, Identity, ScopeMap, Secret, Token

from .auth_helpers import SERVICE, auth_files, basic, bearer
from .helpers import eventually
from .replication_harness import InProcessCluster

CONF = "/georeg/v1/configuration"
PASSWORD = "token-pw-1a2b3c4d5e"
RENEWED = "token-pw2-6f7a8b9c0d"
SECRET = "identity-secret-0f1e2d3c4b"
ADMIN = "admin-pw-9a8b7c6d5e"
IDENTITY = "0a1b2c3d-0000-4000-8000-000000000001"


@pytest.fixture
async def cluster(tmp_path):
    files = auth_files(tmp_path / "auth", "westeurope")
    cert = files.certificates["westeurope"]
    c = InProcessCluster(tmp_path, [("eastus", ""), ("westeurope", "")], node_settings={
        "westeurope": {"auth_ca_file": cert.ca_file, "auth_key_file": cert.key_file,
                       "auth_cert_file": cert.cert_file, "auth_service": SERVICE}})
    await c.start()
    try:
        await c.wait_ready()
        yield c
    finally:
        await c.close()


async def put(http, cluster, kind: str, name: str, value: msgspec.Struct) -> None:
    async with http.put(f"{cluster.nodes['eastus'].url}{CONF}/{kind}/{name}",
                        json=msgspec.to_builtins(value)) as r:
        assert r.status == 200, await r.text()


async def delete(http, cluster, kind: str, name: str) -> None:
    async with http.delete(f"{cluster.nodes['eastus'].url}{CONF}/{kind}/{name}") as r:
        assert r.status == 200, await r.text()


def secret(slot: str, value: str) -> Secret:
    return Secret(slot, hash_secret(value))


async def status(http, url: str, path: str, headers: dict) -> int:
    async with http.get(f"{url}{path}", headers=headers) as r:
        return r.status


async def becomes(http, url: str, path: str, headers: dict, expected: int, what: str) -> None:
    await eventually(lambda: _is(http, url, path, headers, expected), timeout=20, what=what)


async def _is(http, url, path, headers, expected) -> bool:
    return await status(http, url, path, headers) == expected


async def token_for(http, url: str, headers: dict, scope: str) -> str:
    async with http.get(f"{url}/oauth2/token", headers=headers,
                        params={"service": SERVICE, "scope": scope}) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["token"]


async def test_a_token_made_at_home_works_on_the_replica_until_a_change_there_ends_it(
        cluster, http):
    replica = cluster.nodes["westeurope"].url
    tags = "/v2/app/tags/list"
    assert await status(http, replica, "/v2/", basic("ci", PASSWORD)) == 401   # not yet
    await put(http, cluster, "scope-map", "app-read", ScopeMap(
        actions=("repositories/app/content/read",)))
    await put(http, cluster, "token", "ci", Token(
        "app-read", passwords=(secret("password1", PASSWORD),)))
    await becomes(http, replica, "/v2/", basic("ci", PASSWORD), 200, "the token on the replica")
    assert await status(http, replica, tags, basic("ci", PASSWORD)) == 404     # allowed; no repo
    assert await status(http, replica, "/v2/other/tags/list", basic("ci", PASSWORD)) == 403
    access = await token_for(http, replica, basic("ci", PASSWORD), "repository:app:pull")
    assert await status(http, replica, tags, bearer(access)) == 404

    # The scope map changes at home: the token's access follows on the replica.
    await put(http, cluster, "scope-map", "app-read", ScopeMap(
        actions=("repositories/other/content/read",)))
    await becomes(http, replica, tags, basic("ci", PASSWORD), 403, "the scope map's change")
    await put(http, cluster, "scope-map", "app-read", ScopeMap(
        actions=("repositories/app/content/read",)))
    await becomes(http, replica, tags, basic("ci", PASSWORD), 404, "the scope map restored")

    # Disabled at home: Basic and the bearer token it was given stop on the replica.
    await put(http, cluster, "token", "ci", Token(
        "app-read", status="disabled", passwords=(secret("password1", PASSWORD),)))
    await becomes(http, replica, "/v2/", basic("ci", PASSWORD), 401, "the disabled token")
    assert await status(http, replica, tags, bearer(access)) == 401

    # Enabled with a regenerated password1: the old one and its tokens stay refused.
    await put(http, cluster, "token", "ci", Token(
        "app-read", passwords=(secret("password1", RENEWED),)))
    await becomes(http, replica, "/v2/", basic("ci", RENEWED), 200, "the regenerated password")
    assert await status(http, replica, "/v2/", basic("ci", PASSWORD)) == 401
    assert await status(http, replica, tags, bearer(access)) == 401
    fresh = await token_for(http, replica, basic("ci", RENEWED), "repository:app:pull")

    # Deleted at home: gone on the replica, its tokens with it.
    await delete(http, cluster, "token", "ci")
    await becomes(http, replica, "/v2/", basic("ci", RENEWED), 401, "the deleted token")
    assert await status(http, replica, tags, bearer(fresh)) == 401


async def test_an_identity_gets_its_roles_and_the_admin_its_name_on_the_replica(cluster, http):
    replica = cluster.nodes["westeurope"].url
    await put(http, cluster, "identity", IDENTITY, Identity(
        "deployer", secrets=(secret("secret", SECRET),)))
    await put(http, cluster, "role-assignment", "ra-1", Assignment(IDENTITY, "AcrPull",
                                                                   repository="shared"))
    await becomes(http, replica, "/v2/shared/tags/list", basic(IDENTITY, SECRET), 404,
                  "the identity's role on the replica")
    assert await status(http, replica, "/v2/other/tags/list", basic(IDENTITY, SECRET)) == 403
    await delete(http, cluster, "role-assignment", "ra-1")
    await becomes(http, replica, "/v2/shared/tags/list", basic(IDENTITY, SECRET), 403,
                  "the role taken away")

    await put(http, cluster, "registry", "default", RegistryProperties(
        admin_enabled=True, name="georegtest", admin_passwords=(secret("password", ADMIN),)))
    await becomes(http, replica, "/v2/any/tags/list", basic("georegtest", ADMIN), 404,
                  "the admin user on the replica")
    await put(http, cluster, "registry", "default", RegistryProperties(
        admin_enabled=False, name="georegtest", admin_passwords=(secret("password", ADMIN),)))
    await becomes(http, replica, "/v2/", basic("georegtest", ADMIN), 401, "admin disabled")


async def test_the_home_node_refuses_identity_values_that_would_carry_a_plaintext(cluster, http):
    url = cluster.nodes["eastus"].url
    for kind, name, value in (
            ("token", "t", {"scope_map": "m", "passwords": [{"name": "password1",
                                                             "hash": "hunter2-plaintext"}]}),
            ("identity", IDENTITY, {"secrets": [{"name": "secret", "hash": "plain"}]}),
            ("registry", "default", {"admin_passwords": [{"name": "password", "hash": "pw"}]}),
            ("token", "t", {"scope_map": "m", "status": "paused"}),
            ("token", "t", {"scope_map": ""}),
            ("token", "t", {"scope_map": "m", "passwords": [
                {"name": "password3", "hash": hash_secret("x")}]}),
            ("scope-map", "_repositories_pull", {"actions": ["repositories/*/content/write"]}),
            ("scope-map", "m", {"actions": ["repositories/a/content/pull"]}),
            ("scope-map", "m", {"actions": ["repositories/sample/*/x/content/read"]}),
            ("role-assignment", "r", {"assignee": IDENTITY, "role": "Superuser"}),
            ("role-assignment", "r", {"assignee": "", "role": "AcrPull"})):
        async with http.put(f"{url}{CONF}/{kind}/{name}", json=value) as r:
            assert r.status == 400, (kind, value, await r.text())
    async with http.get(f"{url}{CONF}") as r:
        assert (await r.json())["objects"] == []

