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
import sys
from pathlib import Path

import kubernetes_validate
import msgspec
import pytest

from cluster.cli.main import main
from cluster.control import spec as specs
from cluster.deploy import chaosmesh, kubernetes
from cluster.deploy import compose as compose_format
from cluster.deploy.model import (
    DATA_PATH,
    GRPC_PORT,
    HTTP_PORT,
    IMAGE_ENTRYPOINT,
    IMAGE_UID,
    INSTALL_KEYS,
    DeployError,
    deployment,
)
from cluster.faults.chaos import SCENARIOS, Scenario, load

# the newest release the installed kubernetes-validate bundles (>= 1.37, pyproject;
# the manifests need >= 1.31 for StatefulSet ordinals)
KUBERNETES_RELEASE = kubernetes_validate.latest_version()
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


def _pod_labels(d, node) -> dict:
    return {"app.kubernetes.io/name": "georeg", **kubernetes.node_labels(node),
            "statefulset.kubernetes.io/pod-name": node.pod}


def test_brazil_south_policy_keeps_http_closed_and_the_views_readers_open(rendered):
    policies = of_kind(rendered, "NetworkPolicy")
    d = deployment(specs.load(None), namespace="georeg", image="x", host=str)
    pods = {n.name: _pod_labels(d, n) for n in d.nodes}
    brazil = pods["brazilsouth"]
    assert any(_selects(p["spec"]["podSelector"], brazil) for p in policies)
    client = {"app": "ci-runner"}
    for other in ("eastus-1", "westeurope-2", "southeastasia", "pair-eastus"):
        # no other region's node reaches its HTTP port, nor it theirs
        assert not allowed(policies, pods[other], brazil, HTTP_PORT), other
        assert not allowed(policies, brazil, pods[other], HTTP_PORT), other
    assert allowed(policies, client, brazil, HTTP_PORT)
    assert not allowed(policies, client, brazil, GRPC_PORT)
    # Every subscription the views make is admitted: a node reads each of its
    # peers (the nodes keep confined content in; retention and replication
    # status need every reader connected).
    for node in d.nodes:
        for peer in d.view(node).peers:
            assert allowed(policies, pods[node.name], pods[peer.name], GRPC_PORT), \
                (node.name, peer.name)


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
    assert (io["errno"], io["percent"], io["methods"]) == (chaosmesh.EIO, 50, ["write"])
    assert io["selector"]["pods"] == {"georeg": ["westeurope-2"]}      # zone 2: the node's name


def embedded(workflow: dict) -> list[dict]:
    return [t[key] for t in workflow["spec"]["templates"]
            for key in ("podChaos", "networkChaos", "ioChaos") if key in t]


def test_no_chaos_in_a_workflow_carries_a_duration(rendered):
    # Chaos Mesh's workflow webhook refuses one: the template's deadline bounds it
    d = deployment(specs.load(None), namespace="georeg", image="x", host=str)
    disk = chaosmesh.workflow(d, Scenario(name="disk", steps=(
        {"at_s": 1, "fault": "disk", "region": "eastus", "full": True, "duration_s": 5},)))
    flows = [*rendered["workflows"], disk]
    assert len([c for w in flows for c in embedded(w)]) >= 6
    for w in flows:
        for chaos in embedded(w):
            assert "duration" not in chaos, w["metadata"]["name"]


def test_rates_are_the_models_megabits_in_kilobits(rendered):
    model = specs.load(None).wan_model()
    chaos = next(o for o in rendered["wan"] if o["metadata"]["name"] == "wan-eastus-to-westeurope")
    # Chaos Mesh: "bps means bytes per second"; kbit is 1000 bits
    assert chaos["spec"]["rate"]["rate"] == f"{round(model.link('eastus', 'westeurope').bandwidth_mbps * 1000)}kbit"
    assert chaosmesh.rate(2.5) == "2500kbit"
    assert chaosmesh.rate(1e6) == "1000000000kbit"


def _chaos_selects(selector: dict, labels: dict) -> bool:
    return _selects({"matchLabels": selector.get("labelSelectors", {}),
                     "matchExpressions": selector.get("expressionSelectors", [])}, labels)


def test_an_isolated_zone_is_cut_from_its_sibling_zones_and_other_regions(rendered):
    d = deployment(specs.load(None), namespace="georeg", image="x", host=str)
    pods = {n.name: _pod_labels(d, n) for n in d.nodes}
    flow = next(w for w in rendered["workflows"] if w["metadata"]["name"] == "zone-outage")
    cut = next(c for c in embedded(flow) if c.get("action") == "partition")
    isolated = cut["selector"]["pods"]["georeg"]
    assert len(isolated) == 1 and cut["direction"] == "both"
    for name, labels in pods.items():
        expected = labels["statefulset.kubernetes.io/pod-name"] not in isolated
        assert _chaos_selects(cut["target"]["selector"], labels) == expected, name
    assert _chaos_selects(cut["target"]["selector"], {"app": "ci-runner"})    # clients too


def test_a_slowed_link_adds_to_the_wan_in_one_chaos_per_direction(rendered):
    model = specs.load(None).wan_model()
    flow = next(w for w in rendered["workflows"]
                if w["metadata"]["name"] == "slow-transoceanic-link")
    chaos = embedded(flow)
    assert len(chaos) == 2 and {c["action"] for c in chaos} == {"netem"}
    for c in chaos:
        a = c["selector"]["labelSelectors"]["georeg.io/region"]
        b = c["target"]["selector"]["labelSelectors"]["georeg.io/region"]
        link = model.link(a, b)
        assert float(c["delay"]["latency"].removesuffix("ms")) == pytest.approx(
            link.latency_ms + 150, abs=0.001)
        assert c["rate"]["rate"] == chaosmesh.rate(min(20, link.bandwidth_mbps or 20))


def test_bad_scenarios_are_refused_with_a_reason():
    d = deployment(specs.load(None), namespace="georeg", image="x", host=str)
    bad = {"name": ("My_Scenario", {"fault": "region-outage", "region": "eastus"}, "object name"),
           "region": ("s", {"fault": "region-outage", "region": "japaneast"}, "japaneast"),
           "percent": ("s", {"fault": "disk", "region": "eastus", "eio": "read",
                             "probability": 0.001, "duration_s": 1}, "whole percents")}
    for name, step, message in bad.values():
        with pytest.raises(DeployError, match=message):
            chaosmesh.workflow(d, Scenario(name=name, steps=({"at_s": 1, **step},)))


def test_a_fault_chaos_mesh_cannot_express_is_refused_by_name():
    d = deployment(specs.load(None), namespace="georeg", image="x", host=str)
    with pytest.raises(DeployError, match="'routing' has no Chaos Mesh equivalent"):
        chaosmesh.workflow(d, load(SCENARIOS / "routing-maintenance.toml"))


# -- the image's contract and the keys ------------------------------------------------


def test_pods_run_the_images_entrypoint_and_install_keys_without_a_shell(rendered, tmp_path):
    for s in of_kind(rendered, "StatefulSet"):
        pod = s["spec"]["template"]["spec"]
        node, = pod["containers"]
        assert "command" not in node and node["args"][0] != IMAGE_ENTRYPOINT[-1]   # image: `georeg node`
        assert pod["securityContext"]["runAsUser"] == IMAGE_UID
        # a restart must not rewrite the node key's mode on its volume
        assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
        init, = pod["initContainers"]
        assert init["command"][:2] == ["python3", "-c"]
    # the init program, run here on a Secret volume's layout (..data symlinks)
    secret, node_keys, auth, keys = (tmp_path / n for n in ("secret", "nodes", "auth", "keys"))
    for folder in (secret / "..data", node_keys, auth, keys):
        folder.mkdir(parents=True)
    (secret / "..data" / "configuration.key").write_bytes(b"k" * 32)
    (secret / "configuration.key").symlink_to("..data/configuration.key")
    for name in ("eastus-0.key", "eastus-1.key"):
        (node_keys / name).write_text(name)
    subprocess.run([sys.executable, "-c", INSTALL_KEYS, str(secret), str(auth),
                    str(node_keys / "eastus-1.key"), str(keys)], check=True, timeout=30)
    assert sorted(p.name for p in auth.iterdir()) == ["configuration.key"]
    assert [p.name for p in keys.iterdir()] == ["eastus-1.key"]     # its own key only
    for path in (auth / "configuration.key", keys / "eastus-1.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and not path.is_symlink()


def test_bad_output_and_secrets_paths_are_errors_not_tracebacks(rendered, tmp_path, capsys):
    secrets = ["--secrets-dir", str(rendered["root"] / "secrets")]
    assert main(["deploy", "kubernetes", "-o", "/proc/georeg-nope", *secrets]) == 2
    assert "cannot use /proc/georeg-nope" in capsys.readouterr().err
    assert main(["deploy", "compose", "-o", str(tmp_path), *secrets]) == 2   # a directory
    assert f"cannot use {tmp_path}" in capsys.readouterr().err


# -- compose and access material ------------------------------------------------------


def test_compose_file_passes_docker_compose_config(rendered):
    compose = rendered["root"] / "compose" / "compose.yaml"
    result = subprocess.run(["docker-compose", "-f", str(compose), "config", "-q"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    services = json.loads(compose.read_text())["services"]
    install = services.pop(compose_format.INSTALL_SERVICE)
    assert len(services) == 10
    # the installer (root) fills volumes the nodes mount as the image's user
    installed = dict(zip(install["command"][1::2], install["command"][::2], strict=True))
    mounted = dict(reversed(v.split(":")[:2]) for v in install["volumes"])
    for name, service in services.items():
        assert f"{name}-data:{DATA_PATH}" in service["volumes"]
        assert service["healthcheck"]["test"][0] == "CMD"
        assert service["user"] == f"{IMAGE_UID}:{IMAGE_UID}" and install["user"] == "0:0"
        assert service["depends_on"] == {compose_format.INSTALL_SERVICE: {
            "condition": "service_completed_successfully"}}
        for volume in (v.split(":") for v in service["volumes"] if not v.startswith(".")):
            target = next(t for t, source in mounted.items() if source == volume[0])
            assert target in installed, volume       # made, and given to the node's user


def test_access_material_is_private_and_stable(rendered, tmp_path):
    root = rendered["root"]
    for path in [*(root / "k8s").glob("*-secret-*.json"), *(root / "secrets").rglob("*.key"),
                 *(root / "compose" / "georeg-secrets").rglob("*.secret")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    before = json.loads(next((root / "k8s").glob("*-secret-georeg-auth.json")).read_text())
    assert "owner.secret" not in before["data"]            # no node reads the owner's
    assert not list((root / "compose" / "georeg-secrets").rglob("owner.secret"))
    assert main(["deploy", "kubernetes", "-o", str(tmp_path), "--secrets-dir",
                 str(root / "secrets")]) == 0
    after = json.loads(next(tmp_path.glob("*-secret-georeg-auth.json")).read_text())
    assert after["data"] == before["data"]        # a re-render does not rotate them


@pytest.fixture(scope="module")
def open_tls(tmp_path_factory) -> dict:
    """A TLS cluster without auth, as the README's first try renders it."""
    root = tmp_path_factory.mktemp("open-tls")
    (root / "spec.toml").write_text('auth = "none"\ntls = true\n')
    assert main(["deploy", "kubernetes", "--config", str(root / "spec.toml"), "-o",
                 str(root / "k8s"), "--secrets-dir", str(root / "secrets")]) == 0
    return {"root": root, "objects": [json.loads(p.read_text())
                                      for p in sorted((root / "k8s").glob("*.json"))]}


def test_node_arguments_are_the_plans_and_close_internal_routes_without_auth(open_tls):
    sets = {s["metadata"]["name"]: s["spec"]["template"]["spec"]
            for s in of_kind(open_tls, "StatefulSet")}
    for name, pod in sets.items():
        node, = pod["containers"]
        assert "--auth-ca" not in node["args"]
        # Services forward every path: the internal routes want the credential
        assert "--internal-credential-file" in node["args"], name
        assert "Authorization" in node["readinessProbe"]["exec"]["command"][-1]
        # the plan gives a paired copy no configuration key, a serving node one
        assert ("--configuration-key-file" in node["args"]) == (not name.startswith("pair-")), name
    kubernetes_validate.validate(next(iter(of_kind(open_tls, "StatefulSet"))),
                                 KUBERNETES_RELEASE, strict=True)


def test_node_certificates_name_the_endpoint_services_that_reach_them(open_tls):
    from cryptography import x509

    def names(node: str) -> set[str]:
        pem = (open_tls["root"] / "secrets" / "ca" / "nodes" / node / "node.pem").read_bytes()
        san = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        return set(san.get_values_for_type(x509.DNSName))

    d = deployment(specs.load(open_tls["root"] / "spec.toml"), namespace="georeg",
                   image="x", host=str)
    routed = {loc: d.routed_region(loc) for loc in d.spec.client_locations}
    first = d.nodes[0].name
    east = names(first)
    assert {f"{first}.georeg.svc.cluster.local", "regional-eastus.georeg.svc.cluster.local",
            d.spec.login_server} <= east
    assert {f"global-{loc}.georeg.svc" for loc, r in routed.items() if r == "eastus"} <= east
    assert "eastus" in routed.values()
    assert "regional-eastus.georeg.svc" not in names("pair-eastus")   # a copy serves no one


def test_the_walkthroughs_spec_is_the_default_but_for_auth():
    # deploy/README.md renders it: the cluster the rest of the README describes
    first_try = specs.load(Path(__file__).parent.parent / "deploy" / "first-try.toml")
    assert first_try.auth == "none"
    assert msgspec.structs.replace(first_try, auth="token") == specs.load(None)
