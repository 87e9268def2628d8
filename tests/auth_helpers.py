"""Identities and credentials for the access tests: a cluster CA in a temp dir, node
certificates from it, and an in-memory identity source with known secrets.

Everything is real: the CA and certificates are ``cluster.control.ca``'s, the
identity source is ``InMemoryIdentities`` (an implementation of the node's
``IdentitySource``) for a node in process, and for a ``georeg node`` child process
the same identities written into its registry configuration
(``configuration_objects``, ``seed_configuration``), which is what a node with
auth on enforces; the node is given the same files a cluster would give it.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
from aiohttp import web

from cluster.control.ca import ClusterCA, NodeCertificate
from cluster.control.private_files import write_private
from registry_node.app import init_app
from registry_node.auth.identities import (
    DISABLED,
    IdentityRecord,
    InMemoryIdentities,
    Password,
    RegistrySettings,
    RoleAssignment,
    ScopeMapRecord,
    TokenRecord,
    hash_secret,
)
from registry_node.config import NodeConfig
from registry_node.configuration import RegistryProperties
from registry_node.identities import Assignment, Identity, ScopeMap, Secret, Token

from .helpers import ManualClock, RunningNode

REGISTRY = "georegtest"
SERVICE = "georegtest.azurecr.test"

# Secrets the tests log in with (each distinct, so a grep of a log finds any of them).
ADMIN_PASSWORD = "admin-pw-3c1f0a9e7d"
ADMIN_PASSWORD2 = "admin-pw2-8b2d4e6f1a"
PULL_PASSWORD = "pull-pw-5e7a9c1b3d"
PUSH_PASSWORD = "push-pw-2f4b6d8e0c"
TEAM_PASSWORD = "team-pw-7d9f1b3e5a"
DISABLED_PASSWORD = "off-pw-4a6c8e0f2b"
EXPIRED_PASSWORD = "old-pw-9e1c3a5b7d"
IDENTITY_ID = "11111111-2222-3333-4444-555555555555"
IDENTITY_SECRET = "identity-secret-6b8d0f2a4c"
READER_ID = "66666666-7777-8888-9999-000000000000"
READER_SECRET = "reader-secret-1c3e5a7b9d"
SECRETS = (ADMIN_PASSWORD, ADMIN_PASSWORD2, PULL_PASSWORD, PUSH_PASSWORD, TEAM_PASSWORD,
           DISABLED_PASSWORD, EXPIRED_PASSWORD, IDENTITY_SECRET, READER_SECRET)


def basic(username: str, password: str) -> dict[str, str]:
    encoded = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def identities(*, admin: bool = True, anonymous: bool = False) -> InMemoryIdentities:
    """The registry every access test uses:

    * admin enabled (two passwords) unless ``admin=False``;
    * token ``puller``: ``_repositories_pull``; ``pusher``: ``_repositories_push``;
    * token ``team``: scope map ``team-rw`` — read/write under ``team/*``, read on ``shared``;
    * token ``off`` (disabled), token ``old`` (password expired in 1970);
    * identity ``IDENTITY_ID`` with AcrPush; ``READER_ID`` with AcrPull limited to ``shared``.
    """
    source = InMemoryIdentities(RegistrySettings(
        REGISTRY, admin_enabled=admin,
        admin_passwords=(Password("password1", hash_secret(ADMIN_PASSWORD)),
                         Password("password2", hash_secret(ADMIN_PASSWORD2))),
        anonymous_pull_enabled=anonymous))
    source.put_scope_map(ScopeMapRecord("team-rw", (
        "repositories/team/*/content/read", "repositories/team/*/content/write",
        "repositories/team/*/metadata/read", "repositories/shared/content/read")))
    for name, scope_map, password in (("puller", "_repositories_pull", PULL_PASSWORD),
                                      ("pusher", "_repositories_push", PUSH_PASSWORD),
                                      ("team", "team-rw", TEAM_PASSWORD)):
        source.put_token(TokenRecord(name, scope_map,
                                     passwords=(Password("password1", hash_secret(password)),)))
    source.put_token(TokenRecord("off", "_repositories_admin", status=DISABLED,
                                 passwords=(Password("password1", hash_secret(DISABLED_PASSWORD)),)))
    source.put_token(TokenRecord("old", "_repositories_admin", passwords=(
        Password("password1", hash_secret(EXPIRED_PASSWORD), expiry=1.0),)))
    source.put_identity(IdentityRecord(IDENTITY_ID, (Password("secret", hash_secret(IDENTITY_SECRET)),)))
    source.assign(RoleAssignment(IDENTITY_ID, "AcrPush"))
    source.put_identity(IdentityRecord(READER_ID, (Password("secret", hash_secret(READER_SECRET)),)))
    source.assign(RoleAssignment(READER_ID, "AcrPull", repository="shared"))
    return source


@dataclass
class AuthFiles:
    ca: ClusterCA
    certificates: dict[str, NodeCertificate]
    internal_file: Path            # the cluster's internal credential, as `georeg up` makes one

    def node_args(self, node: str) -> list[str]:
        cert = self.certificates[node]
        return ["--auth-ca", str(cert.ca_file), "--auth-key", str(cert.key_file),
                "--auth-cert", str(cert.cert_file), "--auth-service", SERVICE,
                "--internal-credential-file", str(self.internal_file)]

    def internal_headers(self) -> dict[str, str]:
        """What the cluster's own requests carry: the node's internal routes
        (the registry configuration among them) answer nothing else."""
        return {"Authorization": f"Bearer {self.internal_file.read_text().strip()}"}

    def config(self, node: str, data_dir: Path) -> NodeConfig:
        cert = self.certificates[node]
        return NodeConfig(data_dir=data_dir, port=0, auth_ca_file=cert.ca_file,
                          auth_key_file=cert.key_file, auth_cert_file=cert.cert_file,
                          auth_service=SERVICE)


def auth_files(root: Path, *nodes: str) -> AuthFiles:
    ca = ClusterCA.open(root / "ca")
    internal = root / "internal.secret"
    write_private(internal, secrets.token_urlsafe(32).encode())
    return AuthFiles(ca, {n: ca.node_certificate(n, "eastus", "1") for n in nodes}, internal)


async def start_auth_node(config: NodeConfig, source: InMemoryIdentities,
                          clock: ManualClock | None = None) -> RunningNode:
    """A node with auth on, in this process, enforcing ``source`` (which the test may change)."""
    clocks = {} if clock is None else {"wall_ns": clock.wall_ns, "monotonic": clock.monotonic}
    runner = web.AppRunner(init_app(config, identities=source, **clocks), access_log=None,
                           handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return RunningNode(f"http://127.0.0.1:{port}", config, runner)


def configuration_objects(source: InMemoryIdentities) -> list[tuple[str, str, dict]]:
    """``source`` as registry configuration objects: (kind, name, value) as the
    management API writes them (hashes only)."""
    def secrets(passwords):
        return tuple(Secret(p.name, p.hashed, expiry=p.expiry) for p in passwords)

    r = source.registry
    objects: list[tuple[str, str, msgspec.Struct]] = [
        ("registry", "default", RegistryProperties(
            r.admin_enabled, r.anonymous_pull_enabled, r.name,
            tuple(Secret("password" if s.name == "password1" else s.name, s.hash, s.created,
                         s.expiry) for s in secrets(r.admin_passwords))))]
    objects += [("scope-map", m.name, ScopeMap(actions=m.actions))
                for m in source.scope_maps.values()]
    objects += [("token", t.name, Token(t.scope_map, t.status, secrets(t.passwords)))
                for t in source.tokens.values()]
    objects += [("identity", i.id, Identity(secrets=secrets(i.secrets)))
                for i in source.identities.values()]
    objects += [("role-assignment", f"assignment-{n}", Assignment(a.assignee, a.role, a.repository))
                for n, a in enumerate(source.assignments)]
    return [(kind, name, msgspec.to_builtins(value)) for kind, name, value in objects]


async def seed_configuration(http: aiohttp.ClientSession, url: str,
                             source: InMemoryIdentities,
                             headers: dict[str, str] | None = None) -> None:
    """Write ``source`` into the registry configuration of the node at ``url``
    (``headers``: the internal credential, which a node with auth wants there)."""
    for kind, name, value in configuration_objects(source):
        async with http.put(f"{url}/georeg/v1/configuration/{kind}/{name}", json=value,
                            headers=headers) as r:
            assert r.status == 200, await r.text()
