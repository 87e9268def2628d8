"""end-3, end-7 and end-9 through a real node: manifests by tag and digest,
every manifest kind the node accepts, every way a push is refused, deletion
and its guards.
"""

from __future__ import annotations

import json

import pytest

from .helpers import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    assert_error,
    descriptor,
    digest_of,
    make_image,
    push_blob,
    push_image,
)

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MiB = 1024 * 1024


async def put(http, base, repo, ref, body: bytes, content_type: str | None):
    headers = {"Content-Type": content_type} if content_type else {}
    async with http.put(f"{base}/v2/{repo}/manifests/{ref}", data=body, headers=headers) as r:
        await r.read()
        return r


async def get(http, base, repo, ref, method="GET", **headers):
    async with http.request(method, f"{base}/v2/{repo}/manifests/{ref}", headers=headers) as r:
        return r, await r.read()


async def tags(http, base, repo) -> list[str]:
    async with http.get(f"{base}/v2/{repo}/tags/list") as r:
        assert r.status == 200, await r.text()
        return (await r.json())["tags"]


def index_of(*children: tuple[bytes, str], media_type: str = OCI_INDEX, **extra) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": media_type,
           "manifests": [{**descriptor(body, mt), "platform": {"architecture": f"arch{i}",
                                                              "os": "linux"}}
                         for i, (body, mt) in enumerate(children)], **extra}
    return json.dumps(doc).encode()


# -- GET / HEAD --------------------------------------------------------------------


async def test_get_and_head_by_tag_and_digest_are_byte_exact(node, http):
    image = make_image([100, 200], seed=1)
    # Odd but valid formatting: the node must not re-serialise.
    body = json.dumps(json.loads(image.manifest), indent=3, sort_keys=True).encode() + b"\n"
    image.manifest = body
    for blob in image.blobs:
        await push_blob(http, node.url, "app/web", blob)
    r = await put(http, node.url, "app/web", "v1", body, OCI_MANIFEST)
    assert r.status == 201
    for ref in ("v1", digest_of(body)):
        r, got = await get(http, node.url, "app/web", ref)
        assert r.status == 200
        assert got == body
        assert r.headers["Content-Type"] == OCI_MANIFEST
        assert r.headers["Docker-Content-Digest"] == digest_of(body)
        assert int(r.headers["Content-Length"]) == len(body)
        r, got = await get(http, node.url, "app/web", ref, method="HEAD")
        assert r.status == 200 and got == b""
        assert r.headers["Content-Type"] == OCI_MANIFEST
        assert r.headers["Docker-Content-Digest"] == digest_of(body)
        assert int(r.headers["Content-Length"]) == len(body)


async def test_unknown_manifest_is_404_manifest_unknown(node, http):
    await push_image(http, node.url, "app/web", make_image(seed=2), tag="v1")
    for ref in ("v2", digest_of(b"nothing")):
        r, _ = await get(http, node.url, "app/web", ref)
        assert r.status == 404
        async with http.get(f"{node.url}/v2/app/web/manifests/{ref}") as r:
            await assert_error(r, 404, "MANIFEST_UNKNOWN")
        r, _ = await get(http, node.url, "app/web", ref, method="HEAD")
        assert r.status == 404
    # The same tag in another repository is another tag.
    async with http.get(f"{node.url}/v2/app/other/manifests/v1") as r:
        await assert_error(r, 404, "MANIFEST_UNKNOWN")


@pytest.mark.parametrize("tag", ["-dash", ".dot", "a" * 129, "a+b", "tag@x"])
async def test_invalid_tag_on_get_and_head_is_404(node, http, tag):
    async with http.get(f"{node.url}/v2/app/web/manifests/{tag}") as r:
        await assert_error(r, 404, "MANIFEST_UNKNOWN")
    async with http.head(f"{node.url}/v2/app/web/manifests/{tag}") as r:
        assert r.status == 404


async def test_invalid_digest_reference_on_get_is_400(node, http):
    async with http.get(f"{node.url}/v2/app/web/manifests/sha256:abc") as r:
        await assert_error(r, 400, "DIGEST_INVALID")


async def test_if_none_match_gives_304(node, http):
    image = make_image(seed=3)
    await push_image(http, node.url, "app/web", image, tag="v1")
    etag = f'"{image.digest}"'
    for ref in ("v1", image.digest):
        r, body = await get(http, node.url, "app/web", ref, **{"If-None-Match": etag})
        assert r.status == 304 and body == b""
        assert r.headers["Docker-Content-Digest"] == image.digest
        r, body = await get(http, node.url, "app/web", ref, method="HEAD",
                            **{"If-None-Match": etag})
        assert r.status == 304
    # RFC 9110: a list of entity tags, weak comparison, and "*" all match.
    for header in (f'"sha256:other", {etag}', f"W/{etag}", "*"):
        r, body = await get(http, node.url, "app/web", "v1", **{"If-None-Match": header})
        assert r.status == 304, header
    for header in ('"sha256:other"', '"v1"', image.digest):
        r, body = await get(http, node.url, "app/web", "v1", **{"If-None-Match": header})
        assert r.status == 200 and body == image.manifest, header
        assert r.headers["ETag"] == etag
    # A manifest that does not exist is still a 404, whatever If-None-Match says.
    async with http.get(f"{node.url}/v2/app/web/manifests/nope", headers={"If-None-Match": "*"}) as r:
        await assert_error(r, 404, "MANIFEST_UNKNOWN")


# -- PUT -----------------------------------------------------------------------


async def test_put_returns_201_location_and_digest(node, http):
    image = make_image(seed=4)
    for blob in image.blobs:
        await push_blob(http, node.url, "app/put", blob)
    r = await put(http, node.url, "app/put", "latest", image.manifest, OCI_MANIFEST)
    assert r.status == 201
    assert r.headers["Location"] == f"/v2/app/put/manifests/{image.digest}"
    assert r.headers["Docker-Content-Digest"] == image.digest
    assert "OCI-Subject" not in r.headers
    # Pushing the same thing again is fine, and idempotent.
    r = await put(http, node.url, "app/put", "latest", image.manifest, OCI_MANIFEST)
    assert r.status == 201 and r.headers["Docker-Content-Digest"] == image.digest


async def test_put_by_digest(node, http):
    image = make_image(seed=5)
    for blob in image.blobs:
        await push_blob(http, node.url, "app/put", blob)
    r = await put(http, node.url, "app/put", image.digest, image.manifest, OCI_MANIFEST)
    assert r.status == 201
    assert r.headers["Docker-Content-Digest"] == image.digest
    r, body = await get(http, node.url, "app/put", image.digest)
    assert r.status == 200 and body == image.manifest
    assert await tags(http, node.url, "app/put") == []


async def test_put_by_sha512_digest(node, http):
    image = make_image(seed=6)
    for blob in image.blobs:
        await push_blob(http, node.url, "app/put", blob)
    digest = digest_of(image.manifest, "sha512")
    r = await put(http, node.url, "app/put", digest, image.manifest, OCI_MANIFEST)
    assert r.status == 201
    assert r.headers["Docker-Content-Digest"] == digest
    r, body = await get(http, node.url, "app/put", digest)
    assert r.status == 200 and body == image.manifest


async def test_put_with_mismatched_digest_is_400(node, http):
    image = make_image(seed=7)
    for blob in image.blobs:
        await push_blob(http, node.url, "app/put", blob)
    wrong = digest_of(image.manifest + b" ")
    async with http.put(f"{node.url}/v2/app/put/manifests/{wrong}", data=image.manifest,
                        headers={"Content-Type": OCI_MANIFEST}) as r:
        await assert_error(r, 400, "DIGEST_INVALID")
    for ref in (wrong, image.digest):
        r, _ = await get(http, node.url, "app/put", ref)
        assert r.status == 404


@pytest.mark.parametrize("tag", ["-dash", ".dot", "a" * 129, "a+b"])
async def test_put_with_invalid_tag_is_400(node, http, tag):
    image = make_image(seed=8)
    for blob in image.blobs:
        await push_blob(http, node.url, "app/put", blob)
    async with http.put(f"{node.url}/v2/app/put/manifests/{tag}", data=image.manifest,
                        headers={"Content-Type": OCI_MANIFEST}) as r:
        await assert_error(r, 400, "MANIFEST_INVALID")
    r, _ = await get(http, node.url, "app/put", image.digest)
    assert r.status == 404


async def test_longest_valid_tag_is_accepted(node, http):
    tag = "_" + "a.b-C" * 25 + "xy"
    assert len(tag) == 128
    image = make_image(seed=9)
    await push_image(http, node.url, "app/put", image, tag=tag)
    r, body = await get(http, node.url, "app/put", tag)
    assert r.status == 200 and body == image.manifest


@pytest.mark.parametrize("with_existing_subject", [True, False])
async def test_put_with_subject_returns_oci_subject(node, http, with_existing_subject):
    subject = make_image(seed=10)
    if with_existing_subject:
        await push_image(http, node.url, "app/sig", subject, tag="v1")
    sig = make_image([50], seed=11, subject=descriptor(subject.manifest, OCI_MANIFEST),
                     artifact_type="application/vnd.example.sig")
    for blob in sig.blobs:
        await push_blob(http, node.url, "app/sig", blob)
    r = await put(http, node.url, "app/sig", sig.digest, sig.manifest, OCI_MANIFEST)
    assert r.status == 201
    assert r.headers["OCI-Subject"] == subject.digest
    assert r.headers["Docker-Content-Digest"] == sig.digest
    async with http.get(f"{node.url}/v2/app/sig/referrers/{subject.digest}") as r:
        assert r.status == 200
        assert [m["digest"] for m in (await r.json())["manifests"]] == [sig.digest]


async def test_docker_schema2_manifest_and_manifest_list(node, http):
    children = []
    for seed in (12, 13):
        config = json.dumps({"architecture": f"a{seed}", "os": "linux"}).encode()
        layer = bytes([seed]) * 3000
        for blob in (config, layer):
            await push_blob(http, node.url, "docker/app", blob)
        body = json.dumps({
            "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
            "config": descriptor(config, DOCKER_CONFIG),
            "layers": [descriptor(layer, DOCKER_LAYER)],
        }, indent=3).encode()
        r = await put(http, node.url, "docker/app", digest_of(body), body, DOCKER_MANIFEST)
        assert r.status == 201
        children.append((body, DOCKER_MANIFEST))
    listing = index_of(*children, media_type=DOCKER_LIST)
    r = await put(http, node.url, "docker/app", "latest", listing, DOCKER_LIST)
    assert r.status == 201
    r, body = await get(http, node.url, "docker/app", "latest")
    assert r.status == 200 and body == listing
    assert r.headers["Content-Type"] == DOCKER_LIST
    r, body = await get(http, node.url, "docker/app", digest_of(children[0][0]))
    assert r.status == 200 and body == children[0][0]
    assert r.headers["Content-Type"] == DOCKER_MANIFEST


async def test_oci_index_and_nested_index(node, http):
    images = [make_image([64], seed=s) for s in (14, 15)]
    for image in images:
        await push_image(http, node.url, "oci/app", image)
    inner = index_of(*[(i.manifest, OCI_MANIFEST) for i in images])
    r = await put(http, node.url, "oci/app", "inner", inner, OCI_INDEX)
    assert r.status == 201
    outer = index_of((inner, OCI_INDEX), annotations={"x": "y"})
    r = await put(http, node.url, "oci/app", "outer", outer, OCI_INDEX)
    assert r.status == 201
    for tag, body in (("inner", inner), ("outer", outer)):
        r, got = await get(http, node.url, "oci/app", tag)
        assert r.status == 200 and got == body
        assert r.headers["Content-Type"] == OCI_INDEX


async def test_manifest_without_content_type_uses_its_media_type(node, http):
    image = make_image(seed=16)
    for blob in image.blobs:
        await push_blob(http, node.url, "app/ct", blob)
    for content_type in ("application/json", "application/octet-stream"):
        r = await put(http, node.url, "app/ct", "t", image.manifest, content_type)
        assert r.status == 201
        r, _ = await get(http, node.url, "app/ct", "t")
        assert r.headers["Content-Type"] == OCI_MANIFEST


@pytest.mark.parametrize("content_type", [
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
    None,
])
async def test_schema1_is_refused_with_a_helpful_message(node, http, content_type):
    body = json.dumps({"schemaVersion": 1, "name": "app/old", "tag": "v1", "architecture": "amd64",
                       "fsLayers": [{"blobSum": digest_of(b"x")}], "history": [],
                       "signatures": []}).encode()
    async with http.put(f"{node.url}/v2/app/old/manifests/v1", data=body,
                        headers={"Content-Type": content_type or OCI_MANIFEST}) as r:
        error = await assert_error(r, 400, "MANIFEST_INVALID")
    text = (error["message"] + " " + str(error.get("detail", ""))).lower()
    assert "schema 1" in text and "v2s2" in text
    r, _ = await get(http, node.url, "app/old", "v1")
    assert r.status == 404


async def test_missing_layer_or_config_is_manifest_blob_unknown(node, http):
    image = make_image([500, 600], seed=17)
    config, *layers = image.blobs
    await push_blob(http, node.url, "app/miss", config)
    await push_blob(http, node.url, "app/miss", layers[0])
    async with http.put(f"{node.url}/v2/app/miss/manifests/v1", data=image.manifest,
                        headers={"Content-Type": OCI_MANIFEST}) as r:
        error = await assert_error(r, 400, "MANIFEST_BLOB_UNKNOWN")
        assert digest_of(layers[1]) in json.dumps(error)
    # Config missing, layers present.
    image2 = make_image([700], seed=18)
    await push_blob(http, node.url, "app/miss", image2.layers[0])
    async with http.put(f"{node.url}/v2/app/miss/manifests/v2", data=image2.manifest,
                        headers={"Content-Type": OCI_MANIFEST}) as r:
        await assert_error(r, 400, "MANIFEST_BLOB_UNKNOWN")
    # Blobs present in another repository do not count.
    image3 = make_image([800], seed=19)
    await push_image(http, node.url, "app/elsewhere", image3)
    async with http.put(f"{node.url}/v2/app/miss/manifests/v3", data=image3.manifest,
                        headers={"Content-Type": OCI_MANIFEST}) as r:
        await assert_error(r, 400, "MANIFEST_BLOB_UNKNOWN")
    assert await tags(http, node.url, "app/miss") == []


async def test_index_with_missing_child_is_manifest_blob_unknown(node, http):
    present, absent = make_image(seed=20), make_image(seed=21)
    await push_image(http, node.url, "app/idx", present)
    for blob in absent.blobs:      # blobs of the child are there, its manifest is not
        await push_blob(http, node.url, "app/idx", blob)
    body = index_of((present.manifest, OCI_MANIFEST), (absent.manifest, OCI_MANIFEST))
    async with http.put(f"{node.url}/v2/app/idx/manifests/multi", data=body,
                        headers={"Content-Type": OCI_INDEX}) as r:
        error = await assert_error(r, 400, "MANIFEST_BLOB_UNKNOWN")
        assert absent.digest in json.dumps(error)
    r, _ = await get(http, node.url, "app/idx", "multi")
    assert r.status == 404


async def test_content_type_and_media_type_mismatch_is_invalid(node, http):
    image = make_image(seed=22)
    for blob in image.blobs:
        await push_blob(http, node.url, "app/mm", blob)
    for content_type in (OCI_INDEX, DOCKER_MANIFEST, "application/vnd.example.unknown+json"):
        async with http.put(f"{node.url}/v2/app/mm/manifests/v1", data=image.manifest,
                            headers={"Content-Type": content_type}) as r:
            await assert_error(r, 400, "MANIFEST_INVALID")
    r, _ = await get(http, node.url, "app/mm", "v1")
    assert r.status == 404


def _valid_doc() -> dict:
    return {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": digest_of(b"{}"), "size": 2},
            "layers": [{"mediaType": OCI_LAYER, "digest": digest_of(b"l"), "size": 1}]}


def _mutated(path: tuple, value) -> bytes:
    doc = _valid_doc()
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(doc).encode()


_DELETE = object()

INVALID_BODIES = {
    "not json": b"{not json",
    "truncated": json.dumps(_valid_doc()).encode()[:-3],
    "invalid utf-8": b'{"schemaVersion": 2, "x": "\xff\xfe"}',
    "array": b"[1, 2, 3]",
    "string": b'"manifest"',
    "null": b"null",
    "number": b"2",
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "schemaVersion 3": _mutated(("schemaVersion",), 3),
    "schemaVersion string": _mutated(("schemaVersion",), "2"),
    "schemaVersion true": _mutated(("schemaVersion",), True),
    "no schemaVersion": _mutated(("schemaVersion",), _DELETE),
    "mediaType number": _mutated(("mediaType",), 5),
    "no config": _mutated(("config",), _DELETE),
    "config string": _mutated(("config",), "sha256:abc"),
    "config digest bad": _mutated(("config", "digest"), "sha256:XYZ"),
    "config digest md5": _mutated(("config", "digest"), "md5:" + "a" * 32),
    "config no digest": _mutated(("config", "digest"), _DELETE),
    "config size negative": _mutated(("config", "size"), -1),
    "config size float": _mutated(("config", "size"), 1.5),
    "config size string": _mutated(("config", "size"), "2"),
    "config size bool": _mutated(("config", "size"), True),
    "config no mediaType": _mutated(("config", "mediaType"), _DELETE),
    "config empty mediaType": _mutated(("config", "mediaType"), ""),
    "layers not a list": _mutated(("layers",), {"a": 1}),
    "no layers": _mutated(("layers",), _DELETE),
    "layer not an object": _mutated(("layers",), ["sha256:" + "a" * 64]),
    "layer annotations not strings": _mutated(("layers",), [{
        "mediaType": OCI_LAYER, "digest": digest_of(b"l"), "size": 1, "annotations": {"a": 1}}]),
    "annotations a list": _mutated(("annotations",), ["a"]),
    "annotations values not strings": _mutated(("annotations",), {"a": None}),
    "artifactType number": _mutated(("artifactType",), 7),
    "subject not a descriptor": _mutated(("subject",), "sha256:" + "a" * 64),
    "subject bad digest": _mutated(("subject",), {"mediaType": OCI_MANIFEST, "digest": "x",
                                                  "size": 1}),
    "unknown mediaType": _mutated(("mediaType",), "application/vnd.example+json"),
}


@pytest.mark.parametrize("name", list(INVALID_BODIES))
async def test_invalid_manifests_are_400_manifest_invalid(node, http, name):
    body = INVALID_BODIES[name]
    for content_type in (OCI_MANIFEST, None):
        headers = {"Content-Type": content_type} if content_type else {}
        async with http.put(f"{node.url}/v2/app/bad/manifests/v1", data=body, headers=headers) as r:
            await assert_error(r, 400, "MANIFEST_INVALID")
    r, _ = await get(http, node.url, "app/bad", "v1")
    assert r.status == 404


async def test_index_with_bad_descriptors_is_invalid(node, http):
    for manifests in ("x", [1], [{"mediaType": OCI_MANIFEST, "size": 1}],
                      [{"mediaType": OCI_MANIFEST, "digest": "sha256:1", "size": 1}]):
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                           "manifests": manifests}).encode()
        async with http.put(f"{node.url}/v2/app/bad/manifests/i", data=body,
                            headers={"Content-Type": OCI_INDEX}) as r:
            await assert_error(r, 400, "MANIFEST_INVALID")


async def test_empty_body_is_invalid(node, http):
    async with http.put(f"{node.url}/v2/app/bad/manifests/v1", data=b"",
                        headers={"Content-Type": OCI_MANIFEST}) as r:
        await assert_error(r, 400, "MANIFEST_INVALID")


async def test_manifest_size_limit_is_4_mib(node, http):
    image = make_image([10], seed=23)
    for blob in image.blobs:
        await push_blob(http, node.url, "app/huge", blob)
    doc = json.loads(image.manifest)
    doc["annotations"] = {"pad": ""}
    base = len(json.dumps(doc).encode())
    doc["annotations"]["pad"] = "x" * (4 * MiB - base)
    exact = json.dumps(doc).encode()
    assert len(exact) == 4 * MiB
    r = await put(http, node.url, "app/huge", "exact", exact, OCI_MANIFEST)
    assert r.status == 201
    r, body = await get(http, node.url, "app/huge", "exact")
    assert r.status == 200 and body == exact

    doc["annotations"]["pad"] += "x"
    over = json.dumps(doc).encode()
    async with http.put(f"{node.url}/v2/app/huge/manifests/over", data=over,
                        headers={"Content-Type": OCI_MANIFEST}) as r:
        await assert_error(r, 413)

    async def chunks():   # no Content-Length: the limit holds for a streamed body too
        for i in range(0, len(over), 100_000):
            yield over[i:i + 100_000]

    async with http.put(f"{node.url}/v2/app/huge/manifests/over", data=chunks(),
                        headers={"Content-Type": OCI_MANIFEST}) as r:
        await assert_error(r, 413)
    r, _ = await get(http, node.url, "app/huge", "over")
    assert r.status == 404


# -- DELETE ------------------------------------------------------------------


async def test_delete_by_tag_removes_only_the_tag(node, http):
    image = make_image(seed=24)
    await push_image(http, node.url, "app/del", image, tag="v1")
    await push_image(http, node.url, "app/del", image, tag="v2")
    async with http.delete(f"{node.url}/v2/app/del/manifests/v1") as r:
        assert r.status == 202
    r, _ = await get(http, node.url, "app/del", "v1")
    assert r.status == 404
    for ref in ("v2", image.digest):
        r, body = await get(http, node.url, "app/del", ref)
        assert r.status == 200 and body == image.manifest
    assert await tags(http, node.url, "app/del") == ["v2"]
    async with http.delete(f"{node.url}/v2/app/del/manifests/v1") as r:
        await assert_error(r, 404, "MANIFEST_UNKNOWN")


async def test_delete_by_digest_removes_manifest_and_all_its_tags(node, http):
    image, other = make_image(seed=25), make_image(seed=26)
    for tag in ("a", "b", "c"):
        await push_image(http, node.url, "app/del", image, tag=tag)
    await push_image(http, node.url, "app/del", other, tag="keep")
    before = await tags(http, node.url, "app/del")
    assert before == ["a", "b", "c", "keep"]
    async with http.delete(f"{node.url}/v2/app/del/manifests/{image.digest}") as r:
        assert r.status == 202
        assert await r.read() == b""
    for ref in ("a", "b", "c", image.digest):
        async with http.get(f"{node.url}/v2/app/del/manifests/{ref}") as r:
            await assert_error(r, 404, "MANIFEST_UNKNOWN")
    after = await tags(http, node.url, "app/del")
    assert after == ["keep"] and len(after) < len(before)
    async with http.delete(f"{node.url}/v2/app/del/manifests/{image.digest}") as r:
        await assert_error(r, 404, "MANIFEST_UNKNOWN")


async def test_delete_referrer_removes_its_referrers_entry(node, http):
    subject = make_image(seed=27)
    await push_image(http, node.url, "app/ref", subject, tag="v1")
    sigs = [make_image([20], seed=s, subject=descriptor(subject.manifest, OCI_MANIFEST),
                       artifact_type="application/vnd.example.sig") for s in (28, 29)]
    for sig in sigs:
        await push_image(http, node.url, "app/ref", sig)
    url = f"{node.url}/v2/app/ref/referrers/{subject.digest}"
    async with http.get(url) as r:
        assert sorted(m["digest"] for m in (await r.json())["manifests"]) == \
            sorted(s.digest for s in sigs)
    async with http.delete(f"{node.url}/v2/app/ref/manifests/{sigs[0].digest}") as r:
        assert r.status == 202
    async with http.get(url) as r:
        assert [m["digest"] for m in (await r.json())["manifests"]] == [sigs[1].digest]
    # Deleting the subject leaves its remaining referrer listed (OCI allows dangling subjects).
    async with http.delete(f"{node.url}/v2/app/ref/manifests/{subject.digest}") as r:
        assert r.status == 202
    async with http.get(url) as r:
        assert [m["digest"] for m in (await r.json())["manifests"]] == [sigs[1].digest]


async def test_delete_manifest_used_by_an_index_is_403(node, http):
    child = make_image(seed=30)
    await push_image(http, node.url, "app/idx", child)
    index = index_of((child.manifest, OCI_MANIFEST))
    r = await put(http, node.url, "app/idx", "multi", index, OCI_INDEX)
    assert r.status == 201
    async with http.delete(f"{node.url}/v2/app/idx/manifests/{child.digest}") as r:
        await assert_error(r, 403, "DENIED")
    r, body = await get(http, node.url, "app/idx", child.digest)
    assert r.status == 200 and body == child.manifest
    # Untagging the index does not free the child: the index is still stored.
    async with http.delete(f"{node.url}/v2/app/idx/manifests/multi") as r:
        assert r.status == 202
    async with http.delete(f"{node.url}/v2/app/idx/manifests/{child.digest}") as r:
        await assert_error(r, 403, "DENIED")
    async with http.delete(f"{node.url}/v2/app/idx/manifests/{digest_of(index)}") as r:
        assert r.status == 202
    async with http.delete(f"{node.url}/v2/app/idx/manifests/{child.digest}") as r:
        assert r.status == 202


async def test_delete_with_invalid_references(node, http):
    await push_image(http, node.url, "app/del", make_image(seed=31), tag="v1")
    async with http.delete(f"{node.url}/v2/app/del/manifests/sha256:abc") as r:
        await assert_error(r, 400, "DIGEST_INVALID")
    async with http.delete(f"{node.url}/v2/app/del/manifests/-bad") as r:
        await assert_error(r, 400, "MANIFEST_INVALID")
    async with http.delete(f"{node.url}/v2/app/nothing/manifests/v1") as r:
        await assert_error(r, 404, "MANIFEST_UNKNOWN")


async def test_retag_moves_the_tag(node, http):
    one, two = make_image(seed=32), make_image(seed=33)
    await push_image(http, node.url, "app/retag", one, tag="latest")
    await push_image(http, node.url, "app/retag", two, tag="latest")
    r, body = await get(http, node.url, "app/retag", "latest")
    assert r.status == 200 and body == two.manifest
    r, body = await get(http, node.url, "app/retag", one.digest)
    assert r.status == 200 and body == one.manifest


async def test_manifest_after_its_blob_was_deleted_is_manifest_blob_unknown(node, http):
    image = make_image(seed=34)
    for blob in image.blobs:
        await push_blob(http, node.url, "app/gone", blob)
    async with http.delete(f"{node.url}/v2/app/gone/blobs/{digest_of(image.layers[1])}") as r:
        assert r.status == 202
    async with http.put(f"{node.url}/v2/app/gone/manifests/v1", data=image.manifest,
                        headers={"Content-Type": OCI_MANIFEST}) as r:
        await assert_error(r, 400, "MANIFEST_BLOB_UNKNOWN")


async def test_deleting_a_blob_in_one_repo_leaves_other_repos_images_whole(node, http):
    image = make_image([5000], seed=35)
    await push_image(http, node.url, "app/one", image, tag="v1")
    for blob in image.blobs:
        await push_blob(http, node.url, "app/two", blob)
    for blob in image.blobs:
        async with http.delete(f"{node.url}/v2/app/two/blobs/{digest_of(blob)}") as r:
            assert r.status == 202
    r, body = await get(http, node.url, "app/one", "v1")
    assert r.status == 200 and body == image.manifest
    for blob in image.blobs:
        async with http.get(f"{node.url}/v2/app/one/blobs/{digest_of(blob)}") as r:
            assert r.status == 200 and await r.read() == blob


async def test_pushing_a_referrer_twice_lists_it_once(node, http):
    subject = make_image(seed=36)
    await push_image(http, node.url, "app/twice", subject, tag="v1")
    sig = make_image([10], seed=37, subject=descriptor(subject.manifest, OCI_MANIFEST))
    for tag in ("a", "b", None):
        await push_image(http, node.url, "app/twice", sig, tag=tag)
    async with http.get(f"{node.url}/v2/app/twice/referrers/{subject.digest}") as r:
        assert [m["digest"] for m in (await r.json())["manifests"]] == [sig.digest]
