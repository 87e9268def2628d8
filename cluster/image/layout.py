"""An OCI image layout (image-spec v1.1) from root-filesystem-shaped directories.

Invariant: the same directories (paths, contents, modes, symlink targets), the
same ``ImageSpec`` and the same ``epoch`` give the same bytes, hence the same
manifest digest. Layers are PAX tars with entries in sorted order, every mtime
clamped to ``epoch``, owners fixed (root, or the ``owners`` given per path) with
their names, modes normalised (``_mode``: the builder's umask never shows), no
device nodes, sockets or fifos (a runtime provides ``/dev``), gzip at the fixed
level ``GZIP_LEVEL`` without a file name or timestamp. One input no argument
captures: the zlib that compresses (another zlib build, e.g. zlib-ng, may give
other bytes at the same level; the ``diff_id`` stays the same). The config's ``created`` and the
``org.opencontainers.image.created`` annotation are ``epoch`` too.

Python's ``tarfile`` and ``gzip`` write the layers rather than GNU tar: ownership
has to differ per path (``/data`` belongs to the image's user) and the digests of
both the tar (``diff_id``) and the gzip (blob) are taken while streaming.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
# zlib's default: level 9 took four times as long for 0.7 % less (docs/image.md).
GZIP_LEVEL = 6


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int
    user: str
    group: str


ROOT = Owner(0, 0, "root", "root")


@dataclass(frozen=True)
class Layer:
    """A packed layer: its blob's digest and size, and its uncompressed ``diff_id``."""

    digest: str
    size: int
    diff_id: str
    uncompressed: int
    created_by: str


@dataclass(frozen=True)
class ImageSpec:
    """What the image's config holds besides its layers."""

    entrypoint: list[str]
    cmd: list[str]
    user: str
    env: list[str]
    exposed_ports: list[str]
    volumes: list[str]
    working_dir: str
    architecture: str
    annotations: dict[str, str] = field(default_factory=dict)


class _Hashing:
    """A write-only file that hashes and counts what passes into ``sink``."""

    def __init__(self, sink) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        if self.sink is not None:
            self.sink.write(data)
        return len(data)

    def flush(self) -> None:
        pass


def _sorted_tree(root: Path) -> list[Path]:
    """Every path under ``root`` (not ``root`` itself, symlinks not followed),
    each directory directly followed by its contents, names in sorted order."""
    paths = []
    for top, dirs, files in os.walk(root):
        paths.extend(Path(top, name) for name in dirs + files)
    return sorted(paths, key=lambda p: p.relative_to(root).parts)


def _mode(mode: int) -> int:
    """The permission bits a layer records for a file of ``mode``: 0755 for a
    directory (1777 if sticky, as ``/tmp``), 0755 for a file any can execute,
    else 0644, keeping set-user/group-id bits (as Debian ships them)."""
    if stat.S_ISLNK(mode):
        return 0o777
    if stat.S_ISDIR(mode):
        return 0o1777 if mode & stat.S_ISVTX else 0o755
    return (0o755 if mode & 0o111 else 0o644) | (mode & (stat.S_ISUID | stat.S_ISGID))


def _write_tar(root: Path, out, epoch: int, owners: dict[str, Owner]) -> None:
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for path in _sorted_tree(root):
            mode = path.lstat().st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                continue
            name = path.relative_to(root).as_posix()
            info = tar.gettarinfo(str(path), arcname=name)
            info.mtime = min(int(info.mtime), epoch)
            info.mode = _mode(mode)
            owner = owners.get(name, ROOT)
            info.uid, info.gid, info.uname, info.gname = owner.uid, owner.gid, owner.user, owner.group
            info.pax_headers = {}
            if info.isreg():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)


def pack_layer(root: Path, blobs: Path, epoch: int, created_by: str,
               owners: dict[str, Owner] | None = None) -> Layer:
    """``root``'s tree as a gzipped tar blob in ``blobs`` (``blobs/<hex>``)."""
    blobs.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".partial-", dir=blobs)
    partial = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            compressed = _Hashing(f)
            with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0,
                               compresslevel=GZIP_LEVEL) as gz:
                plain = _Hashing(gz)
                _write_tar(root, plain, epoch, owners or {})
        digest = compressed.sha.hexdigest()
        partial.chmod(0o644)
        partial.replace(blobs / digest)
    finally:
        partial.unlink(missing_ok=True)
    return Layer(f"sha256:{digest}", compressed.size, f"sha256:{plain.sha.hexdigest()}",
                 plain.size, created_by)


def cached_layer(root: Path, store: Path, epoch: int, created_by: str,
                 owners: dict[str, Owner] | None = None) -> Layer:
    """``pack_layer`` for a stage that does not change once built: packed once
    into the blob store ``store``, recorded beside the stage as
    ``<root>.layer-<key>.json`` (removed whenever the stage is rebuilt), the key
    a hash of the epoch, the owners and this module's code, which packed it."""
    packing = json.dumps([epoch, sorted((k, asdict(v)) for k, v in (owners or {}).items()),
                          hashlib.sha256(Path(__file__).read_bytes()).hexdigest()])
    key = hashlib.sha256(packing.encode()).hexdigest()[:16]
    record = root.parent / f"{root.name}.layer-{key}.json"
    if record.exists():
        layer = Layer(**json.loads(record.read_text()))
        if (store / layer.digest.removeprefix("sha256:")).exists():
            return layer
    layer = pack_layer(root, store, epoch, created_by, owners)
    partial = record.with_suffix(".partial")
    partial.write_text(json.dumps(asdict(layer)))
    partial.replace(record)
    return layer


def link_blob(store: Path, blobs: Path, digest: str) -> None:
    """Blob ``digest`` of ``store`` into ``blobs`` (a hard link where they share a disk)."""
    name = digest.removeprefix("sha256:")
    blobs.mkdir(parents=True, exist_ok=True)
    try:
        os.link(store / name, blobs / name)
    except OSError:
        shutil.copyfile(store / name, blobs / name)


def _put_json(blobs: Path, doc: dict) -> tuple[str, int]:
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def write_layout(out: Path, layers: list[Layer], spec: ImageSpec, epoch: int,
                 tag: str) -> str:
    """Config, manifest, ``index.json`` (the manifest tagged ``tag``) and
    ``oci-layout`` into ``out``, whose ``blobs/sha256`` already holds the layers;
    returns the manifest's digest."""
    blobs = out / "blobs" / "sha256"
    created = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    annotations = {"org.opencontainers.image.created": created, **spec.annotations}
    config = {
        "architecture": spec.architecture,
        "os": "linux",
        "created": created,
        "config": {
            "User": spec.user,
            "Entrypoint": spec.entrypoint,
            "Cmd": spec.cmd,
            "Env": spec.env,
            "ExposedPorts": {port: {} for port in spec.exposed_ports},
            "Volumes": {volume: {} for volume in spec.volumes},
            "WorkingDir": spec.working_dir,
            "Labels": annotations,
        },
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": created, "created_by": layer.created_by} for layer in layers],
    }
    config_digest, config_size = _put_json(blobs, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": LAYER_TYPE, "digest": layer.digest, "size": layer.size}
                   for layer in layers],
        "annotations": annotations,
    }
    manifest_digest, manifest_size = _put_json(blobs, manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": MANIFEST_TYPE, "digest": manifest_digest, "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }
    (out / "index.json").write_text(json.dumps(index, sort_keys=True, indent=1) + "\n")
    (out / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return manifest_digest


def manifest_of(out: Path, tag: str) -> tuple[str, dict]:
    """The digest and parsed manifest that ``out``'s index tags ``tag``."""
    index = json.loads((out / "index.json").read_text())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            digest = entry["digest"]
            blob = out / "blobs" / "sha256" / digest.removeprefix("sha256:")
            return digest, json.loads(blob.read_bytes())
    raise LookupError(f"{out} has no image tagged {tag!r}")


def unpack(out: Path, tag: str, rootfs: Path) -> None:
    """The image tagged ``tag`` in layout ``out``, its layers applied in order
    into ``rootfs`` (with owners and modes; georeg's layers hold no whiteouts)."""
    _, manifest = manifest_of(out, tag)
    rootfs.mkdir(parents=True, exist_ok=True)
    for layer in manifest["layers"]:
        blob = out / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
        with tarfile.open(blob, mode="r:gz") as tar:
            # Trusted: georeg's own image, its digests checked. The "tar" filter
            # would drop /tmp's sticky and world-write bits.
            tar.extractall(rootfs, filter="fully_trusted")
