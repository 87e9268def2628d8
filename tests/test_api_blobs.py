"""end-2 and end-10 through a real node: reading blobs (whole, ranged, HEAD),
deleting them, and the refusals around digests, names and repository scope.
"""

from __future__ import annotations

import gc
import random

import pytest

from .helpers import assert_error, digest_of, make_image, push_blob, push_image

SIZE = 200_000  # crosses the 64 KiB encryption segments three times


@pytest.fixture
def blob() -> bytes:
    return random.Random(2).randbytes(SIZE)


async def _get(http, url, **headers):
    async with http.get(url, headers=headers) as r:
        return r.status, r.headers, await r.read()


# -- GET / HEAD ------------------------------------------------------------------


async def test_get_blob_returns_bytes_digest_and_length(node, http, blob):
    digest = await push_blob(http, node.url, "lib/a", blob)
    status, headers, body = await _get(http, f"{node.url}/v2/lib/a/blobs/{digest}")
    assert status == 200
    assert body == blob
    assert headers["Docker-Content-Digest"] == digest
    assert int(headers["Content-Length"]) == SIZE
    assert headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_head_blob_has_headers_and_no_body(node, http, blob):
    digest = await push_blob(http, node.url, "lib/a", blob)
    async with http.head(f"{node.url}/v2/lib/a/blobs/{digest}") as r:
        assert r.status == 200
        assert r.headers["Docker-Content-Digest"] == digest
        assert int(r.headers["Content-Length"]) == SIZE
        assert await r.read() == b""


async def test_blob_larger_than_a_stream_piece_is_served_whole(node, http):
    data = random.Random(3).randbytes(2 * 1024 * 1024 + 12_345)
    digest = await push_blob(http, node.url, "big", data)
    status, headers, body = await _get(http, f"{node.url}/v2/big/blobs/{digest}")
    assert status == 200 and body == data
    assert int(headers["Content-Length"]) == len(data)


@pytest.mark.parametrize(("header", "start", "end"), [
    ("bytes=0-0", 0, 1),
    ("bytes=10-99", 10, 100),
    ("bytes=65530-65545", 65530, 65546),            # across a segment boundary
    ("bytes=1000-", 1000, SIZE),
    (f"bytes=100-{SIZE + 5000}", 100, SIZE),        # end past the blob is clamped
    ("bytes=-1", SIZE - 1, SIZE),
    ("bytes=-70000", SIZE - 70000, SIZE),
    (f"bytes=-{SIZE * 2}", 0, SIZE),                # suffix longer than the blob: all of it
    (f"bytes={SIZE - 1}-{SIZE - 1}", SIZE - 1, SIZE),
])
async def test_ranged_get_returns_206_with_content_range(node, http, blob, header, start, end):
    digest = await push_blob(http, node.url, "lib/r", blob)
    status, headers, body = await _get(http, f"{node.url}/v2/lib/r/blobs/{digest}", Range=header)
    assert status == 206
    assert body == blob[start:end]
    assert headers["Content-Range"] == f"bytes {start}-{end - 1}/{SIZE}"
    assert int(headers["Content-Length"]) == end - start
    assert headers["Docker-Content-Digest"] == digest


async def test_ranged_get_over_stream_pieces(node, http):
    data = random.Random(4).randbytes(3 * 1024 * 1024)
    digest = await push_blob(http, node.url, "big", data)
    start, end = 1024 * 1024 - 7, 2 * 1024 * 1024 + 9
    status, headers, body = await _get(http, f"{node.url}/v2/big/blobs/{digest}",
                                       Range=f"bytes={start}-{end - 1}")
    assert status == 206 and body == data[start:end]
    assert headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(data)}"


@pytest.mark.parametrize("header", [f"bytes={SIZE}-", f"bytes={SIZE}-{SIZE + 10}",
                                    f"bytes={SIZE + 100}-{SIZE + 200}", "bytes=-0"])
async def test_unsatisfiable_range_is_416_with_size(node, http, blob, header):
    digest = await push_blob(http, node.url, "lib/r", blob)
    async with http.get(f"{node.url}/v2/lib/r/blobs/{digest}", headers={"Range": header}) as r:
        await assert_error(r, 416)
        assert r.headers["Content-Range"] == f"bytes */{SIZE}"


@pytest.mark.parametrize("header", ["bytes=0-", "bytes=-5", "bytes=0-0"])
async def test_any_range_of_an_empty_blob_is_unsatisfiable(node, http, header):
    digest = await push_blob(http, node.url, "lib/empty", b"")
    async with http.get(f"{node.url}/v2/lib/empty/blobs/{digest}", headers={"Range": header}) as r:
        await assert_error(r, 416)
        assert r.headers["Content-Range"] == "bytes */0"


@pytest.mark.parametrize("header", ["bytes=10-5", "items=0-5", "bytes=0-1,5-6", "garbage"])
async def test_malformed_or_multi_range_is_ignored(node, http, blob, header):
    digest = await push_blob(http, node.url, "lib/r", blob)
    status, headers, body = await _get(http, f"{node.url}/v2/lib/r/blobs/{digest}", Range=header)
    assert status == 200 and body == blob
    assert "Content-Range" not in headers


async def test_empty_blob_is_served(node, http):
    digest = await push_blob(http, node.url, "lib/empty", b"")
    assert digest == digest_of(b"")
    status, headers, body = await _get(http, f"{node.url}/v2/lib/empty/blobs/{digest}")
    assert status == 200 and body == b""
    assert headers["Content-Length"] == "0"
    assert headers["Docker-Content-Digest"] == digest


async def test_unknown_blob_is_404_blob_unknown(node, http):
    missing = digest_of(b"never pushed")
    await push_blob(http, node.url, "lib/a", b"something")
    async with http.get(f"{node.url}/v2/lib/a/blobs/{missing}") as r:
        await assert_error(r, 404, "BLOB_UNKNOWN")
    async with http.get(f"{node.url}/v2/no/such/repo/blobs/{missing}") as r:
        await assert_error(r, 404, "BLOB_UNKNOWN")
    async with http.head(f"{node.url}/v2/lib/a/blobs/{missing}") as r:
        assert r.status == 404


async def test_blob_is_visible_only_in_repos_it_was_pushed_or_mounted_into(node, http, blob):
    digest = await push_blob(http, node.url, "team/one", blob)
    for repo in ("team/two", "team", "team/one/sub", "team/on"):
        async with http.get(f"{node.url}/v2/{repo}/blobs/{digest}") as r:
            await assert_error(r, 404, "BLOB_UNKNOWN")
        async with http.head(f"{node.url}/v2/{repo}/blobs/{digest}") as r:
            assert r.status == 404
    async with http.post(f"{node.url}/v2/team/two/blobs/uploads/",
                         params={"mount": digest, "from": "team/one"}) as r:
        assert r.status == 201
    status, _, body = await _get(http, f"{node.url}/v2/team/two/blobs/{digest}")
    assert status == 200 and body == blob
    async with http.get(f"{node.url}/v2/team/three/blobs/{digest}") as r:
        await assert_error(r, 404, "BLOB_UNKNOWN")


async def test_sha512_blob_round_trip(node, http, blob):
    digest = digest_of(blob, "sha512")
    async with http.post(f"{node.url}/v2/lib/s/blobs/uploads/", params={"digest": digest},
                         data=blob) as r:
        assert r.status == 201, await r.text()
        assert r.headers["Docker-Content-Digest"] == digest
        assert r.headers["Location"] == f"/v2/lib/s/blobs/{digest}"
    status, headers, body = await _get(http, f"{node.url}/v2/lib/s/blobs/{digest}")
    assert status == 200 and body == blob
    assert headers["Docker-Content-Digest"] == digest
    status, _, body = await _get(http, f"{node.url}/v2/lib/s/blobs/{digest}", Range="bytes=-10")
    assert status == 206 and body == blob[-10:]
    # The sha256 of the same bytes names nothing in this repo.
    async with http.get(f"{node.url}/v2/lib/s/blobs/{digest_of(blob)}") as r:
        await assert_error(r, 404, "BLOB_UNKNOWN")


async def test_sha512_blob_with_wrong_content_is_refused(node, http):
    wrong = digest_of(b"other", "sha512")
    async with http.post(f"{node.url}/v2/lib/s/blobs/uploads/", params={"digest": wrong},
                         data=b"actual") as r:
        await assert_error(r, 400, "DIGEST_INVALID")
    async with http.get(f"{node.url}/v2/lib/s/blobs/{wrong}") as r:
        await assert_error(r, 404, "BLOB_UNKNOWN")


# -- invalid digests and names ---------------------------------------------------------

GOOD_HEX = "a" * 64
BAD_DIGESTS = [
    "sha256:" + "a" * 63,                  # too short
    "sha256:" + "a" * 65,                  # too long
    "sha256:" + "A" * 64,                  # uppercase hex
    "sha256:" + "g" * 64,                  # not hex
    "sha512:" + "a" * 64,                  # sha512 needs 128
    "md5:d41d8cd98f00b204e9800998ecf8427e",  # unknown algorithm
    "sha384:" + "a" * 96,                  # unsupported algorithm
    "SHA256:" + GOOD_HEX,
    "sha256" + GOOD_HEX,
    "sha256:",
]


@pytest.mark.parametrize("bad", BAD_DIGESTS)
async def test_invalid_digest_is_400_digest_invalid(node, http, bad):
    await push_blob(http, node.url, "lib/a", b"x")
    for method in ("GET", "DELETE"):
        async with http.request(method, f"{node.url}/v2/lib/a/blobs/{bad}") as r:
            await assert_error(r, 400, "DIGEST_INVALID")
    async with http.head(f"{node.url}/v2/lib/a/blobs/{bad}") as r:
        assert r.status == 400


BAD_NAMES = ["Upper/case", "a..b", "-lead", "trail-", "a/.b", "a_", "a___b", "a" * 256,
             "x/" * 127 + "yy", "sp ace", "a:b"]


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_invalid_repo_name_is_400_name_invalid(node, http, name):
    digest = digest_of(b"x")
    async with http.get(f"{node.url}/v2/{name}/blobs/{digest}") as r:
        await assert_error(r, 400, "NAME_INVALID")
    async with http.delete(f"{node.url}/v2/{name}/blobs/{digest}") as r:
        await assert_error(r, 400, "NAME_INVALID")
    async with http.post(f"{node.url}/v2/{name}/blobs/uploads/", params={"digest": digest},
                         data=b"x") as r:
        await assert_error(r, 400, "NAME_INVALID")


async def test_longest_valid_name_is_accepted(node, http):
    name = "a" * 100 + "/" + "b" * 100 + "/" + "c" * 53   # 255 characters
    assert len(name) == 255
    digest = await push_blob(http, node.url, name, b"long name")
    status, _, body = await _get(http, f"{node.url}/v2/{name}/blobs/{digest}")
    assert status == 200 and body == b"long name"


# -- DELETE ------------------------------------------------------------------


async def test_delete_blob_then_404(node, http, blob):
    digest = await push_blob(http, node.url, "lib/d", blob)
    async with http.delete(f"{node.url}/v2/lib/d/blobs/{digest}") as r:
        assert r.status == 202, await r.text()
        assert await r.read() == b""
    async with http.get(f"{node.url}/v2/lib/d/blobs/{digest}") as r:
        await assert_error(r, 404, "BLOB_UNKNOWN")
    async with http.head(f"{node.url}/v2/lib/d/blobs/{digest}") as r:
        assert r.status == 404
    async with http.delete(f"{node.url}/v2/lib/d/blobs/{digest}") as r:
        await assert_error(r, 404, "BLOB_UNKNOWN")


async def test_delete_blob_in_one_repo_leaves_it_in_another(node, http, blob):
    digest = await push_blob(http, node.url, "lib/one", blob)
    await push_blob(http, node.url, "lib/two", blob)
    async with http.delete(f"{node.url}/v2/lib/one/blobs/{digest}") as r:
        assert r.status == 202
    status, _, body = await _get(http, f"{node.url}/v2/lib/two/blobs/{digest}")
    assert status == 200 and body == blob
    async with http.get(f"{node.url}/v2/lib/one/blobs/{digest}") as r:
        await assert_error(r, 404, "BLOB_UNKNOWN")


async def test_delete_unknown_blob_is_404(node, http):
    async with http.delete(f"{node.url}/v2/lib/none/blobs/{digest_of(b'nope')}") as r:
        await assert_error(r, 404, "BLOB_UNKNOWN")


async def test_delete_blob_used_by_a_manifest_is_403_denied(node, http):
    image = make_image([3000, 4000], seed=5)
    digest = await push_image(http, node.url, "lib/used", image, tag="v1")
    for data in image.blobs:
        async with http.delete(f"{node.url}/v2/lib/used/blobs/{digest_of(data)}") as r:
            await assert_error(r, 403, "DENIED")
        status, _, body = await _get(http, f"{node.url}/v2/lib/used/blobs/{digest_of(data)}")
        assert status == 200 and body == data
    # Once the manifest is gone the layers can be deleted.
    async with http.delete(f"{node.url}/v2/lib/used/manifests/{digest}") as r:
        assert r.status == 202
    async with http.delete(f"{node.url}/v2/lib/used/blobs/{digest_of(image.layers[0])}") as r:
        assert r.status == 202
    async with http.get(f"{node.url}/v2/lib/used/blobs/{digest_of(image.layers[0])}") as r:
        await assert_error(r, 404, "BLOB_UNKNOWN")


# -- memory -------------------------------------------------------------------------


def _responses_holding(size: int) -> list:
    from aiohttp import web

    return [o for o in gc.get_objects() if isinstance(o, web.Response)
            and isinstance(o.body, bytes | bytearray) and len(o.body) == size]


async def test_an_idle_kept_alive_connection_holds_no_served_body(node, http):
    """aiohttp's server keeps a connection's last response until the next request
    on it; behind the proxy's pool of idle connections a node kept one served
    blob (up to 1 MiB) per connection, and a manifest each, long after a pull."""
    image = make_image([900_000])
    await push_image(http, node.url, "held/app", image, tag="v1")
    layer = image.blobs[-1]
    for url, accept, size in [
            (f"{node.url}/v2/held/app/blobs/{digest_of(layer)}", "*/*", len(layer)),
            (f"{node.url}/v2/held/app/manifests/v1", image.media_type, len(image.manifest))]:
        async with http.get(url, headers={"Accept": accept}) as r:
            assert r.status == 200 and len(await r.read()) == size
        assert len(node.runner.server.connections) == 1, "the connection was not kept alive"
        assert _responses_holding(size) == []
