"""A task's own identity (after ACR's system-assigned identity of a task): the
login its *triggered* runs build and push with, so that no trigger acts as
the admin user, and disabling the admin user breaks none.

The identity is a repository-scoped token of the registry, ``task-<name>``,
with a scope map of the same name (``cluster.control.identities``): push and
pull on the task's image repository, pull on the base image repositories its
Containerfile named. It is given (created, or its scope map replaced) by a
*manual* run of the task (``georeg task run``, ``az acr task run``) whose
caller's login the build region granted exactly that — push on the image,
pull on every base (``builds._login`` refuses the run otherwise). So a task
can do no more than someone who could do it by hand showed they could, and
a Containerfile changed by a commit that names another repository is
refused pull on it until such a caller runs the task again.

The token's password (password1) is made here and kept only in
``<data dir>/auth/task-identities.json`` (0600, the control plane's, like the
admin passwords; never in a log, a run record or a replicated value: nodes
hold its hash as for any token). Deleting a task deletes its identity.

Invariants
    * A token named ``task-<name>`` is taken as the task's only when its scope
      map is ``task-<name>`` and its password is kept here: a user's token of
      that name is never changed.
    * Without a kept password there is no identity: a triggered run is
      refused, saying to run the task once by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import structlog

from .access import auth_dir
from .errors import ClusterError, NotFound
from .identities import RegistryAccess
from .private_files import write_private

log = structlog.get_logger("georeg.task_identities")

SECRETS_FILE = "task-identities.json"
PREFIX = "task-"


def identity_name(task: str) -> str:
    """The token and scope map of ``task``'s identity."""
    return f"{PREFIX}{task}"


class TaskIdentities:
    """The identities of one cluster's tasks."""

    def __init__(self, access: RegistryAccess, data_dir: Path) -> None:
        self.access = access
        self.path = auth_dir(data_dir) / SECRETS_FILE

    def _kept(self) -> dict[str, str]:
        try:
            kept = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return kept if isinstance(kept, dict) else {}

    def _keep(self, task: str, password: str | None) -> None:
        kept = self._kept()
        if password is None:
            kept.pop(task, None)
        else:
            kept[task] = password
        write_private(self.path, json.dumps(kept).encode())

    def login(self, task: str) -> tuple[str, str] | None:
        """The task's identity's username and password (None: not given yet)."""
        password = self._kept().get(task)
        return (identity_name(task), password) if isinstance(password, str) else None

    async def give(self, task: str, repository: str, bases: list[str]) -> None:
        """``task``'s identity may now push ``repository`` and pull ``bases`` (and
        nothing else): what a manual run's caller was just granted."""
        name = identity_name(task)
        wanted = [[repository, "content/read", "content/write"],
                  *([b, "content/read"] for b in sorted(set(bases) - {repository}))]
        try:
            token = await self.access.show_token(name)
        except NotFound:
            token = None
        if token is not None and (token["scopeMap"] != name or self.login(task) is None):
            raise ClusterError(f"a token {name!r} exists that is not task {task!r}'s identity; "
                               f"delete it (georeg token delete) so the task can have its own")
        try:
            current = await self.access.show_scope_map(name)
        except NotFound:
            current = None
        if current is None:
            await self.access.create_scope_map(name, wanted, f"task {task}'s identity")
        else:
            want = {f"repositories/{r}/{a}" for r, *acts in wanted for a in acts}
            stale = [_entry(a) for a in current["actions"] if a not in want]
            await self.access.update_scope_map(name, add=wanted, remove=stale)
        if token is None:
            made = await self.access.create_token(name, scope_map=name)
            password = next(p["value"] for p in made["credentials"]["passwords"]
                            if p["name"] == "password1")
            self._keep(task, password)
            log.info("task_identity_created", task=task, token=name)

    async def forget(self, task: str) -> None:
        """The task was deleted: its identity too (what is not there is skipped)."""
        name = identity_name(task)
        if self.login(task) is None:
            return                           # never given: a token of that name is not ours
        for delete in (self.access.delete_token, self.access.delete_scope_map):
            try:
                await delete(name)
            except NotFound:
                pass
        self._keep(task, None)


def _entry(action: str) -> list[str]:
    """``repositories/<repo>/<kind>/<verb>`` as ``[repo, "<kind>/<verb>"]``."""
    repository, kind, verb = action.removeprefix("repositories/").rsplit("/", 2)
    return [repository, f"{kind}/{verb}"]
