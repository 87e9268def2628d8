"""Task triggers (after ACR Tasks): a task rebuilt when the base image it was
built on moves (*base-image update*), and when its git branch gets a new
commit (*commit*). Manual runs are ``cluster.control.tasks``'.

**Base-image updates.** A task's dependency is the *runtime* base of its
Containerfile (the final stage's, ``baseImages`` with ``runtime``), by tag,
in the task's region: the tag its latest run resolved (known only once the
task has run, ACR's rule), at the digest its latest *Succeeded* run built
on (``dependency_of``; none yet: any move differs). The
moves come from the nodes, one long-poll per region of a task
(``registry_node.tag_moves``: every tag a node moved, by a client's push or a
replication arriving, from its log, in order; the request waits for the next
commit, it is not a poll of the registry). A move of ``repo:tag`` to a digest
``D`` in region ``R`` makes *pending* every task of ``R`` with the trigger
enabled whose dependency is ``repo:tag`` with another digest than ``D``
(``dependents``). Pending is one entry per task (``Pending``): a second move
before the run starts replaces the first (coalesced), and a task with a run
queued or running waits for it to end. When it may start, the dependency is
compared again (the run that just ended may have built on ``D`` already):
only if it still differs is a run started. A run the region refuses for now
(full: ``RUNS_PER_REGION``; unreachable) leaves the trigger pending: any
run's end, and every commit poll, dispatches again. So a base move rebuilds each task
built on it once; a chain (base → runtime → app) follows by itself, since the
runtime's rebuilt tag is itself a move in the region; a move that arrives
again (the same digest, by another path) starts nothing.

ACR's rules (docs/tasks.md): only the runtime base is tracked; a base in this
registry triggers at once (ACR's delay for a base in an Azure registry: none;
public registries, polled every 10–60 min by ACR, are not reachable here); a
task never triggers itself (its own output moving the tag it builds on).

**Restart.** Pending triggers are not written down: they are re-derived when
the control process starts (and whenever a region's log was truncated past
where it had read, or it changed node): each task's dependency tag is
resolved in its region and compared with what its latest run resolved. A run
the crash interrupted is ``Failed`` (``builds``), so its task's latest
successful resolution still differs and it is queued again.

**Commits.** A task with a git context (``branch``) and the commit trigger
enabled is rebuilt when its branch's tip is a commit no run of it built yet.
The tips are read every ``[tasks] commit_poll_seconds`` (10 s by default; one
``git rev-parse``; a hook would have to be installed in the user's
repository). The first look at a new task (or at a task's new branch or
context) records its tip as seen without building (ACR builds on the
*next* commit); seen tips are kept in
``<data dir>/tasks/commits.json``, and a run's record names its commit, so
a restart neither misses a commit nor builds one twice.

**Identity.** No caller is present for a triggered run: it acts as the
task's own identity (``task_identities``: push on its image, pull on the
bases a manual run of it was granted), never as the admin user; a task with
none yet has its triggered runs recorded ``Failed`` saying how to give it one.
"""

from __future__ import annotations

import asyncio
import json
import random
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import structlog

from registry_node.manifest import MANIFEST_ACCEPT

from .builds import COMMIT, IMAGE_UPDATE, BuildRuns
from .errors import ClusterError, NodeRefusal, RegionUnavailable, TooManyRequests
from .git_sources import GitSource, branch_head
from .private_files import write_private
from .tasks import RegistryTasks, run_request, task_source

if TYPE_CHECKING:
    from .cluster import Cluster

log = structlog.get_logger("georeg.triggers")

LONG_POLL_S = 25.0
RETRY_S = (0.5, 10.0)             # a region's node did not answer: backoff, first and most
# Refusals of a triggered run that pass (a region full of runs, its endpoint
# unreachable): the trigger waits and is dispatched again, never recorded Failed.
RETRYABLE = (TooManyRequests, RegionUnavailable)


# -- the logic (no I/O) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TagMove:
    region: str
    repository: str
    tag: str
    digest: str


@dataclass(frozen=True, slots=True)
class Dependency:
    """What a task's latest run was built on (its runtime base, by tag), and
    what it pushed."""

    task: str
    region: str
    repository: str
    tag: str
    digest: str | None              # None: no run built on it successfully yet
    outputs: frozenset[tuple[str, str]] = frozenset()


def dependents(move: TagMove, dependencies: Iterable[Dependency]) -> list[str]:
    """The tasks ``move`` makes pending: built in its region on its tag, at
    another digest, and not the task that pushed that tag itself."""
    return sorted(d.task for d in dependencies
                  if (d.region, d.repository, d.tag) == (move.region, move.repository, move.tag)
                  and d.digest != move.digest
                  and (move.repository, move.tag) not in d.outputs)


def dependency_of(task: dict, runs: list[dict]) -> Dependency | None:
    """``task``'s dependency (``task_view``'s shape; ``runs`` newest first): the
    runtime base (repository, tag) of its newest run that resolved one, whatever
    became of that run (a dependency is known once the task has run), and the
    digest and outputs of its newest *Succeeded* run on that tag: what its
    image really is built on. With no such run the digest is None, which any
    move differs from: a run that failed, timed out or was cut short by a crash
    after it resolved its base leaves the trigger armed."""
    region = task["region"]
    known = None
    for run in runs:
        if run.get("task") != task["name"]:
            continue
        base = _runtime_base(run)
        if base is None:
            continue
        if known is None:
            if not base.get("tag") or run["region"] != region:
                return None         # pinned by digest (nothing moves), or built elsewhere
            known = (base["repository"], base["tag"])
        if run.get("status") == "Succeeded" and run["region"] == region and \
                (base["repository"], base.get("tag")) == known:
            outputs = frozenset((o["repository"], o["tag"])
                                for o in run.get("outputImages") or ())
            return Dependency(task["name"], region, *known, base["digest"], outputs)
    if known is None:
        return None
    return Dependency(task["name"], region, *known, None)


def _runtime_base(run: dict) -> dict | None:
    return next((b for b in run.get("baseImages") or () if b.get("runtime")), None)


class Pending:
    """The base-image triggers waiting: one per task, the newest move wins."""

    def __init__(self) -> None:
        self._moves: dict[str, TagMove] = {}

    def add(self, task: str, move: TagMove) -> None:
        self._moves[task] = move

    def take(self, busy: set[str]) -> list[tuple[str, TagMove]]:
        """The triggers whose task has no run queued or running, taken out."""
        ready = [(t, m) for t, m in sorted(self._moves.items()) if t not in busy]
        for task, _ in ready:
            del self._moves[task]
        return ready

    def restore(self, task: str, move: TagMove) -> None:
        """A taken trigger put back, unless a newer move is pending already."""
        self._moves.setdefault(task, move)

    def __contains__(self, task: str) -> bool:
        return task in self._moves

    def __len__(self) -> int:
        return len(self._moves)


def image_update_detail(move: TagMove, registry: str) -> dict:
    """A run's record of the base-image update that triggered it (ACR's
    ``imageUpdateTrigger``)."""
    return {"imageUpdateTrigger": {
        "timestamp": datetime.now(UTC).isoformat(),
        "images": [{"registry": registry, "repository": move.repository, "tag": move.tag,
                    "digest": move.digest}]}}


# -- the base-image triggers ---------------------------------------------------------------


class BaseImageTriggers:
    """Tag moves in each task region, turned into runs. The seams are
    callables so that the logic runs in-process without a cluster:

    * ``tasks()``: the tasks (``task_view``'s shape);
    * ``runs()``: every run, newest first;
    * ``busy()``: the tasks with a run queued or running;
    * ``start(task, move)``: start a triggered run of ``task``;
    * ``resolve(region, repository, tag)``: the tag's digest there now (None: absent).
    """

    def __init__(self, *, tasks: Callable[[], Awaitable[list[dict]]],
                 runs: Callable[[], list[dict]], busy: Callable[[], set[str]],
                 start: Callable[[dict, TagMove], Awaitable[None]],
                 resolve: Callable[[str, str, str], Awaitable[str | None]]) -> None:
        self._tasks, self._runs, self._busy = tasks, runs, busy
        self._start, self._resolve = start, resolve
        self.pending = Pending()
        self._lock = asyncio.Lock()
        self._later: set[asyncio.Task] = set()
        self._stopping = False

    async def _dependencies(self, region: str | None = None) -> list[tuple[dict, Dependency]]:
        runs = self._runs()
        out = []
        for task in await self._tasks():
            if task["status"] != "Enabled" or not task["baseImageTriggerEnabled"]:
                continue
            if region is not None and task["region"] != region:
                continue
            dependency = dependency_of(task, runs)
            if dependency is not None:
                out.append((task, dependency))
        return out

    async def moved(self, moves: list[TagMove]) -> None:
        """Moves a region's node logged: the tasks they make pending, then dispatch."""
        if not moves:
            return
        found = await self._dependencies()
        for move in moves:
            for name in dependents(move, [d for _, d in found]):
                self.pending.add(name, move)
        await self.dispatch()

    async def rederive(self, region: str | None = None) -> None:
        """What moved while nobody listened (a start, a truncated log): each
        dependency's tag resolved now and compared."""
        for _, dependency in await self._dependencies(region):
            try:
                digest = await self._resolve(dependency.region, dependency.repository,
                                             dependency.tag)
            except ClusterError as exc:
                log.warning("base_trigger_resolve_failed", task=dependency.task,
                            error=str(exc))
                continue
            if digest is not None:
                move = TagMove(dependency.region, dependency.repository, dependency.tag, digest)
                for name in dependents(move, [dependency]):
                    self.pending.add(name, move)
        await self.dispatch()

    async def dispatch(self) -> None:
        """Start what may start: a pending task with no run queued or running,
        whose dependency still differs from the move."""
        async with self._lock:
            ready = self.pending.take(self._busy())
            if not ready:
                return
            found = {d.task: (task, d) for task, d in await self._dependencies()}
            for name, move in ready:
                if name not in found or not dependents(move, [found[name][1]]):
                    continue               # built on it already, disabled, or deleted
                try:
                    await self._start(found[name][0], move)
                except RETRYABLE as exc:
                    # The region is full or unreachable now: the trigger waits
                    # again (unless a newer move replaced it meanwhile) for a
                    # run's end or the next poll to dispatch it.
                    self.pending.restore(name, move)
                    log.info("base_trigger_deferred", task=name, error=str(exc))

    def run_finished(self, record: dict) -> None:
        """``BuildRuns``' listener: a run ended, which frees its task and a slot
        of its region, so any pending trigger may start now."""
        if self.pending and not self._stopping:
            task = asyncio.get_running_loop().create_task(self.dispatch())
            self._later.add(task)
            task.add_done_callback(self._later.discard)

    async def settle(self) -> None:
        """Wait for the dispatches run ends asked for."""
        for _ in range(100):                 # bounded: each dispatch starts no other
            if not self._later:
                return
            await asyncio.gather(*self._later)

    async def stop(self) -> None:
        self._stopping = True              # runs canceled by the stop start nothing
        for task in list(self._later):
            task.cancel()
        await asyncio.gather(*self._later, return_exceptions=True)


# -- the cluster's side: watching the regions, starting runs ----------------------------------


class TaskTriggers:
    """The triggers of one cluster's tasks: a watcher of tag moves per
    region, the commit poll, and the runs they start."""

    def __init__(self, cluster: Cluster, tasks: RegistryTasks, builds: BuildRuns) -> None:
        self.cluster = cluster
        self.tasks = tasks
        self.builds = builds
        self.base = BaseImageTriggers(tasks=self._tasks, runs=builds.list,
                                      busy=builds.active_tasks, start=self._start_image_update,
                                      resolve=self._resolve)
        builds.finished_listeners.append(self.base.run_finished)
        self.commits = CommitTriggers(cluster.data_dir / "tasks" / "commits.json",
                                      tasks=self._tasks, runs=builds.list,
                                      busy=builds.active_tasks, start=self._start_commit)
        self._watchers: dict[str, asyncio.Task] = {}     # region -> its watcher
        self._poll: asyncio.Task | None = None

    def start(self) -> None:
        self._watch_regions()
        self._poll = asyncio.create_task(self._poll_commits(), name="commit-trigger")

    def _watch_regions(self) -> None:
        """One watcher per replica region: started for a new replica (or again,
        for one whose watcher ended), ended for one deleted (checked at every
        commit poll)."""
        regions = {r.region for r in self.cluster.spec.all_replicas}
        for region in [r for r, t in self._watchers.items() if t.done()]:
            task = self._watchers.pop(region)   # ended anyway: logged, then started again
            if not task.cancelled() and task.exception() is not None:
                log.error("base_trigger_watcher_ended", region=region,
                          error=repr(task.exception()))
        for region in sorted(regions - set(self._watchers)):
            self._watchers[region] = asyncio.create_task(self._watch(region),
                                                         name=f"base-trigger {region}")
        for region in set(self._watchers) - regions:
            self._watchers.pop(region).cancel()

    async def stop(self) -> None:
        tasks = [*self._watchers.values(), *([self._poll] if self._poll else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watchers.clear()
        await self.base.stop()

    async def _tasks(self) -> list[dict]:
        """The tasks, each with the region it runs in (a task's "" is the home region)."""
        home = self.cluster.spec.home_region
        return [{**t, "region": t["region"] or home} for t in await self.tasks.list()]

    # -- runs ---------------------------------------------------------------------------

    async def _credentials(self, task: dict) -> tuple[str, str] | None:
        """The task's own identity (``task_identities``), never the admin user's."""
        if not self.cluster.spec.auth_enabled:
            return None
        login = self.tasks.identities.login(task["name"])
        if login is None:
            raise ClusterError(f"task {task['name']!r} has no identity yet: run it once by hand "
                               f"(`georeg task run --name {task['name']}`) with a login that may "
                               f"push its image and pull its base images; its triggered runs "
                               f"then act as that task's identity")
        return login

    async def _triggered(self, task: dict, trigger: str, detail: dict,
                         commit: str | None = None) -> None:
        request = run_request(task, None, trigger, detail)
        try:
            request = run_request(task, await self._credentials(task), trigger, detail)
            record = await self.builds.start(request, task_source(task, commit))
        except RETRYABLE:
            raise                           # the caller tries again later
        except ClusterError as exc:
            last = next(iter(self.builds.list(task["name"])), None)
            if last is not None and last["status"] == "Failed" and last["error"] == str(exc) \
                    and last.get("startTime") is None:
                log.info("task_trigger_refused_again", task=task["name"], run=last["runId"])
                return                      # one record says it; not one per move
            record = self.builds.refused(request, str(exc))
        log.info("task_triggered", task=task["name"], trigger=trigger, run=record["runId"],
                 status=record["status"])

    async def _start_image_update(self, task: dict, move: TagMove) -> None:
        registry = urllib.parse.urlsplit(self.cluster.regional_endpoint(move.region)).netloc
        await self._triggered(task, IMAGE_UPDATE, image_update_detail(move, registry))

    async def _start_commit(self, task: dict, commit: str) -> None:
        await self._triggered(task, COMMIT, {"sourceTrigger": {
            "eventType": "commit", "commitId": commit, "branchName": task["branch"],
            "repositoryUrl": task["contextPath"]}}, commit)

    # -- the nodes ----------------------------------------------------------------------

    def _region_nodes(self, region: str) -> list[str]:
        return [n.name for n in self.cluster.plan.nodes if n.region == region and not n.copy_of]

    async def _resolve(self, region: str, repository: str, tag: str) -> str | None:
        path = (f"/v2/{urllib.parse.quote(repository)}/manifests/"
                f"{urllib.parse.quote(tag, safe='')}")
        for name in self._region_nodes(region):
            try:
                async with self.cluster.http().head(
                        f"{self.cluster.management_link_url(name)}{path}",
                        headers={"Accept": MANIFEST_ACCEPT},
                        timeout=aiohttp.ClientTimeout(total=30)) as r:
                    if r.status == 404:
                        return None
                    if r.status == 200:
                        return r.headers.get("Docker-Content-Digest")
            except (aiohttp.ClientError, TimeoutError, OSError):
                continue
        raise ClusterError(f"no node of {region} answers")

    async def _watch(self, region: str) -> None:
        """The region's tag moves, from one of its nodes at a time, forever."""
        rng = random.Random()
        delay = RETRY_S[0]
        while True:                         # ends when the management API stops (cancel)
            for name in self._region_nodes(region):
                cursor: list[int] = []
                try:
                    await self._follow(region, name, cursor)
                except (ClusterError, aiohttp.ClientError, TimeoutError, OSError,
                        ValueError, KeyError) as exc:
                    log.debug("base_trigger_node_unavailable", node=name, error=str(exc))
                except Exception:       # an answer of an unexpected shape, a bug: back off
                    log.exception("base_trigger_watch_failed", node=name)
                if cursor:                  # it answered for a while: try again at once
                    delay = RETRY_S[0]
            await asyncio.sleep(delay * (0.5 + rng.random()))
            delay = min(delay * 2, RETRY_S[1])

    async def _follow(self, region: str, name: str, cursor: list[int]) -> None:
        """Follow node ``name``'s tag moves until it stops answering (it raises).
        Its first answer is its head: what moved before it is re-derived, as it
        is when the node's log was truncated past the cursor, or restarted
        below it (``reset``)."""
        url = f"{self.cluster.management_link_url(name)}/georeg/v1/tag-moves"
        while True:                         # ends when the node stops answering (raises)
            after = cursor[-1] if cursor else None
            query = "" if after is None else f"?after={after}&wait={LONG_POLL_S:g}"
            async with self.cluster.http().get(
                    url + query, timeout=aiohttp.ClientTimeout(total=LONG_POLL_S + 10)) as r:
                if r.status != 200:
                    raise NodeRefusal(f"{name} answered HTTP {r.status}", r.status,
                                      "Unavailable")
                answer = await r.json()
            if after is None or after < int(answer["floor"]) or answer.get("reset"):
                await self.base.rederive(region)
            else:
                await self.base.moved([TagMove(region, m["repository"], m["tag"], m["digest"])
                                       for m in answer["moves"]])
            # Only once they were handled: moves that failed (no node could list
            # the tasks) are read again, or the next node re-derives them.
            cursor[:] = [int(answer["next"])]

    async def _poll_commits(self) -> None:
        while True:                         # ends when the management API stops (cancel)
            self._watch_regions()
            try:
                if self.base.pending:       # deferred by a full or unreachable region
                    await self.base.dispatch()
                await self.commits.poll()
            except ClusterError as exc:
                log.warning("commit_trigger_failed", error=str(exc))
            except Exception:           # a disk error writing the seen tips: try again next time
                log.exception("commit_trigger_failed")
            await asyncio.sleep(self.cluster.spec.tasks.commit_poll_seconds)


# -- commits -------------------------------------------------------------------------------


class CommitTriggers:
    """Branch tips that moved, turned into runs (see the module's docstring)."""

    def __init__(self, seen_file: Path, *, tasks: Callable[[], Awaitable[list[dict]]],
                 runs: Callable[[], list[dict]], busy: Callable[[], set[str]],
                 start: Callable[[dict, str], Awaitable[None]],
                 head: Callable[[GitSource], str] = branch_head) -> None:
        self.seen_file = seen_file
        self._tasks, self._runs, self._busy, self._start, self._head = \
            tasks, runs, busy, start, head

    def _seen(self) -> dict[str, str]:
        try:
            seen = json.loads(self.seen_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return seen if isinstance(seen, dict) else {}

    async def poll(self) -> list[str]:
        """One look at every commit-triggered task's branch; the tasks started."""
        seen = self._seen()
        tasks = [t for t in await self._tasks() if t.get("commitTriggerEnabled")
                 and t.get("branch") and t["status"] == "Enabled"]
        if not tasks and not seen:
            return []                           # no commit trigger: no runs read, nothing written
        before = dict(seen)
        built = {(r.get("task"), (r.get("source") or {}).get("commitId")) for r in self._runs()}
        busy = self._busy()
        loop = asyncio.get_running_loop()
        started = []
        for task in tasks:
            name, key = task["name"], _watched(task)
            try:
                tip = await loop.run_in_executor(
                    None, self._head, GitSource(Path(task["contextPath"]), task["branch"]))
            except ClusterError as exc:
                log.warning("commit_trigger_unreadable", task=name, error=str(exc))
                continue
            if key not in seen:
                seen[key] = tip                 # the baseline: ACR builds on the next commit
            elif seen[key] != tip and name not in busy and (name, tip) not in built:
                try:
                    await self._start(task, tip)
                except RETRYABLE as exc:    # not seen yet: the next poll tries again
                    log.info("commit_trigger_deferred", task=name, error=str(exc))
                    continue
                seen[key] = tip
                started.append(name)
            elif (name, tip) in built:
                seen[key] = tip
        current = {_watched(t) for t in tasks}
        seen = {k: v for k, v in seen.items() if k in current}
        if seen != before:                      # the tips seen changed: kept for a restart
            write_private(self.seen_file, json.dumps(seen).encode())
        return started



def _watched(task: dict) -> str:
    """What a seen tip belongs to: the task (as created: one deleted and made
    again starts anew), its repository and its branch. A task updated to another
    branch or context takes a new baseline, as a new task does."""
    return json.dumps([task["name"], task.get("creationDate"), task["contextPath"],
                       task["branch"]])
