"""Replication over mutual TLS, as an auth cluster's nodes do it (in-process nodes
with auth on, each given its own certificate from a real cluster CA, real gRPC,
real TCP links between them).

An auth cluster replicates through its WAN links (TCP proxies that carry the
TLS bytes as they are). A node's replication port accepts only a client with a
certificate from the cluster CA: not a plaintext client, not a TLS client with
no certificate, not one with a certificate from another CA. And a peer's
region is its certificate's: a process holding East US's certificate gets none
of Brazil South's confined content, whether it says it is East US or claims to
be Brazil South (that claim is refused outright).

Each refusal is checked beside its control (a client with the right certificate
is served by the same node), so a refusal that has another cause fails.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import aiohttp
import grpc
import pytest

from cluster.control.ca import ClusterCA, NodeCertificate
from cluster.control.private_files import write_private
from replicator.peer_identity import certified_name
from replicator.wire.v1 import replication_pb2 as pb
from replicator.wire.v1 import replication_pb2_grpc as pbg

from .auth_helpers import ADMIN_PASSWORD, REGISTRY, SERVICE, basic, identities, seed_configuration
from .helpers import digest_of, eventually, make_image, push_image
from .replication_harness import InProcessCluster

REPO = "app/web"


def settings(cert: NodeCertificate, internal: Path) -> dict:
    return {"auth_ca_file": cert.ca_file, "auth_key_file": cert.key_file,
            "auth_cert_file": cert.cert_file, "auth_service": SERVICE,
            "internal_credential_file": internal}


@pytest.fixture
async def auth_cluster(tmp_path):
    """Brazil South (confined by default) and East US, replicating over mutual TLS,
    with the admin user in their registry configuration."""
    ca = ClusterCA.open(tmp_path / "ca")
    certificates = {name: ca.node_certificate(name, name) for name in ("brazilsouth", "eastus")}
    internal = tmp_path / "internal.secret"
    write_private(internal, secrets.token_urlsafe(32).encode())
    c = InProcessCluster(tmp_path / "nodes", [("brazilsouth", ""), ("eastus", "")],
                         node_settings={n: settings(c, internal) for n, c in certificates.items()},
                         mutual_tls=True)
    await c.start()
    try:
        await c.wait_ready()
        async with aiohttp.ClientSession() as http:
            await seed_configuration(http, c.nodes["eastus"].url, identities(),
                                     {"Authorization": f"Bearer {internal.read_text()}"})
        c.ca = ca
        yield c
    finally:
        await c.close()


@pytest.fixture
async def admin():
    async with aiohttp.ClientSession(headers=basic(REGISTRY, ADMIN_PASSWORD)) as session:
        yield session


def address(cluster: InProcessCluster, name: str) -> str:
    return f"127.0.0.1:{cluster.nodes[name].grpc_port}"


def tls(cert: NodeCertificate | None, ca_file=None) -> grpc.ChannelCredentials:
    """A channel's credentials: trusting ``ca_file`` (default: ``cert``'s CA),
    presenting ``cert`` (none when None)."""
    ca = (ca_file or cert.ca_file).read_bytes()
    if cert is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=cert.key_file.read_bytes(),
                                        certificate_chain=cert.cert_file.read_bytes())


def channel(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, credentials)


async def health(target: str, credentials: grpc.ChannelCredentials | None) -> pb.HealthReply:
    async with channel(target, credentials) as ch:
        return await pbg.ReplicationStub(ch).Health(pb.HealthRequest(), timeout=30)


async def fetch_blob(target: str, credentials, requester: pb.NodeRef, digest: str) -> bytes:
    async with channel(target, credentials) as ch:
        call = pbg.ReplicationStub(ch).FetchBlob(
            pb.FetchBlobRequest(requester=requester, repository=REPO, digest=digest), timeout=30)
        return b"".join([chunk.data async for chunk in call])


async def refused(target: str, credentials, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health(target, credentials)
    assert caught.value.code() is code, caught.value
    return caught.value


async def pullable(http: aiohttp.ClientSession, url: str, digest: str) -> bool:
    async with http.get(f"{url}/v2/{REPO}/manifests/{digest}") as r:
        return r.status == 200


async def test_an_auth_cluster_replicates_over_mutual_tls_through_its_links(auth_cluster, admin):
    c = auth_cluster
    image = make_image([4096, 300_000], seed=16)
    digest = await push_image(admin, c.nodes["eastus"].url, REPO, image, tag="v1")
    await eventually(lambda: pullable(admin, c.nodes["brazilsouth"].url, digest), timeout=30,
                     what="East US's image pullable in Brazil South")
    for blob in image.blobs:
        async with admin.get(f"{c.nodes['brazilsouth'].url}/v2/{REPO}/blobs/{digest_of(blob)}") as r:
            assert r.status == 200 and await r.read() == blob
    # The node's per-image status asks itself and its peers (over mutual TLS).
    async def complete() -> bool:
        async with admin.get(f"{c.nodes['eastus'].url}/georeg/v1/replication/status",
                             params={"repository": REPO, "reference": "v1"}) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["complete"]

    await eventually(complete, timeout=30, what="v1's status complete, as East US sees it")
    # How far Brazil South has read East US's log is kept under the node name its
    # certificate gives (bounded metadata: replicator.retention).
    retention = c.nodes["eastus"].replication.retention
    await eventually(lambda: getattr(retention.reader("brazilsouth"), "seq", 0) > 0, timeout=30,
                     what="Brazil South's reported cursor, under its certified name")
    # What carried it: the link from Brazil South to East US, whose far end
    # speaks only TLS (a plaintext client through the same link is refused),
    # and a client with a cluster certificate gets through it too (the link
    # forwards the handshake untouched; the address it listens on is a name
    # the node's certificate carries).
    link = c.links[("brazilsouth", "eastus")].address
    await refused(link, None, grpc.StatusCode.UNAVAILABLE)
    cert = c.ca.node_certificate("probe", "westeurope")
    assert (await health(link, tls(cert))).node.region == "eastus"
    # A stream's reader is known by the node name its certificate carries.
    assert certified_name({"x509_pem_cert": [cert.cert_file.read_bytes()]}) == "probe"


async def test_plaintext_to_an_auth_node_fails(auth_cluster):
    target = address(auth_cluster, "eastus")
    cert = auth_cluster.ca.node_certificate("probe", "westeurope")
    assert (await health(target, tls(cert))).node.region == "eastus"      # the control
    await refused(target, None, grpc.StatusCode.UNAVAILABLE)


async def test_a_client_without_a_certificate_is_refused(auth_cluster, admin):
    c = auth_cluster
    image = make_image([2048], seed=17)
    await push_image(admin, c.nodes["eastus"].url, REPO, image, tag="v1")
    target, blob = address(c, "eastus"), digest_of(image.blobs[0])
    cert = c.ca.node_certificate("probe", "westeurope")
    me = pb.NodeRef(region="westeurope", node_id="probe")
    assert await fetch_blob(target, tls(cert), me, blob) == image.blobs[0]   # the control
    await refused(target, tls(None, cert.ca_file), grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fetch_blob(target, tls(None, cert.ca_file), me, blob)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_a_certificate_from_another_ca_is_refused(auth_cluster, tmp_path):
    c = auth_cluster
    target = address(c, "eastus")
    ours = c.ca.node_certificate("probe", "westeurope")
    assert (await health(target, tls(ours))).node.region == "eastus"     # the control
    foreign = ClusterCA.open(tmp_path / "another-ca").node_certificate("westeurope", "westeurope")
    # Presenting the foreign certificate while trusting our CA (so only the
    # server's check of the client can fail the handshake)...
    await refused(target, tls(foreign, ours.ca_file), grpc.StatusCode.UNAVAILABLE)
    # ...and as a rogue cluster would, trusting its own CA: our node's
    # certificate is not from it either.
    await refused(target, tls(foreign), grpc.StatusCode.UNAVAILABLE)


async def test_a_peer_is_the_region_its_certificate_names(auth_cluster, admin):
    """Brazil South's content is confined to it. A process holding East US's
    certificate gets none of it: not as East US, and not by claiming to be
    Brazil South (PERMISSION_DENIED: the claim disagrees with the certificate)."""
    c = auth_cluster
    image = make_image([2048, 4096], seed=18)
    digest = await push_image(admin, c.nodes["brazilsouth"].url, REPO, image, tag="v1")
    blob = digest_of(image.blobs[0])
    target = address(c, "brazilsouth")
    brazil = c.ca.node_certificate("brazilsouth-probe", "brazilsouth")
    claim = pb.NodeRef(region="brazilsouth", node_id="rogue")
    assert await fetch_blob(target, tls(brazil), claim, blob) == image.blobs[0]   # the control

    eastus = c.ca.node_certificate("eastus", "eastus")      # East US's own (reused) certificate
    for requester in (claim, pb.NodeRef(region="eastus"), pb.NodeRef()):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await fetch_blob(target, tls(eastus), requester, blob)
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED, requester

    async with channel(target, tls(eastus)) as ch:
        stub = pbg.ReplicationStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.FetchManifest(pb.FetchManifestRequest(
                requester=claim, repository=REPO, digest=digest), timeout=30)
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "certificate is for eastus" in caught.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetRepositoryState(pb.RepositoryStateRequest(
                requester=claim, repository=REPO), timeout=30)
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        # Subscribing as Brazil South: refused before any event.
        call = stub.Subscribe(iter([pb.SubscribeMessage(start=pb.SubscribeStart(
            subscriber=claim, cursor=0))]), timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            batches = [b async for b in call]
            pytest.fail(f"a false claim was streamed {sum(len(b.events) for b in batches)} events")
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        # Subscribing as what it is: the log, without Brazil South's content.
        call = stub.Subscribe(iter([pb.SubscribeMessage(start=pb.SubscribeStart(
            subscriber=pb.NodeRef(region="eastus", node_id="rogue"), cursor=0))]))
        seen, head = [], c.nodes["brazilsouth"].node.meta.last_seq
        async for batch in call:
            seen += batch.events
            if batch.last_seq >= head:
                break
        call.cancel()
        assert not [e for e in seen if e.repository == REPO]
    # And East US's node, which replicates with that certificate, never got it.
    assert not await pullable(admin, c.nodes["eastus"].url, digest)
