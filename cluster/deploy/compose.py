"""`georeg deploy compose`: the cluster of a spec as one compose file.

One service per node (named after it: peers reach it by that name), its own
named volume for its data, a network per region that its nodes join plus a
``wan`` network every node joins (replication crosses regions on it; compose
emulates no latency: that is Chaos Mesh's job on Kubernetes, georeg's links'
on one machine), and a healthcheck on the node's health route. Each region's
regional endpoint and each client location's global endpoint is published as
a host port of the node it routes to (``regional``/``global`` below).

Views and access material are files beside the compose file
(``georeg-views/``, and ``georeg-secrets/`` with keys 0600), mounted read-only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..control.private_files import write_private
from .model import (
    AUTH_PATH,
    DATA_PATH,
    HTTP_PORT,
    NODE_KEYS_PATH,
    VIEW_PATH,
    Deployment,
    Materials,
)

VIEWS_DIR = "georeg-views"
SECRETS_DIR = "georeg-secrets"


def host(name: str) -> str:
    return name


def document(d: Deployment) -> dict:
    """The compose document. Published ports: the plan's (``network.port_base``),
    so a client uses the addresses it would on one machine."""
    services = {}
    first_of = {}
    for node in d.nodes:
        first_of.setdefault(node.replica, node.name)
        volumes = [f"{node.name}-data:{DATA_PATH}",
                   f"./{VIEWS_DIR}/{node.name}.json:{VIEW_PATH}/{node.name}.json:ro",
                   f"./{SECRETS_DIR}/auth:{AUTH_PATH}:ro"]
        if d.spec.needs_ca:
            volumes.append(f"./{SECRETS_DIR}/nodes/{node.name}:{NODE_KEYS_PATH}:ro")
        services[node.name] = {
            "image": d.image, "command": d.node_args(node, node.name),
            # The key files are the renderer's, 0600 (the node refuses them more
            # open): the node runs as their owner.
            "user": f"{os.getuid()}:{os.getgid()}",
            "hostname": node.name, "volumes": volumes,
            "networks": [f"region-{node.plan.region}", "wan"],
            "healthcheck": {"test": ["CMD", *d.health_command()], "interval": "5s",
                            "timeout": "3s", "retries": 3, "start_period": "30s"},
            "restart": "unless-stopped",
            "labels": {"io.georeg.region": node.plan.region, "io.georeg.zone": node.plan.zone,
                       "io.georeg.role": node.role},
        }
    for endpoint in d.plan.endpoints:
        region = endpoint.region if endpoint.kind == "regional" else d.routed_region(endpoint.region)
        if region is None:      # no replica has global routing
            continue
        target = services[first_of[region]]
        target.setdefault("ports", []).append(f"{endpoint.port}:{HTTP_PORT}")
    return {"services": services,
            "networks": {**{f"region-{r}": {} for r in d.regions}, "wan": {}},
            "volumes": {f"{n.name}-data": {} for n in d.nodes}}


def write(d: Deployment, m: Materials, out: Path) -> list[Path]:
    base = out.parent
    base.mkdir(parents=True, exist_ok=True)
    views = base / VIEWS_DIR
    views.mkdir(exist_ok=True)
    written = []
    for node in d.nodes:
        path = views / f"{node.name}.json"
        path.write_text(d.view_json(node))
        written.append(path)
    auth = base / SECRETS_DIR / "auth"
    auth.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, data in m.auth_files().items():
        write_private(auth / name, data)
    for name, (key, cert) in m.node_keys.items():
        folder = base / SECRETS_DIR / "nodes" / name
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(folder / f"{name}.key", key)
        write_private(folder / f"{name}.pem", cert)
    out.write_text(json.dumps(document(d), indent=2) + "\n")
    return [out, *written]
