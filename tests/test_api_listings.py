"""end-1, end-8, end-12 and the catalog through a real node, plus what every
route shares: HEAD on every GET route, 404 and 405 for what is not a route,
and the OCI error body on every refusal.
"""

from __future__ import annotations

import json
import random
import re
from urllib.parse import parse_qs, urlsplit

import pytest

from .helpers import (
    OCI_INDEX,
    OCI_MANIFEST,
    SPEC_ERROR_CODES,
    assert_error,
    descriptor,
    digest_of,
    make_image,
    push_blob,
    push_image,
)

LINK = re.compile(r'<(?P<url>[^>]+)>; rel="next"')


async def tag_image(http, base, repo, image, tags):
    await push_image(http, base, repo, image)
    for tag in tags:
        async with http.put(f"{base}/v2/{repo}/manifests/{tag}", data=image.manifest,
                            headers={"Content-Type": OCI_MANIFEST}) as r:
            assert r.status == 201, await r.text()


async def follow(http, base: str, first: str, key: str) -> tuple[list[str], list[str]]:
    """Follow Link headers from ``first``; returns (all items, every next link)."""
    items, links, url = [], [], first
    while True:
        async with http.get(base + url) as r:
            assert r.status == 200, await r.text()
            items += (await r.json())[key]
            link = r.headers.get("Link")
        if link is None:
            return items, links
        match = LINK.fullmatch(link)
        assert match, link
        links.append(match["url"])
        url = match["url"]
        assert len(links) < 1000


# -- end-1 -----------------------------------------------------------------------


async def test_version_check(node, http):
    for path in ("/v2/", "/v2"):
        async with http.get(node.url + path) as r:
            assert r.status == 200
            assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
            assert r.headers["Content-Type"].startswith("application/json")
            assert await r.json() == {}


# -- end-8 tags --------------------------------------------------------------------

TAGS = ["latest", "v1", "v1.0", "v1.0.1", "V2", "_private", "a", "a-b", "a_b", "a.b", "Z9", "0",
        "v10", "v2"]


async def test_tags_list_is_sorted(node, http):
    tags = list(TAGS)
    random.Random(1).shuffle(tags)
    await tag_image(http, node.url, "app/tags", make_image(seed=1), tags)
    async with http.get(f"{node.url}/v2/app/tags/tags/list") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("application/json")
        body = await r.json()
        assert "Link" not in r.headers
    assert body == {"name": "app/tags", "tags": sorted(TAGS)}


@pytest.mark.parametrize("n", [1, 2, 3, 5, 13, 14, 15, 100])
async def test_tags_pagination_follows_links(node, http, n):
    await tag_image(http, node.url, "app/page", make_image(seed=2), TAGS)
    everything, links = await follow(http, node.url, f"/v2/app/page/tags/list?n={n}", "tags")
    assert everything == sorted(TAGS)
    assert len(links) == (len(TAGS) - 1) // n
    for link in links:
        assert link.startswith("/v2/app/page/tags/list?")
        query = parse_qs(urlsplit(link).query)
        assert query["n"] == [str(n)] and query["last"][0] in TAGS


async def test_tags_page_link_is_exact(node, http):
    await tag_image(http, node.url, "app/page", make_image(seed=3), ["a", "b", "c"])
    async with http.get(f"{node.url}/v2/app/page/tags/list", params={"n": "2"}) as r:
        assert (await r.json())["tags"] == ["a", "b"]
        assert r.headers["Link"] == '</v2/app/page/tags/list?last=b&n=2>; rel="next"'
    async with http.get(f"{node.url}/v2/app/page/tags/list", params={"n": "2", "last": "b"}) as r:
        assert (await r.json())["tags"] == ["c"]
        assert "Link" not in r.headers


async def test_tags_last_without_n_and_last_not_a_tag(node, http):
    await tag_image(http, node.url, "app/last", make_image(seed=4), ["a", "c", "e"])
    async with http.get(f"{node.url}/v2/app/last/tags/list", params={"last": "a"}) as r:
        assert (await r.json())["tags"] == ["c", "e"]
    async with http.get(f"{node.url}/v2/app/last/tags/list", params={"last": "b"}) as r:
        assert (await r.json())["tags"] == ["c", "e"]
    async with http.get(f"{node.url}/v2/app/last/tags/list", params={"last": "e"}) as r:
        assert (await r.json())["tags"] == []


async def test_n_zero_is_an_empty_page_without_link(node, http):
    await tag_image(http, node.url, "app/zero", make_image(seed=5), ["a", "b"])
    async with http.get(f"{node.url}/v2/app/zero/tags/list", params={"n": "0"}) as r:
        assert r.status == 200
        assert await r.json() == {"name": "app/zero", "tags": []}
        assert "Link" not in r.headers
    async with http.get(f"{node.url}/v2/_catalog", params={"n": "0"}) as r:
        assert r.status == 200
        assert await r.json() == {"repositories": []}
        assert "Link" not in r.headers


@pytest.mark.parametrize("bad", ["-1", "x", "1.5", "1e3"])
async def test_bad_n_is_400(node, http, bad):
    await tag_image(http, node.url, "app/n", make_image(seed=6), ["a"])
    for url in (f"{node.url}/v2/app/n/tags/list", f"{node.url}/v2/_catalog"):
        async with http.get(url, params={"n": bad}) as r:
            await assert_error(r, 400)


async def test_tags_of_unknown_repo_is_404_name_unknown(node, http):
    await tag_image(http, node.url, "app/known", make_image(seed=7), ["a"])
    for repo in ("app/unknown", "app", "app/known/sub"):
        async with http.get(f"{node.url}/v2/{repo}/tags/list") as r:
            await assert_error(r, 404, "NAME_UNKNOWN")
    async with http.get(f"{node.url}/v2/App/tags/list") as r:
        await assert_error(r, 400, "NAME_INVALID")


async def test_repo_with_blobs_but_no_tags_lists_no_tags(node, http):
    await push_blob(http, node.url, "app/blobsonly", b"layer")
    async with http.get(f"{node.url}/v2/app/blobsonly/tags/list") as r:
        assert r.status == 200
        assert await r.json() == {"name": "app/blobsonly", "tags": []}


# -- catalog ---------------------------------------------------------------------


async def test_catalog_lists_repositories_sorted_and_pages(node, http):
    repos = ["b/app", "a", "a/b", "a-b", "a.b", "z/z/z", "m"]
    for i, repo in enumerate(repos):
        await push_image(http, node.url, repo, make_image([16], seed=100 + i), tag="t")
    async with http.get(f"{node.url}/v2/_catalog") as r:
        assert r.status == 200
        assert await r.json() == {"repositories": sorted(repos)}
        assert "Link" not in r.headers
    for n in (1, 2, 3, 7):
        everything, links = await follow(http, node.url, f"/v2/_catalog?n={n}", "repositories")
        assert everything == sorted(repos)
        assert len(links) == (len(repos) - 1) // n
        assert all(link.startswith("/v2/_catalog?") for link in links)
    async with http.get(f"{node.url}/v2/_catalog", params={"n": "4"}) as r:
        assert (await r.json())["repositories"] == ["a", "a-b", "a.b", "a/b"]
        assert r.headers["Link"] == '</v2/_catalog?last=a%2Fb&n=4>; rel="next"'


async def test_catalog_drops_a_repository_emptied_by_deletes(node, http):
    image = make_image(seed=8)
    await push_image(http, node.url, "gone/app", image, tag="v1")
    await push_image(http, node.url, "kept/app", make_image(seed=9), tag="v1")
    async with http.delete(f"{node.url}/v2/gone/app/manifests/{image.digest}") as r:
        assert r.status == 202
    for blob in image.blobs:
        async with http.delete(f"{node.url}/v2/gone/app/blobs/{digest_of(blob)}") as r:
            assert r.status == 202
    async with http.get(f"{node.url}/v2/_catalog") as r:
        assert (await r.json())["repositories"] == ["kept/app"]


# -- end-12 referrers ------------------------------------------------------------


async def test_referrers_lists_descriptors_with_artifact_type_and_annotations(node, http):
    subject = make_image(seed=10)
    await push_image(http, node.url, "app/refs", subject, tag="v1")
    subject_desc = descriptor(subject.manifest, OCI_MANIFEST)
    sig = make_image([30], seed=11, subject=subject_desc, artifact_type="application/vnd.ex.sig",
                     annotations={"org.example.signer": "alice"})
    # No artifactType: the config's media type stands in.
    sbom = make_image([40], seed=12, subject=subject_desc)
    index_referrer = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [],
                                 "subject": subject_desc,
                                 "artifactType": "application/vnd.ex.bundle"}).encode()
    for referrer in (sig, sbom):
        await push_image(http, node.url, "app/refs", referrer)
    async with http.put(f"{node.url}/v2/app/refs/manifests/{digest_of(index_referrer)}",
                        data=index_referrer, headers={"Content-Type": OCI_INDEX}) as r:
        assert r.status == 201
        assert r.headers["OCI-Subject"] == subject.digest

    async with http.get(f"{node.url}/v2/app/refs/referrers/{subject.digest}") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == OCI_INDEX
        assert "OCI-Filters-Applied" not in r.headers
        body = await r.json()
    assert body["schemaVersion"] == 2 and body["mediaType"] == OCI_INDEX
    found = {m["digest"]: m for m in body["manifests"]}
    assert found == {
        sig.digest: {"mediaType": OCI_MANIFEST, "digest": sig.digest, "size": len(sig.manifest),
                     "artifactType": "application/vnd.ex.sig",
                     "annotations": {"org.example.signer": "alice"}},
        sbom.digest: {"mediaType": OCI_MANIFEST, "digest": sbom.digest,
                      "size": len(sbom.manifest),
                      "artifactType": "application/vnd.oci.image.config.v1+json"},
        digest_of(index_referrer): {"mediaType": OCI_INDEX, "digest": digest_of(index_referrer),
                                    "size": len(index_referrer),
                                    "artifactType": "application/vnd.ex.bundle"},
    }

    async with http.get(f"{node.url}/v2/app/refs/referrers/{subject.digest}",
                        params={"artifactType": "application/vnd.ex.sig"}) as r:
        assert r.status == 200
        assert r.headers["OCI-Filters-Applied"] == "artifactType"
        assert r.headers["Content-Type"] == OCI_INDEX
        assert [m["digest"] for m in (await r.json())["manifests"]] == [sig.digest]
    async with http.get(f"{node.url}/v2/app/refs/referrers/{subject.digest}",
                        params={"artifactType": "application/vnd.none"}) as r:
        assert r.headers["OCI-Filters-Applied"] == "artifactType"
        assert (await r.json())["manifests"] == []
    # Referrers are per repository.
    async with http.get(f"{node.url}/v2/app/other/referrers/{subject.digest}") as r:
        assert r.status == 200 and (await r.json())["manifests"] == []


async def test_referrers_of_unknown_digest_is_an_empty_index(node, http):
    await push_image(http, node.url, "app/refs", make_image(seed=13), tag="v1")
    for repo in ("app/refs", "never/pushed"):
        async with http.get(f"{node.url}/v2/{repo}/referrers/{digest_of(b'none')}") as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == OCI_INDEX
            assert await r.json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}


@pytest.mark.parametrize("bad", ["sha256:abc", "md5:" + "a" * 32, "latest", "sha256:" + "A" * 64])
async def test_referrers_with_invalid_digest_is_400(node, http, bad):
    async with http.get(f"{node.url}/v2/app/refs/referrers/{bad}") as r:
        await assert_error(r, 400, "DIGEST_INVALID")


# -- HEAD on every GET route -----------------------------------------------------


async def test_head_on_every_get_route(node, http):
    image = make_image(seed=14)
    await push_image(http, node.url, "app/head", image, tag="v1")
    async with http.post(f"{node.url}/v2/app/head/blobs/uploads/") as r:
        upload = r.headers["Location"]
    routes = ["/v2/", "/v2", "/v2/_catalog", "/v2/app/head/tags/list",
              f"/v2/app/head/referrers/{image.digest}", "/v2/app/head/manifests/v1",
              f"/v2/app/head/manifests/{image.digest}",
              f"/v2/app/head/blobs/{digest_of(image.config)}", upload]
    for path in routes:
        async with http.get(node.url + path) as g:
            get_body = await g.read()
        async with http.head(node.url + path) as h:
            assert h.status == g.status, path
            assert await h.read() == b"", path
            for header in ("Content-Type", "Docker-Content-Digest", "Range", "Location",
                           "Docker-Distribution-API-Version"):
                assert h.headers.get(header) == g.headers.get(header), (path, header)
            if g.status == 200:
                assert int(h.headers["Content-Length"]) == len(get_body), path
    # And on a failing GET route the status carries over.
    async with http.head(f"{node.url}/v2/app/missing/tags/list") as h:
        assert h.status == 404


# -- unknown endpoints, wrong methods, error bodies ------------------------------------


@pytest.mark.parametrize("path", ["/", "/v3/", "/v2/app/web", "/v2/app/web/unknown/x",
                                  "/v2/app/web/blobs", "/v2/app/web/tags", "/favicon.ico"])
async def test_unknown_endpoint_is_404_with_error_body(node, http, path):
    async with http.get(node.url + path) as r:
        error = await assert_error(r, 404)
        assert error["code"] in SPEC_ERROR_CODES


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v2/"),
    ("DELETE", "/v2/_catalog"),
    ("POST", "/v2/app/web/manifests/v1"),
    ("PATCH", "/v2/app/web/manifests/v1"),
    ("PUT", "/v2/app/web/tags/list"),
    ("PUT", f"/v2/app/web/blobs/{digest_of(b'x')}"),
    ("POST", f"/v2/app/web/blobs/{digest_of(b'x')}"),
    ("DELETE", f"/v2/app/web/referrers/{digest_of(b'x')}"),
    ("GET", "/v2/app/web/blobs/uploads/"),
])
async def test_wrong_method_is_405_unsupported(node, http, method, path):
    async with http.request(method, node.url + path, data=b"") as r:
        await assert_error(r, 405, "UNSUPPORTED")
        assert r.headers["Allow"]
        assert method not in r.headers["Allow"].split(",")


async def test_every_error_body_has_the_spec_shape(node, http):
    """A sweep over refusals of every kind: each is ``{"errors": [{code, message}]}``,
    JSON, with the status its code calls for."""
    image = make_image(seed=15)
    await push_image(http, node.url, "app/err", image, tag="v1")
    d = digest_of(b"none")
    cases = [
        ("GET", f"/v2/app/err/blobs/{d}", 404, "BLOB_UNKNOWN"),
        ("GET", "/v2/app/err/blobs/sha256:1", 400, "DIGEST_INVALID"),
        ("GET", f"/v2/BAD/blobs/{d}", 400, "NAME_INVALID"),
        ("GET", "/v2/app/err/manifests/nope", 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/nope/tags/list", 404, "NAME_UNKNOWN"),
        ("GET", f"/v2/app/err/blobs/uploads/{d[7:43]}", 404, "BLOB_UPLOAD_UNKNOWN"),
        ("PUT", "/v2/app/err/manifests/x", 400, "MANIFEST_INVALID"),
        ("DELETE", f"/v2/app/err/blobs/{digest_of(image.config)}", 403, "DENIED"),
        ("POST", "/v2/app/err/manifests/x", 405, "UNSUPPORTED"),
    ]
    for method, path, status, code in cases:
        async with http.request(method, node.url + path, data=b"{}") as r:
            error = await assert_error(r, status, code)
            assert error["message"], (method, path)
            assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"


@pytest.mark.parametrize("repo", ["x/blobs", "x/manifests", "x/tags", "x/blobs/uploads",
                                  "x/referrers", "blobs/uploads/manifests/tags/list"])
async def test_repository_names_made_of_route_words(node, http, repo):
    """``{name}`` may contain slashes and the words the routes end in; every
    route still finds the right repository."""
    subject = make_image([100], seed=20)
    await push_image(http, node.url, repo, subject, tag="v1")
    sig = make_image([10], seed=21, subject=descriptor(subject.manifest, OCI_MANIFEST))
    await push_image(http, node.url, repo, sig)
    async with http.get(f"{node.url}/v2/{repo}/manifests/v1") as r:
        assert r.status == 200 and await r.read() == subject.manifest
    async with http.get(f"{node.url}/v2/{repo}/blobs/{digest_of(subject.layers[0])}") as r:
        assert r.status == 200 and await r.read() == subject.layers[0]
    async with http.get(f"{node.url}/v2/{repo}/tags/list") as r:
        assert await r.json() == {"name": repo, "tags": ["v1"]}
    async with http.get(f"{node.url}/v2/{repo}/referrers/{subject.digest}") as r:
        assert [m["digest"] for m in (await r.json())["manifests"]] == [sig.digest]
    async with http.post(f"{node.url}/v2/{repo}/blobs/uploads/") as r:
        assert r.status == 202
        location = r.headers["Location"]
    assert location.startswith(f"/v2/{repo}/blobs/uploads/")
    async with http.get(node.url + location) as r:
        assert r.status == 204
    async with http.put(node.url + location, params={"digest": digest_of(b"z")}, data=b"z") as r:
        assert r.status == 201
    async with http.get(f"{node.url}/v2/_catalog") as r:
        assert (await r.json())["repositories"] == [repo]
