"""Properties of the node, stated as invariants and checked on generated input.

(a) Chunked uploads: however a blob is cut into PATCH chunks (with or without
    Content-Range, the last one in the PUT or not), the blob stored is the
    bytes sent, under their digest, and every byte range reads back exactly.
(b) Manifest pushes: whatever bytes or JSON arrive as a manifest, the answer is
    201 or a 4xx with an OCI error body, never a 5xx; an accepted manifest reads
    back byte-exact; and an image pushed before still pulls byte-exact after.
(c) The grammar: ``registry_node.reference`` agrees with the distribution-spec
    regexes, written out again here independently.
(d) Encryption at rest: any write/flush/restart pattern of ``SegmentWriter``
    seals into a file whose every range reads back exactly; any single-byte
    change or truncation is detected and never yields wrong bytes.

The HTTP properties run against one real node per module (its own event loop,
driven from the synchronous Hypothesis tests), with a fresh repository per
example.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from registry_node.config import NodeConfig
from registry_node.crypto import (
    HEADER_SIZE,
    SEGMENT_SIZE,
    BlobCorrupt,
    NodeKey,
    SealedBlob,
    SegmentWriter,
)
from registry_node.errors import ErrorCode, RegistryError
from registry_node.reference import Digest, validate_name, validate_tag

from .helpers import (
    OCI_INDEX,
    OCI_MANIFEST,
    RunningNode,
    descriptor,
    digest_of,
    make_image,
    push_image,
    start_node,
)
from .profiles import scaled

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCTET = {"Content-Type": "application/octet-stream"}
ERROR_CODES = {code.name for code in ErrorCode}


@dataclass
class LiveNode:
    loop: asyncio.AbstractEventLoop
    running: RunningNode
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return self.running.url

    def run(self, coro):
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One real node for the module, on a loop of its own (Hypothesis drives it
    synchronously, example after example)."""
    loop = asyncio.new_event_loop()
    config = NodeConfig(data_dir=tmp_path_factory.mktemp("properties") / "node", port=0)

    async def open_session():
        return aiohttp.ClientSession(auto_decompress=False)

    running = loop.run_until_complete(start_node(config))
    http = loop.run_until_complete(open_session())
    try:
        yield LiveNode(loop, running, http)
    finally:
        loop.run_until_complete(http.close())
        loop.run_until_complete(running.stop())
        loop.close()


_repo_ids = itertools.count()


def fresh_repo(prefix: str) -> str:
    return f"{prefix}/r{next(_repo_ids)}"


# -- (a) any split of any blob -----------------------------------------------------

BOUNDARIES = [1, SEGMENT_SIZE - 1, SEGMENT_SIZE, SEGMENT_SIZE + 1, 2 * SEGMENT_SIZE - 1,
              2 * SEGMENT_SIZE, 2 * SEGMENT_SIZE + 1, 3 * SEGMENT_SIZE, 4 * SEGMENT_SIZE + 7]
MAX_BLOB = 300 * 1024


@dataclass
class UploadPlan:
    data: bytes
    chunks: list[bytes]
    streamed: list[bool]       # per chunk: chunked encoding without Content-Range
    last_in_put: bool
    algorithm: str
    ranges: list[tuple[int, int]]


@st.composite
def upload_plans(draw) -> UploadPlan:
    size = draw(st.one_of(st.integers(0, MAX_BLOB), st.sampled_from([0, *BOUNDARIES])))
    data = random.Random(draw(st.integers(0, 2**32))).randbytes(size)
    point = st.one_of(st.integers(0, size), st.sampled_from([b for b in BOUNDARIES if b <= size] or [0]))
    cuts = sorted(set(draw(st.lists(point, max_size=8))))
    edges = [0, *cuts, size]
    chunks = [data[a:b] for a, b in zip(edges, edges[1:], strict=False) if b > a]
    streamed = draw(st.lists(st.booleans(), min_size=len(chunks), max_size=len(chunks)))
    ranges = []
    if size:
        offset = st.integers(0, size - 1)
        ranges = draw(st.lists(st.tuples(offset, offset), max_size=5))
    return UploadPlan(data, chunks, streamed, draw(st.booleans()),
                      draw(st.sampled_from(["sha256", "sha256", "sha512"])), ranges)


def _stream(data: bytes, piece: int = 10_007):
    async def gen():
        for i in range(0, len(data), piece):
            yield data[i:i + piece]
    return gen()


async def _chunked_upload(live: LiveNode, repo: str, plan: UploadPlan) -> str:
    http, base = live.http, live.url
    async with http.post(f"{base}/v2/{repo}/blobs/uploads/") as r:
        assert r.status == 202
        location = base + r.headers["Location"]
    chunks = list(plan.chunks)
    last = chunks.pop() if plan.last_in_put and chunks else None
    offset = 0
    for chunk, streamed in zip(chunks, plan.streamed, strict=False):
        headers = dict(OCTET)
        body = chunk
        if streamed:
            body = _stream(chunk)
        else:
            headers["Content-Range"] = f"{offset}-{offset + len(chunk) - 1}"
        async with http.patch(location, data=body, headers=headers) as r:
            assert r.status == 202, await r.text()
            offset += len(chunk)
            assert r.headers["Range"] == f"0-{max(offset - 1, 0)}"
            location = base + r.headers["Location"]
    digest = digest_of(plan.data, plan.algorithm)
    kwargs = {"data": last, "headers": OCTET} if last is not None else {}
    async with http.put(location, params={"digest": digest}, **kwargs) as r:
        assert r.status == 201, await r.text()
        assert r.headers["Docker-Content-Digest"] == digest
    return digest


@settings(max_examples=scaled(60), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.data_too_large])
@given(plan=upload_plans())
def test_any_chunking_yields_the_same_blob(live, plan):
    repo = fresh_repo("split")

    async def body():
        digest = await _chunked_upload(live, repo, plan)
        url = f"{live.url}/v2/{repo}/blobs/{digest}"
        async with live.http.get(url) as r:
            assert r.status == 200
            assert await r.read() == plan.data
        async with live.http.head(url) as r:
            assert r.status == 200
            assert int(r.headers["Content-Length"]) == len(plan.data)
        for a, b in plan.ranges:
            start, end = min(a, b), max(a, b)
            async with live.http.get(url, headers={"Range": f"bytes={start}-{end}"}) as r:
                assert r.status == 206
                assert await r.read() == plan.data[start:end + 1]
                assert r.headers["Content-Range"] == f"bytes {start}-{end}/{len(plan.data)}"
            async with live.http.get(url, headers={"Range": f"bytes=-{end - start + 1}"}) as r:
                assert r.status == 206
                assert await r.read() == plan.data[len(plan.data) - (end - start + 1):]

    live.run(body())


# -- (b) whatever a manifest PUT carries, no 5xx and no damage -----------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                         st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=5),
                               st.dictionaries(st.text(max_size=12), children, max_size=5)),
    max_leaves=25,
)
MANIFEST_KEYS = ["schemaVersion", "mediaType", "config", "layers", "manifests", "subject",
                 "artifactType", "annotations", "digest", "size", "urls", "platform"]
MEDIA_TYPES = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST,
               "application/vnd.docker.distribution.manifest.v1+prettyjws",
               "application/vnd.docker.distribution.manifest.v1+json",
               "application/vnd.oci.image.config.v1+json", "application/json", "", "x/y"]
CONTENT_TYPES = [None, *MEDIA_TYPES, "text/plain", "application/octet-stream",
                 OCI_MANIFEST + "; charset=utf-8"]

BASE_TAG = "stable"
FUZZ_REPO = "fuzz/target"


@pytest.fixture(scope="module")
def base_image(live):
    """An image pushed before any fuzzing; it must pull byte-exact after every example."""
    image = make_image([3000, 70_000], seed=99)
    live.run(push_image(live.http, live.url, FUZZ_REPO, image, tag=BASE_TAG))
    return image


@st.composite
def mutated_manifests(draw, base: dict) -> bytes:
    """A valid manifest with a few things changed: keys set to arbitrary JSON,
    deleted, media types swapped, descriptors replaced."""
    doc = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 4))):
        paths = [(), ("config",), ("layers", 0), ("layers", 1)]
        path = draw(st.sampled_from(paths))
        target = doc
        try:
            for key in path:
                target = target[key]
        except (KeyError, IndexError, TypeError):
            continue
        if not isinstance(target, dict):
            continue
        key = draw(st.sampled_from(MANIFEST_KEYS))
        action = draw(st.sampled_from(["set", "delete", "media", "descriptor", "number"]))
        if action == "delete":
            target.pop(key, None)
        elif action == "media":
            target[key] = draw(st.sampled_from(MEDIA_TYPES))
        elif action == "descriptor":
            target[key] = {"mediaType": draw(st.sampled_from(MEDIA_TYPES)),
                           "digest": draw(st.sampled_from([
                               base["config"]["digest"], base["layers"][0]["digest"],
                               digest_of(b"unknown"), "sha256:short", "md5:00"])),
                           "size": draw(st.integers(-2, 10**6))}
        elif action == "number":
            target[key] = draw(st.one_of(st.integers(), st.floats(allow_nan=False)))
        else:
            target[key] = draw(json_values)
    return json.dumps(doc).encode()


def manifest_bodies(base: dict):
    return st.one_of(
        st.binary(max_size=600),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(st.sampled_from(MANIFEST_KEYS), json_values, max_size=6)
        .map(lambda v: json.dumps(v).encode()),
        mutated_manifests(base),
    )


async def _put_and_check(live: LiveNode, base_image, body: bytes, content_type: str | None,
                         ref: str) -> None:
    if ref == "@digest":
        ref = digest_of(body)
    headers = {"Content-Type": content_type} if content_type is not None else {}
    url = f"{live.url}/v2/{FUZZ_REPO}/manifests/{ref}"
    async with live.http.put(url, data=body, headers=headers) as r:
        answer = await r.read()
        status, rheaders = r.status, r.headers
    assert status < 500, (status, answer[:300])
    if status == 201:
        digest = rheaders["Docker-Content-Digest"]
        assert digest == digest_of(body)
        async with live.http.get(f"{live.url}/v2/{FUZZ_REPO}/manifests/{digest}") as g:
            assert g.status == 200 and await g.read() == body
    else:
        assert 400 <= status < 500, status
        assert rheaders["Content-Type"].startswith("application/json")
        errors = json.loads(answer)["errors"]
        assert errors and errors[0]["code"] in ERROR_CODES, errors
        assert isinstance(errors[0]["message"], str)
    for ref in (BASE_TAG, base_image.digest):
        async with live.http.get(f"{live.url}/v2/{FUZZ_REPO}/manifests/{ref}") as g:
            assert g.status == 200
            assert await g.read() == base_image.manifest
    for blob in base_image.blobs:
        async with live.http.get(f"{live.url}/v2/{FUZZ_REPO}/blobs/{digest_of(blob)}") as g:
            assert g.status == 200 and await g.read() == blob


# Tags the client can put in a URL path as they are (no "/", "?", "#", dot segments).
url_safe_refs = st.text(alphabet=st.characters(codec="ascii", exclude_characters="/?#%\\"),
                        min_size=1, max_size=12).filter(lambda s: s not in (".", "..", BASE_TAG))


@settings(max_examples=scaled(220), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_no_manifest_body_yields_a_5xx_or_breaks_the_repo(live, base_image, data):
    base = json.loads(base_image.manifest)
    body = data.draw(manifest_bodies(base), label="body")
    content_type = data.draw(st.sampled_from(CONTENT_TYPES), label="content_type")
    ref = data.draw(st.one_of(st.just("fuzzed"), st.just("@digest"),
                              st.from_regex(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,20}", fullmatch=True)
                              .filter(lambda s: s != BASE_TAG),
                              url_safe_refs), label="ref")
    live.run(_put_and_check(live, base_image, body, content_type, ref))


EDGE_CASES = {
    "deep nesting": (lambda base: b"[" * 200_000, OCI_MANIFEST),
    "binary": (lambda base: b"\xff\xfe\x00", None),
    "schema 1 body": (lambda base: json.dumps({**base, "schemaVersion": 1}).encode(), None),
    "repeated layer": (lambda base: json.dumps({**base, "layers": [base["layers"][0]] * 3})
                       .encode(), OCI_MANIFEST),
    "subject is a blob": (lambda base: json.dumps({**base, "subject": base["config"]}).encode(),
                          OCI_MANIFEST),
    "huge size": (lambda base: json.dumps({**base, "config": {**base["config"],
                                                              "size": 2**70}}).encode(),
                  OCI_MANIFEST),
    "huge float": (lambda base: json.dumps(base).encode()[:-1] + b', "x": 1e400}', OCI_MANIFEST),
    "NaN": (lambda base: json.dumps({**base, "x": float("nan")}).encode(), OCI_MANIFEST),
    "lone surrogate": (lambda base: json.dumps(base).encode()[:-1] + b', "x": "\\ud800"}',
                       OCI_MANIFEST),
    "NUL in annotation": (lambda base: json.dumps({**base, "annotations": {"a\u0000": "\u0000"}})
                          .encode(), OCI_MANIFEST),
}


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_manifest_edge_cases_yield_no_5xx(live, base_image, name):
    make, content_type = EDGE_CASES[name]
    body = make(json.loads(base_image.manifest))
    for ref in ("edge", "@digest"):
        live.run(_put_and_check(live, base_image, body, content_type, ref))


# What an index's extra keys may hold and still be well formed, drawn as often
# as arbitrary JSON (which is almost never well formed there).
INDEX_EXTRA_KEYS = [k for k in MANIFEST_KEYS if k not in ("manifests", "mediaType", "schemaVersion")]
_text = st.text(max_size=12)
well_formed_extras = {
    "subject": st.builds(lambda seed, media: descriptor(make_image([8], seed=seed).manifest, media),
                         st.integers(0, 3), st.sampled_from([OCI_MANIFEST, OCI_INDEX])),
    "annotations": st.one_of(st.none(), st.dictionaries(_text, _text, max_size=3)),
    "artifactType": st.one_of(st.none(), _text),
}


@st.composite
def index_extras(draw) -> dict:
    keys = draw(st.lists(st.sampled_from(INDEX_EXTRA_KEYS), max_size=3, unique=True))
    return {k: draw(st.one_of(json_values, well_formed_extras.get(k, json_values)), label=k)
            for k in keys}


def _strict_json(value) -> bool:
    """JSON every parser reads: no NaN or infinities (``json.dumps`` writes them)."""
    if isinstance(value, float):
        return value == value and value not in (float("inf"), float("-inf"))
    if isinstance(value, list):
        return all(_strict_json(v) for v in value)
    if isinstance(value, dict):
        return all(_strict_json(v) for v in value.values())
    return True


def _string_map(value) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def _well_formed_descriptor(value) -> bool:
    """The image-spec descriptor: a media type, a non-negative integer size, a
    sha256 or sha512 digest, and annotations (if any) mapping strings to strings."""
    if not isinstance(value, dict):
        return False
    media, size, digest = value.get("mediaType"), value.get("size"), value.get("digest")
    annotations = value.get("annotations")
    return (isinstance(media, str) and media != ""
            and isinstance(size, int) and not isinstance(size, bool) and size >= 0
            and isinstance(digest, str) and SPEC_DIGEST.fullmatch(digest) is not None
            and (annotations is None or _string_map(annotations)))


def expected_index_answer(doc: dict, complete: bool) -> str | None:
    """The error code an index PUT must get (None: 201), stated from the image
    spec independently of ``registry_node.manifest``: well formed first (its
    optional fields, when present and not null, have their types; unknown keys
    are ignored), then every child present in the repository."""
    if not _strict_json(doc):
        return "MANIFEST_INVALID"
    subject, annotations, artifact_type = (doc.get(k) for k in
                                           ("subject", "annotations", "artifactType"))
    if subject is not None and not _well_formed_descriptor(subject):
        return "MANIFEST_INVALID"
    if annotations is not None and not _string_map(annotations):
        return "MANIFEST_INVALID"
    if artifact_type is not None and not isinstance(artifact_type, str):
        return "MANIFEST_INVALID"
    if not complete:
        return "MANIFEST_BLOB_UNKNOWN"
    return None


@settings(max_examples=scaled(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(children=st.lists(st.integers(0, 3), max_size=4),
       media=st.sampled_from([OCI_INDEX, DOCKER_LIST]),
       subject=st.booleans(), extra=index_extras())
def test_generated_indexes_are_accepted_exactly_when_complete(live, base_image, children, media,
                                                              subject, extra):
    """An index is stored iff it is well formed and every child is in the
    repository; otherwise it gets exactly the error that says which it is."""
    present = [base_image.manifest]
    absent = [make_image([8], seed=s).manifest for s in (1, 2, 3)]
    pool = present + absent
    doc = {"schemaVersion": 2, "mediaType": media,
           "manifests": [descriptor(pool[i], OCI_MANIFEST) for i in children]}
    if subject:
        doc["subject"] = descriptor(absent[0], OCI_MANIFEST)   # a subject need not exist
    doc.update(extra)
    body = json.dumps(doc).encode()
    expected = expected_index_answer(doc, complete=all(i == 0 for i in children))
    event(f"{expected or 'accepted'}{' with extra keys' if extra else ''}")

    async def run():
        async with live.http.put(f"{live.url}/v2/{FUZZ_REPO}/manifests/{digest_of(body)}",
                                 data=body, headers={"Content-Type": media}) as r:
            answer = await r.read()
            if expected is None:
                assert r.status == 201, answer
            else:
                assert r.status == 400, (expected, r.status, answer)
                assert json.loads(answer)["errors"][0]["code"] == expected, answer

    live.run(run())


# -- (c) the grammar ------------------------------------------------------------------

SPEC_NAME = re.compile(r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*")
SPEC_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
SPEC_DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")


def spec_name_ok(name: str) -> bool:
    return SPEC_NAME.fullmatch(name) is not None and len(name) <= 255


def accepts(validator, value: str) -> bool:
    try:
        validator(value)
    except RegistryError as exc:
        assert exc.status == 400
        return False
    return True


# from_regex of the whole name grammar is slow to draw from; joining drawn
# components gives the same language (one to four components) much faster.
SPEC_COMPONENT = re.compile(r"[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*")
spec_names = st.lists(st.from_regex(SPEC_COMPONENT, fullmatch=True), min_size=1, max_size=4) \
    .map("/".join)
name_like = st.text(alphabet="ab09._-/A", max_size=40)


@settings(max_examples=scaled(300), deadline=None)
@given(name=st.one_of(spec_names, name_like, st.text(max_size=30),
                      spec_names.map(lambda s: "/".join([s] * 30)),
                      st.integers(240, 270).map(lambda n: ("ab/" * 100)[:n].strip("/"))))
@example(name="a" * 255)
@example(name="a" * 256)
@example(name="a__b")
@example(name="a___b")
@example(name="a--------b")
@example(name="a\n")
@example(name="ａ")
@example(name="a/b/c/" * 40 + "d")
def test_name_validator_matches_the_spec_grammar(name):
    assert accepts(validate_name, name) == spec_name_ok(name), name


@settings(max_examples=scaled(400), deadline=None)
@given(tag=st.one_of(st.from_regex(SPEC_TAG, fullmatch=True),
                     st.text(alphabet="aZ09._-+:/@", max_size=140), st.text(max_size=20)))
@example(tag="a" * 128)
@example(tag="a" * 129)
@example(tag="latest\n")
@example(tag="٣")
def test_tag_validator_matches_the_spec_grammar(tag):
    assert accepts(validate_tag, tag) == (SPEC_TAG.fullmatch(tag) is not None), tag


digest_like = st.builds(
    lambda alg, hexpart: f"{alg}:{hexpart}",
    st.sampled_from(["sha256", "sha512", "md5", "sha384", "SHA256", "sha256+b64", "blake3", ""]),
    st.one_of(st.text(alphabet="0123456789abcdefABCDEF", max_size=130),
              st.integers(0, 130).map(lambda n: "a" * n),
              st.sampled_from(["a" * 64, "0" * 128, "F" * 64, "a" * 63 + "g"])),
)


@settings(max_examples=scaled(400), deadline=None)
@given(digest=st.one_of(st.from_regex(SPEC_DIGEST, fullmatch=True), digest_like,
                        st.text(max_size=80)))
@example(digest="sha256:" + "a" * 64 + "\n")
@example(digest="sha256:" + "٣" * 64)
def test_digest_validator_matches_the_spec_grammar(digest):
    accepted = accepts(Digest.parse, digest)
    assert accepted == (SPEC_DIGEST.fullmatch(digest) is not None), digest
    if accepted:
        parsed = Digest.parse(digest)
        assert parsed == digest and parsed.algorithm in ("sha256", "sha512")


# -- (d) encryption at rest -----------------------------------------------------------

NODE_KEY = NodeKey(bytes(range(32)))


@dataclass
class WritePlan:
    segment_size: int
    pieces: list[bytes]
    flush_after: list[bool]    # flush after this piece
    resume_after: list[bool]   # and reopen the writer from the file, as after a restart

    @property
    def data(self) -> bytes:
        return b"".join(self.pieces)


@st.composite
def write_plans(draw) -> WritePlan:
    segment_size = draw(st.sampled_from([1, 2, 3, 7, 16, 100, 4096]))
    pieces = draw(st.lists(st.binary(max_size=3 * segment_size + 5), max_size=12))
    n = len(pieces)
    flush = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    resume = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return WritePlan(segment_size, pieces, flush, resume)


def seal(path: Path, plan: WritePlan) -> str:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        writer = SegmentWriter.create(fd, NODE_KEY, segment_size=plan.segment_size)
        written = 0
        for piece, flush, resume in zip(plan.pieces, plan.flush_after, plan.resume_after,
                                        strict=True):
            writer.write(piece)
            written += len(piece)
            if flush or resume:
                writer.flush()
            if resume:
                writer = SegmentWriter.resume(fd, NODE_KEY)
            assert writer.size == written
        digest = digest_of(plan.data)
        writer.seal(digest)
    finally:
        os.close(fd)
    return digest


def ranges(size: int, rng: random.Random, count: int = 6):
    yield 0, size
    for _ in range(count):
        a = rng.randint(0, size)
        yield min(a, b := rng.randint(0, size)), max(a, b)


@settings(max_examples=scaled(150), deadline=None)
@given(plan=write_plans(), seed=st.integers(0, 2**32))
def test_sealed_blob_reads_back_any_range(tmp_path_factory, plan, seed):
    path = tmp_path_factory.mktemp("seal") / "blob"
    digest = seal(path, plan)
    data = plan.data
    with SealedBlob.open(path, NODE_KEY, digest) as blob:
        assert blob.size == len(data)
        for a, b in ranges(len(data), random.Random(seed), 10):
            assert blob.read(a, b) == data[a:b]
    with pytest.raises(BlobCorrupt):      # the file is bound to its digest
        SealedBlob.open(path, NODE_KEY, digest_of(data + b"x"))
    with pytest.raises(BlobCorrupt):      # and to the node key
        SealedBlob.open(path, NodeKey(bytes(32)), digest)


def test_sealed_blob_at_the_real_segment_size(tmp_path):
    rng = random.Random(5)
    pieces = [rng.randbytes(n) for n in (1, SEGMENT_SIZE - 2, 3, SEGMENT_SIZE, 70_000, 11)]
    plan = WritePlan(SEGMENT_SIZE, pieces, [True, False, True, False, True, False],
                     [False, True, False, False, True, False])
    digest = seal(tmp_path / "blob", plan)
    with SealedBlob.open(tmp_path / "blob", NODE_KEY, digest) as blob:
        for a, b in ranges(len(plan.data), rng, 20):
            assert blob.read(a, b) == plan.data[a:b]


def _read_all_or_corrupt(path: Path, digest: str, data: bytes, seed: int) -> bool:
    """True when corruption was detected; asserts that whatever was returned is right."""
    try:
        blob = SealedBlob.open(path, NODE_KEY, digest)
    except BlobCorrupt:
        return True
    detected = False
    with blob:
        assert blob.size == len(data)   # else the header lied and was believed
        for a, b in ranges(len(data), random.Random(seed)):
            try:
                got = blob.read(a, b)
            except BlobCorrupt:
                detected = True
                continue
            assert got == data[a:b], "a tampered blob returned wrong bytes"
        try:
            assert blob.read(0, len(data)) == data
        except BlobCorrupt:
            detected = True
    return detected


@settings(max_examples=scaled(200), deadline=None)
@given(plan=write_plans(), where=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255),
       seed=st.integers(0, 2**32))
def test_any_flipped_byte_is_detected(tmp_path_factory, plan, where, mask, seed):
    path = tmp_path_factory.mktemp("flip") / "blob"
    digest = seal(path, plan)
    raw = bytearray(path.read_bytes())
    offset = int(where * len(raw))
    raw[offset] ^= mask
    path.write_bytes(bytes(raw))
    assert _read_all_or_corrupt(path, digest, plan.data, seed), \
        f"byte {offset} of {len(raw)} (header {HEADER_SIZE}) changed undetected"


@settings(max_examples=scaled(100), deadline=None)
@given(plan=write_plans(), cut=st.floats(0, 1, exclude_max=True),
       extra=st.binary(max_size=40), seed=st.integers(0, 2**32))
def test_truncated_or_extended_file_is_detected(tmp_path_factory, plan, cut, extra, seed):
    path = tmp_path_factory.mktemp("cut") / "blob"
    digest = seal(path, plan)
    raw = path.read_bytes()
    path.write_bytes(raw[:int(cut * len(raw))])
    with pytest.raises(BlobCorrupt):
        SealedBlob.open(path, NODE_KEY, digest)
    if extra:
        path.write_bytes(raw + extra)
        with pytest.raises(BlobCorrupt):
            SealedBlob.open(path, NODE_KEY, digest)
    path.write_bytes(raw)
    assert not _read_all_or_corrupt(path, digest, plan.data, seed)
