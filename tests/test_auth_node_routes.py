"""The node routes beside OCI's that a registry client may reach, on nodes with
auth on (in process, real sockets, real gRPC over mutual TLS, a real CA, the
registry configuration a cluster writes): per-image replication status needs
``pull`` on the repository it asks about (or the cluster's internal
credential), with the same refusals as a manifest read — each its own test,
none a 500, none a hint of whether the repository exists. Every other
non-``/v2`` route is checked too: the internal ones refuse without the
internal credential, the token server authenticates its own requests.
"""

from __future__ import annotations

import secrets

import aiohttp
import pytest

from cluster.control.ca import ClusterCA, NodeCertificate

from .auth_helpers import (
    ADMIN_PASSWORD,
    PULL_PASSWORD,
    READER_ID,
    READER_SECRET,
    REGISTRY,
    SERVICE,
    TEAM_PASSWORD,
    basic,
    bearer,
    configuration_objects,
    identities,
)
from .helpers import assert_error, eventually, make_image, push_image
from .replication_harness import InProcessCluster
from .test_auth_api import parse_challenge, token_for

STATUS = "/georeg/v1/replication/status"


@pytest.fixture
async def nodes(tmp_path):
    """East US and West Europe with auth on, replicating over mutual TLS, the
    internal credential configured, the test identities in their registry
    configuration and one image (``team/app:v1``) everywhere."""
    ca = ClusterCA.open(tmp_path / "ca")
    internal = secrets.token_urlsafe(32)
    (tmp_path / "internal.secret").write_text(internal + "\n")
    certificates = {name: ca.node_certificate(name, name) for name in ("eastus", "westeurope")}

    def settings(cert: NodeCertificate) -> dict:
        return {"auth_ca_file": cert.ca_file, "auth_key_file": cert.key_file,
                "auth_cert_file": cert.cert_file, "auth_service": SERVICE,
                "internal_credential_file": tmp_path / "internal.secret"}

    c = InProcessCluster(tmp_path / "nodes", [("eastus", ""), ("westeurope", "")],
                         node_settings={n: settings(cert) for n, cert in certificates.items()},
                         mutual_tls=True)
    await c.start()
    try:
        await c.wait_ready()
        c.internal = {"Authorization": f"Bearer {internal}"}
        async with aiohttp.ClientSession(headers=c.internal) as cluster_itself:
            for kind, name, value in configuration_objects(identities()):
                url = f"{c.nodes['eastus'].url}/georeg/v1/configuration/{kind}/{name}"
                async with cluster_itself.put(url, json=value) as r:
                    assert r.status == 200, await r.text()
        async with aiohttp.ClientSession(headers=basic(REGISTRY, ADMIN_PASSWORD)) as admin:
            async def admin_everywhere() -> bool:
                async with admin.get(f"{c.nodes['westeurope'].url}/v2/") as r:
                    return r.status == 200
            await eventually(admin_everywhere, timeout=20, what="the admin user on westeurope")
            c.image = make_image(seed=3)
            await push_image(admin, c.nodes["eastus"].url, "team/app", c.image, tag="v1")
        yield c
    finally:
        await c.close()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def status_url(nodes, repository: str = "team/app", reference: str = "v1",
               node: str = "westeurope") -> str:
    return f"{nodes.nodes[node].url}{STATUS}?repository={repository}&reference={reference}"


async def test_status_without_credentials_is_401_with_the_pull_challenge(http, nodes):
    async with http.get(status_url(nodes)) as r:
        error = await assert_error(r, 401, "UNAUTHORIZED")
        challenge = parse_challenge(r.headers["WWW-Authenticate"])
    assert challenge == {"realm": f"{nodes.nodes['westeurope'].url}/oauth2/token",
                         "service": SERVICE, "scope": "repository:team/app:pull"}
    assert error["detail"] == [{"Type": "repository", "Name": "team/app", "Action": "pull"}]
    assert "digest" not in await r.text()


async def test_status_head_without_credentials_is_401_too(http, nodes):
    async with http.head(status_url(nodes)) as r:
        assert r.status == 401
        assert parse_challenge(r.headers["WWW-Authenticate"])["scope"] == "repository:team/app:pull"


async def test_status_with_a_bad_password_is_401(http, nodes):
    async with http.get(status_url(nodes), headers=basic(REGISTRY, "not-the-password")) as r:
        await assert_error(r, 401, "UNAUTHORIZED")


async def test_status_with_a_tampered_token_is_401_invalid_token(http, nodes):
    token = await token_for(http, nodes.nodes["eastus"], "puller", PULL_PASSWORD,
                            "repository:team/app:pull")
    head, body, sig = token.split(".")
    tampered = f"{head}.{body}.{sig[:10]}{'A' if sig[10] != 'A' else 'B'}{sig[11:]}"
    async with http.get(status_url(nodes), headers=bearer(tampered)) as r:
        await assert_error(r, 401, "UNAUTHORIZED")
        assert parse_challenge(r.headers["WWW-Authenticate"])["error"] == "invalid_token"


async def test_status_for_a_known_identity_without_pull_is_403_denied(http, nodes):
    # READER_ID holds AcrPull on ``shared`` only.
    async with http.get(status_url(nodes), headers=basic(READER_ID, READER_SECRET)) as r:
        error = await assert_error(r, 403, "DENIED")
    assert error["detail"] == [{"Type": "repository", "Name": "team/app", "Action": "pull"}]


async def test_status_refusals_do_not_reveal_whether_a_repository_exists(http, nodes):
    answers = []
    for repository in ("team/app", "team/nothing-here"):
        for headers in ({}, basic(READER_ID, READER_SECRET)):
            async with http.get(status_url(nodes, repository), headers=headers) as r:
                body = await r.json()
                answers.append((r.status, body["errors"][0]["code"],
                                r.headers["WWW-Authenticate"].replace(repository, "R")))
    assert answers[0] == answers[2] and answers[1] == answers[3], answers
    assert [a[0] for a in answers] == [401, 403, 401, 403]


async def test_a_token_with_pull_on_another_repository_is_403(http, nodes):
    token = await token_for(http, nodes.nodes["eastus"], "team", TEAM_PASSWORD,
                            "repository:shared:pull")
    async with http.get(status_url(nodes), headers=bearer(token)) as r:
        await assert_error(r, 403, "DENIED")


async def test_status_answers_a_pull_token_through_the_token_flow(http, nodes):
    async with http.get(status_url(nodes)) as r:
        challenge = parse_challenge(r.headers["WWW-Authenticate"])
    async with http.get(challenge["realm"], headers=basic("puller", PULL_PASSWORD),
                        params={"service": challenge["service"], "scope": challenge["scope"]}) as r:
        token = (await r.json())["access_token"]

    async def complete() -> bool:
        async with http.get(status_url(nodes), headers=bearer(token)) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        return answer["complete"]

    await eventually(complete, timeout=20, what="team/app:v1 on both replicas")
    async with http.get(status_url(nodes), headers=bearer(token)) as r:
        answer = await r.json()
    assert answer["digest"] == nodes.image.digest
    assert {x["name"]: x["state"] for x in answer["replicas"]} == \
        {"eastus": "present", "westeurope": "present"}


async def test_status_answers_the_cluster_s_internal_credential(http, nodes):
    async with http.get(status_url(nodes, node="eastus"), headers=nodes.internal) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["digest"] == nodes.image.digest


async def test_status_with_a_bad_name_asks_for_credentials_first_then_refuses_the_name(http, nodes):
    bad = status_url(nodes, repository="UPPER/Case")
    async with http.get(bad) as r:
        await assert_error(r, 401, "UNAUTHORIZED")
    async with http.get(bad, headers=basic("puller", PULL_PASSWORD)) as r:
        await assert_error(r, 400, "NAME_INVALID")
    async with http.get(f"{nodes.nodes['eastus'].url}{STATUS}?reference=v1") as r:
        await assert_error(r, 401, "UNAUTHORIZED")


@pytest.mark.parametrize("method,path", [
    ("GET", "/georeg/v1/node"), ("GET", "/georeg/v1/inventory"), ("GET", "/metrics"),
    ("GET", "/georeg/v1/faults/storage"), ("PUT", "/georeg/v1/faults/storage"),
    ("GET", "/georeg/v1/configuration"), ("GET", "/georeg/v1/configuration/registry"),
    ("GET", "/georeg/v1/configuration/registry/default"),
    ("DELETE", "/georeg/v1/configuration/token/puller"),
    ("GET", "/georeg/v1/no-such-route"), ("GET", "/georeg/v1/tag-moves"),
    ("GET", "/georeg/v1/tag-moves?after=0&wait=5")])
async def test_every_other_node_route_refuses_a_registry_client(http, nodes, method, path):
    """Even with admin credentials: these serve the cluster itself."""
    url = nodes.nodes["eastus"].url + path
    for headers in ({}, basic(REGISTRY, ADMIN_PASSWORD)):
        async with http.request(method, url, headers=headers, json={}) as r:
            await assert_error(r, 401, "UNAUTHORIZED")
    async with http.get(f"{nodes.nodes['eastus'].url}/v2/", headers=basic("puller", PULL_PASSWORD)) as r:
        assert r.status == 200       # the control: the same node lets that client in where it may


async def test_the_token_server_refuses_without_credentials(http, nodes):
    async with http.get(f"{nodes.nodes['eastus'].url}/oauth2/token",
                        params={"service": SERVICE, "scope": "repository:team/app:pull"}) as r:
        assert r.status == 401
