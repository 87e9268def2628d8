"""The access material of a cluster with ``auth = "token"`` (and the CA of one
with ``tls = true``), made at its first start and kept in its data dir::

    <data dir>/auth/                 mode 0700
        ca/                          the cluster CA, each node's key and certificate and
                                     the endpoints' (``cluster.control.ca``; what
                                     ``NodeAccess`` and ``NodeTls`` name). A TLS cluster
                                     without auth has only this
        owner.secret                 the cluster owner's credential: the management API
                                     answers nothing without it; the CLI reads it here
        internal.secret              the cluster's internal credential: nodes' internal
                                     routes (``registry_node.api.internal``); the supervisor,
                                     the management plane, verify and faults send it
        admin-passwords.json         the admin user's passwords in clear, {"password": [...],
                                     "password2": [...]}, newest last: the one home of
                                     them (``credential show|renew``, ``georeg up``'s
                                     printout, ``georeg login``); nodes hold only hashes
        configuration.key            the configuration key (32 random bytes), on every
                                     cluster, with auth or without: it seals webhook header
                                     values (``registry_node.configuration_key``); the
                                     control plane holds it, and each serving node is
                                     given its path (``NodePlan.configuration_key``)

Who may do what: a registry client needs credentials on every node and
endpoint (ACR's token flow, ``registry_node.auth``); with the admin user's
(enabled on a new cluster, so a first-time user gets in with what ``georeg
up`` prints) it may push, pull and delete. Only the holder of the owner
credential may use the management API (configure, inject faults, shut down):
whoever can read the data dir owns the cluster, as whoever holds an
Azure subscription's Owner role owns its registry.

The identities nodes enforce are the replicated registry configuration
(``registry_node.identities``), written through the home region by
``cluster.control.identities``; at an auth cluster's first start the cluster
enables the admin user there with generated passwords (``Cluster._start``).

Invariants: every secret is 256 random bits, generated once and reused at
every restart (the admin passwords change only by ``credential renew``); every secret file is written mode 0600 from its first byte
(never chmod-ed after), under a 0700 directory; secrets reach node processes
only as file paths, never on a command line or in the environment, and are
never logged.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from registry_node.config import listens_everywhere
from registry_node.configuration_key import ConfigurationKey
from registry_node.crypto import KEY_SIZE

from .ca import ClusterCA, NodeCertificate
from .plan import AUTH_DIR, ClusterPlan, NodePlan, configuration_key_file
from .private_files import write_private

OWNER_FILE = "owner.secret"
INTERNAL_FILE = "internal.secret"
ADMIN_PASSWORDS_FILE = "admin-passwords.json"
# Kept per slot: the password being set and the one before it, so that a
# renewal interrupted between this file and the home node's write still shows
# whichever of them the replicated hash names.
_CANDIDATES = 2


def auth_dir(data_dir: Path) -> Path:
    return Path(data_dir) / AUTH_DIR


def owner_credential_path(data_dir: Path) -> Path:
    return auth_dir(data_dir) / OWNER_FILE


def authorization(credential: str) -> dict[str, str]:
    """The header that presents ``credential`` (owner or internal)."""
    return {"Authorization": f"Bearer {credential}"}


@dataclass(frozen=True, slots=True)
class AdminLogin:
    """The registry's admin user: username (the registry's name) and password."""

    username: str
    password: str

    @classmethod
    def from_shown(cls, shown: object) -> AdminLogin | None:
        """The login in what ``GET /georeg/v1/registry/credentials`` (``georeg
        credential show``) answers: the first password that works, or None when
        none does (the admin user disabled, or its passwords renewed elsewhere)."""
        if not isinstance(shown, dict):
            return None
        value = next((p["value"] for p in shown.get("passwords", []) if p.get("value")), None)
        return cls(shown["username"], value) if value is not None else None

    def headers(self) -> dict[str, str]:
        """Basic credentials, as ``curl -u`` sends them on registry routes."""
        encoded = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return {"Authorization": f"Basic {encoded}"}


@dataclass(frozen=True, slots=True)
class ClusterSecrets:
    """A cluster's own credentials, as the supervisor process holds them."""

    owner: str
    internal: str
    service: str

    def internal_headers(self) -> dict[str, str]:
        return authorization(self.internal)


def kept_secret(path: Path) -> str:
    """The secret kept at ``path`` (mode 0600), made now if there is none."""
    if path.exists():
        value = path.read_text().strip()
        if value:
            return value
    value = secrets.token_urlsafe(32)
    write_private(path, (value + "\n").encode())
    return value


def provision(cluster_plan: ClusterPlan) -> ClusterSecrets | None:
    """Everything a cluster with auth or TLS needs before its nodes start, made at
    its first start and reused at every later one: the CA and each node's
    certificate (auth or TLS), and the cluster's secrets (auth; None on a cluster without auth)."""
    spec = cluster_plan.spec
    if not spec.needs_ca:
        return None
    directory = auth_dir(cluster_plan.data_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = ClusterCA.open(directory / "ca", spec.registry)
    for node in cluster_plan.all_nodes:
        provision_node(ca, cluster_plan, node)
    if not spec.auth_enabled:
        return None
    owner = kept_secret(directory / OWNER_FILE)
    internal = kept_secret(directory / INTERNAL_FILE)
    return ClusterSecrets(owner, internal, spec.login_server)


def configuration_key(cluster_plan: ClusterPlan) -> ConfigurationKey:
    """The cluster's configuration key, made at its first start (whether or not
    it has auth) and reused at every later one; every serving node's plan names
    its file. Values sealed under a key lost with its file do not open again:
    the file belongs in a backup of the data dir."""
    path = configuration_key_file(cluster_plan.data_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    kept_key(path)
    return ConfigurationKey.load(path)


def kept_key(path: Path) -> bytes:
    """The raw key kept at ``path`` (mode 0600), made now if there is none."""
    if not path.exists():
        write_private(path, secrets.token_bytes(KEY_SIZE))
    return path.read_bytes()


def served_names(cluster_plan: ClusterPlan) -> tuple[str, ...]:
    """The names a node's or endpoint's certificate holds besides 127.0.0.1 and
    localhost: the cluster's host (unless it listens everywhere) and the
    registry's login server."""
    return tuple(h for h in (cluster_plan.host, cluster_plan.spec.login_server)
                 if not listens_everywhere(h))


def provision_node(ca: ClusterCA, cluster_plan: ClusterPlan, node: NodePlan) -> None:
    """``node``'s key and certificate (its region and zone in the subject, and
    the address of its host among its names when it has one of its own), where
    its plan says the control process keeps them (``ClusterPlan.control_copy``:
    the node's own path on the control process's host; the supervisor puts a
    copy on a node's own host)."""
    copy = cluster_plan.control_copy
    wanted = [(copy(node, f.key_file), copy(node, f.cert_file), copy(node, f.ca_file))
              for f in (node.access, node.tls) if f is not None]
    assert wanted, f"{node.name} has neither access nor TLS in its plan"
    names = served_names(cluster_plan)
    if node.host_root is not None:
        names += (node.host,)
    issued = ca.node_certificate(node.name, node.region, node.zone, names)
    for files in wanted:
        if (issued.key_file, issued.cert_file, issued.ca_file) != files:
            raise RuntimeError(f"the CA put {node.name}'s certificate at {issued.cert_file}, "
                               f"not where its plan says ({files[1]})")


def endpoint_certificate(cluster_plan: ClusterPlan) -> NodeCertificate:
    """The routing endpoints' key and certificate (a TLS cluster's), issued at its
    first start and reused after, for the same names as its nodes'."""
    return open_ca(cluster_plan).endpoint_certificate(served_names(cluster_plan))


def open_ca(cluster_plan: ClusterPlan) -> ClusterCA:
    return ClusterCA.open(auth_dir(cluster_plan.data_dir) / "ca", cluster_plan.spec.registry)


# -- what other processes read (the CLI) ---------------------------------------------


class CredentialMissing(Exception):
    """The data dir holds no readable owner credential; the message says how to get one."""


def read_owner_credential(data_dir: Path) -> str:
    path = owner_credential_path(data_dir)
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        raise CredentialMissing(
            f"{path} does not exist: the cluster owner's credential is made when a cluster "
            f"with auth = \"token\" first starts, in its data dir; pass that data dir "
            f"(--data-dir) to reach the cluster") from None
    except PermissionError:
        raise CredentialMissing(
            f"{path} is not readable by this user: the cluster owner's credential is readable "
            f"only by the user who started the cluster (mode 0600); run georeg as that user")\
            from None
    if not value:
        raise CredentialMissing(f"{path} is empty; restore it from the data dir of the "
                                f"cluster's first start") from None
    return value


def read_internal_credential(data_dir: Path) -> str:
    """The internal credential (for ``georeg verify``, which asks nodes itself)."""
    path = auth_dir(data_dir) / INTERNAL_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise CredentialMissing(f"{path} does not exist: it is made when a cluster with "
                                f"auth = \"token\" first starts, in its data dir") from None
    except PermissionError:
        raise CredentialMissing(f"{path} is readable only by the user who started the cluster "
                                f"(mode 0600); run georeg as that user") from None


# -- the admin user's passwords ---------------------------------------------------------


def admin_passwords_path(data_dir: Path) -> Path:
    return auth_dir(data_dir) / ADMIN_PASSWORDS_FILE


def admin_password_candidates(data_dir: Path) -> dict[str, list[str]]:
    """Per slot, the admin passwords generated for it (newest last); which of them
    works is the one whose hash the registry holds (``RegistryAccess``)."""
    try:
        raw = admin_passwords_path(data_dir).read_text()
    except FileNotFoundError:
        return {}
    doc = json.loads(raw)
    return {slot: [v for v in values if isinstance(v, str)]
            for slot, values in doc.items() if isinstance(values, list)}


def remember_admin_password(data_dir: Path, slot: str, value: str) -> None:
    """Add ``value`` as the newest candidate for ``slot``, before its hash is
    written anywhere (the file stays 0600, replaced atomically: a crash leaves
    the old file or the new one)."""
    candidates = admin_password_candidates(data_dir)
    candidates[slot] = (candidates.get(slot, []) + [value])[-_CANDIDATES:]
    auth_dir(data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(admin_passwords_path(data_dir), (json.dumps(candidates) + "\n").encode())

