"""A task's context taken from a local git repository: the tip of one branch,
archived with ``git archive`` (the commit's tree, never the working copy or
untracked files), for ``cluster.control.builds`` to unpack through the same
checks and limits as any context, and watched by the commit trigger
(``cluster.control.triggers.CommitTriggers``).

Git runs with a fixed, minimal environment and reads neither the system's
nor a user's configuration (``GIT_CONFIG_NOSYSTEM``, ``GIT_CONFIG_GLOBAL``),
only the repository's own; ``git archive`` writes a plain tar (no
compression command). The repository is trusted as its Containerfile is:
its own configuration and attributes could name a filter program that
``git archive`` runs, just as a ``RUN`` step runs one (docs/tasks.md: build
only from people you would let run commands on the cluster's machine).
Branch names are checked (``registry_node.tasks.BRANCH``) before they reach
git's command line, and commit ids are hex."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from registry_node.tasks import BRANCH

from .containerfile import ContextRefused, ContextTooLarge

GIT_TIMEOUT_S = 60
_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class GitSource:
    """A task's context: the branch ``branch`` of the repository at ``path``."""

    path: Path
    branch: str


def check_branch(branch: str) -> str:
    if not BRANCH.fullmatch(branch) or branch.endswith(".lock"):
        raise ContextRefused(f"{branch[:80]!r} is not a branch name (letters, digits, '.', "
                             f"'_', '-' and '/')")
    return branch


def _git(repository: Path, *argv: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
           "GIT_CONFIG_GLOBAL": "/dev/null"}
    try:
        return subprocess.run(["git", "-c", "safe.directory=*", "-C", str(repository), *argv],
                              stdout=stdout, stderr=subprocess.PIPE, env=env,
                              timeout=GIT_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise ContextRefused("git is not installed on the cluster's machine") from None
    except subprocess.TimeoutExpired:
        raise ContextRefused(f"git did not answer within {GIT_TIMEOUT_S}s in "
                             f"{repository}") from None


def branch_head(source: GitSource) -> str:
    """The commit the branch points at now (``ContextRefused`` if there is none)."""
    done = _git(source.path, "rev-parse", "--verify", "--quiet",
                f"refs/heads/{check_branch(source.branch)}^{{commit}}")
    sha = done.stdout.decode(errors="replace").strip()
    if done.returncode != 0 or not _SHA.fullmatch(sha):
        raise ContextRefused(f"{source.path} is not a git repository with a branch "
                             f"{source.branch!r}")
    return sha


def archive_commit(source: GitSource, commit: str, archive: Path, *, max_bytes: int) -> int:
    """The tree of ``commit`` as a tar at ``archive``; its size (``ContextTooLarge``
    past ``max_bytes``)."""
    if not _SHA.fullmatch(commit):
        raise ContextRefused(f"{commit[:80]!r} is not a commit id")
    with open(archive, "wb") as out:
        done = _git(source.path, "-c", "tar.umask=0022", "archive", "--format=tar", commit,
                    stdout=out)
    if done.returncode != 0:
        raise ContextRefused(f"git archive of {commit[:12]} in {source.path} failed: "
                             f"{done.stderr.decode(errors='replace').strip()[:200]}")
    size = archive.stat().st_size
    if size > max_bytes:
        raise ContextTooLarge(f"the commit's tree is over {max_bytes:,} bytes as a tar")
    return size
