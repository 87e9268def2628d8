"""What a build is given, checked before anything runs: the build context (a
tar archive a client uploads, gzip/bzip2/xz or not, or a task's directory
archived here), the run variables substituted into its Containerfile, and the
base images its ``FROM`` lines name. This module owns what a context may be.

Invariants:

* a context never writes outside the directory it is unpacked into. Every
  member is checked here, never by Python's ``tarfile`` filters (their checks
  rely on ``os.path.realpath``, which a long chain of links defeats, and
  Debian's Python 3.11.2 has none): absolute names, ``..`` components, names
  over ``MAX_NAME_BYTES``, symlinks whose target is absolute or leaves the
  context, hardlinks to anything but an earlier regular file, devices, fifos
  and sparse files are refused. Extraction is member by member, creating each
  directory itself and refusing any parent that is not a real directory (a
  link is never followed), files opened ``O_NOFOLLOW | O_EXCL``;
* unpacking is bounded as it reads: the decompressed stream is counted
  (``MAX_STREAM_BYTES``), a header payload (a long name, a pax record) is
  at most ``MAX_HEADER_BYTES`` before it is read, and entries and file data
  are at most ``MAX_MEMBERS`` and ``MAX_UNPACKED_BYTES``: a small bomb is a 413,
  never memory or disk filled;
* a task's directory is archived with the same bounds, stopping as soon as
  one is passed; a file that cannot be read is a 400 naming it;
* every refusal is a ``ClusterError`` (400, 413 for a size) whose message says
  what was wrong; on a refusal the caller removes what was written;
* run variables are ACR's: ``{{.Run.ID}}``, ``{{.Run.Registry}}``,
  ``{{.Run.Date}}`` (in the Containerfile and the image name), and
  ``$Registry`` / ``${Registry}`` for the registry (in the image name and
  ``FROM`` lines only: elsewhere in a Containerfile it is a shell variable).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import stat
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from registry_node.errors import RegistryError
from registry_node.reference import TAG_RE, is_digest, validate_name

from .errors import ClusterError

# A context of this many entries or this much file data is past any real
# source tree a quick build is for (ACR's own limit on an uploaded source is
# not documented; its docs suggest a .dockerignore well before this).
MAX_MEMBERS = 20_000
MAX_UNPACKED_BYTES = 1024 * 1024 * 1024
# A long-name or pax header's payload; real ones are a few hundred bytes.
MAX_HEADER_BYTES = 64 * 1024
# A member's name or link target (PATH_MAX is 4096; a source tree's are far shorter).
MAX_NAME_BYTES = 1024
DEFAULT_FILES = ("Containerfile", "Dockerfile")
_CHUNK = 1 << 16
_HEADER_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                 tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)


def max_stream_bytes(max_members: int, max_bytes: int) -> int:
    """What a context's tar stream may decompress to: its file data, plus headers
    and padding for every entry, plus header payloads."""
    return max_bytes + max_members * (3 * 512 + 512) + 16 * MAX_HEADER_BYTES


class ContextRefused(ClusterError):
    """The context cannot be built from; the message says why."""

    code = "InvalidContext"


class ContextTooLarge(ClusterError):
    status = 413
    code = "ContextTooLarge"


def _too_large(max_members: int, max_bytes: int) -> ContextTooLarge:
    return ContextTooLarge(
        f"the context holds more than {max_members:,} entries or {max_bytes // 2**20:,} MiB "
        f"of files: leave build outputs and dependencies out of it (a .dockerignore is "
        f"not read)")


class _Counted:
    """A decompressed stream that refuses to give more than ``limit`` bytes."""

    def __init__(self, raw, limit: int, too_large: ContextTooLarge) -> None:
        self.raw, self.limit, self.read_bytes, self.too_large = raw, limit, 0, too_large

    def read(self, size: int = -1) -> bytes:
        size = _CHUNK if size is None or size < 0 else size
        data = self.raw.read(min(size, self.limit + 1 - self.read_bytes))
        self.read_bytes += len(data)
        if self.read_bytes > self.limit:
            raise self.too_large
        return data


class _BoundedInfo(tarfile.TarInfo):
    """A member whose header payload (long name, pax record) is refused over
    ``MAX_HEADER_BYTES`` *before* tarfile reads it into memory."""

    def _proc_member(self, tarfile_):
        if self.type in _HEADER_TYPES and self.size > MAX_HEADER_BYTES:
            raise ContextRefused(f"the context archive is refused: a header record of "
                                 f"{self.size:,} bytes (at most {MAX_HEADER_BYTES:,})")
        return super()._proc_member(tarfile_)


def _decompressed(f):
    """``f`` (an open archive) decompressed, by its first bytes."""
    magic = f.read(6)
    f.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=f, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(f)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(f)
    return f


def _member_path(name: str) -> PurePosixPath:
    """A member's name as a relative path inside the context, or refused."""
    if len(name.encode(errors="surrogateescape")) > MAX_NAME_BYTES or "\0" in name:
        raise ContextRefused(f"the context archive is refused: a name longer than "
                             f"{MAX_NAME_BYTES} bytes ({name[:60]!r}…)")
    path = PurePosixPath(name)
    if path.is_absolute():
        raise ContextRefused(f"the context archive is refused: {name[:100]!r} is an "
                             f"absolute name")
    if ".." in path.parts:
        raise ContextRefused(f"the context archive is refused: {name[:100]!r} has a "
                             f"'..' component")
    return PurePosixPath(*[p for p in path.parts if p != "."])


def _symlink_target(link: PurePosixPath, target: str) -> None:
    """Refuse a symlink whose target, taken lexically from the link's directory,
    is absolute or leaves the context."""
    if not target or len(target.encode(errors="surrogateescape")) > MAX_NAME_BYTES \
            or "\0" in target:
        raise ContextRefused(f"the context archive is refused: {str(link)[:100]!r} links "
                             f"to an empty or over-long target")
    if target.startswith("/"):
        raise ContextRefused(f"the context archive is refused: {str(link)[:100]!r} is an "
                             f"absolute symlink (to {target[:100]!r}); absolute symlinks "
                             f"are refused: remove it or make it relative")
    depth = len(link.parts) - 1
    for part in PurePosixPath(target).parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            raise ContextRefused(f"the context archive is refused: {str(link)[:100]!r} "
                                 f"links to {target[:100]!r}, outside the context")


def _parent(into: Path, relative: PurePosixPath) -> Path:
    """The directory ``relative`` goes in, made as needed; every component a real
    directory under ``into`` (a symlink is never followed)."""
    at = into
    for part in relative.parts[:-1]:
        at = at / part
        try:
            mode = os.lstat(at).st_mode
        except FileNotFoundError:
            os.mkdir(at, 0o755)
            continue
        if not stat.S_ISDIR(mode):
            raise ContextRefused(f"the context archive is refused: {str(relative)[:100]!r} "
                                 f"lies under {part!r}, which is not a directory")
    return at


def _clear(path: Path, relative: PurePosixPath) -> None:
    """A later member of the same name replaces an earlier file or link (as tar
    does); it never replaces a directory."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        raise ContextRefused(f"the context archive is refused: {str(relative)[:100]!r} is "
                             f"both a directory and a file")
    os.unlink(path)


def unpack_context(archive: Path, into: Path, *, max_members: int = MAX_MEMBERS,
                   max_bytes: int = MAX_UNPACKED_BYTES) -> None:
    """``archive`` (a tar, compressed or not) unpacked into ``into`` (an empty
    directory), or refused; on a refusal ``into`` may hold part of it (the
    caller removes it)."""
    too_large = _too_large(max_members, max_bytes)
    root = into.resolve()
    files: set[PurePosixPath] = set()
    members, total = 0, 0
    try:
        with open(archive, "rb") as raw, _decompressed(raw) as plain:
            stream = _Counted(plain, max_stream_bytes(max_members, max_bytes), too_large)
            with tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedInfo) as tar:
                for member in tar:
                    members += 1
                    total += member.size if member.isreg() else 0
                    if members > max_members or total > max_bytes:
                        raise too_large
                    _unpack_member(tar, member, root, files)
    except tarfile.TarError as exc:
        raise ContextRefused(f"the context is not a readable tar archive (gzip, bzip2, xz "
                             f"or none): {exc}") from None
    except (EOFError, OSError, lzma.LZMAError) as exc:
        raise ContextRefused(f"the context is not a readable tar archive (gzip, bzip2, xz "
                             f"or none): {exc}") from None


def _unpack_member(tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path,
                   files: set[PurePosixPath]) -> None:
    relative = _member_path(member.name)
    if not relative.parts:
        return                                       # "." itself
    parent = _parent(root, relative)
    if not parent.resolve().is_relative_to(root):    # belt and braces: _parent follows no link
        raise ContextRefused(f"the context archive is refused: {member.name[:100]!r} "
                             f"resolves outside the context")
    path = parent / relative.name
    if member.isdir():
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            os.mkdir(path, 0o755)
            return
        if not stat.S_ISDIR(mode):
            raise ContextRefused(f"the context archive is refused: {member.name[:100]!r} is "
                                 f"both a directory and a file")
        return
    if member.issparse() or not (member.isreg() or member.issym() or member.islnk()):
        raise ContextRefused(f"the context archive is refused: {member.name[:100]!r} is a "
                             f"device, fifo or other special file")
    _clear(path, relative)
    if member.issym():
        _symlink_target(relative, member.linkname)
        os.symlink(member.linkname, path)
    elif member.islnk():
        target = _member_path(member.linkname)
        if target not in files:
            raise ContextRefused(f"the context archive is refused: {member.name[:100]!r} is "
                                 f"a hard link to {member.linkname[:100]!r}, not an earlier "
                                 f"file of the context")
        os.link(root / target, path, follow_symlinks=False)
        files.add(relative)
    else:
        source = tar.extractfile(member)
        assert source is not None
        mode = (member.mode & 0o755) | 0o600
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as f:
            while chunk := source.read(_CHUNK):
                f.write(chunk)
        files.add(relative)


def task_context(path: str, roots: tuple[str, ...], data_dir: Path) -> Path:
    """A task's context directory, allowed: after resolving links, it lies under
    one of ``roots`` (the spec's ``[tasks] context_roots``) and neither is, holds
    nor lies inside the cluster's ``data_dir`` (its keys and credentials)."""
    if not path.startswith("/") or "\0" in path:
        raise ContextRefused("a task's context is an absolute directory path (--context)")
    real = Path(os.path.realpath(path))
    data = Path(os.path.realpath(data_dir))
    if real.is_relative_to(data) or data.is_relative_to(real):
        raise ContextRefused(f"--context {path[:200]!r}: a task's context may not be, hold or "
                             f"lie inside the cluster's data dir")
    allowed = [Path(os.path.realpath(r)) for r in roots]
    if not any(real.is_relative_to(root) for root in allowed):
        where = (f"one of {', '.join(map(str, allowed))}" if allowed else
                 "a directory named in the spec's [tasks] context_roots (none is set)")
        raise ContextRefused(f"--context {path[:200]!r}: a task's context must lie under "
                             f"{where}")
    if not real.is_dir():
        raise ContextRefused(f"--context {path[:200]!r} is not a directory on the cluster's "
                             f"machine")
    return real


def archive_directory(directory: Path, archive: Path, *, max_members: int = MAX_MEMBERS,
                      max_bytes: int = MAX_UNPACKED_BYTES) -> int:
    """``directory`` (a task's context) as a tar archive at ``archive``, its size;
    stopped as soon as it holds more than ``max_members`` entries or ``max_bytes``
    of files (413), refused (400, naming the path) if anything in it cannot be read
    or is not a file, directory or symlink."""
    if not directory.is_dir():
        raise ContextRefused(f"the task's context {directory} is not a directory on the "
                             f"cluster's machine")
    too_large = _too_large(max_members, max_bytes)
    members, total = 0, 0
    pending = [(directory, PurePosixPath("."))]
    path = directory
    try:
        with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
            while pending:                       # bounded: each entry is counted below
                path, name = pending.pop()
                info = tar.gettarinfo(path, arcname=str(name))
                members += 1
                if members > max_members:
                    raise too_large
                if info.isdir():
                    tar.addfile(info)
                    with os.scandir(path) as entries:
                        children = sorted(entries, key=lambda e: e.name, reverse=True)
                    pending.extend((Path(e.path), name / e.name) for e in children)
                elif info.issym():
                    tar.addfile(info)
                elif info.isreg():
                    total += info.size
                    if total > max_bytes:
                        raise too_large
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    raise ContextRefused(f"the task's context holds {path}, which is not a "
                                         f"file, directory or symlink")
    except OSError as exc:
        raise ContextRefused(f"the task's context cannot be read: {exc.filename or path}: "
                             f"{exc.strerror or exc}") from None
    return archive.stat().st_size


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

    def _templates(self, text: str) -> str:
        return (text.replace("{{.Run.ID}}", self.run_id)
                .replace("{{.Run.Registry}}", self.registry)
                .replace("{{.Run.Date}}", self.date))

    def _registry_alias(self, text: str) -> str:
        return re.sub(r"\$\{Registry\}|\$Registry\b", self.registry, text)

    def substitute(self, text: str) -> str:
        """An image name (``-t``, a task's ``--image``): every run variable."""
        return self._registry_alias(self._templates(text))

    def containerfile(self, text: str) -> list[str]:
        """A Containerfile's lines: ``{{.Run.*}}`` everywhere, ``$Registry`` only
        in ``FROM`` lines (in a ``RUN`` it is the shell's variable)."""
        return [self._registry_alias(line) if _FROM.match(line) else line
                for line in self._templates(text).splitlines()]


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
    # The final stage's base, directly or through the stages it is built FROM
    # (ACR's *runtime* image, the one a base-image trigger follows).
    runtime: bool = False

    @property
    def text(self) -> str:
        sep = "@" if self.reference.startswith("sha256:") else ":"
        return f"{self.repository}{sep}{self.reference}"


_FROM = re.compile(r"^\s*FROM\s+(?P<rest>.+)$", re.IGNORECASE)
_ARG = re.compile(r"^\s*ARG\s+(?P<rest>.+)$", re.IGNORECASE)
_VARIABLE = re.compile(r"\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")


def _from_line(lines: list[str], number: int) -> str:
    """The FROM at ``number`` with its continuation lines joined onto it; the
    lines it took are left empty, so later line numbers hold."""
    text = lines[number]
    end = number
    while text.rstrip().endswith("\\") and end + 1 < len(lines):    # bounded by the file
        end += 1
        text = text.rstrip()[:-1] + " " + lines[end].strip()
        lines[end] = ""
    return text


def _image_parts(image: str, number: int) -> tuple[str, str]:
    """``REPOSITORY[:TAG][@DIGEST]`` (after the host): (repository, tag or digest)."""
    name, at, digest = image.partition("@")
    if ":" in name.rsplit("/", 1)[-1]:
        repository, _, tag = name.rpartition(":")
    else:
        repository, tag = name, "latest"
    try:
        validate_name(repository)
    except RegistryError:
        raise ContextRefused(f"line {number + 1}: FROM …/{image[:100]}: {repository[:100]!r} "
                             f"is not a repository name") from None
    if at and not is_digest(digest):
        raise ContextRefused(f"line {number + 1}: FROM …/{image[:100]}: {digest[:80]!r} is not "
                             f"a digest")
    if not TAG_RE.fullmatch(tag):
        raise ContextRefused(f"line {number + 1}: FROM …/{image[:100]}: {tag[:80]!r} is not a tag")
    return repository, digest if at else tag


def base_images(lines: list[str], registry: str, *, aliases: tuple[str, ...] = (),
                build_args: tuple[tuple[str, str], ...] = ()) -> list[BaseImage]:
    """The base images ``FROM`` lines name (``scratch`` and earlier stages aside),
    the runtime one marked. Each must be in this registry (``registry``,
    HOST:PORT, or one of its ``aliases``, such as the login server): nothing is
    pulled from anywhere else.

    ``lines`` is rewritten in place so that buildah reads what was checked: a
    ``FROM`` continued over lines is joined, the ``ARG``s declared before the
    first ``FROM`` (their defaults, or ``build_args`` for them) are substituted
    in it, and an alias becomes ``registry``."""
    args: dict[str, str] = {}
    stages: dict[str, int] = {}         # a stage's name: its index
    based_on: list[str | int | None] = []   # per stage: a stage name, an index into found, scratch
    found = []
    for number in range(len(lines)):
        if not based_on and (declared := _ARG.match(lines[number])):
            for item in declared["rest"].split():
                name, sep, default = item.partition("=")
                args[name] = default.strip("\"'") if sep else args.get(name, "")
            args.update((k, v) for k, v in build_args if k in args)
            continue
        if _FROM.match(lines[number]) is None:
            continue

        def value(m: re.Match, number=number) -> str:
            name = m["braced"] or m["bare"]
            if name not in args:
                raise ContextRefused(f"line {number + 1}: FROM uses ${name}, which no ARG "
                                     f"before the first FROM declares")
            return args[name]
        text = _VARIABLE.sub(value, _from_line(lines, number))
        words = [w for w in _FROM.match(text)["rest"].split() if not w.startswith("--")]
        if not words:
            raise ContextRefused(f"line {number + 1}: FROM names no image")
        image = words[0]
        host, _, path = image.partition("/")
        if host in aliases and path:
            text = text.replace(image, f"{registry}/{path}", 1)
            image = f"{registry}/{path}"
            host = registry
        lines[number] = text
        if image == "scratch" or image.lower() in stages:
            based_on.append(None if image == "scratch" else image.lower())
        else:
            based_on.append(len(found))
        if len(words) >= 3 and words[1].lower() == "as":
            stages[words[2].lower()] = len(based_on) - 1
        if not isinstance(based_on[-1], int):
            continue
        if host != registry or not path:
            raise ContextRefused(
                f"line {number + 1}: FROM {image}: a base image must be in this registry; "
                f"write FROM {{{{.Run.Registry}}}}/REPOSITORY:TAG (it becomes {registry}/…)")
        repository, reference = _image_parts(path, number)
        found.append(BaseImage(number, image, repository, reference))
    step = based_on[-1] if based_on else None
    for _ in range(len(based_on)):      # a stage only names earlier ones: bounded
        if not isinstance(step, str):
            break
        step = based_on[stages[step]]
    if isinstance(step, int):
        found[step] = replace(found[step], runtime=True)
    return found


def pinned(lines: list[str], base: BaseImage, registry: str, digest: str) -> None:
    """``base``'s FROM line rewritten to the digest it resolved to, so what is
    built is what the run records."""
    words = lines[base.line].split()
    words[words.index(base.image)] = f"{registry}/{base.repository}@{digest}"
    lines[base.line] = " ".join(words)
