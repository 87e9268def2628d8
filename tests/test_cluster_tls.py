"""A cluster with ``tls = true``, as a user runs it: ``georeg up --tls --detach``
(real node processes, endpoints, links), ``georeg ca export``, and skopeo
with full certificate verification through the global and a regional
endpoint. Two clusters: one with auth off (TLS does not need auth; its CA is
made for TLS alone, and replication runs over mutual TLS with the nodes'
HTTPS certificates), one with auth on (the token flow over HTTPS: the
challenge's realm says ``https``, as the client used)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from cluster.bench.clusterproc import ClusterProcess
from cluster.bench.workload import open_session
from cluster.control import spec as specs
from cluster.control.access import provision
from cluster.control.ca import ClusterCA
from cluster.control.plan import plan
from cluster.control.state import running_state, save_spec
from cluster.control.tls import client_context, server_context
from cluster.routing.policy import NodeEndpoint, NodeHealth, ReplicaGroup
from cluster.routing.proxy import SPLICE_MIN, RoutingProxy

from .helpers import (
    Skopeo,
    digest_of,
    eventually,
    make_image,
    push_image,
    write_oci_layout,
)
from .test_cluster import DetachedCluster, georeg
from .test_cluster_auth import assert_only_certified_peers_replicate
from .test_interop import gzip_image

SPEC = """\
home_region = "westeurope"
paired_copies = false
auth = "{auth}"
blob_downloads = "{blob_downloads}"
[[replicas]]
region = "northeurope"
[network]
port_base = 0
"""


class TlsCluster(DetachedCluster):
    def __init__(self, data: Path, stdout: str) -> None:
        super().__init__(data)
        self.stdout = stdout
        self.ca_file = data / "auth" / "ca" / "ca.pem"

    def tls(self) -> ssl.SSLContext:
        return client_context(self.ca_file)


def _up(root: Path, auth: str, blob_downloads: str = "relay") -> tuple[Path, object]:
    (root / "spec.toml").write_text(SPEC.format(auth=auth, blob_downloads=blob_downloads))
    data = root / "data"
    up = georeg("up", "--detach", "--tls", "--config", str(root / "spec.toml"), data_dir=data)
    return data, up


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    """TLS without auth: `georeg up --tls` on a spec that says nothing of TLS."""
    data, up = _up(tmp_path_factory.mktemp("tls-cluster"), "none")
    try:
        assert up.returncode == 0, up.stderr
        yield TlsCluster(data, up.stdout)
    finally:
        down = georeg("down", data_dir=data)
        assert down.returncode == 0, down.stderr


@pytest.fixture(scope="module")
def tls_auth_cluster(tmp_path_factory):
    # Blob downloads redirected: a redirect on a cluster with auth is the node's,
    # and must name its https address.
    data, up = _up(tmp_path_factory.mktemp("tls-auth-cluster"), "token", "redirect")
    try:
        assert up.returncode == 0, up.stderr
        yield TlsCluster(data, up.stdout)
    finally:
        down = georeg("down", data_dir=data)
        assert down.returncode == 0, down.stderr


def _host(url: str) -> str:
    assert url.startswith("https://"), url
    return url.removeprefix("https://")


def _cert_dir(cluster: TlsCluster, path: Path) -> Path:
    """What `georeg ca export --cert-dir` writes, for skopeo."""
    export = georeg("ca", "export", "--cert-dir", str(path), data_dir=cluster.data)
    assert export.returncode == 0, export.stderr
    assert (path / "ca.crt").read_bytes() == cluster.ca_file.read_bytes()
    return path


# -- what is served, and to whom -------------------------------------------------------


def test_every_endpoint_and_node_is_an_https_url(tls_cluster):
    status = tls_cluster.status
    assert status["tls"] is True and status["auth"] == "none"
    urls = [*status["global_endpoints"].values(), *status["regional_endpoints"].values(),
            *(n["http"] for n in status["nodes"])]
    assert urls and all(u.startswith("https://127.0.0.1:") for u in urls), urls
    assert "https://127.0.0.1:" in tls_cluster.stdout      # what `georeg up` printed
    # The management API too: the CLI (this `status`) trusts the CA in the data dir.
    management = running_state(tls_cluster.data)["management"]
    assert management.startswith("https://127.0.0.1:"), management
    # TLS alone made the CA (no auth secrets).
    assert tls_cluster.ca_file.exists()
    assert not (tls_cluster.data / "auth" / "owner.secret").exists()


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost"])
async def test_a_nodes_and_an_endpoints_certificate_verify_for_loopback_names(tls_cluster, name):
    for url in (tls_cluster.node("westeurope"), tls_cluster.global_endpoint("westeurope")):
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls_cluster.tls(),
                                                       server_hostname=name)
        writer.write(f"GET /v2/ HTTP/1.1\r\nHost: {name}:{port}\r\nConnection: close\r\n\r\n"
                     .encode())
        assert (await reader.readline()).startswith(b"HTTP/1.1 200"), url
        writer.close()


async def test_a_certificate_is_refused_for_a_name_it_does_not_hold(tls_cluster):
    port = int(tls_cluster.node("westeurope").rsplit(":", 1)[1])
    with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
        await asyncio.open_connection("127.0.0.1", port, ssl=tls_cluster.tls(),
                                      server_hostname="registry.example.com")


async def test_a_client_that_does_not_trust_the_cluster_ca_is_refused(tls_cluster):
    untrusting = ssl.create_default_context()          # the system's CAs only
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection(
            "127.0.0.1", int(tls_cluster.global_endpoint("westeurope").rsplit(":", 1)[1]),
            ssl=untrusting, server_hostname="127.0.0.1")


@pytest.mark.parametrize("kind", ["endpoint", "node", "management"])
def test_plain_http_to_an_https_port_gets_no_http_answer_and_the_port_serves_on(tls_cluster,
                                                                                 kind):
    url = {"endpoint": tls_cluster.global_endpoint("westeurope"),
           "node": tls_cluster.node("westeurope"),
           "management": running_state(tls_cluster.data)["management"]}[kind]
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except ConnectionResetError:
            pass
    # The handshake fails and the connection closes: at most a TLS alert (a
    # record of type 21), never an HTTP response or a hang.
    assert not answer.startswith(b"HTTP"), answer[:80]
    assert answer == b"" or answer[0] == 21, answer[:80]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            tls_cluster.tls().wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 "), kind     # an HTTP answer, over TLS


# -- real clients, verifying -------------------------------------------------------------


@pytest.mark.interop
async def test_skopeo_pushes_and_pulls_through_global_and_regional_endpoints_verifying_tls(
        tls_cluster, tmp_path):
    certs = _cert_dir(tls_cluster, tmp_path / "certs")
    push = Skopeo(tmp_path / "push", _host(tls_cluster.global_endpoint("westeurope")), cert_dir=certs)
    # A layer well above the splice threshold: relayed through the proxy's memory
    # (TLS in, TLS out), it must arrive byte for byte.
    image = gzip_image(41, [3 * SPLICE_MIN + 12345, 900])
    write_oci_layout(tmp_path / "layout", image, tag="v1")
    await push.copy(f"oci:{tmp_path / 'layout'}:v1", push.ref("tls/app:v1"), "--preserve-digests")
    assert await push.inspect_raw(push.ref("tls/app:v1")) == image.manifest
    # Pulled from the other region's regional endpoint once replication (mutual
    # TLS between the nodes, with their HTTPS certificates) has carried it there.
    pull = Skopeo(tmp_path / "pull", _host(tls_cluster.regional_endpoint("northeurope")), cert_dir=certs)

    async def arrived() -> bool:
        code, _, _ = await pull.run("inspect", "--raw", "--cert-dir", str(certs),
                                    pull.ref("tls/app:v1"), check=False)
        return code == 0

    await eventually(arrived, timeout=60)
    await pull.copy(pull.ref("tls/app:v1"), f"oci:{tmp_path / 'out'}:v1", "--preserve-digests")
    for blob in [*image.blobs, image.manifest]:
        digest = hashlib.sha256(blob).hexdigest()
        assert (tmp_path / "out" / "blobs" / "sha256" / digest).read_bytes() == blob


@pytest.mark.interop
async def test_skopeo_without_the_ca_fails_verification(tls_cluster, tmp_path):
    skopeo = Skopeo(tmp_path / "skopeo", _host(tls_cluster.global_endpoint("westeurope")))
    code, _, err = await skopeo.run("inspect", "--raw", skopeo.ref("tls/none:v1"), check=False)
    assert code != 0
    assert "x509" in err or "certificate" in err, err


async def test_a_blob_above_the_splice_threshold_is_byte_identical_through_a_tls_endpoint(
        tls_cluster):
    blob = bytes(range(256)) * (4 * SPLICE_MIN // 256) + b"tail"
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    connector = aiohttp.TCPConnector(ssl=tls_cluster.tls())
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as http:
        for url in (tls_cluster.global_endpoint("westeurope"),
                    tls_cluster.regional_endpoint("westeurope")):
            async with http.post(f"{url}/v2/big/blobs/uploads/", params={"digest": digest},
                                 data=blob) as r:
                assert r.status == 201, await r.text()
            async with http.get(f"{url}/v2/big/blobs/{digest}") as r:
                assert r.status == 200
                got = await r.read()
            assert len(got) == len(blob) and got == blob
            # Ranged reads pass through the relay as well.
            async with http.get(f"{url}/v2/big/blobs/{digest}",
                                headers={"Range": "bytes=70000-200000"}) as r:
                assert r.status == 206
                assert await r.read() == blob[70000:200001]
    # Relayed, not spliced or handed over: there is no plaintext socket to give away.
    status = json.loads(georeg("status", "--json", data_dir=tls_cluster.data).stdout)
    traffic = status["endpoint_traffic"]["global:westeurope"]
    assert traffic["spliced_bytes"] == 0 and traffic["handed_over"] == 0


async def test_georeg_commands_that_ask_nodes_themselves_trust_the_cluster_ca(tls_cluster):
    """`replication status` and `verify` ask nodes over HTTPS, trusting the CA in
    the data dir (not the system's CAs, which know nothing of it)."""
    image = make_image([2000, 300], seed=5)
    connector = aiohttp.TCPConnector(ssl=tls_cluster.tls())
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as http:
        await push_image(http, tls_cluster.global_endpoint("westeurope"), "cli/app", image, "v1")

    def complete() -> bool:
        status = georeg("replication", "status", "cli/app:v1", "--json", data_dir=tls_cluster.data)
        assert status.returncode in (0, 1), status.stderr
        return json.loads(status.stdout)["complete"]

    await eventually(complete, timeout=60)
    verify = georeg("verify", "--json", data_dir=tls_cluster.data)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    report = json.loads(verify.stdout)
    assert report["status"] == "clean" and len(report["checked"]) == 2, report


async def test_benchmarks_reach_a_tls_clusters_nodes_trusting_its_ca(tls_cluster):
    cluster = ClusterProcess.attach(tls_cluster.data)
    assert cluster.tls is not None
    async with open_session(2, cluster.tls) as session:
        for node in cluster.nodes:
            url = cluster.http(node.name)
            assert url.startswith("https://"), url
            async with session.get(f"{url}/v2/") as r:
                assert r.status == 200


async def test_replication_without_auth_takes_only_peers_with_a_certificate_from_the_ca(
        tls_cluster):
    """TLS without auth still replicates over mutual TLS, with the certificates
    the nodes serve HTTPS with: a plaintext peer is refused."""
    connector = aiohttp.TCPConnector(ssl=tls_cluster.tls())
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(tls_cluster.node("northeurope") + "/georeg/v1/node") as r:
            assert r.status == 200
            target = (await r.json())["grpc"]
    await assert_only_certified_peers_replicate(tls_cluster.data, target, "northeurope")


async def test_a_redirecting_tls_endpoint_sends_clients_to_the_nodes_https_address(tmp_path):
    """blob_downloads = "redirect" on a TLS cluster: the 307 names the node's
    https URL, which verifies against the CA; other requests are relayed to the
    node over TLS. A real proxy and a real TLS node server, in this process."""
    ca = ClusterCA.open(tmp_path / "ca")
    node_cert = ca.node_certificate("eastus", "eastus")
    served = ca.endpoint_certificate()
    blob = b"redirected blob over TLS" * 100

    async def get_blob(request: web.Request) -> web.Response:
        return web.Response(body=blob, headers={"X-Scheme": request.scheme})

    app = web.Application()
    app.router.add_route("*", "/v2/{tail:.*}", get_blob)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0,
                       ssl_context=server_context(node_cert.cert_file, node_cert.key_file))
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    health = NodeHealth()
    health.report("eastus", True)
    group = ReplicaGroup("eastus", (NodeEndpoint("eastus", "eastus", "", "127.0.0.1", port),), True)
    proxy = RoutingProxy.regional_endpoint(
        group, health, redirect_blobs=True, server_tls=server_context(served.cert_file,
                                                                      served.key_file),
        backend_tls=client_context(ca.cert_file))
    await proxy.start()
    try:
        assert proxy.url.startswith("https://")
        path = "/v2/app/blobs/sha256:" + "ab" * 32
        connector = aiohttp.TCPConnector(ssl=client_context(ca.cert_file))
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.get(proxy.url + path, allow_redirects=False) as r:
                assert r.status == 307
                assert r.headers["Location"] == f"https://127.0.0.1:{port}{path}"
            async with http.get(proxy.url + path) as r:          # followed, verified
                assert r.status == 200 and await r.read() == blob
            async with http.head(proxy.url + path) as r:          # relayed, over TLS
                assert r.status == 200 and r.headers["X-Scheme"] == "https"
                assert r.headers["X-Georeg-Replica"] == "eastus"
    finally:
        await proxy.stop()
        await runner.cleanup()


# -- georeg ca export ---------------------------------------------------------------------


def test_ca_export_says_where_the_ca_is_and_how_each_client_trusts_it(tls_cluster):
    export = georeg("ca", "export", data_dir=tls_cluster.data)
    assert export.returncode == 0, export.stderr
    out = export.stdout
    assert f"Cluster CA certificate (PEM): {tls_cluster.ca_file.resolve()}" in out
    assert f"curl --cacert {tls_cluster.ca_file.resolve()} https://" in out
    assert "--dest-cert-dir" in out
    certs_d = re.search(r"for a in (.*); do install -D -m 0644 (\S+) "
                        r"/etc/containers/certs\.d/\$a/ca\.crt; done", out)
    assert certs_d and certs_d[2] == str(tls_cluster.ca_file.resolve()), out
    for url in [*tls_cluster.status["global_endpoints"].values(),
                *tls_cluster.status["regional_endpoints"].values(),
                *(n["http"] for n in tls_cluster.status["nodes"])]:
        assert _host(url) in certs_d[1].split(), url
    as_json = json.loads(georeg("ca", "export", "--json", data_dir=tls_cluster.data).stdout)
    assert as_json["tls"] is True and as_json["ca_file"] == str(tls_cluster.ca_file.resolve())
    assert re.fullmatch(r"[0-9A-F]{64}", as_json["fingerprint_sha256"])


def test_ca_export_on_a_cluster_without_a_ca_exits_2_saying_how_to_get_one(tmp_path):
    save_spec(tmp_path, specs.load(None).with_auth("none").seeded(1))
    export = georeg("ca", "export", data_dir=tmp_path)
    assert export.returncode == 2
    assert "has no CA" in export.stderr and "georeg up --tls" in export.stderr
    nothing = georeg("ca", "export", data_dir=tmp_path / "nowhere")
    assert nothing.returncode == 2 and "holds no georeg cluster" in nothing.stderr


def test_tls_alone_provisions_the_ca_and_node_certificates_but_no_secrets(tmp_path):
    spec = specs.validate(specs.load(None).with_auth("none").with_tls(True)
                          .seeded(3).with_port_base(41000), "test")
    cluster_plan = plan(spec, tmp_path)
    assert provision(cluster_plan) is None                       # no auth: no secrets
    for node in cluster_plan.all_nodes:
        assert node.tls is not None and node.access is None
        assert node.tls.cert_file.exists() and node.tls.key_file.stat().st_mode & 0o777 == 0o600
        assert cluster_plan.view(node).mutual_tls
        assert all(p.http.startswith("https://") for p in cluster_plan.view(node).peers)
    assert not (tmp_path / "auth" / "owner.secret").exists()


def test_the_spec_takes_tls_as_a_boolean_only(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text('tls = "yes"\n')
    with pytest.raises(specs.SpecError, match="tls"):
        specs.load(path)
    path.write_text("tls = true\n")
    assert specs.load(path).tls is True
    assert specs.load(None).tls is False


# -- with auth: the token flow over HTTPS -------------------------------------------------


async def test_the_challenge_realm_through_a_tls_endpoint_says_https(tls_auth_cluster):
    connector = aiohttp.TCPConnector(ssl=tls_auth_cluster.tls())
    async with aiohttp.ClientSession(connector=connector) as http:
        for url in (tls_auth_cluster.global_endpoint("westeurope"),
                    tls_auth_cluster.regional_endpoint("northeurope"),
                    tls_auth_cluster.node("westeurope")):
            async with http.get(f"{url}/v2/") as r:
                assert r.status == 401
                realm = re.search(r'realm="([^"]+)"', r.headers["WWW-Authenticate"])[1]
            assert realm == f"{url}/oauth2/token", (url, realm)


@pytest.mark.interop
async def test_skopeo_logs_in_and_copies_over_verified_tls_on_an_auth_cluster(
        tls_auth_cluster, tmp_path):
    certs = _cert_dir(tls_auth_cluster, tmp_path / "certs")
    skopeo = Skopeo(tmp_path / "skopeo", _host(tls_auth_cluster.global_endpoint("northeurope")),
                    cert_dir=certs)
    login = georeg("login", "--authfile", str(skopeo.auth), data_dir=tls_auth_cluster.data)
    assert login.returncode == 0, login.stderr
    image = gzip_image(42, [2 * SPLICE_MIN, 500])
    write_oci_layout(tmp_path / "layout", image, tag="v1")
    await skopeo.copy(f"oci:{tmp_path / 'layout'}:v1", skopeo.ref("secure/app:v1"))
    assert await skopeo.inspect_raw(skopeo.ref("secure/app:v1")) == image.manifest


async def test_a_nodes_redirect_on_a_tls_auth_cluster_points_to_its_https_address(
        tls_auth_cluster, tmp_path):
    """blob_downloads = "redirect" with auth: the node routing chose answers the
    redirect, to its own https URL (verified against the cluster CA) with a
    grant that a client without credentials follows."""
    authfile = tmp_path / "auth.json"
    login = georeg("login", "--authfile", str(authfile), data_dir=tls_auth_cluster.data)
    assert login.returncode == 0, login.stderr
    north = tls_auth_cluster.global_endpoint("northeurope")
    admin = json.loads(authfile.read_text())["auths"][_host(north)]["auth"]
    image = make_image([4000], seed=46)
    layer = image.layers[0]
    node = tls_auth_cluster.node("northeurope")
    connector = aiohttp.TCPConnector(ssl=tls_auth_cluster.tls())
    async with aiohttp.ClientSession(connector=connector) as http:
        credentials = {"Authorization": f"Basic {admin}"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                ssl=tls_auth_cluster.tls()), headers=credentials) as pusher:
            await push_image(pusher, north, "secure/blobs", image, tag="v1")
        url = f"{north}/v2/secure/blobs/blobs/{digest_of(layer)}"
        async with http.get(url, allow_redirects=False) as r:
            assert r.status == 401              # no credentials: the challenge, not a redirect
        async with http.get(url, headers=credentials, allow_redirects=False) as r:
            assert r.status == 307 and r.headers["X-Georeg-Replica"] == "northeurope"
            location = r.headers["Location"]
        assert location.startswith(f"{node}/v2/secure/blobs/blobs/sha256:")
        assert location.startswith("https://")
        async with http.get(location) as r:
            assert r.status == 200 and await r.read() == layer
