"""A task's context taken from a local git repository: one commit of one
branch (its tip, or the commit a trigger saw), archived with ``git archive``
(the commit's tree, never the working copy or untracked files), for
``cluster.control.builds`` to unpack through the same checks and limits as
any context, and watched by the commit trigger
(``cluster.control.triggers.CommitTriggers``).

**Git never opens the user's repository as a repository.** Its config,
hooks, attributes' filters and fsmonitor are programs the repository's
writer chooses, and git would run them on the host as the cluster's user
(not in a build's chroot). So:

* a branch's tip is read here, in Python, from the ref files
  (``refs/heads/<branch>``, else ``packed-refs``; reftable is refused);
* a commit is archived from a scratch bare repository the run creates
  (``git init --bare --template=``: a config of its own, no hooks), whose
  ``objects/info/alternates`` names the user's object directory: git reads
  the objects as files and nothing else of the repository. Its ``GIT_DIR``
  is given, ``GIT_CEILING_DIRECTORIES`` stops any search upwards, and neither
  the system's nor a user's configuration is read. ``.gitattributes`` in the
  tree can name a filter, but no configuration defines one, so nothing runs.

No ``safe.directory`` is needed: the only repository git opens is ours.

**Where objects may come from.** The context is the realpath
``containerfile.task_context`` checked (under a context root). Its git
directory must be a real ``.git`` directory in it (or the context a bare
repository): a ``.git`` file (``gitdir:``) or symlink, alternates of the
user's repository, and symlinks anywhere under its ``objects``, ``refs`` or
``packed-refs`` are refused, since each would read another repository than
the one under the root. The walk of ``objects`` is made at each archive; a
writer of the repository who swaps a directory for a link between that walk
and git's read is not stopped (docs/tasks.md says who may write a context).

Branch names are checked (``registry_node.tasks.valid_branch``) before they
name a file, and commit ids are hex."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from registry_node.tasks import valid_branch

from .containerfile import ContextRefused, ContextTooLarge

GIT_TIMEOUT_S = 60
MAX_OBJECT_ENTRIES = 1_000_000          # files and dirs under objects/, walked per archive
_SHA = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class GitSource:
    """A task's context: the branch ``branch`` of the repository at ``path``,
    at ``commit`` when one is given (what a commit trigger saw), else its tip."""

    path: Path
    branch: str
    commit: str | None = None


def check_branch(branch: str) -> str:
    if not valid_branch(branch):
        raise ContextRefused(f"{branch[:80]!r} is not a branch name (letters, digits, '.', "
                             f"'_', '-' and '/')")
    return branch


def git_dir(path: Path) -> Path:
    """The git directory of the context ``path`` (a realpath under a root): its
    ``.git`` directory, or ``path`` itself when it is a bare repository."""
    dot = path / ".git"
    try:
        mode = os.lstat(dot).st_mode
    except FileNotFoundError:
        if (path / "objects").is_dir() and (path / "HEAD").is_file():
            return path                      # a bare repository
        raise ContextRefused(f"{path} is not a git repository (it has no .git directory)") \
            from None
    if not stat.S_ISDIR(mode):
        raise ContextRefused(f"{dot} is not a directory (a linked worktree's or submodule's "
                             f".git file, or a link): give the repository itself as --context")
    return dot


def _plain(gitdir: Path, name: str) -> Path | None:
    """``gitdir/name`` if it is a regular file reached through no link (None: absent)."""
    path = gitdir / name
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISREG(mode) or os.path.realpath(path) != str(path):
        raise ContextRefused(f"{path} is a link or not a file; git contexts' refs are "
                             f"plain files")
    return path


def branch_head(source: GitSource) -> str:
    """The commit the branch points at now (``ContextRefused`` if there is
    none), read from the ref files: no git process, no repository program."""
    gitdir = git_dir(source.path)
    name = f"refs/heads/{check_branch(source.branch)}"
    if (gitdir / "reftable").exists():
        raise ContextRefused(f"{source.path} keeps its refs in a reftable, which git "
                             f"contexts do not read; use the files backend")
    loose = _plain(gitdir, name)
    if loose is not None:
        sha = loose.read_text(errors="replace").strip()
        if _SHA.fullmatch(sha):
            return sha
        raise ContextRefused(f"{name} in {source.path} is not a commit id (a symbolic ref?)")
    packed = _plain(gitdir, "packed-refs")
    for line in packed.read_text(errors="replace").splitlines() if packed else ():
        sha, _, ref = line.partition(" ")
        if ref == name and _SHA.fullmatch(sha):
            return sha
    raise ContextRefused(f"{source.path} is not a git repository with a branch "
                         f"{source.branch!r}")


def _objects(gitdir: Path) -> Path:
    """``gitdir``'s object directory, checked: a real directory holding only real
    directories and files, and no alternates (another repository's objects)."""
    objects = gitdir / "objects"
    if not stat.S_ISDIR(os.lstat(objects).st_mode):
        raise ContextRefused(f"{objects} is not a directory")
    alternates = objects / "info" / "alternates"
    if alternates.exists() and (alternates.is_symlink() or alternates.read_text().strip()):
        raise ContextRefused(f"{gitdir} borrows objects from another repository "
                             f"(objects/info/alternates); git contexts do not follow that: "
                             f"repack it (git repack -a -d) and remove the file")
    pending, seen = [objects], 0
    while pending:                           # bounded: MAX_OBJECT_ENTRIES
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                seen += 1
                if seen > MAX_OBJECT_ENTRIES:
                    raise ContextRefused(f"{objects} holds over {MAX_OBJECT_ENTRIES:,} entries; "
                                         f"repack it (git gc)")
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif not entry.is_file(follow_symlinks=False):
                    raise ContextRefused(f"{entry.path} is a link or not a file; a git "
                                         f"context's objects are its own files")
    return objects


def _git(scratch_repo: Path, *argv: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    """git on ``scratch_repo`` (ours): no system, user or repository search."""
    env = {"PATH": "/usr/bin:/bin", "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
           "GIT_CONFIG_GLOBAL": "/dev/null", "HOME": str(scratch_repo.parent),
           "GIT_DIR": str(scratch_repo), "GIT_CEILING_DIRECTORIES": str(scratch_repo.parent)}
    try:
        return subprocess.run(["git", "-c", "core.hooksPath=/dev/null",
                               "-c", "core.fsmonitor=false", *argv],
                              stdout=stdout, stderr=subprocess.PIPE, env=env,
                              cwd=scratch_repo.parent, timeout=GIT_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise ContextRefused("git is not installed on the cluster's machine") from None
    except subprocess.TimeoutExpired:
        raise ContextRefused(f"git did not answer within {GIT_TIMEOUT_S}s") from None


def archive_commit(source: GitSource, commit: str, archive: Path, *, max_bytes: int) -> int:
    """The tree of ``commit`` as a tar at ``archive``; its size (``ContextTooLarge``
    past ``max_bytes``). The scratch repository is made beside ``archive``."""
    if not _SHA.fullmatch(commit):
        raise ContextRefused(f"{commit[:80]!r} is not a commit id")
    objects = _objects(git_dir(source.path))
    repo = archive.parent / "source.git"
    init = _git(repo, "init", "-q", "--bare", "--template=",
                f"--object-format={'sha256' if len(commit) == 64 else 'sha1'}", str(repo))
    if init.returncode != 0:
        raise ContextRefused(f"git init failed: {init.stderr.decode(errors='replace')[:200]}")
    (repo / "objects" / "info").mkdir(exist_ok=True)
    (repo / "objects" / "info" / "alternates").write_text(f"{objects}\n")
    with open(archive, "wb") as out:
        done = _git(repo, "-c", "tar.umask=0022", "archive", "--format=tar", commit,
                    stdout=out)
    if done.returncode != 0:
        raise ContextRefused(f"git archive of {commit[:12]} in {source.path} failed: "
                             f"{done.stderr.decode(errors='replace').strip()[:200]}")
    size = archive.stat().st_size
    if size > max_bytes:
        raise ContextTooLarge(f"the commit's tree is over {max_bytes:,} bytes as a tar")
    return size
