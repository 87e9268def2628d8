"""`georeg deploy compose`: the cluster of a spec as one compose file.

One service per node (named after it: peers reach it by that name), its own
named volume for its data, a network per region that its nodes join plus a
``wan`` network every node joins (replication crosses regions on it; compose
emulates no latency: that is Chaos Mesh's job on Kubernetes, georeg's links'
on one machine), and a healthcheck on the node's health route. Each region's
regional endpoint and each client location's global endpoint is published as
a host port of the node it routes to (``regional``/``global`` below).

Views and access material are files beside the compose file
(``georeg-views/``, and ``georeg-secrets/`` with keys 0600). A one-shot
``georeg-keys`` service (root) copies the access material into volumes owned
by the image's user (each node gets the shared files and its own key only)
and gives each data volume's root to that user; the nodes, as that user,
start after it succeeds.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..control.private_files import write_private
from .model import (
    AUTH_PATH,
    DATA_PATH,
    HTTP_PORT,
    IMAGE_UID,
    INSTALL_KEYS,
    NODE_KEYS_PATH,
    VIEW_PATH,
    Deployment,
    Materials,
)

VIEWS_DIR = "georeg-views"
SECRETS_DIR = "georeg-secrets"
INSTALL_SERVICE = "georeg-keys"       # the one-shot key installer
AUTH_VOLUME = "georeg-auth"           # the shared auth files, as the nodes' user's


def host(name: str) -> str:
    return name


def document(d: Deployment) -> dict:
    """The compose document. Published ports: the plan's (``network.port_base``),
    so a client uses the addresses it would on one machine."""
    # A one-shot service, as root, copies the keys into volumes of the node's
    # user (each copy 0600: the node refuses more open; the renderer's files
    # could only be read as their owner) and gives each data volume's root to
    # that user; the nodes start once it has succeeded, as that user.
    keys_src = "/run/georeg-secrets"
    install = [f"{keys_src}/auth", f"/keys/{AUTH_VOLUME}"]
    keys_volumes = [f"./{SECRETS_DIR}:{keys_src}:ro", f"{AUTH_VOLUME}:/keys/{AUTH_VOLUME}"]
    services: dict = {INSTALL_SERVICE: {
        "image": d.image, "entrypoint": ["python3", "-c", INSTALL_KEYS], "command": install,
        "user": "0:0", "environment": {"GEOREG_KEYS_OWNER": f"{IMAGE_UID}:{IMAGE_UID}"},
        "volumes": keys_volumes, "network_mode": "none", "restart": "no"}}
    first_of = {}
    for node in d.nodes:
        first_of.setdefault(node.replica, node.name)
        volumes = [f"{node.name}-data:{DATA_PATH}",
                   f"./{VIEWS_DIR}/{node.name}.json:{VIEW_PATH}/{node.name}.json:ro",
                   f"{AUTH_VOLUME}:{AUTH_PATH}:ro"]
        install += ["", f"/keys/{node.name}-data"]
        keys_volumes.append(f"{node.name}-data:/keys/{node.name}-data")
        if d.spec.needs_ca:
            volumes.append(f"{node.name}-keys:{NODE_KEYS_PATH}:ro")
            install += [f"{keys_src}/nodes/{node.name}", f"/keys/{node.name}-keys"]
            keys_volumes.append(f"{node.name}-keys:/keys/{node.name}-keys")
        services[node.name] = {
            "image": d.image, "command": d.node_args(node, node.name),
            "user": f"{IMAGE_UID}:{IMAGE_UID}",
            "depends_on": {INSTALL_SERVICE: {"condition": "service_completed_successfully"}},
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
    names = [f"{n.name}-{kind}" for n in d.nodes
             for kind in ("data", *(("keys",) if d.spec.needs_ca else ()))]
    return {"services": services,
            "networks": {**{f"region-{r}": {} for r in d.regions}, "wan": {}},
            "volumes": {name: {} for name in (*names, AUTH_VOLUME)}}


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
