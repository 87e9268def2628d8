"""Interoperability with real OCI clients: skopeo (containers/image, Go) and
oras-py, against a real node on loopback.

skopeo runs with a private HOME, auth file, policy, registries.conf and temp
dir, so the machine's container configuration is neither read nor touched,
and every run has a timeout. Images are built as OCI layouts on disk with
gzip layers (what a registry normally holds), so no client recompresses them
and digests can be compared end to end: source, registry, pulled copy.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import random
import tempfile
from pathlib import Path

import oras.client
import oras.oci
import pytest

from .helpers import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    Skopeo,
    descriptor,
    digest_of,
    push_image,
    tar_layer,
    write_oci_layout,
)

pytestmark = pytest.mark.interop

OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


# -- building and reading OCI layouts ------------------------------------------------


def gzip_image(seed: int, sizes: list[int], arch: str = "amd64") -> Image:
    """An image whose layers are gzipped tars, with correct diff_ids in its config."""
    rng = random.Random(seed)
    tars = [tar_layer({f"layer{i}/data.bin": rng.randbytes(n)}) for i, n in enumerate(sizes)]
    layers = [gzip.compress(t, mtime=0) for t in tars]
    config = json.dumps({
        "architecture": arch, "os": "linux", "config": {"Env": [f"SEED={seed}"]},
        "rootfs": {"type": "layers", "diff_ids": [digest_of(t) for t in tars]},
    }).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor(config, OCI_CONFIG),
        "layers": [descriptor(x, OCI_LAYER_GZIP) for x in layers],
    }).encode()
    return Image(config, layers, manifest)


def write_index_layout(path: Path, images: dict[str, Image], tag: str) -> bytes:
    """An OCI layout whose tag names an index of ``images`` (arch → image)."""
    for arch, image in images.items():
        write_oci_layout(path, image, tag=f"{tag}-{arch}")   # puts the blobs in place
    index = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{**descriptor(image.manifest, OCI_MANIFEST),
                       "platform": {"architecture": arch, "os": "linux"}}
                      for arch, image in images.items()],
    }).encode()
    (path / "blobs" / "sha256" / digest_of(index).split(":")[1]).write_bytes(index)
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        **descriptor(index, OCI_INDEX), "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return index


def layout_blob(path: Path, digest: str) -> bytes:
    return (path / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()


def layout_tagged(path: Path, tag: str) -> dict:
    """The descriptor a layout's index.json gives for ``tag``."""
    for entry in json.loads((path / "index.json").read_text())["manifests"]:
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return entry
    raise AssertionError(f"{tag} not in {path}/index.json")


# -- running skopeo -------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _scratch_in_tmp_path(monkeypatch, tmp_path):
    """oras-py tars a pushed directory into the system temp dir and never
    removes it: keep such scratch files inside the test's own temp dir."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))


@pytest.fixture
def skopeo(node, tmp_path) -> Skopeo:
    return Skopeo(tmp_path / "skopeo", node.url.removeprefix("http://"))


# -- registry-side checks -------------------------------------------------------------


async def registry_manifest(http, node, repo: str, ref: str) -> tuple[bytes, str, str]:
    """(body, Docker-Content-Digest, Content-Type) as the node serves them."""
    async with http.get(f"{node.url}/v2/{repo}/manifests/{ref}", headers={"Accept": ", ".join(
            [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST])}) as r:
        assert r.status == 200, await r.text()
        body = await r.read()
        return body, r.headers["Docker-Content-Digest"], r.headers["Content-Type"]


async def assert_blobs_served(http, node, repo: str, blobs: list[bytes]) -> None:
    for blob in blobs:
        async with http.get(f"{node.url}/v2/{repo}/blobs/{digest_of(blob)}") as r:
            assert r.status == 200, await r.text()
            assert r.headers["Docker-Content-Digest"] == digest_of(blob)
            assert await r.read() == blob


# -- skopeo ------------------------------------------------------------------------------


async def test_skopeo_copies_a_multi_layer_oci_image_in_and_out_unchanged(node, http, skopeo, tmp_path):
    image = gzip_image(1, [1_300_000, 40_000, 1_700_000, 3_000])
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_oci_layout(src, image, tag="v1")

    await skopeo.copy(f"oci:{src}:v1", skopeo.ref("interop/app:v1"), "--preserve-digests")
    body, digest, ctype = await registry_manifest(http, node, "interop/app", "v1")
    assert (body, digest, ctype) == (image.manifest, image.digest, OCI_MANIFEST)
    await assert_blobs_served(http, node, "interop/app", image.blobs)

    await skopeo.copy(skopeo.ref("interop/app:v1"), f"oci:{dst}:v1", "--preserve-digests")
    pulled = layout_tagged(dst, "v1")
    assert pulled["digest"] == image.digest and pulled["mediaType"] == OCI_MANIFEST
    assert layout_blob(dst, image.digest) == image.manifest
    for blob in image.blobs:
        assert layout_blob(dst, digest_of(blob)) == blob

    assert await skopeo.inspect_raw(skopeo.ref("interop/app:v1")) == image.manifest
    info = await skopeo.inspect(skopeo.ref("interop/app:v1"))
    assert info["Digest"] == image.digest
    assert info["Layers"] == [digest_of(x) for x in image.layers]
    assert info["Architecture"] == "amd64"

    # A second tag: every blob is already there (skopeo finds them with HEAD).
    await skopeo.copy(f"oci:{src}:v1", skopeo.ref("interop/app:v1.0"), "--preserve-digests")
    assert await skopeo.list_tags("interop/app") == ["v1", "v1.0"]
    _, digest, _ = await registry_manifest(http, node, "interop/app", "v1.0")
    assert digest == image.digest


async def test_skopeo_docker_schema2_round_trip_inspect_and_delete(node, http, skopeo, tmp_path):
    image = gzip_image(2, [1_100_000, 20_000, 500_000])
    src, out = tmp_path / "src", tmp_path / "out"
    write_oci_layout(src, image, tag="v1")

    await skopeo.copy(f"oci:{src}:v1", skopeo.ref("interop/docker:v2s2"), "--format", "v2s2")
    raw = await skopeo.inspect_raw(skopeo.ref("interop/docker:v2s2"))
    doc = json.loads(raw)
    assert doc["mediaType"] == DOCKER_MANIFEST
    assert doc["config"] == descriptor(image.config, DOCKER_CONFIG)
    assert [(x["mediaType"], x["digest"], x["size"]) for x in doc["layers"]] == \
        [(DOCKER_LAYER_GZIP, digest_of(x), len(x)) for x in image.layers]
    body, digest, ctype = await registry_manifest(http, node, "interop/docker", "v2s2")
    assert (body, digest, ctype) == (raw, digest_of(raw), DOCKER_MANIFEST)

    # Pulled back as is (the dir: transport keeps the manifest byte for byte).
    await skopeo.copy(skopeo.ref("interop/docker:v2s2"), f"dir:{out}")
    assert (out / "manifest.json").read_bytes() == raw
    for blob in image.blobs:
        assert (out / digest_of(blob).split(":")[1]).read_bytes() == blob

    # The OCI original beside it; deleting the schema 2 one leaves the OCI one whole.
    await skopeo.copy(f"oci:{src}:v1", skopeo.ref("interop/docker:oci"), "--preserve-digests")
    assert await skopeo.list_tags("interop/docker") == ["oci", "v2s2"]
    await skopeo.delete(skopeo.ref("interop/docker:v2s2"))
    assert await skopeo.list_tags("interop/docker") == ["oci"]
    async with http.get(f"{node.url}/v2/interop/docker/manifests/{digest}") as r:
        assert r.status == 404
    code, _, err = await skopeo.run("inspect", "--raw", "--tls-verify=false", "--authfile",
                                    str(skopeo.auth), skopeo.ref("interop/docker:v2s2"), check=False)
    assert code != 0 and "manifest unknown" in err.lower(), err
    assert await skopeo.inspect_raw(skopeo.ref("interop/docker:oci")) == image.manifest
    await assert_blobs_served(http, node, "interop/docker", image.blobs)


async def test_skopeo_copies_a_multi_arch_index_with_all(node, http, skopeo, tmp_path):
    images = {"amd64": gzip_image(3, [600_000, 10_000], "amd64"),
              "arm64": gzip_image(4, [700_000], "arm64")}
    src, dst, one = tmp_path / "src", tmp_path / "dst", tmp_path / "one"
    index = write_index_layout(src, images, tag="multi")

    await skopeo.copy(f"oci:{src}:multi", skopeo.ref("interop/multi:v1"), "--all", "--preserve-digests")
    body, digest, ctype = await registry_manifest(http, node, "interop/multi", "v1")
    assert (body, digest, ctype) == (index, digest_of(index), OCI_INDEX)
    for image in images.values():
        child, child_digest, _ = await registry_manifest(http, node, "interop/multi", image.digest)
        assert (child, child_digest) == (image.manifest, image.digest)
        await assert_blobs_served(http, node, "interop/multi", image.blobs)
    assert await skopeo.inspect_raw(skopeo.ref("interop/multi:v1")) == index

    await skopeo.copy(skopeo.ref("interop/multi:v1"), f"oci:{dst}:multi", "--all", "--preserve-digests")
    assert layout_tagged(dst, "multi")["digest"] == digest_of(index)
    assert layout_blob(dst, digest_of(index)) == index
    for image in images.values():
        assert layout_blob(dst, image.digest) == image.manifest
        for blob in image.blobs:
            assert layout_blob(dst, digest_of(blob)) == blob

    # Without --all, a client picks its platform out of the index.
    await skopeo.run("--override-arch", "arm64", "--override-os", "linux", "copy", "--quiet",
                     "--authfile", str(skopeo.auth), "--src-tls-verify=false", "--preserve-digests",
                     skopeo.ref("interop/multi:v1"), f"oci:{one}:arm")
    assert layout_tagged(one, "arm")["digest"] == images["arm64"].digest


# -- oras-py ---------------------------------------------------------------------------------


def oras_client(node) -> oras.client.OrasClient:
    client = oras.client.OrasClient(hostname=node.url.removeprefix("http://"), insecure=True)
    client.session.trust_env = False        # loopback only, whatever the environment says
    return client


async def test_oras_pushes_and_pulls_an_artifact_and_finds_its_referrers(node, http, tmp_path):
    host = node.url.removeprefix("http://")
    client = oras_client(node)
    rng = random.Random(5)
    files = tmp_path / "files"
    files.mkdir()
    readme = files / "README.md"
    readme.write_text("# model card\n\nweights for the interop test\n" * 50)
    weights = files / "weights.bin"
    weights.write_bytes(rng.randbytes(1_500_000))
    config = files / "config.json"
    config.write_text(json.dumps({"framework": "none", "version": 3}))
    annotation_file = files / "annotations.json"
    annotation_file.write_text(json.dumps({
        str(weights): {"org.example.weights.dtype": "float16"},
        "$manifest": {"org.example.from-file": "yes"},
    }))
    artifact_config_type = "application/vnd.example.model.config.v1+json"

    response = await asyncio.to_thread(
        client.push, target=f"{host}/interop/model:v1", disable_path_validation=True,
        files=[f"{readme}:application/vnd.example.readme.v1+markdown",
               f"{weights}:application/vnd.example.weights.v1.bin"],
        manifest_config=f"{config}:{artifact_config_type}",
        annotation_file=str(annotation_file),
        manifest_annotations={"org.opencontainers.image.description": "an interop artifact"},
        do_chunked=True, chunk_size=512 * 1024, quiet=True)
    assert response.status_code == 201, response.text
    model_digest = response.headers["Docker-Content-Digest"]

    # What the node stores is what oras pushed.
    body, digest, ctype = await registry_manifest(http, node, "interop/model", "v1")
    assert (digest, ctype) == (model_digest, OCI_MANIFEST) and digest_of(body) == digest
    manifest = json.loads(body)
    assert manifest["config"]["mediaType"] == artifact_config_type
    assert [x["mediaType"] for x in manifest["layers"]] == [
        "application/vnd.example.readme.v1+markdown", "application/vnd.example.weights.v1.bin"]
    assert manifest["layers"][1]["annotations"] == {
        "org.opencontainers.image.title": "weights.bin", "org.example.weights.dtype": "float16"}
    assert manifest["annotations"] == {"org.example.from-file": "yes",
                                       "org.opencontainers.image.description": "an interop artifact"}
    await assert_blobs_served(http, node, "interop/model",
                              [readme.read_bytes(), weights.read_bytes(), config.read_bytes()])

    pulled_dir = tmp_path / "pulled"
    pulled = await asyncio.to_thread(client.pull, target=f"{host}/interop/model:v1",
                                     outdir=str(pulled_dir))
    assert sorted(Path(p).name for p in pulled) == ["README.md", "weights.bin"]
    assert (pulled_dir / "README.md").read_bytes() == readme.read_bytes()
    assert (pulled_dir / "weights.bin").read_bytes() == weights.read_bytes()
    fetched = await asyncio.to_thread(client.get_manifest, f"{host}/interop/model@{model_digest}")
    assert fetched == manifest
    assert await asyncio.to_thread(client.get_tags, f"{host}/interop/model") == ["v1"]

    # Referrers: a signature and an SBOM attached to an image, pushed by oras with a subject.
    image = gzip_image(6, [30_000])
    image_digest = await push_image(http, node.url, "interop/model", image, tag="app")
    subject = oras.oci.Subject(mediaType=OCI_MANIFEST, digest=image_digest, size=len(image.manifest))
    pushed: dict[str, str] = {}
    for kind, payload in (("signature", b"not really a signature"), ("sbom", b'{"packages": []}')):
        path = files / f"{kind}.dat"
        path.write_bytes(payload)
        kind_config = files / f"{kind}-config.json"
        kind_config.write_text("{}")
        response = await asyncio.to_thread(
            client.push, target=f"{host}/interop/model:{kind}", disable_path_validation=True,
            files=[f"{path}:application/vnd.example.{kind}.v1"],
            manifest_config=f"{kind_config}:application/vnd.example.{kind}.v1+json",
            manifest_annotations={"org.example.kind": kind}, subject=subject, quiet=True)
        assert response.status_code == 201, response.text
        assert response.headers.get("OCI-Subject") == image_digest
        pushed[kind] = response.headers["Docker-Content-Digest"]

    async with http.get(f"{node.url}/v2/interop/model/referrers/{image_digest}") as r:
        assert r.status == 200 and r.headers["Content-Type"] == OCI_INDEX
        listed = await r.json()
    assert listed["mediaType"] == OCI_INDEX
    by_digest = {d["digest"]: d for d in listed["manifests"]}
    assert set(by_digest) == set(pushed.values())
    for kind, referrer_digest in pushed.items():
        entry = by_digest[referrer_digest]
        assert entry["artifactType"] == f"application/vnd.example.{kind}.v1+json"
        assert entry["mediaType"] == OCI_MANIFEST
        assert entry["annotations"] == {"org.example.kind": kind}
        body, _, _ = await registry_manifest(http, node, "interop/model", referrer_digest)
        assert entry["size"] == len(body)
        assert json.loads(body)["subject"]["digest"] == image_digest

    async with http.get(f"{node.url}/v2/interop/model/referrers/{image_digest}",
                        params={"artifactType": "application/vnd.example.sbom.v1+json"}) as r:
        assert r.status == 200 and r.headers.get("OCI-Filters-Applied") == "artifactType"
        filtered = await r.json()
    assert [d["digest"] for d in filtered["manifests"]] == [pushed["sbom"]]
    # The artifact itself has no referrers: an empty index, not a 404.
    async with http.get(f"{node.url}/v2/interop/model/referrers/{model_digest}") as r:
        assert r.status == 200 and (await r.json())["manifests"] == []


async def test_oras_monolithic_push_of_a_directory_and_pull_by_digest(node, http, tmp_path):
    """oras-py's default path (POST then PUT with the whole body) and a
    directory, which it tars and gzips itself."""
    client = oras_client(node)
    host = node.url.removeprefix("http://")
    tree = tmp_path / "site"
    (tree / "css").mkdir(parents=True)
    (tree / "index.html").write_text("<h1>hello</h1>\n" * 100)
    (tree / "css" / "style.css").write_bytes(os.urandom(50_000))
    response = await asyncio.to_thread(client.push, target=f"{host}/interop/site:v1",
                                       files=[str(tree)], disable_path_validation=True, quiet=True)
    assert response.status_code == 201, response.text
    digest = response.headers["Docker-Content-Digest"]
    out = tmp_path / "out"
    await asyncio.to_thread(client.pull, target=f"{host}/interop/site@{digest}", outdir=str(out))
    assert (out / "site" / "index.html").read_text() == (tree / "index.html").read_text()
    assert (out / "site" / "css" / "style.css").read_bytes() == \
        (tree / "css" / "style.css").read_bytes()
    body, served_digest, _ = await registry_manifest(http, node, "interop/site", "v1")
    assert served_digest == digest == "sha256:" + hashlib.sha256(body).hexdigest()


async def test_oras_sees_registry_errors_for_missing_content(node):
    client = oras_client(node)
    host = node.url.removeprefix("http://")
    with pytest.raises(ValueError, match="(?i)not found"):
        await asyncio.to_thread(client.get_manifest, f"{host}/interop/absent:v1")
    exists = await asyncio.to_thread(
        client.blob_exists, {"digest": digest_of(b"nothing")}, client.get_container(f"{host}/interop/absent"))
    assert exists is False
