"""Changeable attributes (ACR's locks) on one real node: ``/acr/v1/`` routes to
read and change them, the operations they refuse (with skopeo where a
client's view matters), the ``_tags``/``_manifests`` listings, untag, and
bad input. Replication of attributes is in ``test_replication_stateful``
(the lock-vs-push race) and ``test_locks_cluster``.
"""

from __future__ import annotations

import json

import aiohttp
import grpc
import pytest

from cluster.faults.verify import NodeTarget, verify
from registry_node import locks
from registry_node.auth.identities import Password, TokenRecord, hash_secret
from registry_node.metastore import Batch
from registry_node.records import ChangeableAttributes
from replicator.wire.v1 import replication_pb2 as pb
from replicator.wire.v1 import replication_pb2_grpc as pbg

from .auth_helpers import (
    ADMIN_PASSWORD,
    PUSH_PASSWORD,
    REGISTRY,
    auth_files,
    basic,
    bearer,
    identities,
    start_auth_node,
)
from .helpers import (
    OCI_MANIFEST,
    Skopeo,
    assert_error,
    eventually,
    make_image,
    push_blob,
    push_image,
    write_oci_layout,
)
from .replication_invariants import start_cluster, stop_cluster
from .test_auth_api import token_for

DISALLOWED = "REGISTRY_DISALLOWED_OPERATION"
ALL_ENABLED = {"deleteEnabled": True, "writeEnabled": True, "readEnabled": True,
               "listEnabled": True}


async def patch(http, url: str, body, status: int = 200) -> dict:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    async with http.patch(url, data=data, headers={"Content-Type": "application/json"}) as r:
        if status != 200:
            return await assert_error(r, status)
        assert r.status == 200, await r.text()
        return await r.json()


async def get(http, url: str) -> dict:
    async with http.get(url) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def put_manifest(http, base: str, repo: str, ref: str, manifest: bytes):
    return http.put(f"{base}/v2/{repo}/manifests/{ref}", data=manifest,
                    headers={"Content-Type": OCI_MANIFEST})


# -- reading and changing attributes ----------------------------------------------


async def test_attributes_of_repository_tag_and_manifest_are_separate(node, http):
    image = make_image(seed=1)
    digest = await push_image(http, node.url, "app", image, tag="v1")
    acr = f"{node.url}/acr/v1/app"
    repo = await get(http, acr)
    assert repo["imageName"] == "app" and repo["tagCount"] == 1 and repo["manifestCount"] == 1
    assert repo["changeableAttributes"] == ALL_ENABLED

    tag = await patch(http, f"{acr}/_tags/v1", {"writeEnabled": False})
    assert tag["tag"]["name"] == "v1" and tag["tag"]["digest"] == digest
    assert tag["tag"]["changeableAttributes"] == {**ALL_ENABLED, "writeEnabled": False}
    manifest = await patch(http, f"{acr}/_manifests/{digest}", {"deleteEnabled": False,
                                                                "listEnabled": False})
    assert manifest["manifest"]["tags"] == ["v1"]
    assert manifest["manifest"]["changeableAttributes"] == {
        **ALL_ENABLED, "deleteEnabled": False, "listEnabled": False}
    # Each stays as set; the repository's own are untouched.
    assert (await get(http, acr))["changeableAttributes"] == ALL_ENABLED
    assert (await get(http, f"{acr}/_tags/v1"))["tag"]["changeableAttributes"]["writeEnabled"] is False
    again = await get(http, f"{acr}/_manifests/{digest}")
    assert again["manifest"]["changeableAttributes"]["deleteEnabled"] is False
    # A PATCH sets only what it names.
    tag = await patch(http, f"{acr}/_tags/v1", {"readEnabled": False})
    assert tag["tag"]["changeableAttributes"] == {**ALL_ENABLED, "writeEnabled": False,
                                                  "readEnabled": False}


async def test_bad_attribute_input_is_a_clear_400_and_changes_nothing(node, http):
    await push_image(http, node.url, "app", make_image(seed=2), tag="v1")
    url = f"{node.url}/acr/v1/app/_tags/v1"
    for body, words in [(b"{not json", "JSON object"), ([False], "JSON object"),
                        ({"writeEnabled": "false"}, "true or false"),
                        ({"writeEnabled": 0}, "true or false"),
                        ({"writeEnabled": None}, "true or false"),
                        ({"lockEnabled": False}, "unknown attribute")]:
        error = await patch(http, url, body, status=400)
        assert words in json.dumps(error), (body, error)
    assert (await get(http, url))["tag"]["changeableAttributes"] == ALL_ENABLED
    async with http.patch(url, data=b"{" + b" " * 5000 + b"}") as r:
        await assert_error(r, 413)


async def test_unknown_repository_tag_or_manifest_is_a_404(node, http):
    await push_image(http, node.url, "app", make_image(seed=3), tag="v1")
    missing = "sha256:" + "0" * 64
    cases = [("GET", "/acr/v1/nope", "NAME_UNKNOWN"), ("PATCH", "/acr/v1/nope", "NAME_UNKNOWN"),
             ("GET", "/acr/v1/nope/_tags", "NAME_UNKNOWN"),
             ("GET", "/acr/v1/nope/_manifests", "NAME_UNKNOWN"),
             ("GET", "/acr/v1/app/_tags/v9", "MANIFEST_UNKNOWN"),
             ("PATCH", "/acr/v1/app/_tags/v9", "MANIFEST_UNKNOWN"),
             ("DELETE", "/acr/v1/app/_tags/v9", "MANIFEST_UNKNOWN"),
             ("GET", f"/acr/v1/app/_manifests/{missing}", "MANIFEST_UNKNOWN"),
             ("PATCH", f"/acr/v1/app/_manifests/{missing}", "MANIFEST_UNKNOWN")]
    for method, path, code in cases:
        async with http.request(method, node.url + path, json={"writeEnabled": False}) as r:
            await assert_error(r, 404, code)
    async with http.get(f"{node.url}/acr/v1/app/_manifests/sha256:nothex") as r:
        await assert_error(r, 400, "DIGEST_INVALID")
    async with http.get(f"{node.url}/acr/v1/app/_tags?orderby=sideways") as r:
        await assert_error(r, 400)
    async with http.get(f"{node.url}/acr/v1/app/_tags?n=-1") as r:
        await assert_error(r, 400)


# -- what attributes refuse -----------------------------------------------------------


async def test_write_locks_refuse_pushes_and_deletes(node, http):
    base, acr = node.url, f"{node.url}/acr/v1/app"
    first, second = make_image(seed=4), make_image(seed=5)
    digest = await push_image(http, base, "app", first, tag="v1")
    await push_image(http, base, "app", second)
    await patch(http, f"{acr}/_tags/v1", {"writeEnabled": False})
    # The tag cannot move, nor go, nor take its manifest with it.
    async with await put_manifest(http, base, "app", "v1", second.manifest) as r:
        error = await assert_error(r, 405, DISALLOWED)
        assert "v1" in error["detail"]["reason"]
    async with http.delete(f"{base}/v2/app/manifests/v1") as r:
        await assert_error(r, 405, DISALLOWED)
    async with http.delete(f"{base}/v2/app/manifests/{digest}") as r:
        await assert_error(r, 405, DISALLOWED)
    # Putting what the tag already names changes nothing, and is no refusal;
    # other tags move freely.
    async with await put_manifest(http, base, "app", "v1", first.manifest) as r:
        assert r.status == 201
    async with await put_manifest(http, base, "app", "v2", second.manifest) as r:
        assert r.status == 201
    assert (await get(http, f"{acr}/_tags/v1"))["tag"]["digest"] == digest

    # A write-locked repository takes no upload, and its tags' attributes
    # cannot change until it is unlocked (ACR's rule).
    await patch(http, acr, {"writeEnabled": False})
    async with http.post(f"{base}/v2/app/blobs/uploads/") as r:
        await assert_error(r, 405, DISALLOWED)
    async with await put_manifest(http, base, "app", "v3", second.manifest) as r:
        await assert_error(r, 405, DISALLOWED)
    await patch(http, f"{acr}/_tags/v2", {"writeEnabled": False}, status=405)
    async with http.delete(acr) as r:
        await assert_error(r, 405, DISALLOWED)
    await patch(http, acr, {"writeEnabled": True})
    await patch(http, f"{acr}/_tags/v1", {"writeEnabled": True})
    async with await put_manifest(http, base, "app", "v1", second.manifest) as r:
        assert r.status == 201


async def test_delete_locks_refuse_deletes_only(node, http):
    base, acr = node.url, f"{node.url}/acr/v1/app"
    image = make_image(seed=6)
    digest = await push_image(http, base, "app", image, tag="v1")
    await patch(http, f"{acr}/_manifests/{digest}", {"deleteEnabled": False})
    async with http.delete(f"{base}/v2/app/manifests/{digest}") as r:
        await assert_error(r, 405, DISALLOWED)
    async with http.delete(acr) as r:                  # nothing of it goes
        await assert_error(r, 405, DISALLOWED)
    assert (await get(http, acr))["manifestCount"] == 1
    # Untag is not a delete of the manifest; a re-push by tag is not refused.
    async with http.delete(f"{acr}/_tags/v1") as r:
        assert r.status == 202
    async with await put_manifest(http, base, "app", "v1", image.manifest) as r:
        assert r.status == 201


async def test_a_locked_repository_refuses_a_blob_delete(node, http):
    base, acr = node.url, f"{node.url}/acr/v1/app"
    await push_image(http, base, "app", make_image(seed=60), tag="v1")
    blob = await push_blob(http, base, "app", b"a blob no manifest uses")
    for lock in ({"writeEnabled": False}, {"deleteEnabled": False}):
        await patch(http, acr, lock)
        async with http.delete(f"{base}/v2/app/blobs/{blob}") as r:
            error = await assert_error(r, 405, DISALLOWED)
            assert "repository app" in error["detail"]["reason"]
        async with http.head(f"{base}/v2/app/blobs/{blob}") as r:
            assert r.status == 200, "the refused delete changed nothing"
        await patch(http, acr, ALL_ENABLED)
    async with http.delete(f"{base}/v2/app/blobs/{blob}") as r:
        assert r.status == 202


async def test_read_and_list_locks(node, http):
    base, acr = node.url, f"{node.url}/acr/v1/app"
    one, two = make_image(seed=7), make_image(seed=8)
    d1 = await push_image(http, base, "app", one, tag="v1")
    d2 = await push_image(http, base, "app", two, tag="v2")
    await patch(http, f"{acr}/_manifests/{d1}", {"readEnabled": False})
    for ref in ("v1", d1):
        for method in ("GET", "HEAD"):
            async with http.request(method, f"{base}/v2/app/manifests/{ref}") as r:
                await assert_error(r, 405, DISALLOWED if method == "GET" else None)
    async with http.get(f"{base}/v2/app/manifests/v2") as r:
        assert r.status == 200
    await patch(http, f"{acr}/_tags/v2", {"readEnabled": False, "listEnabled": False})
    async with http.get(f"{base}/v2/app/manifests/v2") as r:
        await assert_error(r, 405, DISALLOWED)
    async with http.get(f"{base}/v2/app/manifests/{d2}") as r:   # the manifest is not locked
        assert r.status == 200
    assert (await get(http, f"{base}/v2/app/tags/list"))["tags"] == ["v1"]
    assert [t["name"] for t in (await get(http, f"{acr}/_tags"))["tags"]] == ["v1"]
    assert (await get(http, f"{acr}/_tags/v2"))["tag"]["name"] == "v2"  # still there by name
    await patch(http, f"{acr}/_manifests/{d2}", {"listEnabled": False})
    assert [m["digest"] for m in (await get(http, f"{acr}/_manifests"))["manifests"]] == [d1]
    await patch(http, acr, {"listEnabled": False})
    assert "app" not in (await get(http, f"{base}/v2/_catalog"))["repositories"]
    await patch(http, acr, {"readEnabled": False})
    async with http.get(f"{base}/v2/app/manifests/{d2}") as r:
        await assert_error(r, 405, DISALLOWED)


# -- listings and untag ------------------------------------------------------------------


async def test_listings_order_by_time_and_page(node, http):
    base, acr = node.url, f"{node.url}/acr/v1/app"
    digests = []
    for i, tag in enumerate(["c", "a", "b"]):       # pushed in this order
        digests.append(await push_image(http, base, "app", make_image(seed=10 + i), tag=tag))
    names = lambda doc: [t["name"] for t in doc["tags"]]  # noqa: E731
    assert names(await get(http, f"{acr}/_tags")) == ["a", "b", "c"]
    assert names(await get(http, f"{acr}/_tags?orderby=timedesc")) == ["b", "a", "c"]
    assert names(await get(http, f"{acr}/_tags?orderby=timeasc")) == ["c", "a", "b"]
    async with http.get(f"{acr}/_tags?orderby=timedesc&n=2") as r:
        assert names(await r.json()) == ["b", "a"]
        link = r.headers["Link"]
    assert "orderby=timedesc" in link and "last=a" in link
    assert names(await get(http, f"{acr}/_tags?orderby=timedesc&n=2&last=a")) == ["c"]
    manifests = (await get(http, f"{acr}/_manifests?orderby=timedesc"))["manifests"]
    assert [m["digest"] for m in manifests] == digests[::-1]
    entry = manifests[0]
    assert entry["tags"] == ["b"] and entry["imageSize"] > 0
    assert entry["createdTime"].endswith("Z") and entry["lastUpdateTime"] >= entry["createdTime"]


async def test_a_time_ordered_listing_goes_on_after_its_last_entry_is_gone(node, http):
    """Paging by ``Link`` while the entry a page ended with is untagged (or its
    manifest deleted): the next page goes on from where it was."""
    base, acr = node.url, f"{node.url}/acr/v1/app"
    pushed = {}
    for i, tag in enumerate(["a", "b", "c", "d"]):
        pushed[tag] = await push_image(http, base, "app", make_image(seed=70 + i), tag=tag)
    # The first run re-pushes "a" last: the second sees it as the newest.
    for order, expected in (("timeasc", ["a", "b", "c", "d"]), ("timedesc", ["a", "d", "c", "b"])):
        seen, url, gone = [], f"{acr}/_tags?orderby={order}&n=1", []
        while url:
            async with http.get(url) as r:
                assert r.status == 200, await r.text()
                seen += [t["name"] for t in (await r.json())["tags"]]
                link = r.headers.get("Link")
            url = f"{base}{link[1:link.index('>')]}" if link else None
            if not gone:                  # the entry the first page ended with goes
                gone.append(seen[0])
                async with http.delete(f"{acr}/_tags/{seen[0]}") as r:
                    assert r.status == 202
        assert seen == expected, (order, seen)
        await push_image(http, base, "app", make_image(seed=70 + "abcd".index(gone[0])),
                         tag=gone[0])     # back, now the newest
    manifests = f"{acr}/_manifests?orderby=timeasc&n=1"
    async with http.get(manifests) as r:
        first = (await r.json())["manifests"][0]["digest"]
        link = r.headers["Link"]
    async with http.delete(f"{base}/v2/app/manifests/{first}") as r:
        assert r.status == 202
    rest = await get(http, f"{base}{link[1:link.index('>')]}")
    assert len(rest["manifests"]) == 1 and rest["manifests"][0]["digest"] != first
    async with http.get(f"{acr}/_tags?orderby=timeasc&last=a&stamp=x") as r:
        await assert_error(r, 400)


async def test_untag_removes_only_the_tag(node, http):
    base, acr = node.url, f"{node.url}/acr/v1/app"
    image = make_image(seed=20)
    digest = await push_image(http, base, "app", image, tag="v1")
    async with await put_manifest(http, base, "app", "v2", image.manifest) as r:
        assert r.status == 201
    async with http.delete(f"{acr}/_tags/v1") as r:
        assert r.status == 202
    assert (await get(http, f"{base}/v2/app/tags/list"))["tags"] == ["v2"]
    async with http.get(f"{base}/v2/app/manifests/{digest}") as r:
        assert r.status == 200


# -- skopeo ----------------------------------------------------------------------


@pytest.fixture
def skopeo(node, tmp_path) -> Skopeo:
    return Skopeo(tmp_path / "skopeo", node.url.removeprefix("http://"))


async def test_skopeo_sees_each_refusal(node, http, skopeo, tmp_path):
    """A real client meets each lock: a push to a write-locked tag, a delete of
    a delete-locked manifest, a pull of a read-disabled manifest, a
    list-disabled tag missing from its listing."""
    acr = f"{node.url}/acr/v1/app"
    first, second = make_image(seed=30), make_image(seed=31)
    write_oci_layout(tmp_path / "first", first)
    write_oci_layout(tmp_path / "second", second)
    await skopeo.copy(f"oci:{tmp_path / 'first'}:latest", skopeo.ref("app:v1"))
    await skopeo.copy(f"oci:{tmp_path / 'first'}:latest", skopeo.ref("app:hidden"))
    digest = (await get(http, f"{acr}/_tags/v1"))["tag"]["digest"]  # as skopeo wrote it
    await patch(http, f"{acr}/_tags/v1", {"writeEnabled": False})
    await patch(http, f"{acr}/_manifests/{digest}", {"deleteEnabled": False,
                                                     "readEnabled": False})
    await patch(http, f"{acr}/_tags/hidden", {"listEnabled": False})

    code, _, err = await skopeo.run("copy", "--quiet", "--authfile", str(skopeo.auth),
                                    "--dest-tls-verify=false", f"oci:{tmp_path / 'second'}:latest",
                                    skopeo.ref("app:v1"), check=False)
    assert code != 0 and "disallowed" in err.lower(), err
    code, _, err = await skopeo.run("delete", "--tls-verify=false", "--authfile", str(skopeo.auth),
                                    skopeo.ref(f"app@{digest}"), check=False)
    assert code != 0 and "disallowed" in err.lower(), err
    code, _, err = await skopeo.run("inspect", "--raw", "--tls-verify=false", "--authfile",
                                    str(skopeo.auth), skopeo.ref(f"app@{digest}"),
                                    check=False)
    assert code != 0 and "disallowed" in err.lower(), err
    assert await skopeo.list_tags("app") == ["v1"]
    # Nothing moved: v1 still names the first image.
    assert (await get(http, f"{acr}/_tags/v1"))["tag"]["digest"] == digest


# -- who may change attributes ---------------------------------------------------------


async def test_changing_attributes_needs_metadata_write_and_reading_them_metadata_read(
        tmp_path, http):
    """ACR's scope-map actions on a node with auth on: a token that may read and
    write content (``_repositories_push``) may neither read nor change
    attributes; ``_repositories_pull_metadata_read`` reads them and changes
    none; ``_repositories_push_metadata_write`` changes them. With Basic
    credentials and with bearer tokens from the node's token server alike; a
    refusal changes nothing."""
    source = identities()
    for name, scope_map, password in (
            ("reader", "_repositories_pull_metadata_read", "reader-pw-1a2b3c"),
            ("locker", "_repositories_push_metadata_write", "locker-pw-4d5e6f")):
        source.put_token(TokenRecord(name, scope_map,
                                     passwords=(Password("password1", hash_secret(password)),)))
    files = auth_files(tmp_path, "node-a")
    node = await start_auth_node(files.config("node-a", tmp_path / "data"), source)
    try:
        async with aiohttp.ClientSession(headers=basic(REGISTRY, ADMIN_PASSWORD)) as admin:
            await push_image(admin, node.url, "team/app", make_image(seed=30), tag="v1")
        tag = f"{node.url}/acr/v1/team/app/_tags/v1"
        lock = json.dumps({"writeEnabled": False})

        async def attempt(method: str, headers: dict) -> int:
            async with http.request(method, tag, headers={**headers, "Content-Type":
                                                          "application/json"},
                                    data=lock if method == "PATCH" else None) as r:
                if r.status == 403:
                    await assert_error(r, 403, "DENIED")
                return r.status

        pusher = basic("pusher", PUSH_PASSWORD)
        reader = basic("reader", "reader-pw-1a2b3c")
        locker = basic("locker", "locker-pw-4d5e6f")
        assert await attempt("PATCH", pusher) == 403
        assert await attempt("GET", pusher) == 403
        assert await attempt("PATCH", reader) == 403
        assert await attempt("GET", reader) == 200
        async with http.get(tag, headers=reader) as r:
            assert (await r.json())["tag"]["changeableAttributes"] == ALL_ENABLED
        # Tokens: what the token server grants is what the scope map holds.
        wanted = "repository:team/app:pull,push,metadata_read,metadata_write"
        pusher_token = await token_for(http, node, "pusher", PUSH_PASSWORD, wanted)
        assert await attempt("PATCH", bearer(pusher_token)) == 403
        locker_token = await token_for(http, node, "locker", "locker-pw-4d5e6f", wanted)
        assert await attempt("PATCH", bearer(locker_token)) == 200
        async with http.get(tag, headers=reader) as r:
            assert (await r.json())["tag"]["changeableAttributes"]["writeEnabled"] is False
        assert await attempt("PATCH", locker) == 200
    finally:
        await node.stop()


# -- georeg verify ------------------------------------------------------------------------


async def test_verify_compares_attributes_and_serves_them_as_locks_have_them(tmp_path, http):
    """Two replicas holding the same locks verify clean, a list-disabled
    repository missing from the catalog and a read-disabled manifest refused
    included (that is how they are served). A lock reverted on one replica
    (an older value) and a lock lost on it (no register) are each an
    ``attributes`` divergence naming the node and the newest value."""
    cluster = await start_cluster(tmp_path, [("eastus", ""), ("westeurope", "")])
    try:
        east, west = cluster.nodes["eastus"], cluster.nodes["westeurope"]
        digest = await push_image(http, east.url, "app", make_image(seed=40), tag="v1")
        acr = f"{east.url}/acr/v1/app"
        await patch(http, f"{acr}/_tags/v1", {"writeEnabled": False})
        await patch(http, f"{acr}/_manifests/{digest}", {"readEnabled": False})
        await patch(http, acr, {"listEnabled": False})
        targets = (locks.tag("app", "v1"), locks.manifest("app", digest), locks.repository("app"))
        def held(node, target):
            record = node.registry.locks.record(target)
            return record and (record.attributes, record.hlc, record.origin_region)
        await eventually(lambda: all(held(west, t) == held(east, t) for t in targets),
                         what="the locks in westeurope")

        async def report():
            nodes = [NodeTarget(n.name, n.region, n.url, n.zone, n.data_dir)
                     for n in cluster.running()]
            done = await verify(nodes, policy=cluster.residency, timeout=30)
            assert done.error is None
            return done

        clean = await report()
        assert clean.divergences == [], clean.as_dict()

        # West Europe's tag lock reverted to an older value, its manifest's lost.
        batch = Batch()
        tag_lock = east.registry.locks.record(locks.tag("app", "v1"))
        west.registry.locks.stage(batch, locks.tag("app", "v1"), ChangeableAttributes(),
                                  (tag_lock.hlc - 1, "westeurope", ""), 0)
        batch.delete(locks.manifest("app", digest).key())
        west.registry.meta.commit(batch)
        found = {(d.kind, d.node, d.tag, d.digest): d for d in (await report()).divergences}
        assert set(found) == {("attributes", "westeurope", "v1", None),
                              ("attributes", "westeurope", None, digest)}, \
            [d.as_dict() for d in found.values()]
        reverted = found[("attributes", "westeurope", "v1", None)]
        assert reverted.expected["writeEnabled"] is False and reverted.actual["writeEnabled"]
        assert reverted.source == "eastus"
        lost = found[("attributes", "westeurope", None, digest)]
        assert lost.expected["readEnabled"] is False and lost.actual is None
    finally:
        await stop_cluster(cluster)


async def test_a_subscriber_that_does_not_say_it_understands_attributes_is_not_sent_them(
        tmp_path, http):
    """A georeg from before changeable attributes fails on an ``attributes_set``
    event (an unknown kind), at the same cursor each time it resubscribes: the
    sender leaves them out for a subscriber whose start does not set
    ``SubscribeStart.attributes``, and sends them to one that does."""
    cluster = await start_cluster(tmp_path, [("eastus", ""), ("westeurope", "")])
    try:
        east = cluster.nodes["eastus"]
        await push_image(http, east.url, "app", make_image(seed=50), tag="v1")
        await patch(http, f"{east.url}/acr/v1/app/_tags/v1", {"writeEnabled": False})
        head = east.registry.meta.last_seq

        async def kinds(**start) -> list[str]:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{east.grpc_port}") as ch:
                call = pbg.ReplicationStub(ch).Subscribe(iter([pb.SubscribeMessage(
                    start=pb.SubscribeStart(
                        subscriber=pb.NodeRef(region="westeurope", node_id="probe"),
                        cursor=0, name="probe", **start))]))
                seen = []
                async for batch in call:
                    seen += [e.kind for e in batch.events]
                    if batch.last_seq >= head:
                        break
                call.cancel()
                return seen

        old = await kinds()
        assert "manifest_put" in old and "attributes_set" not in old, old
        assert "attributes_set" in await kinds(attributes=True)
    finally:
        await stop_cluster(cluster)


async def test_a_replicated_write_landing_on_a_lock_is_counted_and_the_lock_stays(
        tmp_path, http):
    """A lock protects from when it reaches a region (docs/locks.md): a push
    made, during a partition, in the region the lock had not reached, and
    stamped later, moves the tag everywhere once healed. The node that held
    the lock says so (``georeg_lock_overridden_total``), and keeps the lock."""
    cluster = await start_cluster(tmp_path, [("eastus", ""), ("westeurope", "")])
    try:
        east, west = cluster.nodes["eastus"], cluster.nodes["westeurope"]
        first = await push_image(http, east.url, "app", make_image(seed=80), tag="v1")

        async def west_has(digest: str) -> bool:
            async with http.get(f"{west.url}/acr/v1/app/_tags/v1") as r:
                return r.status == 200 and (await r.json())["tag"]["digest"] == digest
        await eventually(lambda: west_has(first), what="v1 in westeurope")
        cluster.partition("eastus", "westeurope")
        await patch(http, f"{west.url}/acr/v1/app/_tags/v1", {"writeEnabled": False})
        second = await push_image(http, east.url, "app", make_image(seed=81), tag="v1")
        cluster.heal()
        await eventually(lambda: west_has(second), what="the later push in westeurope")

        async def overridden() -> float:
            async with http.get(f"{west.url}/metrics") as r:
                text = await r.text()
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("georeg_lock_overridden_total{"))
        await eventually(lambda: overridden(), what="the override counted")
        assert await overridden() == 1
        for node in (east, west):
            await eventually(lambda node=node: node.registry.locks.of(
                locks.tag("app", "v1")).write_enabled is False, what=f"the lock on {node.name}")
    finally:
        await stop_cluster(cluster)
