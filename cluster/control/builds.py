"""Quick builds (after ``az acr build``): a build context uploaded to the
cluster is built by the build agent of one region (the home region, or the
one asked for) with buildah, and the image pushed to that region's endpoint;
replication carries it on like any push. Each build is a *run*, kept as data::

    <data dir>/tasks/               mode 0700
        runs/<run id>.json          the run record (0600, written whole and fsync-ed)
        logs/<run id>.log           its log (0600): what the agent and buildah printed
        scratch/<run id>/           the run's context, Containerfile, auth file and
                                    buildah storage; removed when the run ends

A run is ``Queued`` → ``Running`` → ``Succeeded`` | ``Failed`` | ``Canceled`` |
``Timeout``; a run the supervisor was stopped in the middle of is recorded
``Failed`` (at a clean stop, else when the management API starts again,
which also removes the scratch dirs a crash left): nothing goes on building
unseen.

Who may build: the caller's registry identity (the admin user, a token, an
identity) is logged in at the build region's endpoint, asking for push on
the target repository and pull on every base image; a grant without push is
refused (403 ``DENIED``) before any run exists. The agent then works with a
refresh token for that identity (ACR's three hours from the login, never
the password), kept only in the run's 0600 auth file and in memory: buildah
exchanges it for access tokens itself, and the agent exchanges it for a
fresh access token just before each base image is resolved. The refresh token
is not renewed, so it bounds a run: a timeout is at most ``MAX_TIMEOUT_S``
(the token's life less ``LOGIN_MARGIN_S``), and a run that waited in the
queue gets what is left of the login; one that outlives it fails saying so. Base images (``FROM``) come from this registry
only, through the same endpoint; each is resolved to its digest first, the
digest written into the Containerfile the agent builds and kept in the run
record (``baseImages``), so that a later base-image trigger knows what a run
was built on.

Bounds: one build at a time per region (``BUILDS_PER_REGION``), the rest
queued in order; a run timeout (``DEFAULT_TIMEOUT_S``, ACR's default of an
hour), after which buildah is killed with everything it started
(``_contained``); a context size limit
(``max_context_bytes``) checked as the upload arrives.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import aiohttp
import structlog

from registry_node.auth.tokens import REFRESH_LIFETIME_S
from registry_node.identities import InvalidValue
from registry_node.manifest import MANIFEST_ACCEPT
from registry_node.tasks import DEFAULT_TIMEOUT_S, LOGIN_MARGIN_S, MAX_TIMEOUT_S, build_arg

from .containerfile import (
    ContextRefused,
    ContextTooLarge,
    RunVariables,
    archive_directory,
    base_images,
    containerfile_in,
    image_reference,
    pinned,
    task_context,
    unpack_context,
)
from .errors import ClusterError, Conflict, NotFound, RegionUnavailable, TooManyRequests
from .git_sources import GitSource, archive_commit, branch_head
from .private_files import write_private
from .regions import REGIONS, unknown_region_message
from .tls import client_context

if TYPE_CHECKING:                      # a Cluster is handed in; it never imports this module
    from .cluster import Cluster

log = structlog.get_logger("georeg.builds")

TASKS_DIR = "tasks"
# The user name ACR's refresh tokens are presented with.
TOKEN_USER = "00000000-0000-0000-0000-000000000000"
BUILDS_PER_REGION = 1
# Runs a region holds at once, arriving, queued and running: each keeps an
# unpacked context (up to 1 GiB) in scratch while it waits.
RUNS_PER_REGION = 10
# A run's log past this is cut, with one line saying so (the run goes on).
MAX_LOG_BYTES = 64 * 1024 * 1024
_LOG_CHUNK = 1 << 20
DEFAULT_MAX_CONTEXT_BYTES = 256 * 1024 * 1024
FINAL = ("Succeeded", "Failed", "Canceled", "Timeout")
# A run's ``trigger``, as ``az acr task list-runs`` shows it.
MANUAL, IMAGE_UPDATE, COMMIT = "Manual", "Image Update", "Commit"
# A node answers a login or a manifest lookup within this.
NODE_TIMEOUT_S = 30.0


class Denied(ClusterError):
    """The caller's identity may not push where the build would push (ACR's
    ``DENIED``, as a registry answers a push it refuses)."""

    status = 403
    code = "DENIED"


class Unauthorized(ClusterError):
    """The registry refused the caller's login: its own code, as a registry's 401
    says it (the management API's own 401 is ``errors.Unauthorized``)."""

    status = 401
    code = "UNAUTHORIZED"


@dataclass(frozen=True, slots=True)
class BuildRequest:
    image: str                              # REPO:TAG, run variables not yet substituted
    file: str | None = None
    build_args: tuple[tuple[str, str], ...] = ()
    region: str | None = None
    timeout_s: int = DEFAULT_TIMEOUT_S
    task: str | None = None
    trigger: str = MANUAL
    # What triggered it, as ACR's run names it: {"imageUpdateTrigger": {...}} or
    # {"sourceTrigger": {...}} (``cluster.control.triggers``); kept in the record.
    trigger_detail: dict | None = None
    # Not in the repr: a traceback or a log line that shows the request must
    # not show the password.
    credentials: tuple[str, str] | None = field(default=None, repr=False)


def build_request(query, credentials: tuple[str, str] | None) -> BuildRequest:
    """The management API's query (``image``, ``file``, ``buildArg`` K=V
    repeated, ``region``, ``timeout``), checked."""
    known = {"image", "file", "buildArg", "region", "timeout"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise ClusterError(f"unknown parameters {', '.join(unknown)[:200]}; send "
                           f"{', '.join(sorted(known))}")
    image = query.get("image")
    if not image:
        raise ClusterError("give the image to build as ?image=REPO:TAG (georeg build -t)")
    args = []
    for text in query.getall("buildArg", []):
        try:
            args.append(build_arg(text))
        except InvalidValue as exc:
            raise ClusterError(str(exc)) from None
    region = query.get("region") or None
    if region is not None and region not in REGIONS:
        raise ClusterError(unknown_region_message(region))
    timeout = query.get("timeout", str(DEFAULT_TIMEOUT_S))
    if not (timeout.isascii() and timeout.isdigit()) or not 1 <= int(timeout) <= MAX_TIMEOUT_S:
        raise ClusterError(f"timeout is a whole number of seconds, 1 to {MAX_TIMEOUT_S} (the "
                           f"caller's 3-hour login, which the agent builds and pushes with, "
                           f"less {LOGIN_MARGIN_S} s)")
    return BuildRequest(image, query.get("file") or None, tuple(args), region, int(timeout),
                        credentials=credentials)


@dataclass(slots=True)
class _Grant:
    """What the caller's login at the build region gave the agent."""

    refresh_token: str | None = field(repr=False)
    # When the refresh token stops working (BuildRuns.clock); None without auth.
    expires_at: float | None = None


@dataclass(slots=True)
class _Live:
    """A run this process is running: its task, buildah's process, a wake-up for log readers."""

    task: asyncio.Task | None = None
    process: asyncio.subprocess.Process | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    canceled: bool = False
    logged: int = 0                     # bytes written to its log
    task_name: str | None = None        # the task it is a run of (None: a quick build)


class BuildRuns:
    """The runs of a cluster: started, kept, read, canceled."""

    def __init__(self, cluster: Cluster, *, max_context_bytes: int = DEFAULT_MAX_CONTEXT_BYTES,
                 buildah: str = "buildah", clock=time.monotonic) -> None:
        self.cluster = cluster
        self.max_context_bytes = max_context_bytes
        self.buildah = buildah
        self.clock = clock
        self.root = cluster.data_dir / TASKS_DIR
        self._live: dict[str, _Live] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._held: dict[str, int] = {}   # per region: runs arriving, queued or running
        self._arriving: dict[str, int] = {}   # per task: starts not yet queued or refused
        self._records: dict[str, dict] | None = None   # ``_index``
        self._recovered = False
        self._last_number: int | None = None
        # Called with a run's record when it ends (the base-image triggers
        # dispatch what waited for it).
        self.finished_listeners: list = []
        # ``TaskIdentities.give``: a manual task run's grant becomes its task's identity.
        self.give_task_identity = None

    # -- the files ------------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    def _record_path(self, run_id: str) -> Path:
        if not (run_id.isascii() and run_id.isalnum()):
            raise NotFound(f"no run {run_id[:40]!r}")
        return self._dir("runs") / f"{run_id}.json"

    def log_path(self, run_id: str) -> Path:
        self._record_path(run_id)
        return self._dir("logs") / f"{run_id}.log"

    def _save(self, record: dict) -> None:
        data = json.dumps(record, indent=1).encode()
        write_private(self._record_path(record["runId"]), data)
        if self._records is not None:
            self._records[record["runId"]] = json.loads(data)    # a snapshot, not the live dict
        live = self._live.get(record["runId"])
        if live is not None:
            live.changed.set()

    def show(self, run_id: str) -> dict:
        self._recover()
        try:
            return json.loads(self._record_path(run_id).read_text())
        except FileNotFoundError:
            raise NotFound(f"no run {run_id!r}; `georeg task list-runs` shows them") from None

    def _index(self) -> dict[str, dict]:
        """Every run's record by id, read from disk once, then kept by ``_save``
        (the triggers read all runs at every tag move and commit poll)."""
        if self._records is None:
            self._records = {}
            for path in self._dir("runs").glob("*.json"):
                record = json.loads(path.read_text())
                self._records[record["runId"]] = record
        return self._records

    def list(self, task: str | None = None) -> list[dict]:
        """The runs (of ``task``), newest first: copies of the records in memory."""
        self._recover()
        runs = [dict(r) for r in self._index().values() if task is None or r.get("task") == task]
        return sorted(runs, key=lambda r: r["number"], reverse=True)

    def active_tasks(self) -> set[str]:
        """The tasks with a run arriving (its context read, its login asked for),
        queued or running in this process: busy from the moment a start is
        accepted, so two triggers never start one task twice."""
        return {live.task_name for live in self._live.values() if live.task_name} \
            | set(self._arriving)

    def recover(self) -> None:
        """At the management API's start: runs a crash left are Failed and their
        scratch (auth files with a live refresh token) removed at once."""
        self._recover()

    def _recover(self) -> None:
        """Runs a stopped supervisor left Queued or Running are Failed: nothing builds them now."""
        if self._recovered:
            return
        self._recovered = True
        for record in list(self._index().values()):
            if record["status"] not in FINAL and record["runId"] not in self._live:
                self._finish(dict(record), "Failed", _stopped_in(record))
        scratch = self.root / "scratch"
        for left in sorted(scratch.iterdir()) if scratch.is_dir() else ():
            _remove_scratch(left)        # auth files first: a crash left live refresh tokens
        _remove_scratch(scratch)

    def _next_id(self) -> tuple[str, int]:
        """A new run id, taken at once (two uploads arriving together never share one)."""
        if self._last_number is None:
            self._last_number = max((int(p.stem[2:]) for p in self._dir("runs").glob("ca*.json")
                                     if p.stem[2:].isdigit()), default=0)
        self._last_number += 1
        return f"ca{self._last_number}", self._last_number

    # -- a run ----------------------------------------------------------------------------

    async def start(self, request: BuildRequest, source) -> dict:
        """Check and authorise ``request`` with its context ``source`` (an async
        iterator of the uploaded archive's chunks, or a task's directory), then
        queue its run; the run's record."""
        self._recover()
        region = self.build_region(request.region)
        if self._held.get(region, 0) >= RUNS_PER_REGION:
            raise TooManyRequests(f"{region} already holds {RUNS_PER_REGION} runs (arriving, queued "
                              f"or running); wait for one to end, or build in another region")
        self._held[region] = self._held.get(region, 0) + 1
        if request.task:
            self._arriving[request.task] = self._arriving.get(request.task, 0) + 1
        try:
            return await self._start(request, source, region)
        except BaseException:
            self._release(region)
            raise
        finally:                           # queued now (``_live``), or refused
            if request.task:
                self._arriving[request.task] -= 1
                if not self._arriving[request.task]:
                    del self._arriving[request.task]

    def build_region(self, region: str | None) -> str:
        """The region a build or a task runs in (default: home), which must have a replica."""
        region = region or self.cluster.spec.home_region
        replicas = [r.region for r in self.cluster.spec.all_replicas]
        if region not in replicas:
            raise ClusterError(f"{region} has no replica; build in one of {', '.join(replicas)}")
        return region

    def _release(self, region: str) -> None:
        self._held[region] = max(0, self._held.get(region, 0) - 1)

    async def _start(self, request: BuildRequest, source, region: str) -> dict:
        endpoint = self.cluster.regional_endpoint(region)
        registry = urlsplit(endpoint).netloc
        run_id, number = self._next_id()
        now = datetime.now(UTC)
        variables = RunVariables(run_id, registry, now.strftime("%Y%m%d-%H%M%Sz"))
        scratch = self._dir("scratch") / run_id
        scratch.mkdir(mode=0o700)
        try:
            context, source_facts = await self._receive(source, scratch)
            file = containerfile_in(context, request.file)
            lines = variables.containerfile(file.read_text(errors="replace"))
            bases = base_images(lines, registry, aliases=(self.cluster.spec.login_server,),
                                build_args=request.build_args)
            repository, tag = image_reference(variables.substitute(request.image))
            grant = await self._login(endpoint, request.credentials, repository,
                                      sorted({b.repository for b in bases}))
            note = await self._give_identity(request, grant, repository, bases)
        except BaseException:
            _remove_scratch(scratch)
            raise
        record = _new_record(request, run_id, number, region, now,
                             f"{registry}/{repository}:{tag}")
        record["source"] = source_facts
        self._live[run_id] = live = _Live(task_name=request.task)
        self._save(record)
        if note:
            self._log(run_id, f"georeg: {note}\n".encode())
        work = _Work(record, scratch, context, lines, bases, endpoint, registry,
                     request.build_args, grant)
        live.task = asyncio.create_task(self._run(work), name=f"build {run_id}")
        return record

    async def _give_identity(self, request: BuildRequest, grant: _Grant, repository: str,
                             bases: list) -> str | None:
        """A manual run of a task whose caller was granted push on its image and
        pull on its bases: the task's identity may now do that (``task_identities``),
        for its triggered runs. What went wrong is the run's to say (None: given)."""
        if request.task is None or request.trigger != MANUAL or grant.refresh_token is None \
                or self.give_task_identity is None:
            return None
        try:
            await self.give_task_identity(request.task, repository,
                                          sorted({b.repository for b in bases}))
        except ClusterError as exc:
            log.warning("task_identity_not_given", task=request.task, error=str(exc))
            return f"the task's identity (for its triggered runs) was not given: {exc}"
        return None

    async def _receive(self, source, scratch: Path) -> tuple[Path, dict | None]:
        """The context unpacked under ``scratch``, and (a git context) the branch
        and commit it is: a task's directory or commit goes through the same
        archive, limit and checks as an upload."""
        archive = scratch / "context.tar"
        loop = asyncio.get_running_loop()
        facts = None
        if isinstance(source, GitSource):
            # git reads the realpath checked, not the path again (a link moved between).
            source = GitSource(task_context(str(source.path),
                                            self.cluster.spec.tasks.context_roots,
                                            self.cluster.data_dir), source.branch, source.commit)
            commit = source.commit or await loop.run_in_executor(None, branch_head, source)
            received = await loop.run_in_executor(
                None, functools.partial(archive_commit, source, commit, archive,
                                        max_bytes=self.max_context_bytes))
            facts = {"repositoryUrl": str(source.path), "branchName": source.branch,
                     "commitId": commit}
        elif isinstance(source, Path):
            # Checked again at each run: the spec's roots may have changed, a link moved.
            source = task_context(str(source), self.cluster.spec.tasks.context_roots,
                                  self.cluster.data_dir)
            received = await loop.run_in_executor(
                None, functools.partial(archive_directory, source, archive,
                                        max_bytes=self.max_context_bytes))
        else:
            received = 0
            with open(archive, "wb") as f:  # noqa: ASYNC230 - local writes of 64 KiB chunks
                async for chunk in source:
                    received += len(chunk)
                    if received > self.max_context_bytes:
                        break
                    f.write(chunk)
        if received > self.max_context_bytes:
            raise ContextTooLarge(
                f"the build context is over {self.max_context_bytes:,} bytes; leave "
                f"what the build does not need out of the context directory")
        if received == 0:
            raise ContextRefused("the request carried no build context (a tar archive)")
        context = scratch / "context"
        context.mkdir()
        await loop.run_in_executor(None, unpack_context, archive, context)
        archive.unlink()
        return context, facts

    def refused(self, request: BuildRequest, error: str) -> dict:
        """A run that could not start, recorded ``Failed`` with why (a triggered
        run, which no caller is waiting to hear refused)."""
        self._recover()
        run_id, number = self._next_id()
        record = _new_record(request, run_id, number, request.region or
                             self.cluster.spec.home_region, datetime.now(UTC), request.image)
        self._finish(record, "Failed", error)
        return record

    def _http(self) -> aiohttp.ClientSession:
        """A session of the caller's, not the cluster's: it carries no internal credential."""
        tls = client_context(self.cluster.ca_file) if self.cluster.scheme == "https" else None
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=NODE_TIMEOUT_S),
                                     connector=aiohttp.TCPConnector(ssl=tls) if tls else None)

    async def _login(self, endpoint: str, credentials: tuple[str, str] | None,
                     repository: str, bases: list[str]) -> _Grant:
        """The caller's grant at the build region: push on ``repository`` (else
        ``Denied``), and a refresh token for the agent."""
        if not self.cluster.spec.auth_enabled:
            return _Grant(None)
        obtained = self.clock()
        if credentials is None:
            raise Unauthorized("this registry requires a login: send the caller's registry "
                               "credentials (georeg build --username, or the admin user's)")
        scopes = [f"repository:{repository}:pull,push", *(f"repository:{b}:pull" for b in bases)]
        form = [("grant_type", "password"), ("username", credentials[0]),
                ("password", credentials[1]), ("access_type", "offline"),
                *(("scope", s) for s in scopes)]
        try:
            async with self._http() as http, http.post(f"{endpoint}/oauth2/token",
                                                       data=form) as r:
                answer = await r.json(content_type=None) if r.status == 200 else None
                status = r.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise RegionUnavailable(f"the build region's endpoint {endpoint} cannot be "
                                    f"reached ({type(exc).__name__}); build in another region "
                                    f"with --region") from None
        if status == 401:
            raise Unauthorized("the registry refused the caller's username or password")
        if not isinstance(answer, dict) or not answer.get("refresh_token"):
            raise RegionUnavailable(f"the build region's endpoint answered HTTP {status} "
                                    f"to a login")
        granted = {}
        for item in str(answer.get("scope", "")).split():
            kind, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            granted[name] = set(actions.split(","))
        if "push" not in granted.get(repository, set()):
            raise Denied(f"requested access to the resource is denied: {credentials[0]} may "
                         f"not push to repository {repository} of registry "
                         f"{self.cluster.spec.registry}; grant it push (a scope map with "
                         f"content/write, or the AcrPush role)")
        unreadable = [b for b in bases if "pull" not in granted.get(b, set())]
        if unreadable:
            raise Denied(f"requested access to the resource is denied: {credentials[0]} may "
                         f"not pull the base image repository {unreadable[0]} of registry "
                         f"{self.cluster.spec.registry}; grant it pull (content/read, or "
                         f"the AcrPull role)")
        return _Grant(answer["refresh_token"], obtained + REFRESH_LIFETIME_S - LOGIN_MARGIN_S)

    async def cancel(self, run_id: str) -> dict:
        record = self.show(run_id)
        live = self._live.get(run_id)
        if record["status"] in FINAL or live is None:
            raise Conflict(f"run {run_id} is {record['status']}: only a queued or running "
                               f"run can be canceled")
        live.canceled = True
        if live.task is not None:
            live.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await live.task
        return self.show(run_id)

    async def stop(self) -> None:
        """Cancel what runs (the supervisor is stopping)."""
        for live in list(self._live.values()):
            if live.task is not None:
                live.task.cancel()
        await asyncio.gather(*(live.task for live in self._live.values() if live.task),
                             return_exceptions=True)

    async def follow(self, run_id: str):
        """The run's log as it grows, until the run ends (an async iterator of bytes)."""
        record = self.show(run_id)
        path = self.log_path(run_id)
        offset = 0
        while True:
            live = self._live.get(run_id)
            if live is not None:
                live.changed.clear()
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:  # noqa: ASYNC230 - a local log
                f.seek(offset)
                while chunk := f.read(_LOG_CHUNK):      # bounded: the log is capped
                    offset += len(chunk)
                    yield chunk
            record = self.show(run_id)
            if record["status"] in FINAL or live is None:
                return
            # Woken by every log line and state change; the timeout only bounds a wait
            # whose wake-up raced the clear above.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(live.changed.wait(), 1.0)

    # -- the agent --------------------------------------------------------------------------

    def _finish(self, record: dict, status: str, error: str | None = None) -> None:
        record.update(status=status, finishTime=datetime.now(UTC).isoformat(), error=error)
        if error:
            self._log(record["runId"], f"georeg: run {record['runId']}: {error}\n".encode())
        self._save(record)

    def _log(self, run_id: str, data: bytes) -> None:
        live = self._live.get(run_id)
        if live is not None:
            if live.logged >= MAX_LOG_BYTES:
                return
            live.logged += len(data)
            if live.logged >= MAX_LOG_BYTES:
                data = data[:max(0, len(data) - (live.logged - MAX_LOG_BYTES))] + (
                    f"\ngeoreg: the log is cut at {MAX_LOG_BYTES // 2**20} MiB; the run goes "
                    f"on\n").encode()
        fd = os.open(self.log_path(run_id), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as f:
            f.write(data)
        live = self._live.get(run_id)
        if live is not None:
            live.changed.set()

    async def _run(self, work: _Work) -> None:
        record, run_id = work.record, work.record["runId"]
        slot = self._slots.setdefault(record["region"], asyncio.Semaphore(BUILDS_PER_REGION))
        started = time.monotonic()
        try:
            async with slot:
                record.update(status="Running", startTime=datetime.now(UTC).isoformat())
                self._save(record)
                login_left = _login_left(work.grant, self.clock())
                if login_left is not None and login_left <= 0:
                    raise _LoginExpired("queued")
                timeout = record["timeoutSeconds"] if login_left is None else \
                    min(record["timeoutSeconds"], login_left)
                try:
                    await asyncio.wait_for(self._build(work), timeout)
                except TimeoutError:
                    if timeout < record["timeoutSeconds"]:
                        raise _LoginExpired("running") from None
                    raise
            self._log(run_id, f"georeg: run {run_id} succeeded after "
                              f"{time.monotonic() - started:.1f}s\n".encode())
            self._finish(record, "Succeeded")
        except TimeoutError:
            self._finish(record, "Timeout", f"the run took more than its timeout of "
                                             f"{record['timeoutSeconds']}s")
        except asyncio.CancelledError:
            live = self._live.get(run_id)
            if live is not None and live.canceled:
                self._finish(record, "Canceled", "canceled")
            else:                       # the supervisor is stopping: nobody canceled it
                self._finish(record, "Failed", _stopped_in(record))
        except _LoginExpired as exc:
            self._finish(record, "Failed", f"the caller's login (a refresh token, "
                                           f"{REFRESH_LIFETIME_S // 3600} hours) expired while "
                                           f"the run was {exc}; run it again")
        except _RunFailed as exc:
            self._finish(record, "Failed", str(exc))
        except Exception as exc:        # the run fails with a reason; the API stays up
            self._finish(record, "Failed", f"the build agent failed: {type(exc).__name__}: {exc}")
        finally:
            live = self._live.pop(run_id, None)
            self._release(record["region"])
            for listener in self.finished_listeners:
                listener(record)
            if live is not None and live.process is not None and live.process.returncode is None:
                _kill(live.process)
                await live.process.wait()
            _remove_scratch(work.scratch)
            if live is not None:
                live.changed.set()

    async def _build(self, work: _Work) -> None:
        record, run_id = work.record, work.record["runId"]
        self._log(run_id, f"georeg: run {run_id} building {record['image']} in "
                          f"{record['region']}\n".encode())
        for base in work.bases:
            digest = await self._resolve(work, base.repository, base.reference)
            pinned(work.lines, base, work.registry, digest)
            record["baseImages"].append({"registry": work.registry,
                                         "repository": base.repository,
                                         "tag": None if base.reference.startswith("sha256:")
                                         else base.reference, "digest": digest,
                                         "runtime": base.runtime})
            self._log(run_id, f"georeg: FROM {work.registry}/{base.text} is {digest}\n".encode())
        self._save(record)
        file = work.scratch / "Containerfile"
        file.write_text("\n".join(work.lines) + "\n")
        env = self._environment(work)
        storage = ["--root", str(work.scratch / "storage"), "--runroot",
                   str(work.scratch / "runroot"), "--storage-driver", "vfs"]
        tls = ["--tls-verify=false"] if self.cluster.scheme == "http" else \
            ["--cert-dir", str(work.scratch / "certs")]
        await self._command(run_id, env, [
            self.buildah, *storage, "bud", "--isolation", "chroot", "--authfile",
            str(work.scratch / "auth.json"), *tls, "-f", str(file), "-t", record["image"],
            *(a for k, v in work.build_args for a in ("--build-arg", f"{k}={v}")),
            str(work.context)], "the build failed")
        digest_file = work.scratch / "digest"
        await self._command(run_id, env, [
            self.buildah, *storage, "push", "--authfile", str(work.scratch / "auth.json"),
            *tls, "--digestfile", str(digest_file), record["image"],
            f"docker://{record['image']}"], "the push failed")
        repository, _, tag = record["image"].partition("/")[2].rpartition(":")
        record["outputImages"] = [{"registry": work.registry, "repository": repository,
                                   "tag": tag, "digest": digest_file.read_text().strip()}]

    def _environment(self, work: _Work) -> dict[str, str]:
        """buildah's files, all under the run's scratch dir: the auth file (0600)
        holding the caller's refresh token, the registries it may reach, the CA."""
        auths = {}
        if work.grant.refresh_token:
            # As docker writes an ACR login: the null user with no password
            # (clients skip an entry without "auth"), the refresh token beside it.
            user = base64.b64encode(f"{TOKEN_USER}:".encode()).decode()
            auths[work.registry] = {"auth": user, "identitytoken": work.grant.refresh_token}
        write_private(work.scratch / "auth.json", json.dumps({"auths": auths}).encode())
        if self.cluster.scheme == "https" and self.cluster.ca_file is not None:
            (work.scratch / "certs").mkdir(mode=0o700)
            shutil.copyfile(self.cluster.ca_file, work.scratch / "certs" / "ca.crt")
        registries = work.scratch / "registries.conf"
        registries.write_text("unqualified-search-registries = []\n")
        home = work.scratch / "home"
        home.mkdir(mode=0o700)
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
                "XDG_RUNTIME_DIR": str(home), "TMPDIR": str(work.scratch),
                "CONTAINERS_REGISTRIES_CONF": str(registries), "BUILDAH_ISOLATION": "chroot",
                "NO_PROXY": "*", "no_proxy": "*"}

    async def _command(self, run_id: str, env: dict[str, str], argv: list[str],
                       failed: str) -> None:
        """One buildah command, its output into the run's log; its own process
        group and, when the supervisor is root, its own PID namespace
        (``_contained``), so a cancel or a timeout kills whatever it started,
        a RUN step's ``setsid`` child included."""
        live = self._live[run_id]
        live.process = process = await asyncio.create_subprocess_exec(
            *_contained(argv), env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        try:
            assert process.stdout is not None
            while chunk := await process.stdout.read(65536):
                self._log(run_id, chunk)
            code = await process.wait()
        except BaseException:
            _kill(process)
            await process.wait()
            raise
        if code != 0:
            raise _RunFailed(f"{failed} (buildah exited with status {code}); the log above "
                             f"says why")

    async def _access(self, work: _Work, repository: str) -> str | None:
        """A fresh access token to pull ``repository``, from the run's refresh token
        (just before it is used: one from the login may have expired in the queue)."""
        if work.grant.refresh_token is None:
            return None
        form = {"grant_type": "refresh_token", "refresh_token": work.grant.refresh_token,
                "scope": f"repository:{repository}:pull"}
        try:
            async with self._http() as http, http.post(f"{work.endpoint}/oauth2/token",
                                                       data=form) as r:
                answer = await r.json(content_type=None) if r.status == 200 else None
                status = r.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise _RunFailed(f"the region's endpoint cannot be reached to renew the caller's "
                             f"access ({type(exc).__name__})") from None
        if status == 401:
            raise _LoginExpired("queued")
        if not isinstance(answer, dict) or not answer.get("access_token"):
            raise _RunFailed(f"the region's endpoint answered HTTP {status} when the caller's "
                             f"access was renewed")
        return str(answer["access_token"])

    async def _resolve(self, work: _Work, repository: str, reference: str) -> str:
        headers = {"Accept": MANIFEST_ACCEPT}
        token = await self._access(work, repository)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        url = f"{work.endpoint}/v2/{repository}/manifests/{reference}"
        try:
            async with self._http() as http, http.head(url, headers=headers) as r:
                digest = r.headers.get("Docker-Content-Digest")
                status = r.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _RunFailed(f"the region's endpoint cannot be reached to resolve "
                             f"{repository}:{reference} ({type(exc).__name__})") from None
        if status == 404:
            raise _RunFailed(f"base image {work.registry}/{repository}:{reference} is not in "
                             f"this registry (in {work.record['region']}); push it first")
        if status != 200 or not digest:
            raise _RunFailed(f"base image {repository}:{reference}: the registry answered "
                             f"HTTP {status}")
        return digest


def _new_record(request: BuildRequest, run_id: str, number: int, region: str, now: datetime,
                image: str) -> dict:
    return {"runId": run_id, "number": number, "status": "Queued", "region": region,
            "runType": "QuickRun" if request.task is None else "TaskRun",
            "task": request.task, "trigger": request.trigger, **(request.trigger_detail or {}),
            "createTime": now.isoformat(), "startTime": None, "finishTime": None,
            "image": image, "identity": request.credentials[0] if request.credentials else None,
            "outputImages": [], "baseImages": [], "error": None,
            "timeoutSeconds": request.timeout_s}


def _stopped_in(record: dict) -> str:
    return f"the cluster stopped while this run was {record['status'].lower()}; run it again"


class _RunFailed(Exception):
    """The run failed for a reason its record states."""


class _LoginExpired(Exception):
    """The caller's refresh token ran out; the message says while the run was doing what."""


def _login_left(grant: _Grant, now: float) -> float | None:
    """Seconds the run's login still works for (None: no login, no bound)."""
    return None if grant.expires_at is None else grant.expires_at - now


@dataclass(slots=True)
class _Work:
    record: dict
    scratch: Path
    context: Path
    lines: list[str]
    bases: list
    endpoint: str
    registry: str
    build_args: tuple[tuple[str, str], ...]
    grant: _Grant = field(repr=False)


def _remove_scratch(scratch: Path) -> None:
    """A run's scratch dir removed, its auth file (the caller's refresh token)
    first and on its own; what cannot be removed is logged, never silent."""
    try:
        (scratch / "auth.json").unlink(missing_ok=True)
    except OSError as exc:
        log.warning("build_auth_file_left", path=str(scratch / "auth.json"), error=str(exc))
    shutil.rmtree(scratch, ignore_errors=True)
    if scratch.exists():
        log.warning("build_scratch_left", path=str(scratch),
                    hint="a rootless buildah's storage belongs to subuids; remove it with "
                         "`buildah unshare rm -rf`")


def _contained(argv: list[str]) -> list[str]:
    """``argv`` run as PID 1 of a PID namespace of its own: when it exits or is
    killed, the kernel kills every process left in it (``--kill-child`` kills it
    when ``unshare`` is killed). A non-root supervisor cannot make one without a
    user namespace, which would change buildah's rootless setup; there only the
    process group is killed (docs/tasks.md)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return argv
    return ["unshare", "--pid", "--fork", "--kill-child", *argv]


def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
