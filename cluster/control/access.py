"""The access material of a cluster with ``auth = "token"``, made at its first
start and kept in its data dir::

    <data dir>/auth/                 mode 0700
        ca/                          the cluster CA, and each node's key and certificate
                                     (``cluster.control.ca``; what ``NodeAccess`` names)
        owner.secret                 the cluster owner's credential: the management API
                                     answers nothing without it; the CLI reads it here
        internal.secret              the cluster's internal credential: nodes' internal
                                     routes (``registry_node.api.internal``); the supervisor,
                                     the management plane, verify and faults send it
        admin.json                   the registry's admin user: {"username", "password"},
                                     printed by ``georeg up``, written by ``georeg login``
        identities.json              what every node enforces (the admin user, its password
                                     hashed): ``georeg node --auth-identities``

Who may do what: a registry client needs credentials on every node and
endpoint (ACR's token flow, ``registry_node.auth``); with the admin user's
(enabled on a new cluster, so a first-time user gets in with what ``georeg
up`` prints) it may push, pull and delete. Only the holder of the owner
credential may use the management API (configure, inject faults, shut down):
whoever can read the data dir owns the cluster, as whoever holds an
Azure subscription's Owner role owns its registry.

The identities nodes enforce come from one seam, ``IDENTITIES``: today a
file written here from the admin user (``InMemoryIdentities``' JSON); once
the replicated registry configuration carries identities, nodes read them
from there and this file goes.

Invariants: every secret is 256 random bits, generated once and reused at
every restart; every secret file is written mode 0600 from its first byte
(never chmod-ed after), under a 0700 directory; secrets reach node processes
only as file paths, never on a command line or in the environment, and are
never logged.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from registry_node.auth.identities import (
    InMemoryIdentities,
    Password,
    RegistrySettings,
    hash_secret,
)

from .ca import ClusterCA
from .plan import AUTH_DIR, ClusterPlan, NodePlan

OWNER_FILE = "owner.secret"
INTERNAL_FILE = "internal.secret"
ADMIN_FILE = "admin.json"
IDENTITIES_FILE = "identities.json"


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


@dataclass(frozen=True, slots=True)
class ClusterAccess:
    """A cluster's credentials, as the supervisor process holds them."""

    owner: str
    internal: str
    admin: AdminLogin
    service: str

    def internal_headers(self) -> dict[str, str]:
        return authorization(self.internal)


def _write_secret_file(path: Path, text: str) -> None:
    """``text`` at ``path``, mode 0600 from the first byte, replaced atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _secret(path: Path) -> str:
    """The secret kept at ``path``, made now if there is none."""
    if path.exists():
        value = path.read_text().strip()
        if value:
            return value
    value = secrets.token_urlsafe(32)
    _write_secret_file(path, value + "\n")
    return value


def _admin(path: Path, username: str) -> AdminLogin:
    if path.exists():
        doc = json.loads(path.read_text())
        if doc.get("username") == username and doc.get("password"):
            return AdminLogin(username, doc["password"])
    login = AdminLogin(username, secrets.token_urlsafe(32))
    _write_secret_file(path, json.dumps({"username": login.username,
                                         "password": login.password}) + "\n")
    return login


def identities_for(admin: AdminLogin) -> InMemoryIdentities:
    """What nodes enforce on a new cluster: the admin user enabled with its
    password (hashed), no tokens, no anonymous pull."""
    return InMemoryIdentities(RegistrySettings(
        admin.username, admin_enabled=True,
        admin_passwords=(Password("password1", hash_secret(admin.password)),)))


def provision(cluster_plan: ClusterPlan) -> ClusterAccess | None:
    """Everything a cluster with auth needs before its nodes start, made at its
    first start and reused at every later one (None on a cluster without auth)."""
    spec = cluster_plan.spec
    if not spec.auth_enabled:
        return None
    directory = auth_dir(cluster_plan.data_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    owner = _secret(directory / OWNER_FILE)
    internal = _secret(directory / INTERNAL_FILE)
    admin = _admin(directory / ADMIN_FILE, spec.registry)
    identities = directory / IDENTITIES_FILE
    if not identities.exists():
        _write_secret_file(identities, identities_for(admin).to_json())
    ca = ClusterCA.open(directory / "ca", spec.registry)
    for node in cluster_plan.all_nodes:
        provision_node(ca, cluster_plan, node)
    return ClusterAccess(owner, internal, admin, spec.login_server)


def provision_node(ca: ClusterCA, cluster_plan: ClusterPlan, node: NodePlan) -> None:
    """``node``'s key and certificate (its region and zone in the subject), where
    its plan says the node will look for them."""
    access = node.access
    assert access is not None
    hosts = tuple(h for h in (cluster_plan.host, cluster_plan.spec.login_server)
                  if h not in ("0.0.0.0", "::"))
    issued = ca.node_certificate(node.name, node.region, node.zone, hosts)
    if (issued.key_file, issued.cert_file, issued.ca_file) != \
            (access.key_file, access.cert_file, access.ca_file):
        raise RuntimeError(f"the CA put {node.name}'s certificate at {issued.cert_file}, not "
                           f"where its plan says ({access.cert_file})")


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


def read_admin(data_dir: Path) -> AdminLogin:
    path = auth_dir(data_dir) / ADMIN_FILE
    try:
        doc = json.loads(path.read_text())
        return AdminLogin(doc["username"], doc["password"])
    except FileNotFoundError:
        raise CredentialMissing(
            f"{path} does not exist: the admin user's password is made when a cluster with "
            f"auth = \"token\" first starts (`georeg up --auth token`)") from None
    except PermissionError:
        raise CredentialMissing(f"{path} is readable only by the user who started the cluster "
                                f"(mode 0600); run georeg as that user") from None
    except (ValueError, KeyError, TypeError):
        raise CredentialMissing(f"{path} does not hold the admin user's credentials") from None
