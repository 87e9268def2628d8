"""The pull-through cache (``registry_node.pull_through``, after ACR's artifact
cache), against a real upstream: Debian's ``docker-registry`` populated by
``tests.test_import``'s ``Source``, reached through real HTTP proxies that can
be stopped (the upstream down), cut a blob mid-body (a real socket cut) or
ask for Basic credentials. Clients are skopeo and plain HTTP with the
cluster's admin credentials; pulls go to the West Europe replica, and what it
cached must reach East US by replication.

One cluster (two regions) and one upstream serve the whole module.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys

import aiohttp
import pytest
from aiohttp import web

from cluster.bench.reference import find_binary
from cluster.control import management_client
from cluster.control import spec as specs
from cluster.testing import RunningCluster
from registry_node import pull_through
from registry_node.cache_rules import CacheRule, overlaps, parse_source_repo, rule_for
from registry_node.config import NodeConfig
from registry_node.identities import InvalidValue
from registry_node.manifest import OCI_INDEX

from .helpers import (
    Skopeo,
    assert_error,
    descriptor,
    digest_of,
    eventually,
    make_image,
    require_program,
    start_node,
    write_oci_layout,
)
from .test_cluster import georeg
from .test_import import Source, SourceProxy, push_to_distribution

SPEC = specs.ClusterSpec(registry="georegcache", tier="Premium", home_region="eastus",
                         replicas=(specs.ReplicaSpec("westeurope"),))


# -- rules (no I/O) --------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "alpine", "localhost:5000/a:1", "localhost:5000/A", "https://x.io/a", "x.io/",
    "x.io/a@sha256:" + "a" * 64, "x.io/*/a", "",
])
def test_a_bad_source_repository_is_refused_saying_the_forms(text):
    with pytest.raises(InvalidValue) as caught:
        parse_source_repo(text)
    assert "HOST/REPOSITORY" in str(caught.value) or "--source-repo" in str(caught.value)


def test_a_static_rule_wins_over_the_wildcard_around_it():
    rules = [("all", CacheRule("h.io/*", "*")), ("alpine", CacheRule("h.io/library/alpine",
                                                                      "alpine")),
             ("hub", CacheRule("d.io/library/*", "hub/*"))]
    assert rule_for(rules, "alpine").rule == "alpine"
    assert rule_for(rules, "alpine").repository == "library/alpine"
    hub = rule_for(rules, "hub/nginx/x")
    assert (hub.rule, hub.host, hub.repository) == ("hub", "d.io", "library/nginx/x")
    assert rule_for(rules, "hub").rule == "all"          # hub/* never covers hub itself
    assert rule_for(rules[1:], "other") is None


@pytest.mark.parametrize("a, b, clash", [
    (("h.io/*", "*"), ("d.io/library/*", "library/*"), True),          # ACR's example 1
    (("h.io/lib/*", "lib/*"), ("d.io/lib/dn/*", "lib/dn/*"), True),    # ACR's example 2
    (("h.io/lib/*", "lib/*"), ("d.io/x/*", "libx/*"), False),
    (("h.io/*", "*"), ("d.io/library/dotnet", "library/dotnet"), False),  # static inside: allowed
    (("h.io/a", "a"), ("d.io/b", "a"), True),                          # one target, two rules
])
def test_wildcard_rules_may_not_overlap(a, b, clash):
    assert overlaps(CacheRule(*a), CacheRule(*b)) is clash
    assert overlaps(CacheRule(*b), CacheRule(*a)) is clash


# -- a real upstream -------------------------------------------------------------------------


class CountingProxy(SourceProxy):
    """A ``SourceProxy`` that counts the requests it gets, and while
    ``refusing`` answers every one with a 503 (an upstream that is up but
    failing: what a node holds then shows, since a pull cannot fetch)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.requests = 0
        self.paths: list[str] = []
        self.refusing = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.paths.append(request.path)
        if self.refusing:
            return web.Response(status=503, text="down for the test")
        return await super().handle(request)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    require_program("docker-registry", "docker-registry", found=find_binary())
    upstream = Source(tmp_path_factory.mktemp("upstream"))
    try:
        yield upstream
    finally:
        upstream.registry.stop()


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    with RunningCluster(SPEC, tmp_path_factory.mktemp("cache")) as c:
        yield c


@pytest.fixture
def skopeo(running, tmp_path):
    return Skopeo(tmp_path / "skopeo", running.regional_endpoint("westeurope")
                  .removeprefix("http://"), cluster=running)


def cli(running, *args: str) -> subprocess.CompletedProcess:
    return georeg(*args, data_dir=running.data_dir, timeout=120)


async def create_rule(running, name: str, source_repo: str, target: str, *more: str) -> None:
    done = await asyncio.to_thread(cli, running, "cache", "create", "--name", name,
                                   "--source-repo", source_repo, "--target-repo", target, *more)
    assert done.returncode == 0, done.stderr


def node_of(running, region: str) -> str:
    return running.node_url(next(n["name"] for n in running.status()["nodes"]
                                 if n["region"] == region))


async def get_manifest(running, region: str, repo: str, ref: str,
                       method: str = "GET") -> tuple[int, dict, bytes]:
    async with running.http() as http, http.request(
            method, f"{node_of(running, region)}/v2/{repo}/manifests/{ref}",
            headers={"Accept": OCI_INDEX + ", application/vnd.oci.image.manifest.v1+json"}) as r:
        return r.status, dict(r.headers), await r.read()


async def held(running, region: str, repo: str, ref: str) -> str | None:
    status, headers, _ = await get_manifest(running, region, repo, ref, "HEAD")
    return headers.get("Docker-Content-Digest") if status == 200 else None


async def replicated(running, repo: str, tag: str, digest: str) -> None:
    """East US holds ``repo:tag`` as ``digest``, brought by replication: its
    tag list (which never pulls through the cache) is watched until the tag
    shows, and only then is the manifest read (from what East US holds)."""
    async def listed() -> bool:
        async with running.http() as http, \
                http.get(f"{node_of(running, 'eastus')}/v2/{repo}/tags/list") as r:
            return r.status == 200 and tag in ((await r.json()).get("tags") or [])
    await eventually(listed, timeout=60)
    assert await held(running, "eastus", repo, tag) == digest


async def test_a_tag_pulled_through_is_stored_replicated_and_served_while_upstream_is_down(
        running, source, skopeo, tmp_path):
    proxy = CountingProxy(source.registry.url)
    host = await proxy.start()
    try:
        await create_rule(running, "small-cache", f"{host}/small", "cached/small")
        # The first pull fetches from upstream, in the same request, digest for digest.
        status, headers, body = await get_manifest(running, "westeurope", "cached/small", "1.0")
        assert status == 200 and body == await source.raw("small:1.0")
        assert headers["Docker-Content-Digest"] == source.small.digest
        assert headers.get("X-Georeg-Origin") == "upstream"
        await skopeo.copy(skopeo.ref("cached/small:1.0"), f"oci:{tmp_path / 'one'}:x")
        # Stored as a push is: replication takes it to the other region.
        await replicated(running, "cached/small", "1.0", source.small.digest)
        fetched = proxy.requests
        # The second pull is local: upstream is not asked.
        status, headers, _ = await get_manifest(running, "westeurope", "cached/small", "1.0")
        assert status == 200 and "X-Georeg-Origin" not in headers
        await skopeo.copy(skopeo.ref("cached/small:1.0"), f"oci:{tmp_path / 'two'}:x")
        assert proxy.requests == fetched
    finally:
        await proxy.stop()
    # Upstream gone: what is cached is still served ...
    await skopeo.copy(skopeo.ref("cached/small:1.0"), f"oci:{tmp_path / 'three'}:x")
    # ... and what is not gets ACR's answer: 424, naming the source and the rule.
    sbom = source.sbom.digest
    status, _, body = await get_manifest(running, "westeurope", "cached/small", sbom)
    error = json.loads(body)["errors"][0]
    assert status == 424, body
    assert "cache rule 'small-cache'" in error["message"] and host in error["message"]
    assert "connection" in json.dumps(error["detail"])
    assert await held(running, "westeurope", "cached/small", sbom) is None


async def tag_upstream(source, repo: str, image) -> None:
    """``image`` pushed upstream as ``repo:1.0``."""
    async with aiohttp.ClientSession() as http:
        await push_to_distribution(http, source.registry.url, repo, image)
        async with http.put(f"{source.registry.url}/v2/{repo}/manifests/1.0",
                            data=image.manifest, headers={"Content-Type": image.media_type}) as r:
            assert r.status == 201, await r.text()


async def test_a_wildcard_rule_brings_an_index_with_every_platform(running, source, skopeo,
                                                                   tmp_path):
    await create_rule(running, "hub-all", f"{source.host}/*", "hub/*")
    index = digest_of(source.index)
    await skopeo.copy(skopeo.ref(f"hub/multi@{index}"), f"oci:{tmp_path / 'multi'}:x", "--all")
    for platform in source.platforms:
        assert await held(running, "westeurope", "hub/multi", platform.digest) == platform.digest
    assert await held(running, "westeurope", "hub/multi", index) == index
    # The tag comes through the same rule, and another repository under it too.
    assert await held(running, "westeurope", "hub/multi", "1.0") == index
    assert await skopeo.inspect_raw(skopeo.ref("hub/small:1.0")) == await source.raw("small:1.0")
    await replicated(running, "hub/multi", "1.0", index)
    # No automatic refresh (ACR's rule): a tag upstream moves after it was
    # cached is served as cached.
    await tag_upstream(source, "moving", source.small)
    assert await held(running, "westeurope", "hub/moving", "1.0") == source.small.digest
    await tag_upstream(source, "moving", source.platforms[0])
    assert await held(running, "westeurope", "hub/moving", "1.0") == source.small.digest
    # A wildcard rule that overlaps it is refused, naming it; nothing changes.
    before = await asyncio.to_thread(cli, running, "cache", "list", "--json")
    refused = await asyncio.to_thread(cli, running, "cache", "create", "--name", "hub-lib",
                                      "--source-repo", f"{source.host}/library/*",
                                      "--target-repo", "hub/library/*")
    assert refused.returncode == 2 and "overlaps cache rule 'hub-all'" in refused.stderr
    after = await asyncio.to_thread(cli, running, "cache", "list", "--json")
    assert json.loads(after.stdout) == json.loads(before.stdout)


async def test_an_upstream_cut_mid_blob_stores_nothing_and_the_next_pull_succeeds(
        running, source, skopeo, tmp_path):
    layer = descriptor(source.big.layers[0], "")["digest"]
    proxy = CountingProxy(source.registry.url, cut=layer)
    host = await proxy.start()
    try:
        await create_rule(running, "big-cache", f"{host}/big", "cached/big")
        status, _, body = await get_manifest(running, "westeurope", "cached/big", "1.0")
        assert status == 424 and proxy.cuts == 1, body
        assert f"blob {layer}" in body.decode() and "connection" in body.decode()
        # Nothing partial: with upstream failing, neither the manifest nor the
        # tag is served (a stored one would be, from here), and no tag is listed.
        proxy.refusing = True
        for ref in (source.big.digest, "1.0"):
            status, _, body = await get_manifest(running, "westeurope", "cached/big", ref)
            assert status == 424 and "HTTP 503" in body.decode(), body
        async with running.http() as http, \
                http.get(f"{node_of(running, 'westeurope')}/v2/cached/big/tags/list") as r:
            assert r.status == 404 or (await r.json())["tags"] in ([], None)
        proxy.refusing = False
        await skopeo.copy(skopeo.ref("cached/big:1.0"), f"oci:{tmp_path / 'big'}:x")
        assert await held(running, "westeurope", "cached/big", "1.0") == source.big.digest
    finally:
        await proxy.stop()


async def test_a_credential_set_pulls_and_the_client_needs_pull_on_the_target(
        running, source, skopeo, tmp_path):
    proxy = CountingProxy(source.registry.url, basic=("puller", "s3cret-pw"))
    host = await proxy.start()
    try:
        made = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "cluster.cli", "credential-set", "create",
                             "--name", "upstream-creds", "--login-server", host,
                             "--username", "puller", "--password-stdin",
                             "--data-dir", str(running.data_dir)],
            input="s3cret-pw\n", capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        assert "s3cret-pw" not in made.stdout
        shown = await asyncio.to_thread(cli, running, "credential-set", "show", "--name",
                                        "upstream-creds")
        assert json.loads(shown.stdout)["username"] == "puller" and "s3cret" not in shown.stdout
        raw = await asyncio.to_thread(
            management_client.request, running.management_url, "GET",
            "/georeg/v1/configuration/credential-set/upstream-creds",
            headers=running.owner_headers())
        assert raw["value"]["password"] == "***"
        # What a node stores and replicates is sealed.
        async with running.http(headers=running.internal_headers()) as http, http.get(
                f"{node_of(running, 'westeurope')}/georeg/v1/configuration/credential-set/"
                "upstream-creds") as r:
            stored = (await r.json())["value"]["password"]
        assert stored.startswith("sealed:v1:") and "s3cret" not in stored
        await create_rule(running, "private", f"{host}/small", "private/small",
                          "--cred-set", "upstream-creds")
        await create_rule(running, "private-anon", f"{host}/multi", "private/multi")
        # A client without credentials is refused before upstream is asked.
        asked = proxy.requests
        async with running.http(headers={"Authorization": "Basic eDp5"}) as http, \
                http.get(f"{node_of(running, 'westeurope')}/v2/private/small/manifests/1.0") as r:
            assert r.status == 401
        assert proxy.requests == asked
        # The rule's credential set opens the upstream (the client's admin login would not).
        assert await skopeo.inspect_raw(skopeo.ref("private/small:1.0")) == \
            await source.raw("small:1.0")
        # A rule without one: the upstream refuses, and the client hears why.
        status, _, body = await get_manifest(running, "westeurope", "private/multi", "1.0")
        assert status == 424 and "cache rule 'private-anon'" in body.decode()
        assert "authentication required with source registry" in body.decode()
        assert "--username" not in body.decode()
        # A credential set a rule uses cannot be deleted.
        refused = await asyncio.to_thread(cli, running, "credential-set", "delete", "--name",
                                          "upstream-creds")
        assert refused.returncode == 2 and "used by cache rule private" in refused.stderr
    finally:
        await proxy.stop()


async def test_a_push_into_a_covered_repository_never_asks_the_upstream(running, source, skopeo,
                                                                         tmp_path):
    proxy = CountingProxy(source.registry.url)
    host = await proxy.start()
    try:
        await create_rule(running, "pushy", f"{host}/small", "pushy/small")
        # skopeo HEADs every layer before it uploads it: with the upstream
        # failing, the push still goes through, and the upstream is not asked.
        proxy.refusing = True
        image = make_image([1200, 1700], seed=21)
        write_oci_layout(tmp_path / "mine", image, "mine")
        await skopeo.copy(f"oci:{tmp_path / 'mine'}:mine", skopeo.ref("pushy/small:mine"),
                          "--preserve-digests")
        assert await held(running, "westeurope", "pushy/small", "mine") == image.digest
        assert proxy.requests == 0, proxy.paths
        # A blob that no manifest of the repository references is not fetched,
        # by HEAD or GET, even though the upstream has it and is up.
        proxy.refusing = False
        layer = descriptor(source.small.layers[0], "")["digest"]
        async with running.http() as http:
            for method in ("HEAD", "GET"):
                async with http.request(method, f"{node_of(running, 'westeurope')}/v2/pushy/"
                                                f"small/blobs/{layer}") as r:
                    assert r.status == 404, (method, await r.read())
        assert proxy.requests == 0, proxy.paths
    finally:
        await proxy.stop()


async def test_a_credential_set_for_another_host_is_never_sent_upstream(running, source):
    proxy = CountingProxy(source.registry.url, basic=("puller", "other-pw"))
    host = await proxy.start()
    try:
        made = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "cluster.cli", "credential-set", "create",
                             "--name", "moved-creds", "--login-server", host,
                             "--username", "puller", "--password-stdin",
                             "--data-dir", str(running.data_dir)],
            input="other-pw\n", capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        await create_rule(running, "moved", f"{host}/small", "moved/small",
                          "--cred-set", "moved-creds")
        # The set now says it is for another host (written to the node as the
        # cluster writes configuration: what a race of two writers can leave).
        url = f"{node_of(running, 'westeurope')}/georeg/v1/configuration/credential-set/moved-creds"
        async with running.http(headers=running.internal_headers()) as http:
            async with http.get(url) as r:
                value = (await r.json())["value"]
            async with http.put(url, json={**value, "login_server": "elsewhere.example.com"}) as r:
                assert r.status == 200, await r.text()
        status, _, body = await get_manifest(running, "westeurope", "moved/small", "1.0")
        assert status == 424, body
        assert "'moved-creds' is for elsewhere.example.com" in body.decode(), body
        assert proxy.requests == 0, proxy.paths
    finally:
        await proxy.stop()


async def test_a_valid_client_without_pull_on_the_target_is_refused_before_upstream(
        running, source):
    proxy = CountingProxy(source.registry.url)
    host = await proxy.start()
    try:
        made = await asyncio.to_thread(cli, running, "token", "create", "--name", "elsewhere",
                                       "--repository", "elsewhere/thing", "content/read")
        assert made.returncode == 0, made.stderr
        password = next(p["value"] for p in json.loads(made.stdout)["credentials"]["passwords"]
                        if p["name"] == "password1")
        login = {"Authorization": "Basic " + base64.b64encode(
            f"elsewhere:{password}".encode()).decode()}
        await create_rule(running, "guarded", f"{host}/small", "guarded/small")
        node = node_of(running, "westeurope")

        async def status_of(path: str) -> int:
            async with running.http(headers=login) as http, http.get(f"{node}{path}") as r:
                return r.status
        # The token is valid where its scope map grants pull (a 404: nothing there) ...
        await eventually(lambda: _is(status_of("/v2/elsewhere/thing/manifests/x"), 404),
                         timeout=30, what="the token on the node")
        # ... and refused on the cache's target, before the upstream is asked.
        assert await status_of("/v2/guarded/small/manifests/1.0") == 403
        assert await status_of(f"/v2/guarded/small/manifests/{source.small.digest}") == 403
        assert proxy.requests == 0, proxy.paths
    finally:
        await proxy.stop()


async def _is(status, expected: int) -> bool:
    return await status == expected


async def test_a_pull_through_past_the_storage_limit_is_refused_and_stores_nothing(
        source, tmp_path):
    """A node that may hold 20,000 bytes (an in-process node: the module's
    cluster has no limit to reach) pulls ``big:1.0`` (a 4 MiB layer)."""
    node = await start_node(NodeConfig(data_dir=tmp_path / "node", port=0,
                                       storage_limit=20_000))
    proxy = CountingProxy(source.registry.url)
    host = await proxy.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.put(f"{node.url}/georeg/v1/configuration/cache-rule/limited",
                                json={"source_repo": f"{host}/big",
                                      "target_repo": "limited/big"}) as r:
                assert r.status == 200, await r.text()
            for ref in ("1.0", "1.0"):          # refused alike the second time
                async with http.get(f"{node.url}/v2/limited/big/manifests/{ref}") as r:
                    error = await assert_error(r, 403, "DENIED")
                assert error["message"].startswith("registry storage limit reached"), error
            async with http.get(f"{node.url}/v2/limited/big/tags/list") as r:
                assert r.status == 404 or (await r.json())["tags"] in ([], None)
        # Nothing stored, and no blob even asked for: the sizes the manifest
        # gives are checked against the limit first.
        assert node.node.meta.usage.bytes == 0
        assert proxy.paths.count("/v2/big/manifests/1.0") == 2, proxy.paths
        assert not [p for p in proxy.paths if "/blobs/" in p], proxy.paths
    finally:
        await proxy.stop()
        await node.stop()


async def test_concurrent_pulls_of_one_missing_tag_share_one_fetch(running, source):
    proxy = CountingProxy(source.registry.url)
    host = await proxy.start()
    try:
        await create_rule(running, "together", f"{host}/small", "together/small")
        answers = await asyncio.gather(*(get_manifest(running, "westeurope", "together/small",
                                                      "1.0") for _ in range(4)))
        assert {(status, headers["Docker-Content-Digest"]) for status, headers, _ in answers} \
            == {(200, source.small.digest)}
        assert proxy.paths.count("/v2/small/manifests/1.0") == 1, proxy.paths
    finally:
        await proxy.stop()


class HeldProxy(CountingProxy):
    """A ``CountingProxy`` that holds every request until ``release`` is set,
    then refuses it (503)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.refusing = True
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.paths.append(request.path)
        await self.release.wait()
        return web.Response(status=503, text="down for the test")


async def test_concurrent_pulls_share_one_failed_fetch_and_its_error(running, source):
    proxy = HeldProxy(source.registry.url)
    host = await proxy.start()
    sent = 0

    async def headers_sent(*_) -> None:
        nonlocal sent
        sent += 1

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(headers_sent)
    try:
        await create_rule(running, "refused", f"{host}/small", "refused/small")
        url = f"{node_of(running, 'westeurope')}/v2/refused/small/manifests/1.0"

        async def pull(http) -> tuple[int, bytes]:
            async with http.get(url) as r:
                return r.status, await r.read()

        async with running.http(trace_configs=[trace]) as http:
            pulls = [asyncio.ensure_future(pull(http)) for _ in range(4)]
            # Every pull has reached the node and the first fetch is held upstream.
            await eventually(lambda: sent == 4 and proxy.requests >= 1, timeout=30)
            proxy.release.set()
            answers = await asyncio.gather(*pulls)
        for status, body in answers:
            assert status == 424 and b"HTTP 503" in body, body
        assert proxy.paths.count("/v2/small/manifests/1.0") == 1, proxy.paths
    finally:
        proxy.release.set()
        await proxy.stop()


class BlobGate(CountingProxy):
    """A ``CountingProxy`` that holds every blob request until it has sent
    ``manifests`` manifests: pulls of two tags of one image are then both
    at their blobs while the first one's are still in flight."""

    def __init__(self, *args, manifests: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.manifests = manifests
        self.blobs_go = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if "/blobs/" in request.path:
            await self.blobs_go.wait()
            return await super().handle(request)
        response = await super().handle(request)
        if "/manifests/" in request.path:
            self.manifests -= 1
            if self.manifests <= 0:
                self.blobs_go.set()
        return response


async def test_two_tags_of_one_image_pulled_at_once_fetch_each_blob_once(running, source):
    async with aiohttp.ClientSession() as http, http.put(
            f"{source.registry.url}/v2/small/manifests/twin", data=source.small.manifest,
            headers={"Content-Type": source.small.media_type}) as r:
        assert r.status == 201, await r.text()
    proxy = BlobGate(source.registry.url, manifests=2)
    host = await proxy.start()
    try:
        await create_rule(running, "twins", f"{host}/small", "twins/small")
        answers = await asyncio.gather(*(get_manifest(running, "westeurope", "twins/small", tag)
                                         for tag in ("1.0", "twin")))
        assert {(status, headers["Docker-Content-Digest"]) for status, headers, _ in answers} \
            == {(200, source.small.digest)}
        blobs = [p for p in proxy.paths if "/blobs/" in p]
        assert len(blobs) == 3 and len(set(blobs)) == 3, proxy.paths   # config and 2 layers
    finally:
        proxy.blobs_go.set()
        await proxy.stop()


async def test_pulls_past_the_node_cap_on_upstream_fetches_are_refused_429(
        source, tmp_path, monkeypatch):
    """An in-process node whose cap is one fetch, waited for 0.2 s (the
    shipped 8 and 10 s, scaled down): one pull held upstream, another of a
    different tag waits, then is refused with Retry-After, never asking."""
    monkeypatch.setattr(pull_through, "PARALLEL_FETCHES", 1)
    monkeypatch.setattr(pull_through, "FETCH_SLOT_WAIT_S", 0.2)
    node = await start_node(NodeConfig(data_dir=tmp_path / "node", port=0))
    proxy = HeldProxy(source.registry.url)
    host = await proxy.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.put(f"{node.url}/georeg/v1/configuration/cache-rule/capped",
                                json={"source_repo": f"{host}/*", "target_repo": "capped/*"}) as r:
                assert r.status == 200, await r.text()

            async def pull(ref: str) -> tuple[int, dict, bytes]:
                async with http.get(f"{node.url}/v2/capped/small/manifests/{ref}") as r:
                    return r.status, dict(r.headers), await r.read()
            first = asyncio.ensure_future(pull("1.0"))
            await eventually(lambda: proxy.requests == 1, what="the first fetch upstream")
            status, headers, body = await pull("twin")
            assert status == 429 and b"TOOMANYREQUESTS" in body, body
            assert headers["Retry-After"] == str(pull_through.FETCH_RETRY_AFTER_S)
            assert proxy.paths == ["/v2/small/manifests/1.0"]
            proxy.release.set()
            status, _, body = await first
            assert status == 424, body
    finally:
        proxy.release.set()
        await proxy.stop()
        await node.stop()


async def test_a_missing_upstream_tag_is_asked_for_once_within_the_negative_cache_time(
        running, source):
    proxy = CountingProxy(source.registry.url)
    host = await proxy.start()
    try:
        await create_rule(running, "absent", f"{host}/small", "absent/small")
        # pull_through.NOT_FOUND_TTL_S is 30 s: these three pulls are well within it.
        for _ in range(3):
            status, _, body = await get_manifest(running, "westeurope", "absent/small", "nope")
            assert status == 404 and b"MANIFEST_UNKNOWN" in body, body
        assert proxy.paths.count("/v2/small/manifests/nope") == 1, proxy.paths
        # Per reference: another missing tag is still asked for.
        status, _, _ = await get_manifest(running, "westeurope", "absent/small", "other")
        assert status == 404 and proxy.paths.count("/v2/small/manifests/other") == 1
    finally:
        await proxy.stop()


async def test_bad_input_is_a_clear_error_and_changes_nothing(running):
    before = json.loads((await asyncio.to_thread(cli, running, "cache", "list", "--json")).stdout)
    for args, expected in [
        (("--source-repo", "alpine", "--target-repo", "alpine"), "HOST/REPOSITORY"),
        (("--source-repo", "r.example.com/a:1", "--target-repo", "a"), "without a tag"),
        (("--source-repo", "r.example.com/*", "--target-repo", "a"), "both end in /*"),
        (("--source-repo", "r.example.com/a", "--target-repo", "Bad"), "not a repository name"),
        (("--source-repo", "r.example.com/a", "--target-repo", "a", "--cred-set", "nope"),
         "no credential set 'nope'"),
    ]:
        done = await asyncio.to_thread(cli, running, "cache", "create", "--name", "bad-rule",
                                       *args)
        assert done.returncode == 2 and expected in done.stderr, (args, done.stderr)
    bad_name = await asyncio.to_thread(cli, running, "cache", "create", "--name", "no/slash",
                                       "--source-repo", "r.example.com/a", "--target-repo", "a")
    assert bad_name.returncode == 2 and "letters, digits and hyphens" in bad_name.stderr
    missing = await asyncio.to_thread(cli, running, "cache", "show", "--name", "nothere")
    assert missing.returncode == 2 and "no cache rule 'nothere'" in missing.stderr
    after = json.loads((await asyncio.to_thread(cli, running, "cache", "list", "--json")).stdout)
    assert after == before
