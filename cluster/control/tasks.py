"""Tasks (after ``az acr task``): named builds kept as registry configuration
(kind ``task``, ``registry_node.tasks``), written through the home region,
and run by the build agents (``cluster.control.builds``) on demand.

A task names its context as a directory on the cluster's machine, under one
of the spec's ``[tasks] context_roots`` and never in the data dir
(``containerfile.task_context``, checked at create and again at each run);
each run archives it afresh, so a run builds what the directory holds then, through
the same limits and checks as an uploaded context. A run on demand is
authorised with the caller's registry login, as a quick build is.

Invariants: a task is checked here (its region has a replica, its image
parses) and again by the home node (``check_task``); a task that does not
exist is a 404 naming the command that lists them.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from registry_node.tasks import TASK, Task

from .builds import MANUAL, BuildRequest, BuildRuns
from .containerfile import RunVariables, image_reference, task_context
from .errors import ClusterError, Conflict, NodeRefusal, NotFound
from .git_sources import GitSource, branch_head
from .task_identities import TaskIdentities

if TYPE_CHECKING:                      # a Cluster is handed in; it never imports this module
    from .cluster import Cluster

_FIELDS = {"image": "image", "contextPath": "context", "file": "file", "region": "region",
           "buildArgs": "build_args", "timeout": "timeout", "status": "status",
           "baseImageTriggerEnabled": "base_image_trigger_enabled", "branch": "branch",
           "commitTriggerEnabled": "commit_trigger_enabled"}


def task_view(name: str, value: dict) -> dict:
    """A task as the API shows it (ACR's field names where it has one)."""
    view = {"name": name, **{field: value.get(key) for field, key in _FIELDS.items()}}
    view["creationDate"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value.get("created", 0)))
    return view


class RegistryTasks:
    def __init__(self, cluster: Cluster, builds: BuildRuns) -> None:
        self.cluster = cluster
        self.builds = builds
        self.identities = TaskIdentities(cluster.access, cluster.data_dir)
        builds.give_task_identity = self.identities.give

    async def _get(self, name: str) -> dict | None:
        try:
            stored = await self.cluster.get_configuration(TASK, name)
        except (NodeRefusal, NotFound) as exc:
            if getattr(exc, "status", 404) == 404:
                return None
            raise
        return None if stored.get("deleted") else stored["value"]

    async def show(self, name: str) -> dict:
        value = await self._get(name)
        if value is None:
            raise NotFound(f"no task {name!r}; `georeg task list` shows them")
        return task_view(name, value)

    async def list(self) -> list[dict]:
        return [task_view(o["name"], o["value"])
                for o in await self.cluster.list_configuration(TASK)]

    async def _checked(self, body: dict, current: dict | None = None) -> dict:
        """The task's stored value: ``body``'s fields (API names) over ``current``,
        checked here as the home node will check them, and more (its region has
        a replica, its image parses, its context is allowed; a git context is a
        repository with that branch)."""
        unknown = sorted(set(body) - set(_FIELDS))
        if unknown:
            raise ClusterError(f"unknown fields {', '.join(unknown)[:200]}; send "
                               f"{', '.join(_FIELDS)}")
        value = dict(current or {})
        value.update({key: body[field] for field, key in _FIELDS.items()
                      if body.get(field) is not None})
        try:                                    # typed first: {"region": [...]} is a 400
            msgspec.convert(value, Task, strict=True)
        except msgspec.ValidationError as exc:
            raise ClusterError(f"the task is refused: {exc}") from None
        self.builds.build_region(value.get("region"))
        image_reference(RunVariables("ca1", "registry", "date").substitute(
            str(value.get("image", ""))))
        context = task_context(str(value.get("context", "")),
                               self.cluster.spec.tasks.context_roots, self.cluster.data_dir)
        if value.get("branch"):                 # git runs out of the event loop
            await asyncio.get_running_loop().run_in_executor(
                None, branch_head, GitSource(context, value["branch"]))
        return value

    async def create(self, name: str, body: dict) -> dict:
        value = await self._checked(body)
        if await self._get(name) is not None:
            raise Conflict(f"task {name!r} exists already; delete it first")
        value["created"] = time.time()
        await self.cluster.set_configuration(TASK, name, value)
        return await self.show(name)

    async def update(self, name: str, body: dict) -> dict:
        """``az acr task update``: the fields given change, the others stay."""
        current = await self._get(name)
        if current is None:
            raise NotFound(f"no task {name!r}; `georeg task list` shows them")
        await self.cluster.set_configuration(TASK, name, await self._checked(body, current))
        return await self.show(name)

    async def delete(self, name: str) -> None:
        await self.show(name)
        await self.identities.forget(name)      # first: a failure leaves the task whole
        await self.cluster.delete_configuration(TASK, name)

    async def run(self, name: str, credentials: tuple[str, str] | None,
                  trigger: str = MANUAL, detail: dict | None = None) -> dict:
        task = await self.show(name)
        if task["status"] != "Enabled":
            raise ClusterError(f"task {name!r} is disabled")
        return await self.builds.start(run_request(task, credentials, trigger, detail),
                                       task_source(task))


def run_request(task: dict, credentials: tuple[str, str] | None, trigger: str = MANUAL,
                detail: dict | None = None) -> BuildRequest:
    """A run of ``task`` (as ``task_view`` shows it)."""
    return BuildRequest(task["image"], task["file"] or None,
                        tuple(tuple(p) for p in task["buildArgs"] or ()),
                        task["region"] or None, task["timeout"], task=task["name"],
                        trigger=trigger, trigger_detail=detail, credentials=credentials)


def task_source(task: dict, commit: str | None = None) -> Path | GitSource:
    """What a run of ``task`` builds: its directory, or its branch's ``commit``
    (None: the tip when the run starts)."""
    path = Path(task["contextPath"])
    return GitSource(path, task["branch"], commit) if task.get("branch") else path
