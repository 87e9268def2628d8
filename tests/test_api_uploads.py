"""end-4, end-5, end-6, end-11, end-13 and cancel through a real node: every way
a blob can be uploaded, and every way an upload can be refused.
"""

from __future__ import annotations

import asyncio
import random
import uuid

from .helpers import assert_error, digest_of, push_blob, start_node

OCTET = {"Content-Type": "application/octet-stream"}


async def start(http, base: str, repo: str) -> str:
    """POST a new session; returns its absolute Location."""
    async with http.post(f"{base}/v2/{repo}/blobs/uploads/") as r:
        assert r.status == 202, await r.text()
        return base + r.headers["Location"]


async def patch(http, location: str, data: bytes, start: int | None = None) -> tuple[int, dict]:
    headers = dict(OCTET)
    if start is not None:
        headers["Content-Range"] = f"{start}-{start + len(data) - 1}"
    async with http.patch(location, data=data, headers=headers) as r:
        await r.read()
        return r.status, r.headers


async def status_of(http, location: str):
    async with http.get(location) as r:
        await r.read()
        return r.status, r.headers


async def blob_body(http, base: str, repo: str, digest: str) -> tuple[int, bytes]:
    async with http.get(f"{base}/v2/{repo}/blobs/{digest}") as r:
        return r.status, await r.read()


def stream(data: bytes, piece: int):
    async def gen():
        for i in range(0, len(data), piece):
            yield data[i:i + piece]
    return gen()


# -- POST ---------------------------------------------------------------------


async def test_post_opens_a_session(node, http):
    async with http.post(f"{node.url}/v2/lib/up/blobs/uploads/") as r:
        assert r.status == 202
        assert await r.read() == b""
        upload_id = r.headers["Docker-Upload-UUID"]
        assert r.headers["Location"] == f"/v2/lib/up/blobs/uploads/{upload_id}"
        assert r.headers["Range"] == "0-0"
        assert r.headers["Content-Length"] == "0"
    status, headers = await status_of(http, node.url + f"/v2/lib/up/blobs/uploads/{upload_id}")
    assert status == 204
    assert headers["Range"] == "0-0"


async def test_monolithic_post_with_digest(node, http):
    data = random.Random(1).randbytes(100_000)
    digest = digest_of(data)
    async with http.post(f"{node.url}/v2/lib/up/blobs/uploads/", params={"digest": digest},
                         data=data, headers=OCTET) as r:
        assert r.status == 201, await r.text()
        assert r.headers["Location"] == f"/v2/lib/up/blobs/{digest}"
        assert r.headers["Docker-Content-Digest"] == digest
    assert await blob_body(http, node.url, "lib/up", digest) == (200, data)


async def test_monolithic_post_with_wrong_digest_keeps_nothing(node, http):
    data = b"the real bytes"
    claimed = digest_of(b"something else")
    async with http.post(f"{node.url}/v2/lib/up/blobs/uploads/", params={"digest": claimed},
                         data=data, headers=OCTET) as r:
        await assert_error(r, 400, "DIGEST_INVALID")
    for digest in (claimed, digest_of(data)):
        async with http.get(f"{node.url}/v2/lib/up/blobs/{digest}") as r:
            await assert_error(r, 404, "BLOB_UNKNOWN")
    assert list((node.config.data_dir / "uploads").iterdir()) == []


async def test_monolithic_post_with_bad_digest_param(node, http):
    for bad in ("", "sha256:abc", "md5:" + "a" * 32):
        async with http.post(f"{node.url}/v2/lib/up/blobs/uploads/", params={"digest": bad},
                             data=b"x", headers=OCTET) as r:
            await assert_error(r, 400, "DIGEST_INVALID")


async def test_post_then_monolithic_put(node, http):
    data = random.Random(2).randbytes(70_000)
    location = await start(http, node.url, "lib/up")
    async with http.put(location, params={"digest": digest_of(data)}, data=data,
                        headers=OCTET) as r:
        assert r.status == 201, await r.text()
        assert r.headers["Location"] == f"/v2/lib/up/blobs/{digest_of(data)}"
        assert r.headers["Docker-Content-Digest"] == digest_of(data)
    assert await blob_body(http, node.url, "lib/up", digest_of(data)) == (200, data)
    # The session is finished: its Location names nothing any more.
    async with http.get(location) as r:
        await assert_error(r, 404, "BLOB_UPLOAD_UNKNOWN")


# -- PATCH -------------------------------------------------------------------


async def test_chunked_patch_with_content_range(node, http):
    data = random.Random(3).randbytes(150_001)
    location = await start(http, node.url, "lib/chunks")
    upload_id = location.rsplit("/", 1)[1]
    offset = 0
    for size in (1, 65_535, 1, 50_000, 34_464):
        status, headers = await patch(http, location, data[offset:offset + size], offset)
        assert status == 202
        offset += size
        assert headers["Range"] == f"0-{offset - 1}"
        assert headers["Location"] == f"/v2/lib/chunks/blobs/uploads/{upload_id}"
        assert headers["Docker-Upload-UUID"] == upload_id
        assert headers["Content-Length"] == "0"
    assert offset == len(data)
    async with http.put(location, params={"digest": digest_of(data)}) as r:
        assert r.status == 201, await r.text()
    assert await blob_body(http, node.url, "lib/chunks", digest_of(data)) == (200, data)


async def test_content_range_with_bytes_prefix_and_total_is_accepted(node, http):
    location = await start(http, node.url, "lib/chunks")
    async with http.patch(location, data=b"0123456789",
                          headers={**OCTET, "Content-Range": "bytes 0-9/*"}) as r:
        assert r.status == 202, await r.text()
        assert r.headers["Range"] == "0-9"


async def test_out_of_order_chunk_is_416_and_changes_nothing(node, http):
    location = await start(http, node.url, "lib/chunks")
    assert (await patch(http, location, b"a" * 100, 0))[0] == 202
    for bad_start in (101, 200, 50, 0, 99):   # gaps and overlaps alike
        async with http.patch(location, data=b"b" * 10, headers={
                **OCTET, "Content-Range": f"{bad_start}-{bad_start + 9}"}) as r:
            await assert_error(r, 416)
            assert r.headers["Range"] == "0-99"
    status, headers = await status_of(http, location)
    assert status == 204 and headers["Range"] == "0-99"
    data = b"a" * 100 + b"c" * 5
    assert (await patch(http, location, b"c" * 5, 100))[0] == 202
    async with http.put(location, params={"digest": digest_of(data)}) as r:
        assert r.status == 201


async def test_first_chunk_not_at_zero_is_416(node, http):
    location = await start(http, node.url, "lib/chunks")
    async with http.patch(location, data=b"xyz", headers={**OCTET, "Content-Range": "5-7"}) as r:
        await assert_error(r, 416)
        assert r.headers["Range"] == "0-0"


async def test_malformed_content_range_is_416(node, http):
    location = await start(http, node.url, "lib/chunks")
    for header in ("abc", "5-2", "-3", "0-"):
        async with http.patch(location, data=b"xyz", headers={**OCTET, "Content-Range": header}) as r:
            await assert_error(r, 416)
    status, headers = await status_of(http, location)
    assert status == 204 and headers["Range"] == "0-0"


async def test_content_length_not_matching_range_is_400_size_invalid(node, http):
    location = await start(http, node.url, "lib/chunks")
    for header in ("0-9", "0-3"):   # body is 5 bytes
        async with http.patch(location, data=b"12345",
                              headers={**OCTET, "Content-Range": header}) as r:
            await assert_error(r, 400, "SIZE_INVALID")
    status, headers = await status_of(http, location)
    assert status == 204 and headers["Range"] == "0-0"


async def test_streamed_patch_without_content_range(node, http):
    data = random.Random(4).randbytes(1_500_000)
    location = await start(http, node.url, "lib/stream")
    async with http.patch(location, data=stream(data[:1_000_000], 33_333), headers=OCTET) as r:
        assert r.status == 202, await r.text()
        assert r.headers["Range"] == "0-999999"
    async with http.patch(location, data=stream(data[1_000_000:], 77_777), headers=OCTET) as r:
        assert r.status == 202, await r.text()
        assert r.headers["Range"] == f"0-{len(data) - 1}"
    async with http.put(location, params={"digest": digest_of(data)}) as r:
        assert r.status == 201, await r.text()
    assert await blob_body(http, node.url, "lib/stream", digest_of(data)) == (200, data)


async def test_streamed_chunk_shorter_than_its_content_range_is_400_and_resumable(node, http):
    """A chunked-encoding body that ends before the bytes its Content-Range
    announced is refused with SIZE_INVALID. What did arrive is kept, as after a
    broken link, and the status says so: the client resumes from that offset."""
    location = await start(http, node.url, "lib/stream")
    async with http.patch(location, data=stream(b"01234", 2),
                          headers={**OCTET, "Content-Range": "0-9"}) as r:
        await assert_error(r, 400, "SIZE_INVALID")
    status, headers = await status_of(http, location)
    assert status == 204 and headers["Range"] == "0-4"
    assert (await patch(http, location, b"56789", 5))[0] == 202
    async with http.put(location, params={"digest": digest_of(b"0123456789")}) as r:
        assert r.status == 201, await r.text()
    assert await blob_body(http, node.url, "lib/stream", digest_of(b"0123456789")) == \
        (200, b"0123456789")


async def test_concurrent_chunks_for_the_same_range_append_once(node, http):
    location = await start(http, node.url, "lib/race")
    bodies = [b"a" * 200_000, b"b" * 200_000]
    results = await asyncio.gather(*(patch(http, location, body, 0) for body in bodies))
    statuses = [status for status, _ in results]
    assert sorted(statuses) == [202, 416]
    winner = bodies[statuses.index(202)]
    status, headers = await status_of(http, location)
    assert status == 204 and headers["Range"] == "0-199999"
    async with http.put(location, params={"digest": digest_of(winner)}) as r:
        assert r.status == 201, await r.text()
    assert await blob_body(http, node.url, "lib/race", digest_of(winner)) == (200, winner)


# -- GET status, old Locations -------------------------------------------------


async def test_status_reports_offset_and_location(node, http):
    location = await start(http, node.url, "lib/status")
    upload_id = location.rsplit("/", 1)[1]
    await patch(http, location, b"x" * 70_000, 0)
    async with http.get(location) as r:
        assert r.status == 204
        assert await r.read() == b""
        assert r.headers["Range"] == "0-69999"
        assert r.headers["Location"] == f"/v2/lib/status/blobs/uploads/{upload_id}"
        assert r.headers["Docker-Upload-UUID"] == upload_id
    async with http.head(location) as r:
        assert r.status == 204
        assert r.headers["Range"] == "0-69999"


async def test_an_old_location_still_works_after_later_chunks(node, http):
    data = random.Random(5).randbytes(30_000)
    first = await start(http, node.url, "lib/old")
    _, h1 = await patch(http, first, data[:10_000], 0)
    second = node.url + h1["Location"]
    _, h2 = await patch(http, second, data[10_000:20_000], 10_000)
    # Continue with the very first Location, twice removed.
    status, h3 = await patch(http, first, data[20_000:], 20_000)
    assert status == 202 and h3["Range"] == "0-29999"
    status, headers = await status_of(http, second)
    assert status == 204 and headers["Range"] == "0-29999"
    async with http.put(first, params={"digest": digest_of(data)}) as r:
        assert r.status == 201
    assert await blob_body(http, node.url, "lib/old", digest_of(data)) == (200, data)


# -- PUT -----------------------------------------------------------------------


async def test_put_with_final_chunk_with_and_without_content_range(node, http):
    data = random.Random(6).randbytes(90_000)
    for with_range in (True, False):
        repo = f"lib/final{int(with_range)}"
        location = await start(http, node.url, repo)
        await patch(http, location, data[:40_000], 0)
        headers = dict(OCTET)
        if with_range:
            headers["Content-Range"] = f"40000-{len(data) - 1}"
        async with http.put(location, params={"digest": digest_of(data)}, data=data[40_000:],
                            headers=headers) as r:
            assert r.status == 201, await r.text()
            assert r.headers["Docker-Content-Digest"] == digest_of(data)
        assert await blob_body(http, node.url, repo, digest_of(data)) == (200, data)


async def test_put_with_streamed_final_chunk(node, http):
    data = random.Random(12).randbytes(300_000)
    location = await start(http, node.url, "lib/final")
    await patch(http, location, data[:1000], 0)
    async with http.put(location, params={"digest": digest_of(data)},
                        data=stream(data[1000:], 40_000), headers=OCTET) as r:
        assert r.status == 201, await r.text()
    assert await blob_body(http, node.url, "lib/final", digest_of(data)) == (200, data)


async def test_put_final_chunk_out_of_order_is_416_and_keeps_session(node, http):
    location = await start(http, node.url, "lib/final")
    await patch(http, location, b"abc", 0)
    async with http.put(location, params={"digest": digest_of(b"abcdef")}, data=b"def",
                        headers={**OCTET, "Content-Range": "4-6"}) as r:
        await assert_error(r, 416)
    async with http.put(location, params={"digest": digest_of(b"abcdef")}, data=b"def",
                        headers={**OCTET, "Content-Range": "3-5"}) as r:
        assert r.status == 201, await r.text()


async def test_put_without_digest_is_400_and_keeps_session(node, http):
    location = await start(http, node.url, "lib/nodigest")
    await patch(http, location, b"abc", 0)
    async with http.put(location) as r:
        await assert_error(r, 400, "DIGEST_INVALID")
    async with http.put(location, params={"digest": "sha256:zzz"}) as r:
        await assert_error(r, 400, "DIGEST_INVALID")
    status, headers = await status_of(http, location)
    assert status == 204 and headers["Range"] == "0-2"
    async with http.put(location, params={"digest": digest_of(b"abc")}) as r:
        assert r.status == 201


async def test_put_with_wrong_digest_ends_the_upload_and_keeps_nothing(node, http):
    data = random.Random(7).randbytes(80_000)
    location = await start(http, node.url, "lib/wrong")
    await patch(http, location, data, 0)
    wrong = digest_of(data + b"!")
    async with http.put(location, params={"digest": wrong}) as r:
        error = await assert_error(r, 400, "DIGEST_INVALID")
        assert error["detail"]["computed"] == digest_of(data)
    async with http.get(location) as r:
        await assert_error(r, 404, "BLOB_UPLOAD_UNKNOWN")
    async with http.patch(location, data=b"more", headers=OCTET) as r:
        await assert_error(r, 404, "BLOB_UPLOAD_UNKNOWN")
    for digest in (wrong, digest_of(data)):
        async with http.get(f"{node.url}/v2/lib/wrong/blobs/{digest}") as r:
            await assert_error(r, 404, "BLOB_UNKNOWN")
    assert list((node.config.data_dir / "uploads").iterdir()) == []
    assert not list((node.config.data_dir / "blobs").rglob("*" + digest_of(data)[7:]))


async def test_sha512_digest_on_a_chunked_upload(node, http):
    data = random.Random(8).randbytes(100_000)
    location = await start(http, node.url, "lib/s512")
    await patch(http, location, data[:65_537], 0)
    await patch(http, location, data[65_537:], 65_537)
    digest = digest_of(data, "sha512")
    async with http.put(location, params={"digest": digest}) as r:
        assert r.status == 201, await r.text()
        assert r.headers["Docker-Content-Digest"] == digest
    assert await blob_body(http, node.url, "lib/s512", digest) == (200, data)


# -- DELETE (cancel) ---------------------------------------------------------


async def test_cancel_upload(node, http):
    location = await start(http, node.url, "lib/cancel")
    await patch(http, location, b"x" * 1000, 0)
    async with http.delete(location) as r:
        assert r.status == 204
        assert await r.read() == b""
    for method in ("GET", "PATCH", "PUT", "DELETE"):
        async with http.request(method, location, params={"digest": digest_of(b"x" * 1000)}) as r:
            await assert_error(r, 404, "BLOB_UPLOAD_UNKNOWN")
    assert list((node.config.data_dir / "uploads").iterdir()) == []


# -- unknown ids ---------------------------------------------------------------


async def test_unknown_or_malformed_upload_id_is_404(node, http):
    await start(http, node.url, "lib/ids")   # a real session exists; these are not it
    for upload_id in (str(uuid.uuid4()), "not-a-uuid", "0" * 36, str(uuid.uuid4()).upper(),
                      "%2e%2e%2fetc", "x" * 36):
        location = f"{node.url}/v2/lib/ids/blobs/uploads/{upload_id}"
        for method in ("GET", "PATCH", "PUT", "DELETE"):
            async with http.request(method, location, data=b"x", headers=OCTET,
                                    params={"digest": digest_of(b"x")}) as r:
                await assert_error(r, 404, "BLOB_UPLOAD_UNKNOWN")


async def test_upload_id_under_another_repo_is_404(node, http):
    location = await start(http, node.url, "lib/mine")
    upload_id = location.rsplit("/", 1)[1]
    await patch(http, location, b"abc", 0)
    other = f"{node.url}/v2/lib/theirs/blobs/uploads/{upload_id}"
    for method in ("GET", "PATCH", "PUT", "DELETE"):
        async with http.request(method, other, data=b"x", headers=OCTET,
                                params={"digest": digest_of(b"abc")}) as r:
            await assert_error(r, 404, "BLOB_UPLOAD_UNKNOWN")
    # The real owner's session is untouched.
    status, headers = await status_of(http, location)
    assert status == 204 and headers["Range"] == "0-2"


# -- mount -------------------------------------------------------------------


async def test_mount_from_another_repo(node, http):
    data = random.Random(9).randbytes(5000)
    digest = await push_blob(http, node.url, "src/app", data)
    async with http.post(f"{node.url}/v2/dst/app/blobs/uploads/",
                         params={"mount": digest, "from": "src/app"}) as r:
        assert r.status == 201, await r.text()
        assert r.headers["Location"] == f"/v2/dst/app/blobs/{digest}"
        assert r.headers["Docker-Content-Digest"] == digest
    assert await blob_body(http, node.url, "dst/app", digest) == (200, data)
    # Mounting again is harmless.
    async with http.post(f"{node.url}/v2/dst/app/blobs/uploads/",
                         params={"mount": digest, "from": "src/app"}) as r:
        assert r.status == 201


async def test_mount_of_blob_missing_in_source_opens_a_session(node, http):
    data = b"only in a third repo"
    digest = await push_blob(http, node.url, "third/app", data)
    for params in ({"mount": digest, "from": "src/app"},            # source lacks it
                   {"mount": digest_of(b"nowhere"), "from": "third/app"},
                   {"mount": digest}):                               # no from at all
        async with http.post(f"{node.url}/v2/dst/app/blobs/uploads/", params=params) as r:
            assert r.status == 202, await r.text()
            location = node.url + r.headers["Location"]
            assert "/v2/dst/app/blobs/uploads/" in location
            assert r.headers["Docker-Upload-UUID"]
        # The fallback session is a real one.
        async with http.put(location, params={"digest": digest}, data=data, headers=OCTET) as r:
            assert r.status == 201
    # The mount did not leak the third repo's blob into dst before the upload.
    async with http.get(f"{node.url}/v2/src/app/blobs/{digest}") as r:
        await assert_error(r, 404, "BLOB_UNKNOWN")


async def test_mount_with_invalid_digest_or_source_name(node, http):
    digest = await push_blob(http, node.url, "src/app", b"abc")
    async with http.post(f"{node.url}/v2/dst/app/blobs/uploads/",
                         params={"mount": "sha256:nothex", "from": "src/app"}) as r:
        await assert_error(r, 400, "DIGEST_INVALID")
    async with http.post(f"{node.url}/v2/dst/app/blobs/uploads/",
                         params={"mount": digest, "from": "Src/App"}) as r:
        await assert_error(r, 400, "NAME_INVALID")


# -- sizes -------------------------------------------------------------------


async def test_zero_length_blob_every_way(node, http):
    empty = digest_of(b"")
    async with http.post(f"{node.url}/v2/z/a/blobs/uploads/", params={"digest": empty},
                         data=b"", headers=OCTET) as r:
        assert r.status == 201, await r.text()
    location = await start(http, node.url, "z/b")
    async with http.put(location, params={"digest": empty}) as r:
        assert r.status == 201, await r.text()
    for repo in ("z/a", "z/b"):
        async with http.get(f"{node.url}/v2/{repo}/blobs/{empty}") as r:
            assert r.status == 200 and await r.read() == b""
            assert r.headers["Content-Length"] == "0"


async def test_multi_mib_blob_in_odd_sized_chunks(node, http):
    data = random.Random(10).randbytes(5 * 1024 * 1024 + 333)
    location = await start(http, node.url, "lib/big")
    offset = 0
    sizes = [1, 777_777, 65_536, 1_048_577, 3, 2_000_001]
    for size in sizes:
        status, headers = await patch(http, location, data[offset:offset + size], offset)
        assert status == 202
        offset += size
        assert headers["Range"] == f"0-{offset - 1}"
        location = node.url + headers["Location"]
    rest = data[offset:]
    async with http.put(location, params={"digest": digest_of(data)}, data=rest,
                        headers={**OCTET, "Content-Range": f"{offset}-{len(data) - 1}"}) as r:
        assert r.status == 201, await r.text()
    assert await blob_body(http, node.url, "lib/big", digest_of(data)) == (200, data)
    async with http.get(f"{node.url}/v2/lib/big/blobs/{digest_of(data)}",
                        headers={"Range": "bytes=1048570-3145740"}) as r:
        assert r.status == 206 and await r.read() == data[1048570:3145741]


# -- restart -------------------------------------------------------------------


async def test_upload_session_survives_a_node_restart(node_config, http):
    data = random.Random(11).randbytes(200_000)
    running = await start_node(node_config)
    try:
        location_path = (await start(http, running.url, "lib/restart"))[len(running.url):]
        _, headers = await patch(http, running.url + location_path, data[:100_000], 0)
        assert headers["Range"] == "0-99999"
    finally:
        await running.stop()

    running = await start_node(node_config)
    try:
        location = running.url + location_path
        status, headers = await status_of(http, location)
        assert status == 204 and headers["Range"] == "0-99999"
        status, headers = await patch(http, location, data[100_000:150_000], 100_000)
        assert status == 202 and headers["Range"] == "0-149999"
        async with http.put(location, params={"digest": digest_of(data)}, data=data[150_000:],
                            headers=OCTET) as r:
            assert r.status == 201, await r.text()
        assert await blob_body(http, running.url, "lib/restart", digest_of(data)) == (200, data)
    finally:
        await running.stop()
