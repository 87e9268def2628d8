"""In-process clusters with access control on, as an auth cluster runs its
nodes: each node with its own certificate from a real cluster CA (its region
and zone in it), replication over mutual TLS, the cluster's internal
credential on every node, the test identities (``auth_helpers.identities``)
written into the registry configuration, and a client auth file holding the
admin user's credentials for every node's address (what ``georeg login``
writes), for the CLI run as a client.
"""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path

import aiohttp

from cluster.control.ca import ClusterCA

from .auth_helpers import (
    ADMIN_PASSWORD,
    REGISTRY,
    SERVICE,
    basic,
    configuration_objects,
    identities,
)
from .helpers import eventually
from .replication_harness import InProcessCluster
from .replication_invariants import start_cluster

ADMIN = basic(REGISTRY, ADMIN_PASSWORD)


async def start_auth_cluster(root: Path, topology, **kwargs) -> InProcessCluster:
    """``start_cluster`` with auth on every node; the cluster gets ``internal``
    (the internal credential's header) and ``authfile`` (a client auth file)."""
    ca, credential = _access_files(root)
    settings = {}
    for region, zone in topology:
        name = InProcessCluster.node_name(region, zone)
        cert = ca.node_certificate(name, region, zone)
        settings[name] = {"auth_ca_file": cert.ca_file, "auth_key_file": cert.key_file,
                          "auth_cert_file": cert.cert_file, "auth_service": SERVICE,
                          "internal_credential_file": root / "internal.secret"}
    cluster = await start_cluster(root, topology, node_settings=settings, mutual_tls=True,
                                  **kwargs)
    try:
        cluster.internal = {"Authorization": f"Bearer {credential}"}
        first = next(iter(cluster.nodes.values()))
        async with aiohttp.ClientSession(headers=cluster.internal) as itself:
            for kind, name, value in configuration_objects(identities()):
                url = f"{first.url}/georeg/v1/configuration/{kind}/{name}"
                async with itself.put(url, json=value) as r:
                    assert r.status == 200, await r.text()
        async with aiohttp.ClientSession(headers=ADMIN) as admin:
            async def admin_everywhere() -> bool:
                for node in cluster.nodes.values():
                    async with admin.get(f"{node.url}/v2/") as r:
                        if r.status != 200:
                            return False
                return True

            await eventually(admin_everywhere, timeout=30, what="the admin user on every node")
        auth = base64.b64encode(f"{REGISTRY}:{ADMIN_PASSWORD}".encode()).decode()
        cluster.authfile = _write(root / "auth.json", json.dumps({"auths": {
            node.url.removeprefix("http://"): {"auth": auth} for node in cluster.nodes.values()}}))
    except BaseException:
        await cluster.close()
        raise
    return cluster


def _access_files(root: Path) -> tuple[ClusterCA, str]:
    root.mkdir(parents=True, exist_ok=True)
    credential = secrets.token_urlsafe(32)
    _write(root / "internal.secret", credential + "\n")
    return ClusterCA.open(root / "ca"), credential


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
