"""Encryption at rest, checked from the outside: what lands on disk, what a
tampered file yields, and how the node treats its key file.

Plaintext is searched for in every file under the data dir (blob files,
uploads, RocksDB's WAL and tables), both while the node runs and after it
stopped. Tampering is done on the real files of a running in-process node.
"""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import aiohttp

from registry_node.crypto import HEADER_SIZE, SEGMENT_OVERHEAD, SEGMENT_SIZE

from .helpers import (
    OCI_MANIFEST,
    descriptor,
    digest_of,
    flip,
    make_image,
    push_blob,
    push_image,
    start_node,
)

MARKER = b"GEOREG-PLAINTEXT-MARKER-7f3a9c-"
STRIDE = SEGMENT_SIZE + SEGMENT_OVERHEAD


# -- helpers -----------------------------------------------------------------


def marker_needles() -> list[bytes]:
    """Every distinct 32-byte window of a long run of MARKER."""
    run = MARKER * 4
    return sorted({run[i:i + 32] for i in range(len(MARKER))})


def sampled_needles(data: bytes, count: int, rng: random.Random) -> list[bytes]:
    """Distinctive 64-byte substrings spread across ``data``."""
    step = max(1, (len(data) - 64) // count)
    return [data[i:i + 64] for i in range(0, len(data) - 64, step)][:count] + \
        [data[o:o + 64] for o in (rng.randrange(len(data) - 64) for _ in range(4))]


def plaintext_hits(root: Path, needles: list[bytes]) -> list[tuple[str, bytes]]:
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for needle in needles:
            if needle in data:
                hits.append((str(path.relative_to(root)), needle[:40]))
    return hits


async def chunked_upload(http: aiohttp.ClientSession, base: str, repo: str, data: bytes,
                         chunk: int, finish: bool = True) -> str:
    """POST, PATCH chunks with Content-Range, then (if ``finish``) PUT ?digest=."""
    async with http.post(f"{base}/v2/{repo}/blobs/uploads/") as r:
        assert r.status == 202, await r.text()
        location = base + r.headers["Location"]
    for start in range(0, len(data), chunk):
        piece = data[start:start + chunk]
        async with http.patch(location, data=piece, headers={
                "Content-Range": f"{start}-{start + len(piece) - 1}",
                "Content-Type": "application/octet-stream"}) as r:
            assert r.status == 202, await r.text()
            location = base + r.headers["Location"]
    if finish:
        async with http.put(location, params={"digest": digest_of(data)}) as r:
            assert r.status == 201, await r.text()
    return location


async def get_blob(http: aiohttp.ClientSession, base: str, repo: str, digest: str,
                   headers: dict | None = None) -> tuple[int, bytes | None, str]:
    """(status, body or None when the connection was cut, content type)."""
    async with http.get(f"{base}/v2/{repo}/blobs/{digest}", headers=headers or {}) as r:
        try:
            body = await r.read()
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
            body = None
        return r.status, body, r.headers.get("Content-Type", "")


def assert_not_served(status: int, body: bytes | None, ctype: str, original: bytes) -> None:
    """A tampered blob answers an OCI error, or a cut body; never wrong or full bytes.
    The error: the blob is not here (its file is quarantined: a standalone node
    has no replica to fetch it again from, ``blob_repair``)."""
    if status >= 400:
        assert status == 404 and ctype.startswith("application/json")
        errors = json.loads(body)["errors"]
        assert errors and errors[0]["code"] == "BLOB_UNKNOWN", errors
        assert errors[0]["detail"]["repair"] == "unrepairable", errors
        return
    assert status in (200, 206), status
    assert body is None or len(body) < len(original), "a tampered blob was served in full"


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


# -- plaintext never reaches the disk ------------------------------------------


async def test_no_plaintext_of_layers_uploads_or_manifest_annotations_on_disk(node_config, http):
    rng = random.Random(7)
    random_layer = rng.randbytes(300_000)
    marker_layer = MARKER * (200_000 // len(MARKER))
    small_marker_layer = MARKER * 3 + b"tail"                 # shorter than one segment
    chunked_layer = rng.randbytes(100_000) + MARKER * 3000    # mixed, pushed in chunks
    half_done = MARKER * 5000 + rng.randbytes(70_000)         # upload left open
    secret = "annotation-value-" + rng.randbytes(16).hex()
    referrer_secret = "referrer-annotation-" + rng.randbytes(16).hex()

    running = await start_node(node_config)
    try:
        repo = "secret/app"
        base = running.url
        for layer in (random_layer, marker_layer, small_marker_layer):
            await push_blob(http, base, repo, layer)
        await chunked_upload(http, base, repo, chunked_layer, chunk=50_000)
        await chunked_upload(http, base, repo, half_done, chunk=60_000, finish=False)

        config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
        await push_blob(http, base, repo, config)
        layers = [random_layer, marker_layer, small_marker_layer, chunked_layer]
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": descriptor(config, "application/vnd.oci.image.config.v1+json"),
            "layers": [descriptor(x, "application/vnd.oci.image.layer.v1.tar") for x in layers],
            "annotations": {"org.example.secret": secret},
        }).encode()
        async with http.put(f"{base}/v2/{repo}/manifests/v1", data=manifest,
                            headers={"Content-Type": OCI_MANIFEST}) as r:
            assert r.status == 201, await r.text()
        referrer = make_image([500], seed=3, artifact_type="application/vnd.example.sig",
                              subject=descriptor(manifest, OCI_MANIFEST),
                              annotations={"org.example.note": referrer_secret})
        await push_image(http, base, repo, referrer)
        async with http.get(f"{base}/v2/{repo}/referrers/{digest_of(manifest)}") as r:
            listed = await r.json()
        # The referrers API does report the annotation: it is stored, just not in the clear.
        assert listed["manifests"][0]["annotations"] == {"org.example.note": referrer_secret}

        needles = marker_needles()
        for layer in (random_layer, chunked_layer, half_done):
            needles += sampled_needles(layer, 24, rng)
        needles += [secret.encode(), secret.encode()[-24:], referrer_secret.encode()]
        # Self-check: the search finds what is there (the manifest is served back in the clear).
        async with http.get(f"{base}/v2/{repo}/manifests/v1") as r:
            assert secret.encode() in await r.read()

        data_dir = node_config.data_dir
        assert any((data_dir / "uploads").iterdir()), "the half-done upload should be on disk"
        assert plaintext_hits(data_dir, needles) == []
    finally:
        await running.stop()
    # After a clean stop RocksDB has flushed its memtable to table files.
    assert plaintext_hits(node_config.data_dir, needles) == []
    # The search itself finds plaintext where there is some.
    probe = node_config.data_dir.parent / "probe"
    probe.mkdir()
    (probe / "layer").write_bytes(b"x" + chunked_layer + secret.encode())
    assert len(plaintext_hits(probe, needles)) > 30


# -- tampering is detected, never served ----------------------------------------


async def test_tampered_blob_files_are_never_served(node, http):
    rng = random.Random(11)
    repo = "tamper/app"
    big = rng.randbytes(2_500_000)               # > 1 MiB: streamed after the headers
    victims = {name: rng.randbytes(200_000) for name in
               ("segment", "header-id", "header-key", "truncated", "extended")}
    swap_a, swap_b = rng.randbytes(150_000), rng.randbytes(180_000)
    for data in [big, *victims.values(), swap_a, swap_b]:
        await push_blob(http, node.url, repo, data)
    store = node.node.blobs

    # Untampered first, so the checks below can only pass because of the tampering.
    for data in [big, *victims.values(), swap_a, swap_b]:
        status, body, _ = await get_blob(http, node.url, repo, digest_of(data))
        assert (status, body) == (200, data)

    # A flipped byte in one segment of a small blob: 404 with an OCI error body.
    data = victims["segment"]
    flip(store.path(digest_of(data)), HEADER_SIZE + STRIDE + 100)
    status, body, ctype = await get_blob(http, node.url, repo, digest_of(data))
    assert status == 404
    assert_not_served(status, body, ctype, data)

    # Header: the blob id (bound to the wrapped key as associated data), and the
    # wrapped data key itself.
    data = victims["header-id"]
    flip(store.path(digest_of(data)), 4 + 1 + 1 + 2 + 4 + 8 + 5)
    status, body, ctype = await get_blob(http, node.url, repo, digest_of(data))
    assert status == 404
    assert_not_served(status, body, ctype, data)
    data = victims["header-key"]
    flip(store.path(digest_of(data)), 4 + 1 + 1 + 2 + 4 + 8 + 16 + 2 + 136 + 20)
    status, body, ctype = await get_blob(http, node.url, repo, digest_of(data),
                                         {"Range": "bytes=0-99"})
    assert status == 404
    assert_not_served(status, body, ctype, data)

    # Truncated by a few bytes, or extended by a few.
    data = victims["truncated"]
    path = store.path(digest_of(data))
    os.truncate(path, path.stat().st_size - 5)
    status, body, ctype = await get_blob(http, node.url, repo, digest_of(data))
    assert status == 404
    assert_not_served(status, body, ctype, data)
    data = victims["extended"]
    append(store.path(digest_of(data)), b"\0" * 3)
    status, body, ctype = await get_blob(http, node.url, repo, digest_of(data))
    assert status == 404
    assert_not_served(status, body, ctype, data)

    # Two blobs' files swapped: each name now holds the other's (authentic) bytes.
    pa, pb = store.path(digest_of(swap_a)), store.path(digest_of(swap_b))
    tmp = pa.with_name("swap")
    os.rename(pa, tmp)
    os.rename(pb, pa)
    os.rename(tmp, pb)
    for data in (swap_a, swap_b):
        status, body, ctype = await get_blob(http, node.url, repo, digest_of(data))
        assert status == 404
        assert_not_served(status, body, ctype, data)

    # A large blob tampered past its first MiB. Segments are authenticated one
    # by one: until a read meets the bad one, ranges of untouched segments read…
    digest = digest_of(big)
    bad_segment = 20                              # bytes 1_310_720 .. 1_376_255
    flip(store.path(digest), HEADER_SIZE + bad_segment * STRIDE + 500)
    status, body, _ = await get_blob(http, node.url, repo, digest, {"Range": "bytes=0-99999"})
    assert (status, body) == (206, big[:100_000])
    tail = len(big) - 50_000
    status, body, _ = await get_blob(http, node.url, repo, digest, {"Range": f"bytes={tail}-"})
    assert (status, body) == (206, big[tail:])
    # …a whole read has sent its headers when it reaches it, so the connection
    # is cut short (and the file quarantined)…
    status, body, ctype = await get_blob(http, node.url, repo, digest)
    assert_not_served(status, body, ctype, big)
    assert body is None or body == big[:len(body)], "bytes before the cut must be genuine"
    # …after which the blob is not here at all.
    start = bad_segment * SEGMENT_SIZE + 10
    status, body, ctype = await get_blob(http, node.url, repo, digest,
                                         {"Range": f"bytes={start}-{start + 999}"})
    assert status == 404
    assert_not_served(status, body, ctype, big[start:start + 1000])


# -- the node key file -----------------------------------------------------------


def run_node_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run `georeg node` expecting it to refuse to start (it exits on its own)."""
    return subprocess.run([sys.executable, "-m", "cluster.cli", "node", "--listen", "127.0.0.1:0",
                           "--log-format", "json", *args],
                          capture_output=True, text=True, timeout=timeout)


def write_key(path: Path, content: bytes, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(content)
    os.chmod(path, mode)
    return path


async def test_node_key_is_created_private_and_a_foreign_key_is_refused(node_process, tmp_path, http):
    proc = node_process("keyed")
    key_path = proc.data_dir / "node.key"
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert len(key_path.read_bytes()) == 32
    blob = os.urandom(10_000)
    await push_blob(http, proc.url, "k/app", blob)
    assert proc.terminate() == 0

    other = write_key(tmp_path / "other.key", os.urandom(32))
    result = run_node_cli("--data-dir", str(proc.data_dir), "--key-file", str(other))
    assert result.returncode == 2, result.stderr
    assert "is not the key" in result.stderr and "--key-file" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr

    # The original key still opens it, and the blob is intact.
    proc.start()
    async with http.get(f"{proc.url}/v2/k/app/blobs/{digest_of(blob)}") as r:
        assert r.status == 200 and await r.read() == blob


def test_key_file_readable_by_others_is_refused_with_a_chmod_hint(tmp_path):
    key = write_key(tmp_path / "open.key", os.urandom(32), mode=0o644)
    result = run_node_cli("--data-dir", str(tmp_path / "d"), "--key-file", str(key))
    assert result.returncode == 2, result.stderr
    assert f"chmod 600 {key}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    # Refused before anything was written with it.
    assert not (tmp_path / "d" / "meta").exists()


def test_malformed_or_missing_key_file_is_refused(tmp_path):
    short = write_key(tmp_path / "short.key", b"not a key")
    result = run_node_cli("--data-dir", str(tmp_path / "d"), "--key-file", str(short))
    assert result.returncode == 2 and "32-byte key" in result.stderr, result.stderr
    result = run_node_cli("--data-dir", str(tmp_path / "d"), "--key-file", str(tmp_path / "none"))
    assert result.returncode == 2 and "does not exist" in result.stderr, result.stderr


async def test_key_file_in_hex_base64_or_raw_opens_the_same_data(node_process, tmp_path, http):
    key = os.urandom(32)
    hex_key = write_key(tmp_path / "hex.key", key.hex().encode() + b"\n")
    b64_key = write_key(tmp_path / "b64.key", base64.b64encode(key) + b"\n")
    raw_key = write_key(tmp_path / "raw.key", key)

    proc = node_process("ext", "--key-file", str(hex_key))
    assert not (proc.data_dir / "node.key").exists(), "an explicit key must not be copied"
    blob = os.urandom(150_000)
    await push_blob(http, proc.url, "k/app", blob)
    assert proc.terminate() == 0
    for key_file in (b64_key, raw_key):
        proc.args = ["--key-file", str(key_file)]
        proc.start()
        async with http.get(f"{proc.url}/v2/k/app/blobs/{digest_of(blob)}") as r:
            assert r.status == 200 and await r.read() == blob
        assert proc.terminate() == 0

    # And the key really is the one in those files: another key is refused.
    wrong = write_key(tmp_path / "wrong.key", os.urandom(32).hex().encode())
    result = run_node_cli("--data-dir", str(proc.data_dir), "--key-file", str(wrong))
    assert result.returncode == 2, result.stderr
