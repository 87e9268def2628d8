"""`georeg deploy`: Kubernetes manifests, Chaos Mesh resources and the compose
file, rendered from the default spec and checked offline — against the
Kubernetes OpenAPI schemas (kubernetes-validate), Chaos Mesh's CRD schemas
(tests/data/chaos_mesh_schema.json) and `docker-compose config` — and for
what they mean: volumes, zones, residency, the WAN's delays."""

from __future__ import annotations

import json
import re
import stat
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest

from cluster.cli.main import main
from cluster.control import spec as specs
from cluster.deploy import chaosmesh, kubernetes
from cluster.deploy.model import DATA_PATH, GRPC_PORT, HTTP_PORT, DeployError, deployment
from cluster.faults.chaos import SCENARIOS, Scenario, load

KUBERNETES_RELEASE = "1.37"        # the newest release kubernetes-validate 1.37 bundles
CHAOS_SCHEMA = json.loads((Path(__file__).parent / "data" / "chaos_mesh_schema.json").read_text())
RENDERED = ("zone-outage", "europe-americas-partition", "slow-transoceanic-link",
            "home-region-crash")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("deploy")
    secrets = ["--secrets-dir", str(root / "secrets")]
    assert main(["deploy", "kubernetes", "-o", str(root / "k8s"), *secrets]) == 0
    assert main(["deploy", "compose", "-o", str(root / "compose" / "compose.yaml"), *secrets]) == 0
    for name in RENDERED:
        assert main(["deploy", "chaos", "--scenario", name, "-o", str(root / "chaos")]) == 0
    objects = [json.loads(p.read_text()) for p in sorted((root / "k8s").glob("*.json"))]
    return {"root": root, "objects": objects,
            "wan": [json.loads(p.read_text()) for p in (root / "k8s" / "chaos-mesh").glob("*.json")],
            "workflows": [json.loads(p.read_text()) for p in (root / "chaos").glob("*.json")]}


def of_kind(rendered: dict, kind: str) -> list[dict]:
    return [o for o in rendered["objects"] if o["kind"] == kind]


def test_manifests_validate_against_the_kubernetes_schemas(rendered):
    assert len(rendered["objects"]) > 30
    for obj in rendered["objects"]:
        kubernetes_validate.validate(obj, KUBERNETES_RELEASE, strict=True)


def test_every_node_has_a_volume(rendered):
    plan_nodes = deployment(specs.load(None), namespace="georeg", image="x",
                            host=str).plan.all_nodes
    sets = of_kind(rendered, "StatefulSet")
    assert sum(s["spec"]["replicas"] for s in sets) == len(plan_nodes) == 10
    for s in sets:
        assert [c["metadata"]["name"] for c in s["spec"]["volumeClaimTemplates"]] == ["data"]
        mounts = s["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        assert {"name": "data", "mountPath": DATA_PATH} in mounts


def test_probes_ask_the_health_route_and_requests_come_from_the_footprint(rendered):
    from cluster.bench import footprint
    from registry_node.api.middlewares import HEALTH_PATH

    for s in of_kind(rendered, "StatefulSet"):
        node = s["spec"]["template"]["spec"]["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert HEALTH_PATH in node[probe]["exec"]["command"][-1], probe
        memory = int(node["resources"]["requests"]["memory"].removesuffix("Mi"))
        assert footprint.MEASURED_NODE_RSS_MIB <= memory < footprint.MEASURED_NODE_RSS_MIB + 16


def test_zone_replicas_land_in_distinct_zones(rendered):
    zone_redundant = [r.region for r in specs.load(None).all_replicas if r.zone_redundant]
    sets = {s["metadata"]["name"]: s for s in of_kind(rendered, "StatefulSet")}
    for region in zone_redundant:
        s = sets[region]["spec"]
        assert s["replicas"] == len(specs.ZONES)
        terms = s["template"]["spec"]["affinity"]["podAntiAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]
        assert [t["topologyKey"] for t in terms] == [kubernetes.ZONE_KEY]
        # the anti-affinity selects the set's own pods: no two of them share a zone
        labels = s["template"]["metadata"]["labels"]
        assert terms[0]["labelSelector"]["matchLabels"].items() <= labels.items()
        budget = next(b for b in of_kind(rendered, "PodDisruptionBudget")
                      if b["spec"]["selector"]["matchLabels"].items() <= labels.items())
        assert budget["spec"]["minAvailable"] == specs.ZONE_WRITE_QUORUM
    kind = json.loads((rendered["root"] / "k8s" / "kind" / "cluster.json").read_text())
    zones = {n["labels"][kubernetes.ZONE_KEY] for n in kind["nodes"] if "labels" in n}
    assert len(zones) == len(specs.ZONES)


# -- NetworkPolicy semantics, evaluated as Kubernetes does for one namespace --


def _selects(selector: dict, labels: dict) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for e in selector.get("matchExpressions", []):
        present = e["key"] in labels
        if e["operator"] == "In" and not (present and labels[e["key"]] in e["values"]):
            return False
        if e["operator"] == "NotIn" and present and labels[e["key"]] in e["values"]:
            return False
    return True


def _admits(rules: list[dict], side: str, peer: dict, port: int) -> bool:
    for rule in rules:
        peers = rule.get(side, [])
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        if not peers or any(_selects(p.get("podSelector", {}), peer) for p in peers):
            return True
    return False


def allowed(policies: list[dict], source: dict, target: dict, port: int) -> bool:
    """Whether a TCP connection from a pod labelled ``source`` to one labelled
    ``target`` on ``port`` is allowed: each end's selecting policies must admit it."""
    egress = [p for p in policies if "Egress" in p["spec"]["policyTypes"]
              and _selects(p["spec"]["podSelector"], source)]
    ingress = [p for p in policies if "Ingress" in p["spec"]["policyTypes"]
               and _selects(p["spec"]["podSelector"], target)]
    return (not egress or any(_admits(p["spec"]["egress"], "to", target, port) for p in egress)) \
        and (not ingress or any(_admits(p["spec"]["ingress"], "from", source, port)
                                for p in ingress))


def test_brazil_south_policy_denies_content_egress_to_other_regions(rendered):
    policies = of_kind(rendered, "NetworkPolicy")
    pods = {s["metadata"]["name"]: s["spec"]["template"]["metadata"]["labels"]
            for s in of_kind(rendered, "StatefulSet")}
    brazil = pods["brazilsouth"]
    assert any(_selects(p["spec"]["podSelector"], brazil) for p in policies)
    client = {"app": "ci-runner"}
    for other in ("eastus", "westeurope", "southeastasia", "pair-eastus"):
        for port in (HTTP_PORT, GRPC_PORT):   # content leaves only in answers: to callers
            assert not allowed(policies, pods[other], brazil, port), (other, port)
        assert not allowed(policies, brazil, pods[other], HTTP_PORT), other
        # it pulls what unconfined regions hold; Southeast Asia, confined too, admits no one
        assert allowed(policies, brazil, pods[other], GRPC_PORT) == (other != "southeastasia")
    assert allowed(policies, client, brazil, HTTP_PORT)
    assert not allowed(policies, client, brazil, GRPC_PORT)
    assert allowed(policies, pods["eastus"], pods["westeurope"], GRPC_PORT)  # unconfined: open


# -- Chaos Mesh ---------------------------------------------------------------------


def check_schema(value, schema: dict, where: str) -> None:
    """Chaos Mesh's CRD schema, as much as these resources use: types, required
    fields, enums, patterns, and no field the CRD does not have."""
    kind = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int}
    if kind:
        assert isinstance(value, types[kind]) and not (kind == "integer" and
                                                      isinstance(value, bool)), where
    if "enum" in schema:
        assert value in schema["enum"], (where, value)
    if "pattern" in schema:
        assert re.search(schema["pattern"], value), (where, value)
    if isinstance(value, dict):
        for field in schema.get("required", []):
            assert field in value, f"{where}: {field} missing"
        props = schema.get("properties")
        for key, item in value.items():
            if props is not None:
                assert key in props, f"{where}: no field {key!r} in the CRD"
                check_schema(item, props[key], f"{where}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                check_schema(item, schema["additionalProperties"], f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            check_schema(item, schema["items"], f"{where}[{i}]")


def check_chaos(obj: dict) -> None:
    assert obj["apiVersion"] == CHAOS_SCHEMA["apiVersion"]
    if obj["kind"] != "Workflow":
        check_schema(obj["spec"], CHAOS_SCHEMA["kinds"][obj["kind"]], obj["kind"])
        return
    workflow = CHAOS_SCHEMA["workflow"]
    assert set(obj["spec"]) <= set(workflow["properties"])
    assert all(field in obj["spec"] for field in workflow["required"])
    names = [t["name"] for t in obj["spec"]["templates"]]
    assert obj["spec"]["entry"] in names and len(set(names)) == len(names)
    template = workflow["template"]
    for t in obj["spec"]["templates"]:
        assert t["templateType"] in workflow["templateTypes"]
        assert set(t.get("children", [])) <= set(names)
        for key, value in t.items():
            if key in template["embedded"]:
                check_schema(value, CHAOS_SCHEMA["kinds"][template["embedded"][key]], t["name"])
            else:
                check_schema(value, template["properties"][key], f"{t['name']}.{key}")


def test_chaos_mesh_resources_have_the_crds_fields(rendered):
    assert len(rendered["wan"]) == 6 * 5          # ordered pairs of the six regions with nodes
    assert len(rendered["workflows"]) == len(RENDERED)
    for obj in rendered["wan"] + rendered["workflows"]:
        check_chaos(obj)


def test_a_field_chaos_mesh_lacks_is_caught(rendered):
    bad = json.loads(json.dumps(rendered["wan"][0]))
    bad["spec"]["delay"]["latencyy"] = "1ms"
    with pytest.raises(AssertionError, match="latencyy"):
        check_chaos(bad)


def test_wan_delay_east_us_west_europe_is_the_models(rendered):
    model = specs.load(None).wan_model()
    for a, b in (("eastus", "westeurope"), ("westeurope", "eastus")):
        chaos = next(o for o in rendered["wan"] if o["metadata"]["name"] == f"wan-{a}-to-{b}")
        assert chaos["spec"]["selector"]["labelSelectors"] == {"georeg.io/region": a}
        assert chaos["spec"]["target"]["selector"]["labelSelectors"] == {"georeg.io/region": b}
        latency = float(chaos["spec"]["delay"]["latency"].removesuffix("ms"))
        assert latency == pytest.approx(model.link(a, b).latency_ms, abs=0.001)
        assert latency == pytest.approx(40, abs=1)     # the module's calibration: 80 ms RTT


def test_scenario_faults_become_their_chaos_mesh_kinds(rendered):
    flows = {w["metadata"]["name"]: w["spec"]["templates"] for w in rendered["workflows"]}
    by_type = {name: {t["templateType"] for t in ts} for name, ts in flows.items()}
    assert {"PodChaos", "NetworkChaos"} <= by_type["zone-outage"]          # crash, isolate
    partition = [t for t in flows["europe-americas-partition"] if "networkChaos" in t]
    assert {t["networkChaos"]["action"] for t in partition} == {"partition"}
    assert all(t["deadline"] == "20s" for t in partition)
    wait = next(t for t in flows["europe-americas-partition"] if t["templateType"] == "Suspend")
    assert wait["deadline"] == "8s"
    d = deployment(specs.load(None), namespace="georeg", image="x", host=str)
    disk = chaosmesh.workflow(d, Scenario(name="disk", steps=(
        {"at_s": 3, "fault": "disk", "region": "westeurope", "zone": "2", "eio": "write",
         "probability": 0.5, "duration_s": 10},)))
    check_chaos(disk)
    io = next(t["ioChaos"] for t in disk["spec"]["templates"] if "ioChaos" in t)
    assert (io["errno"], io["percent"], io["methods"]) == (chaosmesh.EIO, 50, ["WRITE"])
    assert io["selector"]["pods"] == {"georeg": ["westeurope-1"]}      # zone 2: ordinal 1


def test_a_fault_chaos_mesh_cannot_express_is_refused_by_name():
    d = deployment(specs.load(None), namespace="georeg", image="x", host=str)
    with pytest.raises(DeployError, match="'routing' has no Chaos Mesh equivalent"):
        chaosmesh.workflow(d, load(SCENARIOS / "routing-maintenance.toml"))


# -- compose and access material ------------------------------------------------------


def test_compose_file_passes_docker_compose_config(rendered):
    compose = rendered["root"] / "compose" / "compose.yaml"
    result = subprocess.run(["docker-compose", "-f", str(compose), "config", "-q"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    services = json.loads(compose.read_text())["services"]
    assert len(services) == 10
    for name, service in services.items():
        assert f"{name}-data:{DATA_PATH}" in service["volumes"]
        assert service["healthcheck"]["test"][0] == "CMD"


def test_access_material_is_private_and_stable(rendered, tmp_path):
    root = rendered["root"]
    for path in [*(root / "k8s").glob("*-secret-*.json"), *(root / "secrets").rglob("*.key"),
                 *(root / "compose" / "georeg-secrets").rglob("*.secret")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    before = json.loads(next((root / "k8s").glob("*-secret-georeg-auth.json")).read_text())
    assert main(["deploy", "kubernetes", "-o", str(tmp_path), "--secrets-dir",
                 str(root / "secrets")]) == 0
    after = json.loads(next(tmp_path.glob("*-secret-georeg-auth.json")).read_text())
    assert after["data"] == before["data"]        # a re-render does not rotate them
