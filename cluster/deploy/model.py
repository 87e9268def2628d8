"""What every deployment target renders from: the one-machine cluster's plan,
re-addressed for hosts of their own.

A ``Deployment`` is built from the spec and its plan (``cluster.control.plan``):
the same nodes, regions, zones, paired-region copies, views and WAN model as
``georeg up`` runs. Only addresses change: every node listens on the same
ports (``HTTP_PORT``, ``GRPC_PORT``) on its own host, and reaches each peer
at that peer's own DNS name (``Deployment.host``), where the one-machine
cluster puts a georeg WAN link on loopback. Nothing here decides a node,
a zone or a latency the plan has not decided.

Access material (the cluster CA, each node's key and certificate, the
internal and owner credentials, the configuration key) is never part of the
output's source: ``materials`` makes it under a directory of the user's
(``--secrets-dir``; made at first render, reused after, every key 0600), with
certificates naming the hosts the deployment gives each node.

Invariants: a node's Service name is its plan name (``eastus-1``,
``pair-eastus``), so views, certificates and Chaos Mesh selectors agree; a
zone-redundant region's nodes are one workload whose pod ordinals are their
zones (from 1), so pod ``eastus-1`` is node ``eastus-1``; a workload of one
node (a region without zones, a paired copy) has pod ``<name>-0``. Which
Kubernetes zone holds georeg's zone 1 is the scheduler's choice (the
anti-affinity only keeps the zones apart).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

import msgspec

from replicator.topology import ClusterView

from ..bench import footprint
from ..control import spec as specs
from ..control.access import kept_key, kept_secret
from ..control.ca import ClusterCA
from ..control.plan import ClusterPlan, NodePlan, node_arguments, plan
from ..control.regions import REGIONS
from ..control.spec import ClusterSpec
from ..routing.policy import distance

HTTP_PORT = 5000
GRPC_PORT = 6000
# The image's contract (branch ``image``, docs/image.md): entrypoint
# ``/usr/local/bin/georeg node``, so a container gives only the node's
# arguments (``node_args``); user and group 10001; its volume ``/data``; no shell.
IMAGE_ENTRYPOINT = ("/usr/local/bin/georeg", "node")
IMAGE_UID = 10001
DATA_PATH = "/data"                    # the node's data dir: its volume (the image's)
VIEW_PATH = "/etc/georeg/views"        # one view file per node, named after it
AUTH_PATH = "/etc/georeg/auth"         # CA, internal credential, configuration key
NODE_KEYS_PATH = "/etc/georeg/node"    # each node's key and certificate, named after it
# The key installer an init container runs (the image has Python, no shell):
# each argument pair SRC DST copies SRC (a file, or a Secret volume's or a
# directory's files; none when SRC is empty) into directory DST, made if need
# be, each copy mode 0600. Run as the node's user (Kubernetes) the copies are
# its; run as root (compose), GEOREG_KEYS_OWNER=uid:gid gives DST and the
# copies to the node's user.
INSTALL_KEYS = "\n".join([
    "import os, shutil, sys",
    "owner = os.environ.get('GEOREG_KEYS_OWNER')",
    "own = (lambda p: os.chown(p, *map(int, owner.split(':')))) if owner else (lambda p: None)",
    "a = sys.argv[1:]",
    "for src, dst in zip(a[::2], a[1::2]):",
    "    os.makedirs(dst, exist_ok=True)",
    "    own(dst)",
    "    names = [] if not src else sorted(f for f in os.listdir(src) if not f.startswith('.'))"
    " if os.path.isdir(src) else [None]",
    "    for f in names:",
    "        s = os.path.join(src, f) if f else src",
    "        t = os.path.join(dst, os.path.basename(s))",
    "        shutil.copyfile(s, t)",
    "        os.chmod(t, 0o600)",
    "        own(t)",
])
INTERNAL_SECRET = "internal.secret"    # under AUTH_PATH
LABEL = "georeg.io"
DEFAULT_NAMESPACE = "georeg"
DEFAULT_VOLUME_GIB = 10                # when the spec sets no storage_limit
DEFAULT_IMAGE = f"georeg:{metadata.version('georeg')}"   # what `make image` tags

# Requests from the measured footprint (cluster.bench.footprint): memory the
# worst resident set seen, rounded up to 16 MiB; CPU a node's share of the
# idle cluster, at least 50 millicores (startup imports take ~0.7 CPU-s).
MEMORY_REQUEST_MIB = 16 * math.ceil(footprint.MEASURED_NODE_RSS_MIB / 16)
MEMORY_LIMIT_MIB = 4 * MEMORY_REQUEST_MIB   # blob transfers buffer in memory for a while
CPU_REQUEST_M = max(50, math.ceil(1000 * footprint.MEASURED_CLUSTER_IDLE_CPU
                                  / footprint.MEASURED_CLUSTER_PROCESSES))


class DeployError(ValueError):
    """A spec or scenario that cannot be rendered, saying why."""


@dataclass(frozen=True, slots=True)
class Node:
    plan: NodePlan
    workload: str          # the StatefulSet / group: the replica region, or the copy's name
    ordinal: int           # its pod's ordinal: its zone (ordinals start at 1), or 0 alone

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def pod(self) -> str:
        return f"{self.workload}-{self.ordinal}"

    @property
    def role(self) -> str:
        return "copy" if self.plan.copy_of else "node"

    @property
    def replica(self) -> str:
        """The replica region whose content it holds (a copy's: the region it keeps)."""
        return self.plan.copy_of or self.plan.region


@dataclass(frozen=True, slots=True)
class Deployment:
    spec: ClusterSpec
    plan: ClusterPlan
    namespace: str
    image: str
    host: Callable[[str], str]       # node name -> the DNS name peers reach it at

    @property
    def nodes(self) -> list[Node]:
        ordinals: dict[str, int] = {}
        out = []
        for node in self.plan.all_nodes:
            workload = node.name if node.copy_of else node.region
            # zone-redundant workloads count from 1, so a pod is named as its node
            out.append(Node(node, workload, ordinals.setdefault(workload, 1 if node.zone else 0)))
            ordinals[workload] += 1
        return out

    def workloads(self) -> dict[str, list[Node]]:
        groups: dict[str, list[Node]] = {}
        for node in self.nodes:
            groups.setdefault(node.workload, []).append(node)
        return groups

    @property
    def regions(self) -> list[str]:
        """Every region a node runs in (replicas and paired copies), in plan order."""
        return list(dict.fromkeys(n.plan.region for n in self.nodes))

    def view(self, node: Node) -> ClusterView:
        """The plan's view of ``node``, with each peer at its own host."""
        view = self.plan.view(node.plan, self.spec.replication.settings())
        scheme = self.spec.scheme
        peers = tuple(msgspec.structs.replace(
            p, grpc=f"{self.host(p.name)}:{GRPC_PORT}",
            http=f"{scheme}://{self.host(p.name)}:{HTTP_PORT}") for p in view.peers)
        return msgspec.structs.replace(view, peers=peers, grpc_listen=f"0.0.0.0:{GRPC_PORT}")

    def view_json(self, node: Node) -> str:
        return msgspec.json.format(msgspec.json.encode(self.view(node))).decode()

    def routed_region(self, location: str) -> str | None:
        """The replica a global endpoint for ``location`` routes to while all are
        healthy, ranked as global routing ranks (``cluster.routing.policy.distance``
        over the WAN model); None when no replica has global routing (the
        endpoint routes nowhere, as on one machine)."""
        nearest = distance(location, self.spec.wan_model().one_way_ms)
        routed = sorted((r.region for r in self.spec.all_replicas if r.global_routing),
                        key=nearest)
        return routed[0] if routed else None

    @property
    def volume_gib(self) -> int:
        limit = self.spec.limits.storage_limit_bytes
        if limit is None:
            return DEFAULT_VOLUME_GIB
        return max(1, math.ceil(2 * limit / 2**30))   # twice the limit: uploads in flight, RocksDB

    def node_args(self, node: Node, node_file: str) -> list[str]:
        """``georeg node``'s arguments for ``node`` (after the image's entrypoint,
        ``IMAGE_ENTRYPOINT``, which names the ``node`` command): the plan's
        command line (``cluster.control.plan.node_arguments``) with its files at
        this deployment's mounts, named by ``node_file`` as the target spells the
        node's name (``$(POD_NAME)`` or literal). The internal credential is
        given on every cluster, auth or not: Services forward every path, so
        the internal routes must be closed to callers without it."""
        files = {"data_dir": Path(DATA_PATH), "view_file": Path(VIEW_PATH) / f"{node_file}.json"}
        key, cert = (Path(NODE_KEYS_PATH) / f"{node_file}.{x}" for x in ("key", "pem"))
        ca, internal = Path(AUTH_PATH) / "ca.pem", Path(AUTH_PATH) / INTERNAL_SECRET
        p = node.plan
        if p.access is not None:
            files["access"] = replace(p.access, ca_file=ca, key_file=key, cert_file=cert,
                                      internal_credential_file=internal)
        if p.tls is not None:
            files["tls"] = replace(p.tls, ca_file=ca, key_file=key, cert_file=cert)
        if p.configuration_key is not None:
            files["configuration_key"] = Path(AUTH_PATH) / "configuration.key"
        args = node_arguments(replace(p, **files), f"0.0.0.0:{HTTP_PORT}")
        if p.access is None:
            args += ["--internal-credential-file", str(internal)]
        return args

    def health_command(self) -> list[str]:
        """A command run inside a node's container that succeeds when the node
        answers its health route (with the internal credential, trusting only the cluster CA on a TLS one)."""
        from registry_node.api.middlewares import HEALTH_PATH

        url = f"{self.spec.scheme}://127.0.0.1:{HTTP_PORT}{HEALTH_PATH}"
        code = ["import ssl, sys, urllib.request as u",
                f"h = {{'Authorization': 'Bearer ' + open('{AUTH_PATH}/{INTERNAL_SECRET}')"
                f".read().strip()}}",
                f"c = ssl.create_default_context(cafile='{AUTH_PATH}/ca.pem')"
                if self.spec.tls else "c = None",
                f"r = u.urlopen(u.Request('{url}', headers=h), timeout=2, context=c)",
                "sys.exit(r.status != 200)"]
        return ["python3", "-c", "; ".join(code)]


def deployment(spec: ClusterSpec, *, namespace: str, image: str,
               host: Callable[[str], str]) -> Deployment:
    if spec.seed is None:
        spec = spec.seeded(0)       # links' draws: no link is rendered, any seed will do
    if spec.network.port_base == specs.ANY_PORT_BASE:
        spec = spec.with_port_base(5000)
    return Deployment(spec, plan(spec, Path(DATA_PATH)), namespace, image, host)


# -- access material -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Materials:
    ca_pem: bytes
    node_keys: dict[str, tuple[bytes, bytes]]    # node -> (key PEM, certificate PEM)
    internal: bytes
    owner: bytes                                 # the owner's: never mounted into a node
    configuration_key: bytes

    def auth_files(self) -> dict[str, bytes]:
        """What every node reads from ``AUTH_PATH``."""
        files = {INTERNAL_SECRET: self.internal, "configuration.key": self.configuration_key}
        if self.ca_pem:
            files["ca.pem"] = self.ca_pem
        return files


def materials(d: Deployment, directory: Path, hosts: Callable[[Node], tuple[str, ...]]) -> Materials:
    """The deployment's access material under ``directory``: made there at the
    first render (keys 0600, the directory 0700), reused at every later one, so
    a re-render does not rotate what a running deployment uses."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys: dict[str, tuple[bytes, bytes]] = {}
    ca_pem = b""
    if d.spec.needs_ca:
        ca = ClusterCA.open(directory / "ca", d.spec.registry)
        for node in d.nodes:
            issued = ca.node_certificate(node.name, node.plan.region, node.plan.zone, hosts(node))
            keys[node.name] = (issued.key_file.read_bytes(), issued.cert_file.read_bytes())
        ca_pem = ca.cert_file.read_bytes()

    def token(name: str) -> bytes:
        return (kept_secret(directory / name) + "\n").encode()

    return Materials(ca_pem, keys, token(INTERNAL_SECRET), token("owner.secret"),
                     kept_key(directory / "configuration.key"))


def confined_regions(d: Deployment) -> list[str]:
    """Regions of this deployment whose content residency keeps in the region."""
    policy = d.spec.residency_policy()
    return [r.region for r in d.spec.all_replicas if policy.confined(r.region, "")]


def region_display(region: str) -> str:
    return REGIONS[region].display
