"""What a build is given, checked before anything runs (no I/O but the
context's own files): the build context a client uploads (a tar archive,
gzip or not), the run variables substituted into its Containerfile, and the
base images its ``FROM`` lines name.

Invariants:

* a context never writes outside the directory it is unpacked into: absolute
  names (refused here), ``..`` components, links that point outside and device files are
  refused (Python's ``data`` extraction filter), before any file is written;
* what a context unpacks to is bounded (``MAX_MEMBERS`` entries,
  ``MAX_UNPACKED_BYTES`` of file data), so a small compressed archive cannot
  fill the disk;
* every refusal is a ``ClusterError`` (400) whose message says what was wrong;
* run variables are ACR's: ``{{.Run.ID}}``, ``{{.Run.Registry}}``,
  ``{{.Run.Date}}``, and ``$Registry`` / ``${Registry}`` for the registry,
  substituted in the Containerfile and the image name alike.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from registry_node.errors import RegistryError
from registry_node.reference import TAG_RE, validate_name

from .errors import ClusterError

# A context of this many entries or this much file data is past any real
# source tree a quick build is for (ACR's own limit on an uploaded source is
# not documented; its docs suggest a .dockerignore well before this).
MAX_MEMBERS = 20_000
MAX_UNPACKED_BYTES = 1024 * 1024 * 1024
DEFAULT_FILES = ("Containerfile", "Dockerfile")


class ContextRefused(ClusterError):
    """The uploaded context cannot be built from; the message says why."""

    code = "InvalidContext"


def unpack_context(archive: Path, into: Path) -> None:
    """``archive`` (a tar, gzip or not) unpacked into ``into``, or refused whole."""
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members, total = [], 0
            for member in tar:
                members.append(member)
                total += member.size if member.isfile() else 0
                if len(members) > MAX_MEMBERS or total > MAX_UNPACKED_BYTES:
                    raise ContextRefused(
                        f"the context unpacks to more than {MAX_MEMBERS:,} entries or "
                        f"{MAX_UNPACKED_BYTES // 2**20:,} MiB: leave build outputs and "
                        f"dependencies out of it (a .dockerignore is not read)")
            for member in members:
                if member.name.startswith("/"):
                    # The data filter would strip the slash; a context made by a
                    # client never holds one, so it is refused as the mistake it is.
                    raise ContextRefused(f"the context archive is refused: {member.name[:100]!r} "
                                         f"is an absolute name")
                # The filter that extraction applies, run on every member first,
                # so a bad one refuses the context before anything is written.
                tarfile.data_filter(member, str(into))
            tar.extractall(into, members=members, filter="data")
    except tarfile.FilterError as exc:
        raise ContextRefused(f"the context archive is refused: {exc}") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ContextRefused(f"the context is not a readable tar archive (gzip or not): "
                             f"{exc}") from None


def containerfile_in(context: Path, name: str | None) -> Path:
    """The Containerfile ``name`` names inside ``context`` (default: Containerfile,
    else Dockerfile), never a file outside it."""
    candidates = (name,) if name else DEFAULT_FILES
    for candidate in candidates:
        relative = PurePosixPath(candidate)
        if relative.is_absolute() or ".." in relative.parts:
            raise ContextRefused(f"--file {candidate!r} must be a path inside the context")
        path = context / relative
        if path.is_file():
            return path
    raise ContextRefused(f"the context has no {' or '.join(candidates)} at its top"
                         + ("" if name else "; name another with --file"))


@dataclass(frozen=True, slots=True)
class RunVariables:
    run_id: str
    registry: str           # HOST:PORT of the build region's endpoint
    date: str               # UTC, as ACR's {{.Run.Date}}: 20261207-212233z

    def substitute(self, text: str) -> str:
        text = (text.replace("{{.Run.ID}}", self.run_id)
                .replace("{{.Run.Registry}}", self.registry)
                .replace("{{.Run.Date}}", self.date))
        return re.sub(r"\$\{Registry\}|\$Registry\b", self.registry, text)


def image_reference(text: str) -> tuple[str, str]:
    """``REPO:TAG`` (the tag defaults to latest), checked: (repository, tag)."""
    repository, _, tag = text.rpartition(":") if ":" in text.rsplit("/", 1)[-1] else (text, "", "")
    tag = tag or "latest"
    try:
        validate_name(repository)
    except RegistryError:
        raise ClusterError(f"-t {text!r}: the repository name must be lowercase letters, "
                           f"digits and separators (. _ - /)") from None
    if not TAG_RE.fullmatch(tag):
        raise ClusterError(f"-t {text!r}: {tag!r} is not a valid tag")
    return repository, tag


@dataclass(frozen=True, slots=True)
class BaseImage:
    """A ``FROM`` line's image in this registry: where it stands in the file."""

    line: int               # index into the Containerfile's lines
    image: str              # as the line names it
    repository: str
    reference: str          # a tag or a digest

    @property
    def text(self) -> str:
        sep = "@" if self.reference.startswith("sha256:") else ":"
        return f"{self.repository}{sep}{self.reference}"


_FROM = re.compile(r"^\s*FROM\s+(?P<rest>.+)$", re.IGNORECASE)


def base_images(lines: list[str], registry: str) -> list[BaseImage]:
    """The base images ``FROM`` lines name (``scratch`` and earlier stages aside).
    Each must be in this registry (``registry``, HOST:PORT): nothing is pulled
    from anywhere else."""
    stages: set[str] = set()
    found = []
    for number, line in enumerate(lines):
        match = _FROM.match(line)
        if match is None:
            continue
        words = [w for w in match["rest"].split() if not w.startswith("--")]
        if not words:
            raise ContextRefused(f"line {number + 1}: FROM names no image")
        image = words[0]
        if len(words) >= 3 and words[1].lower() == "as":
            stages.add(words[2].lower())
        if image == "scratch" or image.lower() in stages:
            continue
        host, _, path = image.partition("/")
        if host != registry or not path:
            raise ContextRefused(
                f"line {number + 1}: FROM {image}: a base image must be in this registry; "
                f"write FROM {{{{.Run.Registry}}}}/REPOSITORY:TAG (it becomes {registry}/…)")
        if "@" in path:
            repository, _, reference = path.partition("@")
        elif ":" in path.rsplit("/", 1)[-1]:
            repository, _, reference = path.rpartition(":")
        else:
            repository, reference = path, "latest"
        found.append(BaseImage(number, image, repository, reference))
    return found


def pinned(lines: list[str], base: BaseImage, registry: str, digest: str) -> None:
    """``base``'s FROM line rewritten to the digest it resolved to, so what is
    built is what the run records."""
    words = lines[base.line].split()
    words[words.index(base.image)] = f"{registry}/{base.repository}@{digest}"
    lines[base.line] = " ".join(words)
