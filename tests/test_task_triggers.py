"""Task triggers' logic, in process (``cluster.control.triggers``,
``registry_node.tag_moves``): no buildah, no cluster.

* A node's tag moves: a client's push and a replicated tag set both come out
  of the node's log, and a reader waiting at the head wakes on the commit.
* Base-image triggers against a small simulated region (tags, tasks, runs
  that resolve their base when they start and push their image when they
  end): a three-level chain rebuilds each level exactly once, in order;
  moves that arrive while a task's run waits are coalesced; a move of the
  same digest, a move in another region, a task's own output, a disabled
  trigger start nothing; a restart (a fresh trigger object, pending lost)
  re-derives what was pending, a run the crash cut after it resolved its
  base included; a trigger a full region refused waits for a run to end.
* Commit triggers with a real git repository: the first look is a
  baseline, a new commit builds once, a restart does not build it again.
* A git context: archiving a commit runs none of the repository's programs
  (a filter, an fsmonitor), and a git directory that is not the context's
  own (a ``.git`` file or link, alternates, a linked object) is refused.

The chain with real buildah on a real cluster is ``test_task_trigger_builds``.
"""

from __future__ import annotations

import asyncio
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web

from cluster.control import triggers as triggers_module
from cluster.control.builds import BuildRequest, BuildRuns
from cluster.control.containerfile import ContextRefused
from cluster.control.errors import TooManyRequests
from cluster.control.git_sources import GitSource, archive_commit, branch_head
from cluster.control.triggers import (
    BaseImageTriggers,
    CommitTriggers,
    Dependency,
    TagMove,
    TaskTriggers,
    dependency_of,
    dependents,
)
from registry_node.records import Event, EventKind
from registry_node.replica import Replica

from .helpers import make_image, push_image

# -- a node's tag moves --------------------------------------------------------------------


async def test_a_push_and_a_replicated_tag_set_both_are_tag_moves(node, http):
    image = make_image([64])
    async with http.get(f"{node.url}/georeg/v1/tag-moves") as r:
        head = (await r.json())["next"]
    # A reader at the head waits for the next commit, and the push wakes it.
    waiting = asyncio.ensure_future(http.get(f"{node.url}/georeg/v1/tag-moves?after={head}"
                                             f"&wait=20"))
    digest = await push_image(http, node.url, "base", image, "1")
    async with await asyncio.wait_for(waiting, 20) as r:
        first = await r.json()
    assert [(m["repository"], m["tag"], m["digest"]) for m in first["moves"]] == \
        [("base", "1", digest)]
    # A tag set arriving by replication goes through the same log.
    Replica(node.registry, node.node.configuration).apply_tag(Event(
        EventKind.TAG_SET, "base", digest=digest, tag="2", origin_region="westus",
        origin_zone="", origin_seq=1, hlc=2**62))
    async with http.get(f"{node.url}/georeg/v1/tag-moves?after={first['next']}") as r:
        second = await r.json()
    assert [(m["repository"], m["tag"]) for m in second["moves"]] == [("base", "2")]
    # A move superseded since (or a replicated tag set a newer delete made a
    # tombstone) is not served: only where the tag points now.
    await push_image(http, node.url, "base", make_image([65]), "2")
    async with http.get(f"{node.url}/georeg/v1/tag-moves?after={first['next']}") as r:
        assert [(m["tag"], m["digest"]) for m in (await r.json())["moves"]] == \
            [("2", (await node_tag(http, node, "base", "2")))]
    for bad in ("x", "%D9%A3", "%EF%BC%91"):           # Unicode digits too
        async with http.get(f"{node.url}/georeg/v1/tag-moves?after={bad}") as r:
            assert r.status == 400, bad
    # A cursor past the head (a log that restarted lower) is told so at once.
    async with http.get(f"{node.url}/georeg/v1/tag-moves") as r:
        head = (await r.json())["next"]
    async with http.get(f"{node.url}/georeg/v1/tag-moves?after={head + 1000}&wait=20") as r:
        answer = await r.json()
    assert answer["reset"] and answer["next"] == head, answer


async def node_tag(http, node, repository: str, tag: str) -> str:
    async with http.head(f"{node.url}/v2/{repository}/manifests/{tag}", headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json"}) as r:
        return r.headers["Docker-Content-Digest"]


# -- base-image triggers, against a simulated region ------------------------------------------


class Region:
    """Tags, tasks and runs of one simulated region. A run resolves its base
    when it starts and pushes its image when it ends, which is a tag move fed
    to the triggers, as a node's log feeds them."""

    def __init__(self, tasks: dict[str, tuple[str, str]]) -> None:
        self.tags: dict[tuple[str, str, str], str] = {}     # (region, repo, tag) -> digest
        self.tasks = {name: {"name": name, "region": "eastus", "status": "Enabled",
                             "baseImageTriggerEnabled": True, "image": image, "base": base}
                      for name, (base, image) in tasks.items()}
        self.runs: list[dict] = []                          # newest first
        self.pushed = 0
        self.triggers = self.make_triggers()

    def make_triggers(self) -> BaseImageTriggers:
        async def tasks():
            return list(self.tasks.values())

        async def resolve(region, repository, tag):
            return self.tags.get((region, repository, tag))

        async def start(task, move):
            self.runs.insert(0, {"runId": f"ca{len(self.runs) + 1}", "task": task["name"],
                                 "region": "eastus", "status": "Queued", "trigger": move,
                                 "baseImages": [], "outputImages": []})
        return BaseImageTriggers(tasks=tasks, runs=lambda: list(self.runs), busy=self.busy,
                                 start=start, resolve=resolve)

    def busy(self) -> set[str]:
        return {r["task"] for r in self.runs if r["status"] in ("Queued", "Running")}

    async def push(self, repository: str, tag: str, region: str = "eastus") -> str:
        self.pushed += 1
        digest = f"sha256:{self.pushed:064x}"
        self.tags[(region, repository, tag)] = digest
        await self.triggers.moved([TagMove(region, repository, tag, digest)])
        return digest

    def begin(self, run: dict) -> None:
        """The run starts: its base resolved now."""
        repository, tag = self.tasks[run["task"]]["base"].split(":")
        run.update(status="Running", baseImages=[{
            "repository": repository, "tag": tag, "runtime": True,
            "digest": self.tags[("eastus", repository, tag)]}])

    async def end(self, run: dict) -> None:
        """The run pushes its image and ends."""
        repository, tag = self.tasks[run["task"]]["image"].split(":")
        run["outputImages"] = [{"repository": repository, "tag": tag}]
        await self.push(repository, tag)
        run["status"] = "Succeeded"
        self.triggers.run_finished(run)
        await self.triggers.settle()

    async def build(self, run: dict) -> None:
        self.begin(run)
        await self.end(run)

    async def build_all(self) -> list[str]:
        """Run whatever is queued until nothing is; the tasks built, in order."""
        built = []
        for _ in range(20):                                 # bounded: a chain is short
            queued = [r for r in reversed(self.runs) if r["status"] == "Queued"]
            if not queued:
                return built
            built.append(queued[0]["task"])
            await self.build(queued[0])
        raise AssertionError(f"still building after 20 runs: {built}")

    def manual(self, task: str) -> dict:
        run = {"runId": f"ca{len(self.runs) + 1}", "task": task, "region": "eastus",
               "status": "Queued", "trigger": "Manual", "baseImages": [], "outputImages": []}
        self.runs.insert(0, run)
        return run


CHAIN = {"runtime": ("base:1", "runtime:1"), "app": ("runtime:1", "app:1"),
         "other": ("unrelated:1", "other:1")}


async def chain_built_once() -> Region:
    region = Region(CHAIN)
    for repo in ("base", "unrelated"):
        await region.push(repo, "1")
    for task in ("runtime", "app", "other"):       # run once first: dependencies are known
        await region.build(region.manual(task))
    assert await region.build_all() == []         # app ran after runtime:1 moved
    return region


async def test_a_base_push_rebuilds_each_level_of_a_chain_once_in_order():
    region = await chain_built_once()
    before = len(region.runs)
    await region.push("base", "1")
    assert await region.build_all() == ["runtime", "app"]
    triggered = region.runs[:len(region.runs) - before]
    assert [r["task"] for r in triggered] == ["app", "runtime"]
    assert triggered[1]["trigger"] == TagMove("eastus", "base", "1", region.tags[
        ("eastus", "base", "1")])
    assert await region.build_all() == []           # nothing more, ever


async def test_moves_while_a_run_waits_are_coalesced_and_a_resolved_one_is_not_rebuilt():
    region = await chain_built_once()
    run = region.manual("runtime")                  # queued, not started: resolves later
    await region.push("base", "1")
    await region.push("base", "1")                  # two moves, one pending trigger
    assert len(region.triggers.pending) == 1 and region.busy() == {"runtime"}
    await region.build(run)                          # it built on the newest base
    assert region.busy() == {"app"}                  # only its dependent, not runtime again
    assert await region.build_all() == ["app"]

    # A move while a run is running, after it resolved the base: once more, after it.
    run = region.manual("runtime")
    region.begin(run)
    await region.push("base", "1")
    await region.end(run)
    assert await region.build_all() == ["app", "runtime", "app"]


async def test_what_starts_nothing():
    region = await chain_built_once()
    same = region.tags[("eastus", "base", "1")]
    await region.triggers.moved([TagMove("eastus", "base", "1", same)])    # arrived again
    await region.push("base", "1", region="westus")                        # another region
    region.tasks["other"]["baseImageTriggerEnabled"] = False
    await region.push("unrelated", "1")
    assert not region.triggers.pending and await region.build_all() == []
    # A task built on its own output: its push is no trigger for itself.
    dependency = Dependency("loop", "eastus", "x", "1", "sha256:a", frozenset({("x", "1")}))
    assert dependents(TagMove("eastus", "x", "1", "sha256:b"), [dependency]) == []
    # Pinned by digest: nothing to follow.
    pinned = {"task": "t", "region": "eastus", "outputImages": [],
              "baseImages": [{"repository": "b", "tag": None, "digest": "sha256:a",
                              "runtime": True}]}
    assert dependency_of({"name": "t", "region": "eastus"}, [pinned]) is None


async def test_a_restart_rederives_what_was_pending():
    region = await chain_built_once()
    region.manual("runtime")                        # busy: the base move waits for it
    await region.push("base", "1")
    assert "runtime" in region.triggers.pending
    region.runs[0]["status"] = "Failed"             # the crash: runs in flight failed
    region.triggers = region.make_triggers()        # a new process: nothing pending
    await region.triggers.rederive()
    assert await region.build_all() == ["runtime", "app"]
    region.triggers = region.make_triggers()
    await region.triggers.rederive()                 # and again: all built, nothing
    assert await region.build_all() == []
    # A crash while buildah builds: the run had resolved the new base already.
    await region.push("base", "1")
    region.begin(region.runs[0])
    region.runs[0]["status"] = "Failed"
    region.triggers = region.make_triggers()
    await region.triggers.rederive()
    assert await region.build_all() == ["runtime", "app"]


async def test_a_full_region_defers_a_trigger_and_a_run_ending_starts_it():
    """One base, more dependents than the region holds runs: the refused one
    waits and starts when any run of the region ends."""
    tasks = {f"app{i}": ("base:1", f"app{i}:1") for i in range(3)}
    region = Region(tasks)
    await region.push("base", "1")
    for name in tasks:
        await region.build(region.manual(name))
    queue = region.triggers._start

    async def start(task, move):                 # as builds.start past RUNS_PER_REGION
        if len(region.busy()) >= 2:
            raise TooManyRequests("eastus already holds 2 runs")
        await queue(task, move)
    region.triggers._start = start
    await region.push("base", "1")
    assert region.busy() == {"app0", "app1"} and "app2" in region.triggers.pending
    assert sorted(await region.build_all()) == ["app0", "app1", "app2"]
    assert not region.triggers.pending


# -- commit triggers, with a real git repository -----------------------------------------------


def git(repo: Path, *argv: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
           "PATH": "/usr/bin:/bin", "HOME": str(repo)}
    return subprocess.run(["git", "-C", str(repo), *argv], check=True, env=env,
                          capture_output=True, text=True).stdout.strip()


def commit(repo: Path, text: str) -> str:
    (repo / "Containerfile").write_text(text)
    git(repo, "add", "Containerfile")
    git(repo, "commit", "-q", "-m", text)
    return git(repo, "rev-parse", "HEAD")


async def test_a_new_commit_on_the_branch_builds_once_and_a_restart_does_not_again(tmp_path):
    repo = tmp_path / "src"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    commit(repo, "FROM scratch\n")
    task = {"name": "web", "status": "Enabled", "commitTriggerEnabled": True,
            "branch": "main", "contextPath": str(repo)}
    started: list[str] = []

    def triggers() -> CommitTriggers:
        async def tasks():
            return [task]

        async def start(_task, sha):
            started.append(sha)
        return CommitTriggers(tmp_path / "commits.json", tasks=tasks, runs=lambda: [],
                              busy=set, start=start)

    assert await triggers().poll() == []             # the baseline
    git(repo, "checkout", "-q", "-b", "other")
    commit(repo, "FROM scratch\nLABEL other=1\n")    # another branch: nothing
    git(repo, "checkout", "-q", "main")
    assert await triggers().poll() == []
    sha = commit(repo, "FROM scratch\nLABEL v=2\n")
    assert await triggers().poll() == ["web"] and started == [sha]
    assert await triggers().poll() == [] and started == [sha]   # a new process: seen
    # Moved to another branch: its tip is a new baseline, not a commit to build.
    task["branch"] = "other"
    assert await triggers().poll() == [] and started == [sha]



# -- a git context: what git may read and run ------------------------------------------------


def test_git_runs_nothing_of_the_repository_and_reads_no_other_repository(tmp_path):
    """The repository's config names a filter its attributes apply, and an
    fsmonitor: archiving its commit runs neither (each would write a marker).
    A context whose git directory is elsewhere (a ``.git`` file or link,
    alternates, a linked object) is refused, so nothing outside it is read."""
    repo = tmp_path / "src"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    marker = tmp_path / "ran"
    (repo / ".gitattributes").write_text("*.txt filter=pwn\n")
    (repo / "a.txt").write_text("data\n")
    git(repo, "add", ".gitattributes", "a.txt")
    sha = commit(repo, "FROM scratch\n")
    with open(repo / ".git" / "config", "a") as config:
        config.write(f'[filter "pwn"]\n\tsmudge = "touch {marker}; cat"\n'
                     f'[core]\n\tfsmonitor = "touch {marker}"\n')
    source = GitSource(repo, "main")
    assert branch_head(source) == sha
    archive = tmp_path / "scratch" / "context.tar"
    archive.parent.mkdir()
    archive_commit(source, sha, archive, max_bytes=1 << 20)
    with tarfile.open(archive) as tar:
        assert tar.extractfile("a.txt").read() == b"data\n"
    assert not marker.exists()

    def refused(context: Path) -> str:
        with pytest.raises(ContextRefused) as caught:
            archive_commit(GitSource(context, "main"), sha, tmp_path / "scratch" / "x.tar",
                           max_bytes=1 << 20)
        return str(caught.value)
    pointer = tmp_path / "pointer"
    pointer.mkdir()
    (pointer / ".git").write_text(f"gitdir: {repo / '.git'}\n")
    assert ".git file" in refused(pointer)
    link = tmp_path / "link"
    link.mkdir()
    (link / ".git").symlink_to(repo / ".git")
    assert "not a directory" in refused(link)
    borrower = tmp_path / "borrower"
    git(tmp_path, "clone", "-q", "--shared", str(repo), str(borrower))
    assert "alternates" in refused(borrower)
    (borrower / ".git" / "objects" / "info" / "alternates").unlink()
    loose = next(p for p in (repo / ".git" / "objects").rglob("*") if p.is_file())
    target = borrower / ".git" / "objects" / loose.relative_to(repo / ".git" / "objects")
    target.parent.mkdir(exist_ok=True)
    target.symlink_to(loose)
    assert "is a link" in refused(borrower)


async def test_a_watcher_outlives_an_answer_it_cannot_read(tmp_path, monkeypatch):
    """A node answering a malformed page (``moves: [1]``) does not end the
    region's watcher: it backs off (shortened here) and asks again."""
    monkeypatch.setattr(triggers_module, "RETRY_S", (0.05, 0.1))
    asked: list[str] = []

    async def tag_moves(request: web.Request) -> web.Response:
        asked.append(request.query_string)
        page = {"moves": [1] if "after" in request.query else [], "next": 1, "floor": 0}
        return web.json_response(page)
    app = web.Application()
    app.router.add_get("/georeg/v1/tag-moves", tag_moves)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    async with aiohttp.ClientSession() as http:
        cluster = SimpleNamespace(
            data_dir=tmp_path, plan=SimpleNamespace(nodes=[SimpleNamespace(
                name="n1", region="eastus", copy_of=None)]),
            management_link_url=lambda name: url, http=lambda: http)
        builds = SimpleNamespace(list=list, active_tasks=set, finished_listeners=[])
        triggers = TaskTriggers(cluster, SimpleNamespace(), builds)
        triggers.base.rederive = triggers.base.moved = _nothing
        watcher = asyncio.create_task(triggers._watch("eastus"))
        try:
            for _ in range(100):                    # bounded: 10 s
                if sum("after" in q for q in asked) >= 2 or watcher.done():
                    break
                await asyncio.sleep(0.1)
            assert not watcher.done() and sum("after" in q for q in asked) >= 2, asked
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await runner.cleanup()


async def _nothing(*_args) -> None:
    await asyncio.sleep(0)


async def test_a_task_is_busy_from_the_moment_its_run_is_accepted(tmp_path):
    """While a run's context is still arriving (a git archive, an upload) its task
    counts as busy, so no trigger starts it a second time; a refusal frees it."""
    cluster = SimpleNamespace(
        data_dir=tmp_path, spec=SimpleNamespace(
            home_region="eastus", all_replicas=[SimpleNamespace(region="eastus")]),
        regional_endpoint=lambda region: "http://127.0.0.1:9")
    builds = BuildRuns(cluster)
    arrived = asyncio.Event()

    async def context():
        await arrived.wait()
        return
        yield b""                                   # an empty upload: refused
    start = asyncio.create_task(builds.start(BuildRequest("web:1", task="web"), context()))
    await asyncio.sleep(0)
    assert builds.active_tasks() == {"web"}
    arrived.set()
    with pytest.raises(ContextRefused):
        await start
    assert builds.active_tasks() == set()
