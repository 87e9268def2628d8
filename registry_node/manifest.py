"""What a manifest is, as far as the registry must know: its media type, the
blobs and child manifests it needs, its subject, and what the referrers API
lists for it. Pure: bytes in, a ``ParsedManifest`` or a ``RegistryError`` out.

Accepted: OCI image manifest and index, Docker v2 schema 2 manifest and
manifest list. Docker schema 1 is refused with a message saying what to do.
Anything a client sends, however malformed, ends as ``MANIFEST_INVALID``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from .errors import ErrorCode, RegistryError
from .reference import Digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
# What a client that takes any manifest kind asks for (Accept).
MANIFEST_ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))
DOCKER_SCHEMA1 = frozenset({
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
})
IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = IMAGE_TYPES | INDEX_TYPES
# Content types that say nothing about the manifest kind; the body decides.
_GENERIC_TYPES = frozenset({"", "application/json", "application/octet-stream"})
# Layers that may legitimately be absent from the registry (fetched from their URLs).
_FOREIGN_LAYER_PREFIXES = (
    "application/vnd.docker.image.rootfs.foreign.",
    "application/vnd.oci.image.layer.nondistributable.",
)

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
_decoder = msgspec.json.Decoder()


@dataclass(frozen=True, slots=True)
class ParsedManifest:
    media_type: str
    blobs: tuple[str, ...]         # must be in the repository: config, then layers
    children: tuple[str, ...]      # must be in the repository as manifests
    subject: str | None
    artifact_type: str | None      # as the referrers API reports it
    annotations: dict[str, str] | None

    @property
    def references(self) -> tuple[str, ...]:
        """Everything this manifest needs, in the order a replica fetches it."""
        return self.blobs + self.children


def _invalid(detail: str) -> RegistryError:
    return RegistryError(ErrorCode.MANIFEST_INVALID, detail)


def _base_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse(body: bytes, content_type: str | None) -> ParsedManifest:
    declared_header = _base_type(content_type)
    if declared_header in DOCKER_SCHEMA1:
        raise _schema1()
    try:
        doc = _decoder.decode(body)
    except (msgspec.DecodeError, RecursionError, ValueError, UnicodeDecodeError):
        raise _invalid("manifest is not valid JSON") from None
    if not isinstance(doc, dict):
        raise _invalid("manifest must be a JSON object")
    version = doc.get("schemaVersion")
    if version == 1:
        raise _schema1()
    if version != 2 or isinstance(version, bool):
        raise _invalid("schemaVersion must be 2")
    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise _invalid("mediaType must be a string")
    media_type = _media_type(declared_header, declared, doc)

    annotations = _annotations(doc.get("annotations"), "annotations")
    subject = doc.get("subject")
    subject_digest = _descriptor(subject, "subject")[0] if subject is not None else None
    artifact_type = doc.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise _invalid("artifactType must be a string")

    if media_type in IMAGE_TYPES:
        config = doc.get("config")
        if config is None:
            raise _invalid("an image manifest needs a config descriptor")
        config_digest, config_type = _descriptor(config, "config")
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise _invalid("an image manifest needs a layers array")
        blobs = [config_digest]
        for i, layer in enumerate(layers):
            digest, layer_type = _descriptor(layer, f"layers[{i}]")
            if layer_type.startswith(_FOREIGN_LAYER_PREFIXES) and layer.get("urls"):
                continue
            blobs.append(digest)
        return ParsedManifest(media_type, tuple(dict.fromkeys(blobs)), (), subject_digest,
                              artifact_type or config_type, annotations)

    manifests = doc.get("manifests")
    if not isinstance(manifests, list):
        raise _invalid("an index needs a manifests array")
    children = [_descriptor(m, f"manifests[{i}]")[0] for i, m in enumerate(manifests)]
    return ParsedManifest(media_type, (), tuple(dict.fromkeys(children)), subject_digest,
                          artifact_type, annotations)


def _schema1() -> RegistryError:
    return RegistryError(
        ErrorCode.MANIFEST_INVALID,
        "Docker schema 1 manifests are not supported (deprecated since 2017); push the image "
        "as Docker v2 schema 2 or OCI, e.g. `skopeo copy --format v2s2`",
        message="manifest schema 1 unsupported",
    )


def _media_type(header: str, declared: str | None, doc: dict[str, Any]) -> str:
    if declared in DOCKER_SCHEMA1:
        raise _schema1()
    if header not in _GENERIC_TYPES:
        if header not in MANIFEST_TYPES:
            raise _invalid(f"unsupported manifest media type {header!r}; expected one of "
                           f"{', '.join(sorted(MANIFEST_TYPES))}")
        if declared is not None and declared != header:
            raise _invalid(f"mediaType {declared!r} does not match Content-Type {header!r}")
        return header
    if declared is not None:
        if declared not in MANIFEST_TYPES:
            raise _invalid(f"unsupported manifest media type {declared!r}")
        return declared
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc:
        return OCI_MANIFEST
    raise _invalid("cannot tell the manifest type: send a Content-Type or a mediaType field")


def _descriptor(value: Any, where: str) -> tuple[str, str]:
    """Validate a descriptor; returns (digest, mediaType)."""
    if not isinstance(value, dict):
        raise _invalid(f"{where} must be a descriptor object")
    media_type = value.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise _invalid(f"{where}.mediaType must be a non-empty string")
    size = value.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _invalid(f"{where}.size must be a non-negative integer")
    digest = value.get("digest")
    try:
        parsed = Digest.parse(digest)
    except RegistryError:
        raise _invalid(f"{where}.digest {digest!r} is not a valid sha256 or sha512 digest") from None
    _annotations(value.get("annotations"), f"{where}.annotations")
    return str(parsed), media_type


def _annotations(value: Any, where: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _invalid(f"{where} must map strings to strings")
    return value
