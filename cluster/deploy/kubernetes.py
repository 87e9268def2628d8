"""`georeg deploy kubernetes`: the cluster of a spec as Kubernetes manifests.

One JSON manifest per object (``kubectl apply -f DIR`` takes them in name
order: the namespace first): per workload (a replica region, or a
paired-region copy) a StatefulSet whose ordinals are its zones, each pod in a
distinct ``topology.kubernetes.io/zone`` (required anti-affinity) with its own
volume; a Service per node (the name its peers and certificate use); a
regional endpoint Service per replica and a global endpoint Service per client
location (see ``deploy/README.md`` for why Services, not proxies); the views
as a ConfigMap; the access material as Secrets; a PodDisruptionBudget per
zone-redundant region keeping its write quorum; a NetworkPolicy per confined
region. ``DIR/chaos-mesh/`` holds the WAN model as Chaos Mesh NetworkChaos
(``cluster.deploy.chaosmesh``), ``DIR/kind/cluster.json`` a kind cluster
with a node per zone.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from ..control.private_files import write_private
from . import chaosmesh
from .model import (
    AUTH_PATH,
    CPU_REQUEST_M,
    DATA_PATH,
    GRPC_PORT,
    HTTP_PORT,
    IMAGE_UID,
    INSTALL_KEYS,
    LABEL,
    MEMORY_LIMIT_MIB,
    MEMORY_REQUEST_MIB,
    NODE_KEYS_PATH,
    VIEW_PATH,
    Deployment,
    Materials,
    Node,
    confined_regions,
)

ZONE_KEY = "topology.kubernetes.io/zone"
REGION_KEY = "topology.kubernetes.io/region"
HEADLESS = "nodes"              # the StatefulSets' governing service
VIEWS = "cluster-views"
AUTH_SECRET = "georeg-auth"
SECRET_MOUNT = "/run/georeg-secrets"   # where the init container reads Secrets from



def host(namespace: str):
    """Where peers reach node ``name``: its own Service."""
    return lambda name: f"{name}.{namespace}.svc.cluster.local"


def service_names(namespace: str, name: str) -> tuple[str, ...]:
    return (name, f"{name}.{namespace}", f"{name}.{namespace}.svc",
            f"{name}.{namespace}.svc.cluster.local")


def certificate_names(d: Deployment, node: Node) -> tuple[str, ...]:
    """What node ``node``'s certificate names: its own Service, and on a serving
    node (no paired copy) every endpoint Service that sends clients to it (its
    region's regional endpoint, the global endpoints routed to its region) and
    the login server, as one-machine endpoints' names are served."""
    names = [node.name]
    if node.role == "node":
        names.append(f"regional-{node.replica}")
        names += [f"global-{location}" for location in d.spec.client_locations
                  if d.routed_region(location) == node.replica]
    return (*(n for name in names for n in service_names(d.namespace, name)),
            d.spec.login_server)


def _meta(d: Deployment, name: str, **labels: str) -> dict:
    return {"name": name, "namespace": d.namespace,
            "labels": {"app.kubernetes.io/name": "georeg", **labels}}


def node_labels(node: Node) -> dict[str, str]:
    return {f"{LABEL}/role": node.role, f"{LABEL}/region": node.plan.region,
            f"{LABEL}/replica": node.replica, f"{LABEL}/workload": node.workload}


def _pod_spec(d: Deployment, first: Node, zone_spread: bool) -> dict:
    probe_exec = {"exec": {"command": d.health_command()}}
    container = {
        "name": "node", "image": d.image,
        "args": d.node_args(first, "$(POD_NAME)"),
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "ports": [{"name": "http", "containerPort": HTTP_PORT},
                  {"name": "grpc", "containerPort": GRPC_PORT}],
        "readinessProbe": {**probe_exec, "periodSeconds": 5, "timeoutSeconds": 3},
        # Restarted only after two minutes without an answer (a long compaction
        # or a stalled disk is not a reason to lose a zone).
        "livenessProbe": {**probe_exec, "periodSeconds": 20, "timeoutSeconds": 3,
                          "failureThreshold": 6},
        "startupProbe": {**probe_exec, "periodSeconds": 2, "timeoutSeconds": 3,
                         "failureThreshold": 60},
        "resources": {"requests": {"cpu": f"{CPU_REQUEST_M}m", "memory": f"{MEMORY_REQUEST_MIB}Mi"},
                      "limits": {"memory": f"{MEMORY_LIMIT_MIB}Mi"}},
        "volumeMounts": [{"name": "data", "mountPath": DATA_PATH},
                         {"name": "views", "mountPath": VIEW_PATH, "readOnly": True},
                         {"name": "auth", "mountPath": AUTH_PATH, "readOnly": True}],
    }
    # The configuration key must be 0600 and the node's own (the node refuses it
    # more open), which a Secret volume's files never are (root's, group-readable
    # under fsGroup): an init container copies them, as the node's user, into
    # memory-backed volumes; a pod gets its own node key only.
    secret_mounts = [{"name": "auth-secret", "mountPath": f"{SECRET_MOUNT}/auth",
                      "readOnly": True}]
    volumes = [{"name": "views", "configMap": {"name": VIEWS}},
               {"name": "auth-secret", "secret": {"secretName": AUTH_SECRET,
                                                  "defaultMode": 0o440}},
               {"name": "auth", "emptyDir": {"medium": "Memory"}}]
    copies = [f"{SECRET_MOUNT}/auth", AUTH_PATH]
    if d.spec.needs_ca:
        container["volumeMounts"].append({"name": "node-keys", "mountPath": NODE_KEYS_PATH,
                                          "readOnly": True})
        secret_mounts.append({"name": "node-keys-secret", "mountPath": f"{SECRET_MOUNT}/node",
                              "readOnly": True})
        volumes += [{"name": "node-keys-secret", "secret": {
            "secretName": f"keys-{first.workload}", "defaultMode": 0o440}},
            {"name": "node-keys", "emptyDir": {"medium": "Memory"}}]
        copies += [f"{SECRET_MOUNT}/node/$(POD_NAME).key", NODE_KEYS_PATH,
                   f"{SECRET_MOUNT}/node/$(POD_NAME).pem", NODE_KEYS_PATH]
    init = {"name": "keys", "image": d.image,
            "command": ["python3", "-c", INSTALL_KEYS, *copies],
            "env": container["env"],
            "volumeMounts": secret_mounts + [
                {"name": "auth", "mountPath": AUTH_PATH},
                *([{"name": "node-keys", "mountPath": NODE_KEYS_PATH}]
                  if d.spec.needs_ca else [])],
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}
    spec: dict = {"initContainers": [init], "containers": [container], "volumes": volumes,
                  # fsGroup makes a new volume writable by the node's user; only when
                  # the volume's root does not match yet, so a restart never rewrites
                  # the modes of the node's key on it (it refuses a group bit).
                  "securityContext": {"runAsNonRoot": True, "runAsUser": IMAGE_UID,
                                      "runAsGroup": IMAGE_UID, "fsGroup": IMAGE_UID,
                                      "fsGroupChangePolicy": "OnRootMismatch"},
                  # The region's nodes prefer hosts labelled with it (a multi-region
                  # cluster); kind and single-region clusters run them anywhere.
                  "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                      {"weight": 100, "preference": {"matchExpressions": [
                          {"key": REGION_KEY, "operator": "In", "values": [first.plan.region]}]}}]}}}
    if zone_spread:
        spec["affinity"]["podAntiAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"topologyKey": ZONE_KEY,
             "labelSelector": {"matchLabels": {f"{LABEL}/workload": first.workload}}}]}
    return spec


def statefulset(d: Deployment, nodes: list[Node]) -> dict:
    first = nodes[0]
    labels = node_labels(first)
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": _meta(d, first.workload, **labels),
        "spec": {
            "serviceName": HEADLESS, "replicas": len(nodes),
            "ordinals": {"start": first.ordinal},     # pod eastus-1 is node eastus-1
            # Zones start together: a zone quorum needs two of them up.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {f"{LABEL}/workload": first.workload}},
            "template": {"metadata": {"labels": {"app.kubernetes.io/name": "georeg", **labels},
                                      "annotations": {f"{LABEL}/zones": ",".join(
                                          n.plan.zone for n in nodes)}},
                         "spec": _pod_spec(d, first, zone_spread=len(nodes) > 1)},
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": f"{d.volume_gib}Gi"}}}}],
        },
    }


def _service(d: Deployment, name: str, selector: dict[str, str], *, kind: str,
             headless: bool = False, affinity: bool = False) -> dict:
    spec: dict = {"selector": selector,
                  "ports": [{"name": "http", "port": HTTP_PORT, "targetPort": "http"}]}
    if kind in ("node", "headless"):
        spec["ports"].append({"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc"})
    if headless:
        spec |= {"clusterIP": "None", "publishNotReadyAddresses": True}
    if affinity:     # an upload continues on the node it started on
        spec["sessionAffinity"] = "ClientIP"
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(d, name, **{f"{LABEL}/endpoint": kind}), "spec": spec}


def services(d: Deployment) -> list[dict]:
    out = [_service(d, HEADLESS, {"app.kubernetes.io/name": "georeg"}, kind="headless",
                    headless=True)]
    # A node's own Service: its peers' address for it, ready or not (a starting
    # zone must reach its peers to form a quorum).
    out += [_service(d, n.name, {"statefulset.kubernetes.io/pod-name": n.pod}, kind="node",
                     headless=True) for n in d.nodes]
    for replica in d.spec.all_replicas:
        out.append(_service(d, f"regional-{replica.region}",
                            {f"{LABEL}/role": "node", f"{LABEL}/replica": replica.region},
                            kind="regional", affinity=True))
    for location in d.spec.client_locations:
        routed = d.routed_region(location)
        if routed:          # none: no replica has global routing, nothing to select
            out.append(_service(d, f"global-{location}",
                                {f"{LABEL}/role": "node", f"{LABEL}/replica": routed},
                                kind="global", affinity=True))
    return out


def config_map(d: Deployment) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(d, VIEWS),
            "data": {f"{n.pod}.json": d.view_json(n) for n in d.nodes}}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def secrets(d: Deployment, m: Materials) -> list[dict]:
    out = [{"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _meta(d, AUTH_SECRET),
            "data": {k: _b64(v) for k, v in m.auth_files().items()}}]
    if d.spec.needs_ca:
        for workload, nodes in d.workloads().items():
            data = {}
            for n in nodes:
                key, cert = m.node_keys[n.name]
                data |= {f"{n.pod}.key": _b64(key), f"{n.pod}.pem": _b64(cert)}
            out.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                        "metadata": _meta(d, f"keys-{workload}"), "data": data})
    return out


def disruption_budgets(d: Deployment) -> list[dict]:
    """Voluntary disruptions (drains, upgrades) never take a zone-redundant
    region below its write quorum."""
    out = []
    for replica in d.spec.all_replicas:
        if replica.zone_redundant:
            out.append({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
                        "metadata": _meta(d, f"quorum-{replica.region}"),
                        "spec": {"minAvailable": replica.write_quorum, "selector": {
                            "matchLabels": {f"{LABEL}/workload": replica.region}}}})
    return out


def network_policies(d: Deployment) -> list[dict]:
    """Residency at the network level, per confined region, as defence in depth
    behind the nodes' own per-RPC residency checks (a confined digest is refused
    and filtered from event streams). The region's nodes admit their own nodes,
    clients that are no georeg node on HTTP, and other regions' nodes on gRPC
    only: the views make every node a reader of its peers (tombstones are
    collected once every reader has read past them; replication status asks
    every allowed region), and the nodes answer those readers without
    confined content. No other region's node reaches their HTTP port. They may
    call other regions' nodes only on gRPC (to pull what those hold), plus DNS."""
    out = []
    georeg_pods = {"matchExpressions": [{"key": f"{LABEL}/role", "operator": "In",
                                         "values": ["node", "copy"]}]}
    for region in confined_regions(d):
        own = {"podSelector": {"matchLabels": {f"{LABEL}/replica": region}}}
        clients = {"namespaceSelector": {}, "podSelector": {"matchExpressions": [
            {"key": f"{LABEL}/role", "operator": "NotIn", "values": ["node", "copy"]}]}}
        grpc = [{"protocol": "TCP", "port": GRPC_PORT}]
        ingress = [{"from": [own]},
                   {"from": [clients], "ports": [{"protocol": "TCP", "port": HTTP_PORT}]},
                   {"from": [{"podSelector": georeg_pods}], "ports": grpc}]
        egress = [{"to": [own]},
                  {"to": [{"podSelector": georeg_pods}], "ports": grpc},
                  {"to": [{"namespaceSelector": {}}],
                   "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]
        out.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": _meta(d, f"residency-{region}"),
                    "spec": {"podSelector": {"matchLabels": {f"{LABEL}/replica": region,
                                                             f"{LABEL}/role": "node"}},
                             "policyTypes": ["Ingress", "Egress"],
                             "ingress": ingress, "egress": egress}})
    return out


def kind_cluster(d: Deployment) -> dict:
    """A kind cluster with one worker per zone the widest region needs."""
    zones = max(len(nodes) for nodes in d.workloads().values())
    workers = [{"role": "worker", "labels": {ZONE_KEY: f"zone-{i + 1}"}} for i in range(zones)]
    return {"kind": "Cluster", "apiVersion": "kind.x-k8s.io/v1alpha4",
            "nodes": [{"role": "control-plane"}, *workers]}


def manifests(d: Deployment, m: Materials) -> list[dict]:
    """Every object, in the order they are applied."""
    namespace = {"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": d.namespace, "labels": {"app.kubernetes.io/name": "georeg"}}}
    return [namespace, *secrets(d, m), config_map(d), *services(d),
            *(statefulset(d, nodes) for nodes in d.workloads().values()),
            *disruption_budgets(d), *network_policies(d)]


def dump(obj: dict) -> str:
    return json.dumps(obj, indent=2) + "\n"


def _dump(obj: dict) -> bytes:
    return dump(obj).encode()


def write(d: Deployment, m: Materials, out: Path) -> list[Path]:
    """The manifests under ``out`` (Secrets 0600: they hold keys), the WAN as
    Chaos Mesh under ``out/chaos-mesh``, kind's cluster under ``out/kind``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    objects = manifests(d, m)
    width = max(2, len(str(len(objects) - 1)))      # name order is apply order
    for i, obj in enumerate(objects):
        path = out / f"{i:0{width}d}-{obj['kind'].lower()}-{obj['metadata']['name']}.json"
        if obj["kind"] == "Secret":
            write_private(path, _dump(obj))
        else:
            path.write_bytes(_dump(obj))
        written.append(path)
    (out / "chaos-mesh").mkdir(exist_ok=True)
    for obj in chaosmesh.wan(d):
        path = out / "chaos-mesh" / f"{obj['metadata']['name']}.json"
        path.write_bytes(_dump(obj))
        written.append(path)
    (out / "kind").mkdir(exist_ok=True)
    (out / "kind" / "cluster.json").write_bytes(_dump(kind_cluster(d)))
    written.append(out / "kind" / "cluster.json")
    return written
