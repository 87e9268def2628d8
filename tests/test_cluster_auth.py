"""A cluster with ``auth = "token"``, as a user runs it: ``georeg up`` (detached,
real node processes, endpoints, management API), the credentials it prints,
``georeg login``, real clients through the endpoints, and everything a client
must not reach: the management API without the owner credential, a node's
internal routes without the internal credential. No secret on any command
line (``ps``) and none in the logs."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import stat
from pathlib import Path

import aiohttp
import grpc
import pytest

from cluster.control import spec as specs
from cluster.control.access import admin_passwords_path
from cluster.control.ca import ClusterCA
from cluster.control.cluster import Cluster
from cluster.control.state import running_state
from replicator.wire.v1 import replication_pb2 as pb
from replicator.wire.v1 import replication_pb2_grpc as pbg

from .helpers import Skopeo, eventually, make_image, push_image, write_oci_layout
from .test_cluster import DetachedCluster, georeg
from .test_interop import gzip_image

SPEC = """\
home_region = "westeurope"
paired_copies = false
auth = "token"
[[replicas]]
region = "northeurope"
[network]
port_base = 0
"""
_PRINTED = re.compile(r"username (\S+), password (\S+)")


class AuthCluster(DetachedCluster):
    def __init__(self, data: Path, stdout: str) -> None:
        super().__init__(data)
        self.stdout = stdout
        match = _PRINTED.search(stdout)
        assert match, f"`georeg up` printed no credentials:\n{stdout}"
        self.username, self.password = match[1], match[2]
        self.management = running_state(data)["management"]
        self.owner = (data / "auth" / "owner.secret").read_text().strip()
        self.internal = (data / "auth" / "internal.secret").read_text().strip()
        self.tokens: list[str] = []          # minted during the run: secrets too

    def secrets(self) -> list[str]:
        basic = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return [self.password, self.owner, self.internal, basic, *self.tokens]


@pytest.fixture(scope="module")
def auth_cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth-cluster")
    (root / "spec.toml").write_text(SPEC)
    data = root / "data"
    up = georeg("up", "--detach", "--config", str(root / "spec.toml"), data_dir=data)
    try:
        assert up.returncode == 0, up.stderr
        yield AuthCluster(data, up.stdout)
    finally:
        down = georeg("down", data_dir=data)
        assert down.returncode == 0, down.stderr


def _basic(username: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


def _challenge(header: str) -> dict[str, str]:
    assert header.startswith("Bearer "), header
    return dict(re.findall(r'(\w+)="([^"]*)"', header))


# -- the data plane through the endpoints ------------------------------------------------


async def test_v2_through_an_endpoint_is_401_with_a_realm_naming_that_endpoint(auth_cluster, http):
    """Endpoints stay access-blind and pass the client's Host on: the node's
    challenge names the address the client used, so it fetches its token there."""
    endpoints = [*auth_cluster.status["global_endpoints"].values(),
                 *auth_cluster.status["regional_endpoints"].values()]
    assert auth_cluster.status["login_server"] == "georeg.azurecr.io"
    for url in endpoints:
        async with http.get(f"{url}/v2/") as r:
            assert r.status == 401, url
            assert (await r.json())["errors"][0]["code"] == "UNAUTHORIZED"
            challenge = _challenge(r.headers["WWW-Authenticate"])
        assert challenge["realm"] == f"{url}/oauth2/token"
        assert challenge["service"] == "georeg.azurecr.io"
    # A push without credentials is refused too, and nothing is stored.
    async with http.post(f"{endpoints[0]}/v2/demo/blobs/uploads/") as r:
        assert r.status == 401
        assert _challenge(r.headers["WWW-Authenticate"])["scope"] == "repository:demo:pull,push"


@pytest.mark.interop
async def test_skopeo_logs_in_and_copies_through_the_global_endpoint_with_the_printed_credentials(
        auth_cluster, tmp_path):
    endpoint = auth_cluster.global_endpoint("westeurope").removeprefix("http://")
    skopeo = Skopeo(tmp_path / "skopeo", endpoint)
    image = gzip_image(16, [3000, 700])
    write_oci_layout(tmp_path / "layout", image, tag="v1")
    # Wrong credentials: refused at login.
    code, _, err = await skopeo.run("login", "--tls-verify=false", "--authfile", str(skopeo.auth),
                                    "-u", auth_cluster.username, "--password-stdin", endpoint,
                                    check=False, stdin=b"not-the-password\n")
    assert code != 0 and "invalid username/password" in err
    await skopeo.run("login", "--tls-verify=false", "--authfile", str(skopeo.auth),
                     "-u", auth_cluster.username, "--password-stdin", endpoint,
                     stdin=auth_cluster.password.encode() + b"\n")
    await skopeo.copy(f"oci:{tmp_path / 'layout'}:v1", skopeo.ref("demo/app:v1"))
    assert await skopeo.inspect_raw(skopeo.ref("demo/app:v1")) == image.manifest
    # `georeg login` writes what a fresh client needs, for the other region's
    # endpoint as well; skopeo reads it from $REGISTRY_AUTH_FILE.
    fresh = Skopeo(tmp_path / "fresh", auth_cluster.global_endpoint("northeurope")
                   .removeprefix("http://"))
    login = georeg("login", data_dir=auth_cluster.data,
                   env={"REGISTRY_AUTH_FILE": str(fresh.auth)})
    assert login.returncode == 0, login.stderr
    assert os.stat(fresh.auth).st_mode & 0o777 == 0o600
    fresh.env["REGISTRY_AUTH_FILE"] = str(fresh.auth)
    _, out, _ = await fresh.run("list-tags", "--tls-verify=false", fresh.ref("demo/app"))
    assert json.loads(out)["Tags"] == ["v1"]


async def test_a_token_minted_through_one_regions_endpoint_works_on_another_regions_node(
        auth_cluster, http):
    realm = f"{auth_cluster.regional_endpoint('westeurope')}/oauth2/token"
    async with http.get(realm, params={"service": "georeg.azurecr.io",
                                       "scope": "repository:demo/app:pull"},
                        headers=_basic(auth_cluster.username, auth_cluster.password)) as r:
        assert r.status == 200, await r.text()
        token = (await r.json())["access_token"]
    auth_cluster.tokens.append(token)
    other = auth_cluster.node("northeurope")
    async with http.get(f"{other}/v2/") as r:
        assert r.status == 401
    bearer = {"Authorization": f"Bearer {token}"}
    async with http.get(f"{other}/v2/", headers=bearer) as r:
        assert r.status == 200
    async with http.get(f"{other}/v2/demo/app/tags/list", headers=bearer) as r:
        assert r.status in (200, 404)       # allowed: what it holds, not a refusal
    # The token grants pull only: a push with it is refused on that node.
    async with http.post(f"{other}/v2/demo/app/blobs/uploads/", headers=bearer) as r:
        assert r.status == 403
        assert (await r.json())["errors"][0]["code"] == "DENIED"


# -- replication between the nodes -------------------------------------------------------


async def test_nodes_replicate_over_mutual_tls(auth_cluster):
    # Before any test renews the admin password: it pushes with the printed one.
    """A push in West Europe is pulled in North Europe (node processes, through
    the WAN link between them), and a node's replication port takes only a
    client with a certificate from the cluster CA."""
    admin = _basic(auth_cluster.username, auth_cluster.password)
    image = make_image([2048, 70_000], seed=1616)
    async with aiohttp.ClientSession(headers=admin) as http:
        digest = await push_image(http, auth_cluster.node("westeurope"), "mtls/app", image,
                                  tag="v1")

        async def pulled() -> bool:
            async with http.get(f"{auth_cluster.node('northeurope')}/v2/mtls/app/manifests/v1") as r:
                return r.status == 200 and r.headers["Docker-Content-Digest"] == digest

        await eventually(pulled, timeout=60, what="West Europe's push in North Europe")
        async with http.get(auth_cluster.node("northeurope") + "/georeg/v1/node",
                            headers={"Authorization": f"Bearer {auth_cluster.internal}"}) as r:
            assert r.status == 200
            target = (await r.json())["grpc"]
    await assert_only_certified_peers_replicate(auth_cluster.data, target, "northeurope")


# -- the management API and the CLI ------------------------------------------------------


async def test_the_management_api_answers_only_the_cluster_owner(auth_cluster, http):
    api = auth_cluster.management
    for method, path, body in (("GET", "/georeg/v1/cluster", None),
                               ("POST", "/georeg/v1/faults", {"kind": "routing",
                                                              "region": "northeurope"}),
                               ("PATCH", "/georeg/v1/registry", {"anonymousPullEnabled": True}),
                               ("POST", "/georeg/v1/shutdown", None)):
        for headers in ({}, _basic(auth_cluster.username, auth_cluster.password),
                        {"Authorization": f"Bearer {auth_cluster.internal}"}):
            async with http.request(method, api + path, json=body, headers=headers) as r:
                assert r.status == 401, (method, path)
                message = (await r.json())["error"]["message"]
                assert str(auth_cluster.data / "auth" / "owner.secret") in message
    # Nothing happened: no fault, the cluster still runs, and the owner gets in.
    owner = {"Authorization": f"Bearer {auth_cluster.owner}"}
    async with http.get(api + "/georeg/v1/faults", headers=owner) as r:
        assert r.status == 200 and await r.json() == []
    assert running_state(auth_cluster.data) is not None


def test_the_cli_works_with_the_owner_credential_in_its_data_dir(auth_cluster):
    status = georeg("status", "--json", data_dir=auth_cluster.data)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["auth"] == "token"
    faults = georeg("fault", "list", data_dir=auth_cluster.data)
    assert faults.returncode == 0, faults.stderr
    verify = georeg("verify", "--json", data_dir=auth_cluster.data)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_the_cli_without_the_owner_credential_says_how_to_get_it(auth_cluster, tmp_path):
    """A data dir that finds the running cluster (its state file) but holds no
    credential: the command fails, naming where the credential is."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(auth_cluster.data / "cluster.json", elsewhere / "cluster.json")
    status = georeg("status", data_dir=elsewhere)
    assert status.returncode == 2
    assert str(auth_cluster.data / "auth" / "owner.secret") in status.stderr
    assert str(elsewhere / "auth" / "owner.secret") in status.stderr
    assert "does not exist" in status.stderr


# -- a node's internal routes ------------------------------------------------------------


async def test_node_internal_routes_refuse_without_the_internal_credential(auth_cluster, http):
    node = auth_cluster.node("northeurope")
    internal = [("GET", "/georeg/v1/node"), ("GET", "/georeg/v1/inventory"),
                ("GET", "/georeg/v1/configuration"), ("GET", "/metrics"),
                ("PUT", "/georeg/v1/faults/storage"),
                ("PUT", "/georeg/v1/configuration/registry/default")]
    for headers in ({}, _basic(auth_cluster.username, auth_cluster.password),
                    {"Authorization": f"Bearer {auth_cluster.owner}"}):
        for method, path in internal:
            async with http.request(method, node + path, json={"full": True},
                                    headers=headers) as r:
                assert r.status == 401, (method, path, headers.keys())
    # Nothing changed: the node still takes writes (no disk fault), and the
    # cluster's own credential gets in.
    cluster = {"Authorization": f"Bearer {auth_cluster.internal}"}
    async with http.get(node + "/georeg/v1/faults/storage", headers=cluster) as r:
        assert r.status == 200 and (await r.json())["full"] is False
    async with http.get(node + "/georeg/v1/node", headers=cluster) as r:
        assert r.status == 200
    # The one route endpoints forward is a client's question, which needs pull
    # on the repository it asks about (tests/test_auth_node_routes.py).
    async with http.get(node + "/georeg/v1/replication/status",
                        params={"repository": "demo/app", "reference": "v1"}) as r:
        assert r.status == 401
        assert _challenge(r.headers["WWW-Authenticate"])["scope"] == "repository:demo/app:pull"


# -- identities written through the control plane ---------------------------------------


async def _every_node_answers(auth_cluster, http, username: str, password: str,
                              expected: int) -> bool:
    """Whether every node's token endpoint answers ``expected`` to these Basic credentials."""
    for region in ("westeurope", "northeurope"):
        async with http.get(f"{auth_cluster.node(region)}/oauth2/token",
                            params={"service": auth_cluster.status["login_server"]},
                            headers=_basic(username, password)) as r:
            if r.status != expected:
                return False
    return True


@pytest.mark.interop
async def test_a_cli_token_and_a_renewed_admin_password_work_through_the_global_endpoint(
        auth_cluster, http, tmp_path):
    """The admin user and tokens are one design: what ``georeg token create`` and
    ``georeg credential renew`` write through the home region is what every node
    enforces, and ``georeg login`` writes the password that works now."""
    endpoint = auth_cluster.global_endpoint("westeurope").removeprefix("http://")
    made = georeg("token", "create", "--name", "ci-push", "--repository", "demo/tok",
                  "content/read", "content/write", data_dir=auth_cluster.data)
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)
    password = next(p["value"] for p in token["credentials"]["passwords"]
                    if p["name"] == "password1")
    auth_cluster.tokens.append(password)
    await eventually(lambda: _every_node_answers(auth_cluster, http, "ci-push", password, 200),
                     timeout=30, what="the token on every node")
    skopeo = Skopeo(tmp_path / "token", endpoint)
    await skopeo.run("login", "--tls-verify=false", "--authfile", str(skopeo.auth),
                     "-u", "ci-push", "--password-stdin", endpoint, stdin=password.encode() + b"\n")
    image = gzip_image(8, [1500])
    write_oci_layout(tmp_path / "layout", image, tag="v1")
    await skopeo.copy(f"oci:{tmp_path / 'layout'}:v1", skopeo.ref("demo/tok:v1"))
    assert await skopeo.inspect_raw(skopeo.ref("demo/tok:v1")) == image.manifest
    # Its scope map names demo/tok only: another repository is refused.
    code, _, err = await skopeo.run("copy", "--quiet", "--authfile", str(skopeo.auth),
                                    "--dest-tls-verify=false", f"oci:{tmp_path / 'layout'}:v1",
                                    skopeo.ref("demo/other:v1"), check=False)
    assert code != 0 and "403 (Forbidden)" in err, err

    old = auth_cluster.password
    renewed = georeg("credential", "renew", "--password-name", "password",
                     data_dir=auth_cluster.data)
    assert renewed.returncode == 0, renewed.stderr
    shown = json.loads(renewed.stdout)
    new = next(p["value"] for p in shown["passwords"] if p["name"] == "password")
    assert new and new != old and shown["username"] == auth_cluster.username
    auth_cluster.tokens.append(new)
    await eventually(lambda: _every_node_answers(auth_cluster, http, auth_cluster.username,
                                                 new, 200),
                     timeout=30, what="the renewed password on every node")
    await eventually(lambda: _every_node_answers(auth_cluster, http, auth_cluster.username,
                                                 old, 401),
                     timeout=30, what="the old password refused on every node")
    fresh = Skopeo(tmp_path / "fresh", endpoint)
    login = georeg("login", data_dir=auth_cluster.data,
                   env={"REGISTRY_AUTH_FILE": str(fresh.auth)})
    assert login.returncode == 0, login.stderr
    written = json.loads(fresh.auth.read_text())["auths"][endpoint]["auth"]
    assert base64.b64decode(written).decode() == f"{auth_cluster.username}:{new}"
    fresh.env["REGISTRY_AUTH_FILE"] = str(fresh.auth)
    _, out, _ = await fresh.run("list-tags", "--tls-verify=false", fresh.ref("demo/tok"))
    assert json.loads(out)["Tags"] == ["v1"]
    code, _, err = await fresh.run("login", "--tls-verify=false", "--authfile",
                                   str(tmp_path / "old.json"), "-u", auth_cluster.username,
                                   "--password-stdin", endpoint, check=False,
                                   stdin=old.encode() + b"\n")
    assert code != 0 and "invalid username/password" in err


async def test_the_first_start_enables_the_admin_user_once(tmp_path, http):
    """The registry object gets its admin passwords at an auth cluster's first
    start only: a restart rotates nothing, and the password shown before it
    still logs in after it."""
    spec = specs.parse({"auth": "token", "home_region": "westeurope", "paired_copies": False,
                        "network": {"port_base": 0}})
    data = tmp_path / "data"
    held = []
    for _ in range(2):                          # the first start, then a restart
        cluster = await Cluster.start(spec, data)
        try:
            shown = await cluster.access.admin_credentials()
            held.append((shown, (await cluster.get_configuration("registry", "default"))
                         ["value"]["admin_passwords"]))
            password = {p["name"]: p["value"] for p in held[0][0]["passwords"]}["password"]
            node = cluster.node_url(cluster.plan.nodes[0].name)
            async with http.get(f"{node}/oauth2/token", params={"service": spec.login_server},
                                headers=_basic(spec.registry, password)) as r:
                assert r.status == 200, await r.text()
        finally:
            await cluster.stop()
    assert held[0] == held[1]
    assert stat.S_IMODE(os.stat(admin_passwords_path(data)).st_mode) == 0o600


# -- secrets stay secret ---------------------------------------------------------------


def _command_lines() -> list[str]:
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace"))
            except OSError:
                continue
    return lines


def test_no_secret_is_on_any_command_line(auth_cluster):
    lines = _command_lines()
    nodes = [line for line in lines if " node " in line and str(auth_cluster.data) in line]
    assert len(nodes) == 2 and all("--internal-credential-file" in n for n in nodes)
    leaked = [s for s in auth_cluster.secrets() if any(s in line for line in lines)]
    assert not leaked


def test_no_secret_reaches_a_log(auth_cluster):
    """Run last in this module: by now every secret has been used (logins,
    tokens, refusals of wrong ones)."""
    logs = list((auth_cluster.data / "logs").iterdir())
    assert any(p.name == "supervisor.log" for p in logs)
    assert sum(1 for p in logs if p.name.startswith(("westeurope", "northeurope"))) == 2
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    assert "access_refused" in text or "request" in text        # the logs are there to read
    leaked = [s[:6] + "…" for s in auth_cluster.secrets() if s in text]
    assert not leaked


async def assert_only_certified_peers_replicate(data_dir: Path, target: str, region: str) -> None:
    """The replication port at ``target`` (a node of ``region``, in the cluster
    of ``data_dir``) answers a peer holding a certificate of the cluster CA, and
    refuses one without (mutual TLS)."""
    cert = ClusterCA.open(data_dir / "auth" / "ca").node_certificate("probe", "eastus")
    certified = grpc.ssl_channel_credentials(cert.ca_file.read_bytes(), cert.key_file.read_bytes(),
                                             cert.cert_file.read_bytes())
    async with grpc.aio.secure_channel(target, certified) as channel:
        reply = await pbg.ReplicationStub(channel).Health(pb.HealthRequest(), timeout=30)
        assert reply.node.region == region
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pbg.ReplicationStub(channel).Health(pb.HealthRequest(), timeout=30)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
