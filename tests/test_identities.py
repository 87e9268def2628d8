"""Identities as registry configuration (``registry_node.identities``,
``cluster.control.identities``): ACR's commands for the admin user's credentials,
scope maps, tokens, identities and role assignments, each through the real
``georeg`` CLI on a real cluster (home East US, one replica in West Europe);
what they write reaches every node, as hashes only; limits per tier; bad input
is a 4xx; every change is refused while the home region is down. The
replicated identities at work in a replica's access gate:
``test_identities_on_a_replica``."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import urllib.parse
import urllib.request

import aiohttp
import pytest

from cluster.control import management_client
from cluster.control import spec as specs
from cluster.control.access import admin_passwords_path
from cluster.testing import RunningCluster
from registry_node.auth.identities import secret_matches

from .helpers import eventually
from .test_cluster import georeg

CONF = "/georeg/v1/configuration"
NODES = ("eastus", "westeurope")
SPEC = specs.ClusterSpec(registry="georegids", tier="Premium", home_region="eastus",
                         paired_copies=False, replicas=(specs.ReplicaSpec("westeurope"),))


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    with RunningCluster(SPEC, tmp_path_factory.mktemp("ids")) as c:
        yield c


def cli(c: RunningCluster, *args: str):
    """``georeg ARGS`` against the cluster: (exit status, stdout, stderr)."""
    done = georeg(*args, data_dir=c.data_dir)
    return done.returncode, done.stdout, done.stderr


def ok(c: RunningCluster, *args: str):
    code, out, err = cli(c, *args)
    assert code == 0, (args, out, err)
    return json.loads(out) if out.lstrip()[:1] in ("{", "[") else out


def on_node(c: RunningCluster, url: str):
    """GET ``url`` on a node's internal route, as the cluster itself (its
    internal credential): a response to read, or ``OSError``."""
    return management_client.open_direct(
        urllib.request.Request(url, headers=c.internal_headers()), 10)


def held(c: RunningCluster, node: str, kind: str, name: str) -> dict | None:
    """The live value of ``kind/name`` on ``node``, from its own configuration API."""
    url = f"{c.node_url(node)}{CONF}/{kind}/{urllib.parse.quote(name, safe='')}"
    try:
        with on_node(c, url) as r:
            return json.load(r)["value"]
    except OSError:       # 404 (absent or deleted) or not reachable now
        return None


async def on_every_node(c: RunningCluster, predicate, what: str) -> None:
    for node in NODES:
        await eventually(lambda n=node: asyncio.to_thread(predicate, n), timeout=30,
                         what=f"{what} on {node}")


def matches(secrets: list[dict], slot: str, password: str) -> bool:
    return any(s["name"] == slot and secret_matches(password, s["hash"]) for s in secrets)


# -- the admin user ------------------------------------------------------------------------


async def test_admin_credentials_show_and_renew_and_only_hashes_leave_the_control_plane(running):
    c = running
    # ACR's admin user is disabled by default; an auth cluster's first start
    # enables it (so that `georeg up` can print a login), and it can be turned off.
    at_start = ok(c, "credential", "show")
    ok(c, "registry", "update", "--admin-enabled", "false")
    code, _, err = cli(c, "credential", "show")
    assert code == 2 and "registry update --admin-enabled true" in err
    ok(c, "registry", "update", "--admin-enabled", "true")
    shown = ok(c, "credential", "show")
    assert shown == at_start                         # enabled again: the same passwords
    assert shown["username"] == "georegids"
    first = {p["name"]: p["value"] for p in shown["passwords"]}
    assert set(first) == {"password", "password2"} and all(first.values())
    assert ok(c, "credential", "show") == shown                   # shown again, the same
    await on_every_node(c, lambda n: matches(
        (held(c, n, "registry", "default") or {}).get("admin_passwords", []), "password2",
        first["password2"]), "the admin password's hash")

    renewed = ok(c, "credential", "renew", "--password-name", "password2")
    second = {p["name"]: p["value"] for p in renewed["passwords"]}
    assert second["password"] == first["password"] and second["password2"] != first["password2"]
    assert ok(c, "credential", "show") == renewed
    await on_every_node(c, lambda n: matches(
        (held(c, n, "registry", "default") or {}).get("admin_passwords", []), "password2",
        second["password2"]), "the renewed password's hash")
    for node in NODES:                         # the old password2 works nowhere
        secrets = held(c, node, "registry", "default")["admin_passwords"]
        assert not matches(secrets, "password2", first["password2"])
        assert matches(secrets, "password", first["password"])

    # The plaintexts: in the control plane's 0600 file; in no node's configuration
    # (every register, tombstones included) and in no node's log.
    assert stat.S_IMODE(os.stat(admin_passwords_path(c.data_dir)).st_mode) == 0o600
    plaintexts = [first["password"], first["password2"], second["password2"]]
    for node in NODES:
        with on_node(c, f"{c.node_url(node)}{CONF}") as r:
            everything = r.read().decode()
        assert "admin_passwords" in everything
        assert not [p for p in plaintexts if p in everything]
    for log in (c.data_dir / "logs").glob("*.log"):
        text = log.read_text(errors="replace")
        assert not [p for p in plaintexts if p in text], log

    code, _, err = cli(c, "credential", "renew", "--password-name", "password3")
    assert code == 2 and "invalid choice" in err

    # A raw write of the registry object changes its switches, never the control
    # plane's fields: the admin passwords and the name stay.
    for value in ({"admin_passwords": []}, {"name": "other"}):
        with pytest.raises(management_client.ManagementError, match="set by the control plane"):
            await asyncio.to_thread(management_client.set_object, c.management_url, "registry",
                                    "default", value, c.owner_headers())
    await asyncio.to_thread(management_client.set_object, c.management_url, "registry",
                            "default", {"admin_enabled": True, "anonymous_pull_enabled": True},
                            c.owner_headers())
    assert ok(c, "credential", "show") == renewed
    assert held(c, "eastus", "registry", "default")["name"] == "georegids"


# -- scope maps ------------------------------------------------------------------------------


async def test_scope_map_commands(running):
    c = running
    created = ok(c, "scope-map", "create", "--name", "team-rw", "--description", "team",
                 "--repository", "team/*", "content/read", "content/write",
                 "--repository", "shared", "content/read")
    assert created["actions"] == ["repositories/team/*/content/read",
                                  "repositories/team/*/content/write",
                                  "repositories/shared/content/read"]
    assert created["scopeMapType"] == "UserDefined"
    listed = {m["name"]: m for m in ok(c, "scope-map", "list", "--json")}
    assert listed["team-rw"]["description"] == "team"
    assert listed["_repositories_pull"]["scopeMapType"] == "SystemDefined"
    assert {"_repositories_push", "_repositories_admin"} <= set(listed)
    assert "team-rw" in ok(c, "scope-map", "list")                           # the table
    assert ok(c, "scope-map", "show", "--name", "_repositories_admin")["actions"]

    updated = ok(c, "scope-map", "update", "--name", "team-rw",
                 "--add-repository", "shared", "metadata/read",
                 "--remove-repository", "team/*", "content/write", "--description", "read")
    assert updated["actions"] == ["repositories/team/*/content/read",
                                  "repositories/shared/content/read",
                                  "repositories/shared/metadata/read"]
    await on_every_node(c, lambda n: (held(c, n, "scope-map", "team-rw") or {}).get("actions")
                        == updated["actions"], "the updated scope map")

    for args, says in (
            (("create", "--name", "_repositories_pull", "--repository", "a", "content/read"),
             "system scope map"),
            (("update", "--name", "_repositories_pull", "--add-repository", "a", "content/write"),
             "system scope map"),
            (("delete", "--name", "_repositories_admin"), "system scope map"),
            (("create", "--name", "team-rw", "--repository", "a", "content/read"),
             "exists already"),
            (("create", "--name", "bad", "--repository", "a", "content/pull"),
             "'content/pull' is not an action"),
            (("create", "--name", "bad", "--repository", "sample/*/x", "content/read"),
             "wildcard"),
            (("create", "--name", "bad", "--repository", "a"), "at least one action"),
            (("create", "--name", "../x", "--repository", "a", "content/read"), "name is"),
            (("show", "--name", "nope"), "no scope map 'nope'"),
            (("update", "--name", "team-rw"), "nothing to update")):
        code, _, err = cli(c, "scope-map", *args)
        assert code == 2 and says in err, (args, err)
    assert ok(c, "scope-map", "show", "--name", "_repositories_pull")["actions"] == \
        ["repositories/*/content/read"]                         # unchanged
    assert held(c, "eastus", "scope-map", "bad") is None

    ok(c, "scope-map", "delete", "--name", "team-rw")
    await on_every_node(c, lambda n: held(c, n, "scope-map", "team-rw") is None,
                        "the scope map's deletion")
    code, _, err = cli(c, "scope-map", "delete", "--name", "team-rw")
    assert code == 2 and "no scope map" in err


# -- tokens ------------------------------------------------------------------------------------


async def test_token_commands(running):
    c = running
    created = ok(c, "token", "create", "--name", "ci-pull", "--scope-map", "_repositories_pull",
                 "--expiration-in-days", "30")
    passwords = {p["name"]: p["value"] for p in created["credentials"]["passwords"]}
    assert set(passwords) == {"password1", "password2"} and all(passwords.values())
    assert all(p["expiry"] for p in created["credentials"]["passwords"])
    assert created["status"] == "enabled" and created["credentials"]["username"] == "ci-pull"
    await on_every_node(c, lambda n: matches(
        (held(c, n, "token", "ci-pull") or {}).get("passwords", []), "password1",
        passwords["password1"]), "the token's password hash")

    # Never shown again: not by show, list, or any node's configuration.
    shown = ok(c, "token", "show", "--name", "ci-pull")
    listed = ok(c, "token", "list", "--json")
    assert "value" not in json.dumps(shown) and "value" not in json.dumps(listed)
    for node in NODES:
        with on_node(c, f"{c.node_url(node)}{CONF}") as r:
            everything = r.read().decode()
        assert passwords["password1"] not in everything
    assert "ci-pull" in ok(c, "token", "list")

    # --repository makes <token>-scope-map.
    pusher = ok(c, "token", "create", "--name", "ci-push", "--repository", "app",
                "content/read", "content/write")
    assert pusher["scopeMap"] == "ci-push-scope-map"
    assert ok(c, "scope-map", "show", "--name", "ci-push-scope-map")["actions"] == [
        "repositories/app/content/read", "repositories/app/content/write"]

    disabled = ok(c, "token", "update", "--name", "ci-pull", "--status", "disabled")
    assert disabled["status"] == "disabled"
    await on_every_node(c, lambda n: (held(c, n, "token", "ci-pull") or {}).get("status")
                        == "disabled", "the disabled status")
    ok(c, "token", "update", "--name", "ci-pull", "--scope-map", "ci-push-scope-map",
       "--status", "enabled")

    generated = ok(c, "token", "credential", "generate", "--name", "ci-pull", "--password1")
    values = {p["name"]: p.get("value") for p in generated["credentials"]["passwords"]}
    assert values["password1"] and values["password1"] != passwords["password1"]
    assert values["password2"] is None                              # not shown again
    await on_every_node(c, lambda n: matches(
        (held(c, n, "token", "ci-pull") or {}).get("passwords", []), "password1",
        values["password1"]), "the generated password")
    assert not matches(held(c, "westeurope", "token", "ci-pull")["passwords"], "password1",
                       passwords["password1"])

    for args, says in (
            (("create", "--name", "ci-pull", "--scope-map", "_repositories_pull"),
             "exists already"),
            (("create", "--name", "x", "--scope-map", "nope"), "no scope map 'nope'"),
            (("create", "--name", "x", "--scope-map", "_repositories_pull", "--repository", "a",
              "content/read"), "either --scope-map or --repository"),
            (("create", "--name", "georegids", "--scope-map", "_repositories_pull"),
             "admin user's name"),
            (("create", "--name", "x", "--scope-map", "_repositories_pull",
              "--expiration-in-days", "0"), "at least 1"),
            (("update", "--name", "nope", "--status", "disabled"), "no token 'nope'"),
            (("update", "--name", "ci-pull", "--scope-map", "nope"), "no scope map"),
            (("credential", "generate", "--name", "nope", "--password2"), "no token"),
            (("show", "--name", "nope"), "no token")):
        code, _, err = cli(c, "token", *args)
        assert code == 2 and says in err, (args, err)
    code, _, err = cli(c, "scope-map", "delete", "--name", "ci-push-scope-map")
    assert code == 2 and "used by the tokens ci-pull, ci-push" in err

    ok(c, "token", "delete", "--name", "ci-pull")
    ok(c, "token", "delete", "--name", "ci-push")
    await on_every_node(c, lambda n: held(c, n, "token", "ci-pull") is None,
                        "the token's deletion")
    assert ok(c, "scope-map", "show", "--name", "ci-push-scope-map")    # stays, as in ACR
    ok(c, "scope-map", "delete", "--name", "ci-push-scope-map")


# -- identities and role assignments ---------------------------------------------------------------


async def test_identity_and_role_assignment_commands(running):
    c = running
    created = ok(c, "identity", "create", "--name", "deployer")
    identity, secret = created["id"], created["secret"]
    assert created["displayName"] == "deployer" and secret
    listed = ok(c, "identity", "list", "--json")
    assert [i["id"] for i in listed if i["displayName"] == "deployer"] == [identity]
    assert secret not in json.dumps(listed)
    await on_every_node(c, lambda n: matches(
        (held(c, n, "identity", identity) or {}).get("secrets", []), "secret", secret),
        "the identity's secret hash")

    everywhere = ok(c, "role", "assignment", "create", "--role", "AcrPush", "--assignee", identity)
    one = ok(c, "role", "assignment", "create", "--role", "AcrPull", "--assignee", identity,
             "--scope", "repository/shared")
    assert everywhere["scope"] == "registry" and one["scope"] == "repository/shared"
    mine = ok(c, "role", "assignment", "list", "--assignee", identity, "--json")
    assert {(a["roleDefinitionName"], a["scope"]) for a in mine} == {
        ("AcrPush", "registry"), ("AcrPull", "repository/shared")}
    await on_every_node(c, lambda n: held(c, n, "role-assignment", one["id"]) is not None,
                        "the role assignment")

    for args, says in (
            (("create", "--role", "AcrPush", "--assignee", identity), "already has the role"),
            (("create", "--role", "AcrPull", "--assignee", "nobody"), "no identity 'nobody'"),
            (("create", "--role", "AcrPull", "--assignee", identity, "--scope", "shared"),
             "repository/NAME"),
            (("create", "--role", "Superuser", "--assignee", identity), "invalid choice"),
            (("delete", "--ids", "nope"), "no role assignment")):
        code, _, err = cli(c, "role", "assignment", *args)
        assert code == 2 and says in err, (args, err)

    ok(c, "role", "assignment", "delete", "--assignee", identity, "--role", "AcrPush")
    assert [a["id"] for a in ok(c, "role", "assignment", "list", "--json")
            if a["principalId"] == identity] == [one["id"]]
    ok(c, "identity", "delete", "--id", identity)             # and its last assignment
    await on_every_node(c, lambda n: held(c, n, "role-assignment", one["id"]) is None
                        and held(c, n, "identity", identity) is None, "the identity's deletion")
    code, _, err = cli(c, "identity", "delete", "--id", identity)
    assert code == 2 and "no identity" in err


# -- bad input through the management API --------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/georeg/v1/tokens", {}, 400),
    ("POST", "/georeg/v1/tokens", {"name": 5, "scopeMap": "_repositories_pull"}, 400),
    ("POST", "/georeg/v1/tokens", {"name": "t", "scopeMap": "nope"}, 404),
    ("POST", "/georeg/v1/tokens", {"name": "t", "scopeMap": "_repositories_pull",
                                   "expirationInDays": True}, 400),
    ("POST", "/georeg/v1/tokens", {"name": "t", "repositories": [["r", "bogus"]]}, 400),
    ("POST", "/georeg/v1/tokens", {"name": "t", "repositories": "r"}, 400),
    ("POST", "/georeg/v1/tokens", {"name": "t", "repositories": [[1, 2]]}, 400),
    ("POST", "/georeg/v1/tokens", {"name": "t", "scopeMap": "_repositories_pull", "x": 1}, 400),
    ("POST", "/georeg/v1/tokens", {"name": "t", "scopeMap": "_repositories_pull",
                                   "status": "maybe"}, 400),
    ("PATCH", "/georeg/v1/tokens/nope", {"status": "disabled"}, 404),
    ("PATCH", "/georeg/v1/tokens/..%2Fx", {"status": "disabled"}, 400),
    ("DELETE", "/georeg/v1/tokens/nope", None, 404),
    ("POST", "/georeg/v1/tokens/nope/credentials", {"name": "password1"}, 404),
    ("POST", "/georeg/v1/scope-maps", {"name": "m", "repositories": [["a*", "content/read"]]},
     400),
    ("POST", "/georeg/v1/scope-maps", {"name": "_repositories_x",
                                       "repositories": [["a", "content/read"]]}, 400),
    ("DELETE", "/georeg/v1/scope-maps/_repositories_pull", None, 400),
    ("PATCH", "/georeg/v1/scope-maps/_repositories_push", {"description": "x"}, 400),
    ("POST", "/georeg/v1/identities", {"name": ""}, 400),
    ("DELETE", "/georeg/v1/identities/nope", None, 404),
    ("POST", "/georeg/v1/role-assignments", {"role": "Nope", "assignee": "x"}, 400),
    ("POST", "/georeg/v1/role-assignments", {"role": "AcrPull", "assignee": "x"}, 404),
    ("POST", "/georeg/v1/registry/credentials/renew", {"name": "password3"}, 400),
    ("POST", "/georeg/v1/registry/credentials/renew", [], 400),
    # Identities are written by their commands only, never as raw configuration.
    ("PUT", f"{CONF}/token/t", {"scope_map": "_repositories_admin"}, 400),
    ("DELETE", f"{CONF}/scope-map/m", None, 400),
])
async def test_bad_input_is_a_4xx_and_changes_nothing(running, http, method, path, body, status):
    before = await asyncio.to_thread(_everything, running)
    async with http.request(method, f"{running.management_url}{path}", json=body,
                            headers=running.owner_headers()) as r:
        assert r.status == status, await r.text()
        assert (await r.json())["error"]["message"]
    assert await asyncio.to_thread(_everything, running) == before


def _everything(c: RunningCluster) -> list:
    with on_node(c, f"{c.node_url('eastus')}{CONF}") as r:
        return json.load(r)["objects"]


# -- the home region down ------------------------------------------------------------------------------


async def test_every_change_fails_while_the_home_region_is_down(running):
    c = running
    ok(c, "registry", "update", "--admin-enabled", "true")
    ok(c, "scope-map", "create", "--name", "kept", "--repository", "a", "content/read")
    kept = ok(c, "token", "create", "--name", "kept", "--scope-map", "kept")
    await on_every_node(c, lambda n: held(c, n, "token", "kept") is not None, "the token")
    identity = ok(c, "identity", "create", "--name", "kept")["id"]
    c.crash("eastus")
    try:
        for args in (("token", "create", "--name", "t2", "--scope-map", "_repositories_pull"),
                     ("token", "update", "--name", "kept", "--status", "disabled"),
                     ("token", "delete", "--name", "kept"),
                     ("token", "credential", "generate", "--name", "kept", "--password2"),
                     ("scope-map", "create", "--name", "m2", "--repository", "a", "content/read"),
                     ("scope-map", "update", "--name", "kept", "--description", "x"),
                     ("scope-map", "delete", "--name", "kept"),
                     ("credential", "renew", "--password-name", "password"),
                     ("identity", "create", "--name", "i2"),
                     ("identity", "delete", "--id", identity),
                     ("role", "assignment", "create", "--role", "AcrPull", "--assignee", identity)):
            code, _, err = cli(c, *args)
            assert code == 2, (args, err)
            assert "home region eastus holds the control plane" in err, (args, err)
        # Reads answer from the replica, which keeps what it holds.
        assert ok(c, "token", "show", "--name", "kept")["status"] == "enabled"
        assert "kept" in {m["name"] for m in ok(c, "scope-map", "list", "--json")}
        assert matches(held(c, "westeurope", "token", "kept")["passwords"], "password1",
                       kept["credentials"]["passwords"][0]["value"])
    finally:
        c.restart("eastus")
    c.run(c.cluster.wait_ready)
    ok(c, "token", "delete", "--name", "kept")
    ok(c, "scope-map", "delete", "--name", "kept")
    ok(c, "identity", "delete", "--id", identity)


# -- limits per tier ----------------------------------------------------------------------------------


BASIC = specs.ClusterSpec(registry="georegbasic", tier="Basic", home_region="eastus",
                          paired_copies=False)


async def test_the_basic_tier_allows_100_scope_maps_and_100_tokens(tmp_path):
    with RunningCluster(BASIC, tmp_path) as c:
        async with aiohttp.ClientSession(headers=c.owner_headers()) as http:
            url = c.management_url
            for n in range(99):
                async with http.post(f"{url}/georeg/v1/scope-maps", json={
                        "name": f"m{n}", "repositories": [[f"r{n}", "content/read"]]}) as r:
                    assert r.status == 201, await r.text()
            # The 100th scope map is made by a token's --repository; a token counts once.
            ok(c, "token", "create", "--name", "t99", "--repository", "r", "content/read")
            code, _, err = cli(c, "scope-map", "create", "--name", "m100", "--repository", "r",
                               "content/read")
            assert code == 2 and "the Basic tier allows 100 scope maps" in err, err
            assert "Standard (500)" in err
            for n in range(99):
                async with http.post(f"{url}/georeg/v1/tokens", json={
                        "name": f"t{n}", "scopeMap": "_repositories_pull"}) as r:
                    assert r.status == 201, await r.text()
            code, _, err = cli(c, "token", "create", "--name", "t100", "--scope-map",
                               "_repositories_pull")
            assert code == 2 and "the Basic tier allows 100 tokens" in err, err
            async with http.post(f"{url}/georeg/v1/tokens", json={
                    "name": "t100", "scopeMap": "_repositories_pull"}) as r:
                assert r.status == 409 and (await r.json())["error"]["code"] == "QuotaExceeded"
            ok(c, "token", "delete", "--name", "t0")              # room again
            ok(c, "token", "create", "--name", "t100", "--scope-map", "_repositories_pull")

