"""``georeg import`` (``cluster.control.imports``, after ``az acr import``)
against a real source: Debian's ``docker-registry`` (CNCF distribution 2.8,
which has no referrers API: its referrers come by the tag schema), populated
with skopeo, and the cluster's own endpoint (Bearer challenges, the referrers
API, refused credentials). Images come back with skopeo from another region
with the source's digests. A source whose connection is cut mid-blob (a real
socket cut, by a proxy in front of the registry) leaves no manifest and no
tag, and the same import run again succeeds.

One cluster (two regions) and one source registry serve the whole module.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from cluster.bench.reference import ReferenceRegistry, find_binary
from cluster.control import imports, management_client
from cluster.control import spec as specs
from cluster.control.ca import ClusterCA
from cluster.control.tls import server_context
from cluster.testing import RunningCluster
from registry_node.manifest import MAX_MANIFEST_SIZE, OCI_INDEX, OCI_MANIFEST
from registry_node.upstream import (
    UpstreamError,
    UpstreamFailure,
    basic_authorization,
    parse_challenge,
    parse_source,
    token_query,
)
from registry_node.upstream_http import UpstreamRegistry, upstream_session

from .helpers import (
    Image,
    Skopeo,
    descriptor,
    digest_of,
    eventually,
    make_image,
    require_program,
    write_oci_layout,
)
from .test_cluster import georeg

SPEC = specs.ClusterSpec(registry="georegimport", tier="Premium", home_region="eastus",
                         replicas=(specs.ReplicaSpec("westeurope"),))
ARTIFACT = "application/vnd.example.sbom.v1"


# -- the source's grammar and challenges (no I/O) ------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("localhost:5000/app:1", ("localhost:5000", "app", "1", None)),
    ("registry.example.com/library/alpine", ("registry.example.com", "library/alpine",
                                              "latest", None)),
    ("127.0.0.1:5000/a/b@sha256:" + "a" * 64, ("127.0.0.1:5000", "a/b", None,
                                               "sha256:" + "a" * 64)),
    ("[::1]:5000/app:v2", ("[::1]:5000", "app", "v2", None)),
])
def test_a_source_is_a_registry_a_repository_and_a_tag_or_digest(text, expected):
    s = parse_source(text)
    assert (s.registry, s.repository, s.tag, s.digest) == expected


@pytest.mark.parametrize("text", [
    "", "alpine:3", "library/alpine:3", "https://r.example.com/a:1", "r.example.com/",
    "r.example.com/UPPER:1", "r.example.com/a:bad tag", "r.example.com/a@sha256:12",
    "r.example.com/a:1@sha256:" + "a" * 64, "localhost:65536/app:1", "r.example.com:0/a:1",
])
def test_a_malformed_source_is_refused_saying_the_format(text):
    with pytest.raises(UpstreamError) as caught:
        parse_source(text)
    assert caught.value.kind is UpstreamFailure.INVALID_SOURCE
    assert "REGISTRY/REPOSITORY:TAG" in str(caught.value)


def test_a_bearer_challenge_without_a_scope_gets_the_pull_scope():
    """ACR's import fails there (Azure/acr #449); georeg asks for pull."""
    challenge = parse_challenge('Bearer realm="https://auth.example/token",service="reg"')
    assert challenge.scheme == "bearer"
    assert token_query(challenge, "lib/app") == {"scope": "repository:lib/app:pull",
                                                 "service": "reg"}
    given = parse_challenge('Bearer realm="https://a/t",scope="repository:x:pull,push"')
    assert token_query(given, "x") == {"scope": "repository:x:pull,push"}
    assert parse_challenge('Basic realm="r"').scheme == "basic"


# -- a real source ---------------------------------------------------------------------------


def write_index_layout(path: Path, images: list[Image], tag: str) -> bytes:
    """An OCI layout holding a two-platform index under ``tag``; the index bytes."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    platforms = [{"architecture": "amd64", "os": "linux"}, {"architecture": "arm64", "os": "linux"}]
    for image in images:
        for data in [*image.blobs, image.manifest]:
            (blobs / digest_of(data).split(":")[1]).write_bytes(data)
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {**descriptor(image.manifest, OCI_MANIFEST), "platform": platform}
        for image, platform in zip(images, platforms, strict=True)]}).encode()
    (blobs / digest_of(index).split(":")[1]).write_bytes(index)
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        **descriptor(index, OCI_INDEX), "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return index


async def push_to_distribution(http: aiohttp.ClientSession, url: str, repo: str,
                               image: Image) -> None:
    """Push by digest the way distribution 2.8 takes it (POST, then PUT the body)."""
    for blob in image.blobs:
        async with http.post(f"{url}/v2/{repo}/blobs/uploads/") as r:
            assert r.status == 202, await r.text()
            location = r.headers["Location"]
        joiner = "&" if "?" in location else "?"
        async with http.put(f"{location}{joiner}digest={digest_of(blob)}", data=blob) as r:
            assert r.status == 201, await r.text()
    async with http.put(f"{url}/v2/{repo}/manifests/{image.digest}", data=image.manifest,
                        headers={"Content-Type": image.media_type}) as r:
        assert r.status == 201, await r.text()


class Source:
    """The reference registry, populated: ``small:1.0`` (one image, with an SBOM
    referring to it, kept by the referrers tag schema), ``multi:1.0`` (an index
    of two platforms), ``big:1.0`` (one layer of 4 MiB, for the cut)."""

    def __init__(self, workdir: Path) -> None:
        self.registry = ReferenceRegistry(workdir / "registry").start()
        self.host = self.registry.url.removeprefix("http://")
        self.skopeo = Skopeo(workdir / "skopeo", self.host)
        self.small = make_image([1500, 2500], seed=1)
        self.platforms = [make_image([3000], seed=2), make_image([3500], seed=3)]
        self.big = make_image([4 << 20], seed=4)
        self.sbom = make_image([700], seed=5, artifact_type=ARTIFACT,
                               subject=descriptor(self.small.manifest, OCI_MANIFEST))
        asyncio.run(self._populate(workdir))

    async def _populate(self, workdir: Path) -> None:
        for name, image in (("small", self.small), ("big", self.big)):
            write_oci_layout(workdir / name, image, "1.0")
            await self.skopeo.copy(f"oci:{workdir / name}:1.0", self.skopeo.ref(f"{name}:1.0"),
                                   "--preserve-digests")
        self.index = write_index_layout(workdir / "multi", self.platforms, "1.0")
        await self.skopeo.copy(f"oci:{workdir / 'multi'}:1.0", self.skopeo.ref("multi:1.0"),
                               "--all", "--preserve-digests")
        async with aiohttp.ClientSession() as http:
            await push_to_distribution(http, self.registry.url, "small", self.sbom)
            # distribution 2.8 has no referrers API: the referrers tag schema.
            listing = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
                {**descriptor(self.sbom.manifest, OCI_MANIFEST), "artifactType": ARTIFACT}]})
            tag = self.small.digest.replace(":", "-")
            async with http.put(f"{self.registry.url}/v2/small/manifests/{tag}", data=listing,
                                headers={"Content-Type": OCI_INDEX}) as r:
                assert r.status == 201, await r.text()

    async def raw(self, ref: str) -> bytes:
        return await self.skopeo.inspect_raw(self.skopeo.ref(ref))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    require_program("docker-registry", "docker-registry", found=find_binary())
    s = Source(tmp_path_factory.mktemp("source"))
    try:
        yield s
    finally:
        s.registry.stop()


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    with RunningCluster(SPEC, tmp_path_factory.mktemp("import")) as c:
        yield c


@pytest.fixture
def skopeo(running, tmp_path):
    return Skopeo(tmp_path / "skopeo", running.regional_endpoint("westeurope")
                  .removeprefix("http://"), cluster=running)


def do_import(running, *args: str):
    return georeg("import", *args, data_dir=running.data_dir, timeout=300)


def node_of(running, region: str) -> str:
    return running.node_url(next(n["name"] for n in running.status()["nodes"]
                                 if n["region"] == region))


async def node_digest(running, region: str, repo: str, ref: str) -> str | None:
    async with running.http() as http, \
            http.head(f"{node_of(running, region)}/v2/{repo}/manifests/{ref}") as r:
        return r.headers.get("Docker-Content-Digest") if r.status == 200 else None


async def replicated(running, repo: str, ref: str, digest: str) -> None:
    async def there() -> bool:
        return await node_digest(running, "westeurope", repo, ref) == digest
    await eventually(there, timeout=60)


async def test_an_imported_tag_keeps_its_digest_and_replicates(running, source, skopeo):
    result = await asyncio.to_thread(do_import, running, "--source", f"{source.host}/small:1.0",
                                     "--image", "imported/small:1.0", "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["digest"] == source.small.digest and answer["region"] == "eastus"
    assert answer["blobsCopied"] == 3 and answer["referrers"] == 0
    await replicated(running, "imported/small", "1.0", source.small.digest)
    # A client in the other region pulls the source's bytes, digest for digest.
    assert await skopeo.inspect_raw(skopeo.ref("imported/small:1.0")) == await source.raw("small:1.0")
    await skopeo.copy(skopeo.ref("imported/small:1.0"), f"oci:{skopeo.env['HOME']}/out:x")
    # An existing tag refuses the import (ACR's NoForce), naming it; nothing changes.
    again = await asyncio.to_thread(do_import, running, "--source", f"{source.host}/multi:1.0",
                                    "--image", "imported/small:1.0")
    assert again.returncode == 2
    assert "Tag imported/small:1.0 already exists in target registry" in again.stderr
    assert await node_digest(running, "eastus", "imported/small", "1.0") == source.small.digest
    # --force replaces it.
    forced = await asyncio.to_thread(do_import, running, "--source", f"{source.host}/multi:1.0",
                                     "--image", "imported/small:1.0", "--force")
    assert forced.returncode == 0, forced.stderr
    assert await node_digest(running, "eastus", "imported/small", "1.0") == digest_of(source.index)


async def test_an_index_by_digest_comes_with_every_platform(running, source, skopeo):
    digest = digest_of(source.index)
    result = await asyncio.to_thread(do_import, running, "--source",
                                     f"{source.host}/multi@{digest}", "--image", "multi:v1",
                                     "--repository", "multi/untagged", "--region", "westeurope",
                                     "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["manifests"] == 3
    assert await skopeo.inspect_raw(skopeo.ref("multi:v1")) == await source.raw(f"multi@{digest}")
    for platform in source.platforms:
        assert await node_digest(running, "westeurope", "multi", platform.digest) \
            == platform.digest
    # --repository: the same manifests, no tag (the blobs linked, not sent again).
    assert await node_digest(running, "westeurope", "multi/untagged", digest) == digest
    async with running.http() as http, \
            http.get(f"{node_of(running, 'westeurope')}/v2/multi/untagged/tags/list") as r:
        assert (await r.json())["tags"] in ([], None)
    await skopeo.copy(skopeo.ref("multi:v1"), f"oci:{skopeo.env['HOME']}/all:x", "--all")
    # Imported in westeurope, it replicates to the home region too.
    async def home() -> bool:
        return await node_digest(running, "eastus", "multi", "v1") == digest
    await eventually(home, timeout=60)


async def test_referrers_come_by_the_tag_schema_and_by_the_referrers_api(running, source):
    result = await asyncio.to_thread(do_import, running, "--source", f"{source.host}/small:1.0",
                                     "--image", "signed/small:1.0", "--include-referrers",
                                     "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["referrers"] == 1
    async with running.http() as http:
        async with http.get(f"{node_of(running, 'eastus')}/v2/signed/small/referrers/"
                            f"{source.small.digest}") as r:
            assert r.status == 200
            listed = [m["digest"] for m in (await r.json())["manifests"]]
    assert listed == [source.sbom.digest]
    # The cluster as a source: Bearer challenges and the referrers API proper.
    login = running.credentials
    endpoint = running.regional_endpoint("eastus").removeprefix("http://")
    # The password from stdin (--password-stdin), out of the command line.
    again = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "cluster.cli", "import", "--source",
                         f"{endpoint}/signed/small:1.0", "--image", "copy/small:1.0",
                         "--include-referrers", f"--username={login.username}",
                         "--password-stdin", "--json", "--data-dir", str(running.data_dir)],
        input=login.password + "\n", capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["referrers"] == 1
    assert await node_digest(running, "eastus", "copy/small", source.sbom.digest) \
        == source.sbom.digest


async def test_bad_input_is_a_clear_4xx_and_changes_nothing(running, source):
    endpoint = running.regional_endpoint("eastus").removeprefix("http://")
    cases = [
        (["--source", "small:1.0"], "REGISTRY/REPOSITORY:TAG", 400),
        (["--source", f"{source.host}/nothing:1.0"], "not found at the source", 404),
        (["--source", f"{source.host}/small:nope"], "not found at the source", 404),
        (["--source", f"{endpoint}/imported/small:1.0", "--username", "admin", "--password",
          "wrong"], "refused the credentials", 400),
        (["--source", f"{endpoint}/imported/small:1.0"], "none given", 400),
        (["--source", f"{source.host}/small:1.0", "--image", "bad:tag:x"], "not a valid", 400),
    ]
    for args, message, _ in cases:
        result = await asyncio.to_thread(do_import, running, *args, "--image", "untouched:1")
        assert result.returncode == 2, (args, result.stdout)
        assert message in result.stderr, (args, result.stderr)
    # The API answers the same refusals with their status, never a 500.
    for args, _, status in cases[:5]:
        body = {"source": args[1], "targetTags": ["untouched:1"]}
        if "--username" in args:
            body.update(username=args[3], password=args[5])
        with pytest.raises(management_client.ManagementError) as caught:
            management_client.request(running.management_url, "POST", "/georeg/v1/imports", body,
                                      headers=running.owner_headers())
        assert caught.value.status == status, (args, caught.value)
    with pytest.raises(management_client.ManagementError) as caught:
        management_client.request(running.management_url, "POST", "/georeg/v1/imports", {
            "source": f"{source.host}/small:1.0", "targetTags": ["untouched:1"],
            "sourceCaPem": "not a certificate"}, headers=running.owner_headers())
    assert caught.value.status == 400 and "PEM" in str(caught.value)
    assert await node_digest(running, "eastus", "untouched", "1") is None


class SourceProxy:
    """A real HTTP server in front of the source, passing everything through,
    except that: with ``cut``, the first GET of that blob sends its headers and
    half its bytes, then resets the connection; with ``basic``, a request
    without those credentials gets ``401`` and a ``Basic`` challenge; with
    ``tls``, it serves HTTPS with that context."""

    def __init__(self, upstream: str, cut: str | None = None,
                 basic: tuple[str, str] | None = None, tls=None) -> None:
        self.upstream, self.cut, self.tls, self.cuts = upstream, cut, tls, 0
        self.basic = basic_authorization(basic) if basic else None
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.basic and request.headers.get("Authorization") != self.basic:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="source"'})
        async with aiohttp.ClientSession(auto_decompress=False) as http, \
                http.request(request.method, self.upstream + request.path_qs,
                             headers={k: v for k, v in request.headers.items()
                                      if k.lower() not in ("host", "authorization")},
                             data=await request.read(), allow_redirects=False) as r:
            body = await r.read()
            headers = {k: v for k, v in r.headers.items()
                       if k.lower() not in ("transfer-encoding", "content-encoding",
                                            "content-length", "connection")}
            response = web.StreamResponse(status=r.status, headers=headers)
            response.content_length = len(body)
            await response.prepare(request)
            if request.method == "GET" and self.cut is not None \
                    and request.path.endswith(f"/blobs/{self.cut}") and self.cuts == 0:
                self.cuts += 1
                await response.write(body[: len(body) // 2])
                request.transport.abort()
                return response
            if request.method != "HEAD":
                await response.write(body)
            await response.write_eof()
            return response

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.tls)
        await site.start()
        return f"127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def test_a_source_cut_mid_blob_leaves_nothing_and_a_retry_succeeds(running, source,
                                                                         skopeo):
    layer = descriptor(source.big.layers[0], "")["digest"]
    proxy = SourceProxy(source.registry.url, cut=layer)
    host = await proxy.start()
    try:
        args = ("--source", f"{host}/big:1.0", "--image", "big:1.0")
        failed = await asyncio.to_thread(do_import, running, *args)
        assert failed.returncode == 2 and proxy.cuts == 1
        assert f"blob {layer}" in failed.stderr and "connection" in failed.stderr, failed.stderr
        # Nothing partial: no manifest, no tag, in the region imported into.
        assert await node_digest(running, "eastus", "big", source.big.digest) is None
        assert await node_digest(running, "eastus", "big", "1.0") is None
        retried = await asyncio.to_thread(do_import, running, *args)
        assert retried.returncode == 0, retried.stderr
    finally:
        await proxy.stop()
    await replicated(running, "big", "1.0", source.big.digest)
    assert await skopeo.inspect_raw(skopeo.ref("big:1.0")) == await source.raw("big:1.0")



async def test_a_basic_auth_source_over_https_with_its_ca(running, source, tmp_path):
    """A source that answers Basic challenges, over HTTPS whose certificate
    chains to a private CA (--source-ca-file)."""
    ca = ClusterCA.open(tmp_path / "ca")
    served = ca.endpoint_certificate()
    proxy = SourceProxy(source.registry.url, basic=("puller", "s3cret"),
                        tls=server_context(served.cert_file, served.key_file))
    host = await proxy.start()
    try:
        base = ("--source", f"{host}/small:1.0", "--image", "tls/small:1.0",
                "--source-ca-file", str(ca.cert_file))
        refused = await asyncio.to_thread(do_import, running, *base, "--username", "puller",
                                          "--password", "wrong")
        assert refused.returncode == 2 and "refused the credentials given" in refused.stderr, \
            refused.stderr
        unverified = await asyncio.to_thread(
            do_import, running, "--source", f"{host}/small:1.0", "--image", "tls/small:1.0",
            "--username", "puller", "--password", "s3cret")
        assert unverified.returncode == 2, unverified.stdout    # plain HTTP to a TLS server
        assert "the connection to the source failed" in unverified.stderr, unverified.stderr
        imported = await asyncio.to_thread(do_import, running, *base, "--username", "puller",
                                           "--password", "s3cret")
        assert imported.returncode == 0, imported.stderr
    finally:
        await proxy.stop()
    assert await node_digest(running, "eastus", "tls/small", "1.0") == source.small.digest


# -- a hostile source: a real HTTP server that answers as each test tells it --------------


class HostileSource:
    """A real HTTP server on a real socket: ``routes`` maps a path to a handler
    (``fallback`` takes the rest, else 404); ``seen`` records every request's
    path and ``Authorization``; ``finished`` counts handlers that wrote
    everything they meant to."""

    def __init__(self, host: str = "127.0.0.1", tls=None) -> None:
        self.host, self.routes, self.seen, self.finished = host, {}, [], 0
        self.tls = tls
        self.fallback = None
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.path, request.headers.get("Authorization")))
        handler = self.routes.get(request.path, self.fallback)
        if handler is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        return await handler(request)

    async def __aenter__(self) -> HostileSource:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, 0, ssl_context=self.tls).start()
        self.address = f"{self.host}:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()

    def serve(self, body: bytes, content_type: str = OCI_MANIFEST, piece: int = 0,
              headers: dict | None = None, length: bool = True):
        """A handler sending ``body``; with ``piece``, in pieces of that size with
        a pause between them (a slow network), so the client reads it in parts."""
        async def handler(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": content_type,
                                                   **(headers or {})})
            if length:
                response.content_length = len(body)
            await response.prepare(request)
            for start in range(0, len(body), piece or len(body) or 1):
                await response.write(body[start:start + (piece or len(body))])
                if piece:
                    await asyncio.sleep(0.005)
            await response.write_eof()
            self.finished += 1
            return response
        return handler


def index_of(*children: bytes) -> bytes:
    """An OCI index listing ``children`` (indexes or image manifests)."""
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        descriptor(c, OCI_INDEX if b'"manifests"' in c else OCI_MANIFEST) for c in children]
    }).encode()


async def test_a_manifest_larger_than_one_network_read_arrives_whole():
    """300 KB of annotations, sent in 16 KB pieces: the whole manifest, by tag
    and by digest (a read of what happened to be buffered cut it short)."""
    image = make_image([10], seed=7, annotations={"notes": "x" * 300_000})
    async with HostileSource() as src, upstream_session() as http:
        for ref in ("big", image.digest):
            src.routes[f"/v2/app/manifests/{ref}"] = src.serve(image.manifest, piece=16 << 10,
                                                               length=False)
        source = UpstreamRegistry(http, src.address)
        for ref in ("big", image.digest):
            got = await source.manifest("app", ref)
            assert got.body == image.manifest and got.digest == image.digest
        # Over the node's limit, with no Content-Length to say so first: refused.
        huge = b" " * (MAX_MANIFEST_SIZE + 1) + image.manifest
        src.routes["/v2/app/manifests/huge"] = src.serve(huge, piece=1 << 20, length=False)
        with pytest.raises(UpstreamError) as caught:
            await source.manifest("app", "huge")
        assert caught.value.kind is UpstreamFailure.UNAVAILABLE
        assert f"larger than {MAX_MANIFEST_SIZE} bytes" in str(caught.value)


async def test_a_token_realm_over_plain_http_on_another_host_gets_no_credentials():
    """The source (plain HTTP, loopback) names a realm on another host over
    plain HTTP: refused, and the realm never hears the password."""
    async with HostileSource() as src, HostileSource("127.0.0.2") as realm, \
            upstream_session() as http:
        realm.routes["/token"] = src.serve(b'{"token": "t"}', "application/json")
        challenge = f'Bearer realm="http://{realm.address}/token",service="s"'

        async def challenged(request: web.Request) -> web.Response:
            return web.Response(status=401, headers={"WWW-Authenticate": challenge})
        src.routes["/v2/app/manifests/1"] = challenged
        source = UpstreamRegistry(http, src.address, credentials=("puller", "pw"))
        with pytest.raises(UpstreamError) as caught:
            await source.manifest("app", "1")
        assert caught.value.kind is UpstreamFailure.UNAVAILABLE
        assert f"http://{realm.address}/token" in str(caught.value) and "https" in \
            str(caught.value)
        assert realm.seen == []


async def test_a_redirect_from_https_to_plain_http_is_refused(tmp_path):
    ca = ClusterCA.open(tmp_path / "ca")
    served = ca.endpoint_certificate()
    image = make_image([10], seed=13)
    async with HostileSource(tls=server_context(served.cert_file, served.key_file)) as src, \
            HostileSource() as plain, upstream_session(ca.cert_file.read_text()) as http:
        plain.routes["/v2/app/manifests/1"] = plain.serve(image.manifest)

        async def downgrade(request: web.Request) -> web.Response:
            raise web.HTTPFound(f"http://{plain.address}/v2/app/manifests/1")
        src.routes["/v2/app/manifests/1"] = downgrade
        with pytest.raises(UpstreamError) as caught:
            await UpstreamRegistry(http, src.address, ca_given=True).manifest("app", "1")
        assert caught.value.kind is UpstreamFailure.UNAVAILABLE
        assert "from HTTPS to plain HTTP" in str(caught.value)


async def test_a_token_that_is_no_header_value_is_refused_naming_the_realm():
    async with HostileSource() as src, upstream_session() as http:
        realm_url = f"http://{src.address}/token"
        src.routes["/token"] = src.serve(b'{"token": "abc\\r\\nX-Injected: 1"}',
                                         "application/json")

        async def challenged(request: web.Request) -> web.Response:
            return web.Response(status=401, headers={
                "WWW-Authenticate": f'Bearer realm="{realm_url}"'})
        src.routes["/v2/app/manifests/1"] = challenged
        with pytest.raises(UpstreamError) as caught:
            await UpstreamRegistry(http, src.address).manifest("app", "1")
        assert caught.value.kind is UpstreamFailure.UNAVAILABLE
        assert realm_url in str(caught.value) and "token" in str(caught.value)


async def test_oversized_referrers_and_token_answers_are_refused():
    image = make_image([10], seed=8)
    padding = " " * MAX_MANIFEST_SIZE
    async with HostileSource() as src, upstream_session() as http:
        src.routes[f"/v2/app/referrers/{image.digest}"] = src.serve(
            ('{"schemaVersion": 2, "manifests": []' + padding + "}").encode(), OCI_INDEX,
            piece=1 << 20, length=False)
        with pytest.raises(UpstreamError) as caught:
            await UpstreamRegistry(http, src.address).referrers("app", image.digest)
        assert caught.value.kind is UpstreamFailure.UNAVAILABLE
        assert "larger than" in str(caught.value)

        src.routes["/token"] = src.serve(('{"token": "t"' + padding + "}").encode(),
                                         "application/json", piece=1 << 20, length=False)

        async def challenged(request: web.Request) -> web.Response:
            return web.Response(status=401, headers={
                "WWW-Authenticate": f'Bearer realm="http://{src.address}/token"'})
        src.routes["/v2/app/manifests/1"] = challenged
        with pytest.raises(UpstreamError) as caught:
            await UpstreamRegistry(http, src.address).manifest("app", "1")
        assert caught.value.kind is UpstreamFailure.UNAVAILABLE
        assert "larger than" in str(caught.value)


async def test_a_blob_larger_than_its_descriptor_says_is_refused_as_it_arrives():
    blob = b"y" * 100
    digest = digest_of(blob)
    async with HostileSource() as src, upstream_session() as http:
        source = UpstreamRegistry(http, src.address)
        # Content-Length over the size: refused before a byte is taken.
        src.routes[f"/v2/app/blobs/{digest}"] = src.serve(blob, "application/octet-stream")
        with pytest.raises(UpstreamError) as caught:
            async for _ in source.blob("app", digest, size=10):
                pytest.fail("a byte of an oversized blob was passed on")
        assert caught.value.kind is UpstreamFailure.UNAVAILABLE and "10 bytes" in \
            str(caught.value)
        # No Content-Length, 64 MiB streamed for a 10-byte blob: cut off early.
        src.routes[f"/v2/app/blobs/{digest}"] = src.serve(b"z" * (64 << 20),
                                                          "application/octet-stream",
                                                          piece=256 << 10, length=False)
        passed = 0
        with pytest.raises(UpstreamError) as caught:
            async for chunk in source.blob("app", digest, size=10):
                passed += len(chunk)
        assert passed <= 10 and "more than 10 bytes" in str(caught.value)
        assert src.finished == 1      # the first answer only: the stream was abandoned


def api_import(running, body: dict) -> management_client.ManagementError | dict:
    try:
        return management_client.request(running.management_url, "POST", "/georeg/v1/imports",
                                         body, headers=running.owner_headers())
    except management_client.ManagementError as exc:
        return exc


async def node_has_blob(running, region: str, repo: str, digest: str) -> bool:
    async with running.http() as http, \
            http.head(f"{node_of(running, region)}/v2/{repo}/blobs/{digest}") as r:
        return r.status == 200


def manifests_by_digest(src: HostileSource, repo: str, bodies: list[bytes],
                        tags: dict[str, bytes] | None = None) -> None:
    for body in bodies:
        kind = OCI_INDEX if b'"manifests"' in body else OCI_MANIFEST
        src.routes[f"/v2/{repo}/manifests/{digest_of(body)}"] = src.serve(body, kind)
    for tag, body in (tags or {}).items():
        kind = OCI_INDEX if b'"manifests"' in body else OCI_MANIFEST
        src.routes[f"/v2/{repo}/manifests/{tag}"] = src.serve(body, kind)


async def test_nesting_fan_out_and_bulk_past_the_limits_are_a_502(running):
    """1,200 nested indexes (a RecursionError, a 500, before), an index of
    2,000 children, and nine manifests of nearly 4 MiB each: each refused
    as SourceUnavailable, saying which limit, before anything is copied."""
    FAN_OUT = 2_000
    leaf = make_image([10], seed=9)
    chain = [leaf.manifest]
    for _ in range(1_200):
        chain.append(index_of(chain[-1]))
    wide = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": "sha256:" + f"{i:064x}", "size": 100}
        for i in range(FAN_OUT)]}).encode()
    bulky = [make_image([10], seed=20 + i, annotations={"n": "x" * (MAX_MANIFEST_SIZE - 4096)})
             for i in range(9)]
    bulk = index_of(*(b.manifest for b in bulky))
    async with HostileSource() as src:
        manifests_by_digest(src, "deep", chain, {"top": chain[-1]})
        manifests_by_digest(src, "wide", [wide], {"top": wide})
        manifests_by_digest(src, "bulk", [bulk, *(b.manifest for b in bulky)], {"top": bulk})
        answers, requests = {}, {}
        for repo in ("deep", "wide", "bulk"):
            src.seen.clear()
            answers[repo] = await asyncio.to_thread(api_import, running, {
                "source": f"{src.address}/{repo}:top", "targetTags": [f"limits/{repo}:1"]})
            requests[repo] = len(src.seen)
    wrong = [(repo, str(answers[repo])[:300])
             for repo, limit in (("deep", "nested"), ("wide", "manifests"), ("bulk", "bytes"))
             if not (isinstance(answers[repo], management_client.ManagementError)
                     and answers[repo].status == 502 and limit in str(answers[repo]))]
    assert wrong == []
    assert requests["deep"] <= imports.MAX_INDEX_DEPTH + 2
    assert requests["wide"] == 1 and imports.MAX_MANIFESTS < FAN_OUT
    for repo in ("deep", "wide", "bulk"):
        assert await node_digest(running, "eastus", f"limits/{repo}", "1") is None


async def test_a_missing_child_or_an_existing_tag_leaves_nothing_behind(running):
    """A platform the source lacks (404 while manifests are fetched): no blob,
    no manifest, no tag. An existing tag without --force: no blob copied."""
    present, absent = make_image([2000], seed=10), make_image([2000], seed=11)
    index = index_of(present.manifest, absent.manifest)
    other = make_image([3000], seed=12)
    async with HostileSource() as src:
        manifests_by_digest(src, "part", [index, present.manifest],
                            {"1.0": index, "solo": present.manifest, "other": other.manifest})
        for blob in [*present.blobs, *other.blobs]:
            src.routes[f"/v2/part/blobs/{digest_of(blob)}"] = src.serve(
                blob, "application/octet-stream")
        missing = await asyncio.to_thread(api_import, running, {
            "source": f"{src.address}/part:1.0", "targetTags": ["part:1.0"]})
        assert isinstance(missing, management_client.ManagementError), missing
        assert missing.status == 404 and absent.digest in str(missing), missing
        for blob in present.blobs:
            assert not await node_has_blob(running, "eastus", "part", digest_of(blob))
        for ref in (present.digest, digest_of(index), "1.0"):
            assert await node_digest(running, "eastus", "part", ref) is None
        taken = await asyncio.to_thread(api_import, running, {
            "source": f"{src.address}/part:solo", "targetTags": ["part:taken"]})
        assert isinstance(taken, dict), taken
        refused = await asyncio.to_thread(api_import, running, {
            "source": f"{src.address}/part:other", "targetTags": ["part:taken"]})
        assert isinstance(refused, management_client.ManagementError) and refused.status == 409
    for blob in other.blobs:
        assert not await node_has_blob(running, "eastus", "part", digest_of(blob))
    assert await node_digest(running, "eastus", "part", "taken") == present.digest
