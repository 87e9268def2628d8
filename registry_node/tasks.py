"""Tasks (after ACR Tasks): a named build that can be run again — an image to
build, a Containerfile in a context directory, the region whose build agent
runs it. A task is registry configuration (kind ``task``,
``configuration.KINDS``), written through the home region and replicated
like any other; its runs are the control plane's (``cluster.control.builds``).
No I/O here.

Invariants: a task's context is an absolute path (the cluster runs on one
machine, and the supervisor reads it when a run starts); its image is
``REPOSITORY[:TAG]`` (run variables such as ``{{.Run.ID}}`` allowed in the
tag); its timeout is at most ``MAX_TIMEOUT_S`` (and, unlike ACR's 5 minutes, as
short as a second).
"""

from __future__ import annotations

import re

import msgspec

from .auth.tokens import REFRESH_LIFETIME_S
from .identities import InvalidValue

TASK = "task"
# ACR: "Task name must be between 5 and 50 characters" of letters, digits, hyphens
# and underscores; georeg accepts from 1, as its other names do.
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,49}")
DEFAULT_TIMEOUT_S = 3600             # ACR's default run timeout
# ACR allows 8 hours. georeg's build agent works with the caller's refresh
# token, which lasts REFRESH_LIFETIME_S (ACR's three hours) from the login and
# is not renewed, so a run's timeout stays inside it, with room for a push.
LOGIN_MARGIN_S = 300
MAX_TIMEOUT_S = REFRESH_LIFETIME_S - LOGIN_MARGIN_S
STATUSES = ("Enabled", "Disabled")
# A branch name: git's rules, narrowed (no leading '-', no '..', '//', no trailing '.' or '/').
BRANCH = re.compile(r"(?!-)(?!.*\.\.)(?!.*//)[A-Za-z0-9._/-]{1,200}(?<![./])")


def valid_branch(branch: str) -> bool:
    """``branch`` may name a git branch here (and a file under refs/heads/): ``BRANCH``,
    and, as git requires, no component starting with '.' nor ending with '.lock'."""
    return bool(BRANCH.fullmatch(branch)) and not branch.endswith(".lock") \
        and not branch.startswith(".") and "/." not in branch


class Task(msgspec.Struct, frozen=True):
    image: str = ""
    context: str = ""                  # an absolute directory path on the cluster's machine
    file: str = ""                     # relative to the context; "" for Containerfile|Dockerfile
    region: str = ""                   # "" for the home region
    build_args: list[list[str]] = []   # [[KEY, VALUE], ...]
    timeout: int = DEFAULT_TIMEOUT_S
    status: str = "Enabled"
    base_image_trigger_enabled: bool = True
    # A git context: the branch of the repository at ``context`` that runs build
    # (its tip's tree, not the working copy); "" for a plain directory.
    branch: str = ""
    commit_trigger_enabled: bool = False
    created: float = 0.0


def build_arg(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (``--build-arg``, ``?buildArg=``), checked as every caller checks it."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise InvalidValue(f"--build-arg {text[:60]!r} is KEY=VALUE, KEY a letter or _ then "
                           f"letters, digits and _")
    return key, value


def check_task(name: str, task: Task) -> None:
    if not TASK_NAME.fullmatch(name):
        raise InvalidValue(f"a task's name is 1 to 50 letters, digits, hyphens and underscores, "
                           f"starting with a letter or digit, not {name[:64]!r}")
    if not task.image or any(c.isspace() for c in task.image):
        raise InvalidValue("a task needs the image it builds, REPOSITORY[:TAG] (--image)")
    if not task.context.startswith("/") or "\0" in task.context:
        raise InvalidValue("a task's context is an absolute directory path (--context)")
    if task.file.startswith("/") or ".." in task.file.split("/"):
        raise InvalidValue(f"--file {task.file[:100]!r} must be a path inside the context")
    if not 1 <= task.timeout <= MAX_TIMEOUT_S:
        raise InvalidValue(f"a task's timeout is 1 to {MAX_TIMEOUT_S} seconds")
    if task.status not in STATUSES:
        raise InvalidValue(f"a task's status is Enabled or Disabled, not {task.status[:20]!r}")
    if task.branch and not valid_branch(task.branch):
        raise InvalidValue(f"--branch {task.branch[:80]!r} is not a branch name (letters, "
                           f"digits, '.', '_', '-' and '/')")
    if task.commit_trigger_enabled and not task.branch:
        raise InvalidValue("a commit trigger needs a git context: give the branch (--branch) "
                           "of the repository at --context")
    for pair in task.build_args:
        if len(pair) != 2 or not str(pair[0]).isidentifier():
            raise InvalidValue("a task's build arguments are [KEY, VALUE] pairs")
