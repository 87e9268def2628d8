"""``georeg purge``'s rules (``cluster.control.purge``) against one in-process
node, as a client of its data plane: filters, --ago, --keep, --untagged
(indexes before their children, referrers with their subjects), locks
skipped and named, --dry-run deleting nothing, and bad input refused before
anything is deleted. Ages come from the purge's ``now``, moved forward
instead of waited for. The CLI on a running cluster: ``test_lifecycle_commands``.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import regex

from cluster.control import purge as purges
from cluster.control.purge import (
    PurgeError,
    PurgeRequest,
    RegistryClient,
    parse_ago,
    parse_command,
    parse_filter,
    purge,
)
from registry_node.config import NodeConfig

from .helpers import make_image, push_image, push_index_and_signed_image, started_node

DAY = 86_400.0


@pytest.mark.parametrize("text,seconds", [("2d3h6m", 2 * DAY + 3 * 3600 + 360), ("7d", 7 * DAY),
                                          ("0d", 0.0), ("90m", 5400.0), ("1h30m", 5400.0),
                                          ("1.5h", 5400.0), ("10s", 10.0)])
def test_ago_is_acr_s_duration(text, seconds):
    assert parse_ago(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "7", "-1d", "1x", "3h2d", "1 d", "1d2", "P1D"])
def test_a_bad_ago_says_what_a_duration_is(text):
    with pytest.raises(ValueError, match="duration such as 2d3h6m"):
        parse_ago(text)


@pytest.mark.parametrize("text,why", [("app", "REPO_REGEX:TAG_REGEX"), (":v1", "both parts"),
                                      ("app:", "both parts"), ("app:(", "does not compile"),
                                      ("[:.*", "does not compile")])
def test_a_bad_filter_says_what_is_wrong(text, why):
    with pytest.raises(ValueError, match=why.replace("(", r"\(")):
        parse_filter(text)


def test_a_command_is_purge_with_its_options():
    request = parse_command("purge --filter 'hello-world:.*' --ago 7d --untagged --keep 2 "
                            "--region brazilsouth")
    assert request.ago_s == 7 * DAY and request.untagged and request.keep == 2
    assert request.region == "brazilsouth"       # a confined region's content, purged there
    assert [f.text for f in request.filters] == ["hello-world:.*"]
    for bad, why in [("import --source x", "the command is 'purge"), ("", "not 'nothing'"),
                     ("purge --ago 1d", "--filter"), ("purge --filter a:b --ago 1d --bogus", "bogus"),
                     ("purge --filter 'a:b --ago 1d", "cannot split"),
                     ("purge --filter a:b --ago 1d --keep -1", "--keep")]:
        with pytest.raises(ValueError, match=why):
            parse_command(bad)


def request(*filters: str, ago: str = "1d", **options) -> PurgeRequest:
    return PurgeRequest(tuple(parse_filter(f) for f in filters), parse_ago(ago), **options)


async def tags_of(http, node, repo: str) -> set[str]:
    async with http.get(f"{node.url}/v2/{repo}/tags/list") as r:
        return set((await r.json())["tags"] or []) if r.status == 200 else set()


async def held(http, node, repo: str, digest: str) -> bool:
    async with http.head(f"{node.url}/v2/{repo}/manifests/{digest}") as r:
        return r.status == 200


@pytest.fixture
async def client(node):
    async with aiohttp.ClientSession() as session:
        yield RegistryClient(session, node.url)


async def test_tags_older_than_ago_go_but_the_newest_kept_and_the_locked(node, http, client):
    digests = {}
    for i, tag in enumerate(["v1", "v2", "v3", "latest"]):
        digests[tag] = await push_image(http, node.url, "web", make_image(seed=i), tag=tag)
        if tag == "v1":       # (a lock is an update: locked later, v1 would be the newest)
            async with http.patch(f"{node.url}/acr/v1/web/_tags/v1",
                                  json={"writeEnabled": False}) as r:
                assert r.status == 200
    await push_image(http, node.url, "other", make_image(seed=9), tag="v1")
    later = time.time() + 2 * DAY
    # Nothing is older than 3 days: nothing goes.
    report = await purge(client, request("web:v.*", ago="3d"), later)
    assert report.tags == [] and report.skipped == []
    # Dry run: says what would go, deletes nothing.
    report = await purge(client, request("web:v.*", keep=1, dry_run=True), later)
    assert sorted(report.tags) == [("web", "v2")]
    assert report.skipped == [("web", "v1", "locked: the tag is write- or delete-disabled")]
    assert await tags_of(http, node, "web") == {"v1", "v2", "v3", "latest"}
    # For real: v3 (the newest match) kept, v1 locked, latest not matched.
    report = await purge(client, request("web:v.*", keep=1), later)
    assert report.tags == [("web", "v2")] and len(report.skipped) == 1
    assert await tags_of(http, node, "web") == {"v1", "v3", "latest"}
    assert await held(http, node, "web", digests["v2"])      # untagged, not deleted
    assert await tags_of(http, node, "other") == {"v1"}       # not matched


async def test_untagged_goes_index_first_and_referrers_stay_with_their_image(node, http, client):
    pushed = await push_index_and_signed_image(http, node.url, "multi", seed=20, index_tag="old",
                                               subject_tag="stable")
    child_digest, image_digest, signature_digest = pushed["child"], pushed["subject"], pushed["signature"]
    loose = await push_image(http, node.url, "multi", make_image(seed=23))
    report = await purge(client, request("multi:old", untagged=True), time.time() + DAY + 60)
    assert report.tags == [("multi", "old")]
    assert sorted(report.manifests) == sorted([("multi", pushed["index"]),
                                               ("multi", child_digest), ("multi", loose)])
    assert ("multi", signature_digest, "a referrer of an image that stays") in report.skipped
    for gone in (pushed["index"], child_digest, loose):
        assert not await held(http, node, "multi", gone)
    assert await held(http, node, "multi", signature_digest)
    assert await held(http, node, "multi", image_digest)


async def test_an_unknown_repository_is_refused_before_anything_is_deleted(node, http, client):
    await push_image(http, node.url, "kept", make_image(seed=30), tag="v1")
    with pytest.raises(PurgeError, match="no repository matches 'nope'"):
        await purge(client, request("kept:.*", "nope:.*"), time.time() + 10 * DAY)
    assert await tags_of(http, node, "kept") == {"v1"}
    # A repository regex matches whole names: "kep" is not "kept".
    with pytest.raises(PurgeError, match="no repository matches 'kep'"):
        await purge(client, request("kep:.*"), time.time() + 10 * DAY)


async def test_keep_counts_only_the_tags_that_would_go(tmp_path, clock, http):
    """ACR's --keep: of the matching tags older than --ago and not locked, the
    N newest stay; a fresh tag and a locked one use no keep slot."""
    async with started_node(NodeConfig(data_dir=tmp_path / "n", port=0), clock) as node, \
            aiohttp.ClientSession() as session:
        for i, tag in enumerate(["a", "b", "locked"]):
            await push_image(http, node.url, "web", make_image(seed=60 + i), tag=tag)
            clock.advance(1)
        async with http.patch(f"{node.url}/acr/v1/web/_tags/locked",
                              json={"deleteEnabled": False}) as r:
            assert r.status == 200
        clock.advance(DAY)
        await push_image(http, node.url, "web", make_image(seed=63), tag="fresh")
        report = await purge(RegistryClient(session, node.url), request("web:.*", ago="12h", keep=1),
                             clock.wall_ns() / 1e9)
        assert report.tags == [("web", "a")]
        assert [ref for _, ref, _ in report.skipped] == ["locked"]
        assert await tags_of(http, node, "web") == {"b", "locked", "fresh"}


async def test_what_the_listing_hides_is_looked_up_and_a_refusal_skips_only_it(node, http, client):
    """An unlisted index still holds its child (the node refuses the delete:
    skipped, in use, and the purge goes on); an unlisted subject still keeps
    its signature."""
    pushed = await push_index_and_signed_image(http, node.url, "hid", seed=70, index_tag=None,
                                               subject_tag="unmatched")
    child_digest, subject_digest, signature_digest = pushed["child"], pushed["subject"], pushed["signature"]
    for hidden in (pushed["index"], subject_digest):
        async with http.patch(f"{node.url}/acr/v1/hid/_manifests/{hidden}",
                              json={"listEnabled": False}) as r:
            assert r.status == 200
    loose = await push_image(http, node.url, "hid", make_image(seed=73))
    report = await purge(client, request("hid:none", untagged=True), time.time() + DAY + 60)
    assert report.manifests == [("hid", loose)] and report.failed == []
    reasons = {ref: why for _, ref, why in report.skipped}
    assert reasons[child_digest].startswith("in use")
    assert reasons[signature_digest] == "a referrer of an image that stays"
    assert await held(http, node, "hid", signature_digest)


async def test_a_refused_delete_is_recorded_and_the_purge_goes_on(node, http, client):
    for tag in ("v1", "v2"):
        await push_image(http, node.url, "full", make_image(seed=80 if tag == "v1" else 81), tag=tag)
    async with http.put(f"{node.url}/georeg/v1/faults/storage", json={"full": True}) as r:
        assert r.status == 200, await r.text()
    try:
        report = await purge(client, request("full:.*"), time.time() + 2 * DAY)
    finally:
        async with http.put(f"{node.url}/georeg/v1/faults/storage", json={"full": False}) as r:
            assert r.status == 200
    assert report.tags == []
    assert sorted(ref for _, ref, _ in report.failed) == ["v1", "v2"]
    assert report.as_dict()["failed"][0]["reason"].startswith("5")


async def test_a_regex_that_backtracks_without_end_fails_the_purge_not_the_loop(monkeypatch):
    monkeypatch.setattr(purges, "MATCH_TIMEOUT_S", 0.05)
    ticks = 0

    async def ticking() -> None:
        nonlocal ticks
        for _ in range(1000):
            ticks += 1
            await asyncio.sleep(0.001)

    ticker = asyncio.create_task(ticking())
    with pytest.raises(PurgeError, match="took longer than 0.05 s"):
        await purges._matching(["a" * 30 + "-"], [regex.compile("(a|aa)+")], "repositories")
    ticker.cancel()
    assert ticks >= 5            # the loop went on while the regex ran in its thread


@pytest.mark.parametrize("text,repo,tag", [("app:v.*", "app", "v.*"),
                                           ("(?:app|web):(?:v|r)[0-9]+", "(?:app|web)",
                                            "(?:v|r)[0-9]+"),
                                           ("[[:alpha:]]+:[[:digit:]]+", "[[:alpha:]]+",
                                            "[[:digit:]]+"),
                                           (r"a\:b:c", r"a\:b", "c")])
def test_a_filter_splits_at_the_first_colon_outside_groups_and_brackets(text, repo, tag):
    f = parse_filter(text)
    assert (f.repository.pattern, f.tag.pattern) == (repo, tag)
    if "alpha" in text:
        assert f.repository.fullmatch("web") and f.tag.fullmatch("42")


async def test_what_another_client_deleted_first_is_skipped_as_already_gone(node, http):
    """A tag or manifest another client (another purge, a replicated delete)
    deleted between the purge's listing and its delete answers 404: the
    purge goes on and records it as skipped, already gone — never as deleted
    by this purge."""
    loose = await push_image(http, node.url, "raced", make_image(seed=90))
    tagged = await push_image(http, node.url, "raced", make_image(seed=91), tag="v1")

    class RacedClient(RegistryClient):
        """The node's real client, with another client's delete of the same
        target landing just before each of the purge's own."""

        async def untag(self, repo: str, tag: str) -> tuple[int, str]:
            await super().untag(repo, tag)
            return await super().untag(repo, tag)

        async def delete_manifest(self, repo: str, digest: str) -> tuple[int, str]:
            await super().delete_manifest(repo, digest)
            return await super().delete_manifest(repo, digest)

    async with aiohttp.ClientSession() as session:
        report = await purge(RacedClient(session, node.url), request("raced:.*", untagged=True),
                             time.time() + 2 * DAY)
    assert report.tags == [] and report.manifests == [] and report.failed == []
    assert sorted(report.skipped) == sorted(("raced", ref, "already gone")
                                            for ref in ("v1", loose, tagged))
