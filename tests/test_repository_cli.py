"""``georeg repository show | update | untag | show-manifests | delete --image``
and ``show-tags --orderby/--top/--detail`` on a running cluster of one region:
each command's answer and its effect on what the registry serves, and bad
input (an unknown repository, tag or digest, a bad ``--image``, a bad
boolean, a refusal of a lock) ending with exit status 2, a message that says
what is wrong, and nothing changed.

The commands go through the management API to a node (ACR's ``/acr/v1/``
there); the rules themselves are tested on one node in ``test_locks``.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import ClientSession, web

from cluster.cli import repository as repository_cli
from cluster.control import spec as specs
from cluster.control.errors import ClusterError
from cluster.control.repositories import _request
from cluster.testing import RunningCluster

from .helpers import Skopeo, make_image, push_image
from .test_cluster import georeg

REPO = "cli/locks"
SPEC = specs.ClusterSpec(registry="georegcli", tier="Standard", home_region="eastus",
                         paired_copies=False)
UNKNOWN_DIGEST = "sha256:" + "0" * 64


@pytest.fixture(scope="module")
def c(tmp_path_factory):
    with RunningCluster(SPEC, tmp_path_factory.mktemp("repocli")) as running:
        yield running


def cli(c: RunningCluster, *args: str):
    done = georeg("repository", *args, data_dir=c.data_dir)
    return done.returncode, done.stdout, done.stderr


def ok(c: RunningCluster, *args: str):
    code, out, err = cli(c, *args)
    assert code == 0, (args, out, err)
    return json.loads(out) if out.lstrip()[:1] in ("{", "[") else out


def refused(c: RunningCluster, *args: str, says: str) -> str:
    code, out, err = cli(c, *args)
    assert code == 2, (args, code, out, err)
    assert says in err, (args, err)
    assert "Traceback" not in err
    return err


def push(c: RunningCluster, repo: str, seed: int, *tags: str) -> str:
    async def run() -> str:
        image = make_image([64 + seed], seed=seed)
        async with c.http() as http:
            digest = ""
            for tag in tags:
                digest = await push_image(http, c.endpoint("eastus"), repo, image, tag=tag)
            return digest
    return asyncio.run(run())


def push_status(c: RunningCluster, repo: str, tag: str, seed: int) -> int:
    """The status of a push of a new image by ``tag`` (its blobs first)."""
    async def run() -> int:
        image = make_image([64 + seed], seed=seed)
        async with c.http() as http:
            digest = await push_image(http, c.endpoint("eastus"), repo, image)
            assert digest == image.digest
            async with http.put(f"{c.endpoint('eastus')}/v2/{repo}/manifests/{tag}",
                                data=image.manifest,
                                headers={"Content-Type": image.media_type}) as r:
                return r.status
    return asyncio.run(run())


def state(c: RunningCluster, repo: str) -> tuple:
    """Everything these commands may change about ``repo``: its attributes, and
    each tag and manifest with theirs."""
    return (ok(c, "show", "--name", repo)["changeableAttributes"],
            ok(c, "show-tags", "--name", repo, "--detail"),
            ok(c, "show-manifests", "--name", repo, "--detail"))


def test_update_locks_a_tag_a_manifest_and_the_repository_and_show_says_so(c):
    first = push(c, REPO, 1, "v1")
    shown = ok(c, "show", "--name", REPO)
    assert shown["imageName"] == REPO and shown["tagCount"] >= 1
    assert set(shown["changeableAttributes"].values()) == {True}

    tag = ok(c, "update", "--image", f"{REPO}:v1", "--write-enabled", "false")
    assert tag["tag"]["name"] == "v1" and tag["tag"]["digest"] == first
    assert tag["tag"]["changeableAttributes"]["writeEnabled"] is False
    assert ok(c, "show", "--image", f"{REPO}:v1")["tag"]["changeableAttributes"] == {
        "deleteEnabled": True, "writeEnabled": False, "readEnabled": True, "listEnabled": True}
    # The lock holds: the tag cannot be moved, nor the image deleted by it.
    assert push_status(c, REPO, "v1", 2) == 405
    refused(c, "delete", "--image", f"{REPO}:v1", "--yes", says="write-disabled")
    assert ok(c, "show", "--image", f"{REPO}:v1")["tag"]["digest"] == first

    manifest = ok(c, "update", "--image", f"{REPO}@{first}", "--delete-enabled", "no")
    assert manifest["manifest"]["digest"] == first
    assert manifest["manifest"]["changeableAttributes"]["deleteEnabled"] is False
    assert ok(c, "show", "--image", f"{REPO}@{first}")["manifest"]["tags"] == ["v1"]

    repository = ok(c, "update", "--name", REPO, "--list-enabled", "false",
                    "--read-enabled", "true")
    assert repository["changeableAttributes"]["listEnabled"] is False
    assert REPO not in ok(c, "list").split()
    # Unlocked again: each change is one register, the others stay as they were.
    ok(c, "update", "--name", REPO, "--list-enabled", "true")
    assert REPO in ok(c, "list").split()
    ok(c, "update", "--image", f"{REPO}:v1", "--write-enabled", "1")
    ok(c, "update", "--image", f"{REPO}@{first}", "--delete-enabled", "yes")
    assert push_status(c, REPO, "v1", 2) == 201


def test_listings_order_limit_and_detail(c):
    repo = "cli/listing"
    digests = [push(c, repo, 10 + n, f"t{n}") for n in range(3)]
    assert ok(c, "show-tags", "--name", repo, "--orderby", "time_desc") == ["t2", "t1", "t0"]
    assert ok(c, "show-tags", "--name", repo, "--orderby", "time_asc") == ["t0", "t1", "t2"]
    assert ok(c, "show-tags", "--name", repo, "--orderby", "time_desc", "--top", "1") == ["t2"]
    detailed = ok(c, "show-tags", "--name", repo, "--detail", "--orderby", "time_asc")
    assert [t["name"] for t in detailed] == ["t0", "t1", "t2"]
    assert [t["digest"] for t in detailed] == digests
    assert all(t["createdTime"] and t["lastUpdateTime"] and
               set(t["changeableAttributes"].values()) == {True} for t in detailed)

    manifests = ok(c, "show-manifests", "--name", repo, "--orderby", "time_desc")
    assert [m["digest"] for m in manifests] == digests[::-1]
    assert [m["tags"] for m in manifests] == [["t2"], ["t1"], ["t0"]]
    assert all(set(m) == {"digest", "tags", "timestamp"} for m in manifests)
    top = ok(c, "show-manifests", "--name", repo, "--orderby", "time_asc", "--top", "2",
             "--detail")
    assert [m["digest"] for m in top] == digests[:2]
    assert all(m["imageSize"] > 0 and "changeableAttributes" in m for m in top)
    # A locked tag shows its lock in the detail.
    ok(c, "update", "--image", f"{repo}:t1", "--read-enabled", "false")
    detailed = ok(c, "show-tags", "--name", repo, "--detail")
    assert {t["name"]: t["changeableAttributes"]["readEnabled"] for t in detailed} == {
        "t0": True, "t1": False, "t2": True}
    # The plain listing is the one over every region, as before.
    plain = ok(c, "show-tags", "--name", repo)
    assert all(tag in plain for tag in ("t0", "t1", "t2")), plain


def test_untag_removes_the_tag_and_delete_image_the_manifest_with_its_tags(c):
    repo = "cli/delete"
    kept = push(c, repo, 20, "keep", "alias")
    doomed = push(c, repo, 21, "doomed", "also")
    assert ok(c, "untag", "--image", f"{repo}:alias").strip() == f"untagged {repo}:alias"
    manifests = {m["digest"]: m["tags"] for m in ok(c, "show-manifests", "--name", repo)}
    assert manifests == {kept: ["keep"], doomed: ["also", "doomed"]}

    out = ok(c, "delete", "--image", f"{repo}:doomed", "--yes")
    assert out.strip() == f"deleted {repo}@{doomed} and every tag on it"
    manifests = {m["digest"]: m["tags"] for m in ok(c, "show-manifests", "--name", repo)}
    assert manifests == {kept: ["keep"]}, "the manifest and both its tags are gone"
    plain = ok(c, "show-tags", "--name", repo)
    assert "keep" in plain and "doomed" not in plain and "also" not in plain

    out = ok(c, "delete", "--image", f"{repo}@{kept}", "--yes")
    assert out.strip() == f"deleted {repo}@{kept} and every tag on it"
    assert ok(c, "show-manifests", "--name", repo) == []
    assert ok(c, "show-tags", "--name", repo, "--detail") == []


BAD = [
    # (arguments, what stderr must say)
    (("show", "--name", "cli/nothing"), "cli/nothing"),
    (("show", "--image", f"{REPO}:nosuchtag"), "MANIFEST_UNKNOWN"),
    (("show", "--image", f"{REPO}@{UNKNOWN_DIGEST}"), "MANIFEST_UNKNOWN"),
    (("show", "--image", f"{REPO}@sha256:nothex"), "DIGEST_INVALID"),
    (("show",), "give --name REPOSITORY or --image"),
    (("show", "--name", "cli/other", "--image", f"{REPO}:v1"), "name different repositories"),
    (("update", "--image", f"{REPO}:nosuchtag", "--write-enabled", "false"), "MANIFEST_UNKNOWN"),
    (("update", "--image", f"{REPO}@{UNKNOWN_DIGEST}", "--delete-enabled", "false"),
     "MANIFEST_UNKNOWN"),
    (("update", "--name", "cli/nothing", "--write-enabled", "false"), "cli/nothing"),
    (("update", "--image", REPO, "--write-enabled", "false"),
     "give REPOSITORY:TAG or REPOSITORY@DIGEST"),
    (("update", "--image", f"{REPO}:", "--write-enabled", "false"),
     "give REPOSITORY:TAG or REPOSITORY@DIGEST"),
    (("update", "--image", f"{REPO}:v1", "--write-enabled", "maybe"), "'maybe' is not true or false"),
    (("update", "--image", f"{REPO}:v1"), "nothing to change"),
    (("untag", "--image", f"{REPO}:nosuchtag"), "MANIFEST_UNKNOWN"),
    (("untag", "--image", f"{REPO}@{UNKNOWN_DIGEST}"), "untag removes a tag"),
    (("untag", "--image", "cli/nothing:v1"), "cli/nothing"),
    (("delete", "--image", f"{REPO}:nosuchtag", "--yes"), "MANIFEST_UNKNOWN"),
    (("delete", "--image", f"{REPO}@{UNKNOWN_DIGEST}", "--yes"), "MANIFEST_UNKNOWN"),
    (("delete", "--image", f"{REPO}:v1"), "refusing to delete without confirmation"),
    (("delete", "--yes"), "give --name REPOSITORY"),
    (("show-tags", "--name", REPO, "--top", "-1"), "--top must be 0 or more"),
    (("show-tags", "--name", REPO, "--orderby", "newest"), "invalid choice"),
    (("show-manifests", "--name", "cli/nothing"), "cli/nothing"),
    (("show-manifests", "--name", REPO, "--top", "x"), "invalid int value"),
]


def test_bad_input_is_exit_status_2_with_a_clear_message_and_changes_nothing(c):
    push(c, REPO, 1, "v1")
    before = state(c, REPO)
    for args, says in BAD:
        refused(c, *args, says=says)
    assert state(c, REPO) == before


@pytest.mark.parametrize("action", ["images", "untag"])
def test_a_repository_named_like_an_action_is_deleted_whole_and_nothing_else(c, action):
    """``images`` and ``untag`` are legal path components of a repository
    name; deleting ``cli/x/images/y`` must not be read as deleting image
    ``cli/x:y`` (nor untagging it)."""
    parent, child = f"cli/{action}x", f"cli/{action}x/{action}/y"
    kept = push(c, parent, 30, "y")
    push(c, child, 31, "v1", "v2")
    ok(c, "untag", "--image", f"{child}:v2")
    ok(c, "delete", "--name", child, "--yes")
    assert {m["digest"]: m["tags"] for m in ok(c, "show-manifests", "--name", parent)} == {
        kept: ["y"]}, "the parent repository is untouched"
    assert child not in ok(c, "list").split()


async def test_a_node_answer_that_is_not_json_is_a_502_not_bad_input(tmp_path):
    """What the management API passes on to a node and gets back as something
    other than JSON (a proxy's error page, a node broken mid-answer) is the
    node's failure (502), not the asker's bad input (400)."""
    async def html(_request):
        return web.Response(status=502, text="<html>bad gateway</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/acr/v1/app", html)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with ClientSession() as http:
            with pytest.raises(ClusterError) as caught:
                await _request(http, "GET", f"http://127.0.0.1:{port}/acr/v1/app")
        assert caught.value.status == 502 and "not JSON" in str(caught.value)
        assert not isinstance(caught.value, ValueError)
    finally:
        await runner.cleanup()


def test_soft_delete_update_delete_list_deleted_restore_then_skopeo_pulls(c, tmp_path):
    """``georeg registry soft-delete update`` (bad days refused, exit 2, the
    policy unchanged), ``repository delete --image`` into the bin,
    ``list-deleted`` showing it with both its tags, ``restore`` refused (exit
    2) while one of them names another image, then forced, bringing both back,
    and skopeo pulling the image again. The policy is off
    again at the end (the cluster is the module's)."""
    repo = "cli/softdelete"
    digest = push(c, repo, 40, "v1", "v2")
    policy = georeg("registry", "soft-delete", "show", data_dir=c.data_dir)
    assert policy.returncode == 0, policy.stderr
    before = json.loads(policy.stdout)
    assert before["status"] == "disabled", before
    for days, says in (("0", "days are 1 to 90, not 0"), ("91", "days are 1 to 90, not 91"),
                       ("x", "'x' is not a whole number of days")):
        done = georeg("registry", "soft-delete", "update", "--status", "enabled",
                      "--days", days, data_dir=c.data_dir)
        assert done.returncode == 2 and says in done.stderr, (days, done.stderr)
    after = georeg("registry", "soft-delete", "show", data_dir=c.data_dir)
    assert json.loads(after.stdout) == before, "a refused update changed the policy"

    done = georeg("registry", "soft-delete", "update", "--status", "enabled", "--days", "3",
                  data_dir=c.data_dir)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"status": "enabled", "retentionDays": 3}
    try:
        ok(c, "delete", "--image", f"{repo}:v1", "--yes")
        assert ok(c, "show-manifests", "--name", repo) == []
        binned = ok(c, "list-deleted", "--name", repo, "--json")
        assert [(m["digest"], m["tags"]) for m in binned["manifests"]] == [
            (digest, ["v1", "v2"])], binned
        assert binned["manifests"][0]["purgeTime"] > binned["manifests"][0]["deletedTime"]
        refused(c, "restore", "--image", f"{repo}:nosuchtag", says="not in the recycle bin")
        # v2 names another image since: refused (a 409, exit 2) unless forced.
        other = push(c, repo, 41, "v2")
        refused(c, "restore", "--image", f"{repo}:v1", says="names another manifest")

        out = ok(c, "restore", "--image", f"{repo}:v1", "--force")
        assert out.splitlines() == [f"restored {repo}@{digest}; tags restored: v1, v2",
                                    f"moved v2 back from {other}"], out
        assert ok(c, "list-deleted", "--name", repo, "--json")["manifests"] == []
        skopeo = Skopeo(tmp_path / "skopeo", c.endpoint("eastus").removeprefix("http://"),
                        cluster=c)
        asyncio.run(skopeo.copy(skopeo.ref(f"{repo}:v2"), f"oci:{tmp_path / 'pulled'}:v2",
                                "--preserve-digests"))
        index = json.loads((tmp_path / "pulled" / "index.json").read_text())
        assert [m["digest"] for m in index["manifests"]] == [digest]
    finally:
        done = georeg("registry", "soft-delete", "update", "--status", "disabled",
                      data_dir=c.data_dir)
        assert done.returncode == 0, done.stderr


def test_a_region_that_refused_the_delete_midway_is_told_apart_from_one_not_asked():
    """A region that answered the delete with a refusal (a lock or an index
    that landed midway: part of it may be gone) is not one that "could not be
    asked", whose copy is untouched: stderr says to run the delete again."""
    answer = {"unavailable": [
        {"region": "brazilsouth", "reason": "brazilsouth-1: HTTP 405: tag v2 is delete-disabled",
         "refused": True},
        {"region": "westeurope", "reason": "every node is down (westeurope-1 down)",
         "refused": False}]}
    assert repository_cli.region_notes(answer, "what it holds of app is not deleted",
                                       refused="part of app may be deleted there; "
                                               "run the delete again") == [
        "brazilsouth refused: brazilsouth-1: HTTP 405: tag v2 is delete-disabled; "
        "part of app may be deleted there; run the delete again",
        "westeurope could not be asked: every node is down (westeurope-1 down); "
        "what it holds of app is not deleted"]
