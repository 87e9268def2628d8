"""The WAN model and the shipped fault scenarios as Chaos Mesh resources.

``wan``: one NetworkChaos per ordered pair of regions (``netem``: the WAN
model's one-way latency and jitter, and its bandwidth as a rate), on the
source region's pods towards the destination's, so each direction carries its
own modelled delay, as georeg's links do on one machine. Zones of one region
are not delayed (the cluster network stands for the region's).

``workflow``: a scenario (``cluster.faults.chaos``) as a Chaos Mesh Workflow:
its schedule resolved with its seed, each step a serial branch (a Suspend
until the step's time, then the fault for its duration) under one Parallel
entry. Faults map to what Chaos Mesh has: a crash or stop to PodChaos
``pod-failure`` (or ``pod-kill`` with no duration), isolation and partitions
to NetworkChaos ``partition`` (an isolated region or zone is cut from every
other pod of the namespace), a slowed link to one NetworkChaos ``netem`` per
direction carrying the WAN's delay plus the fault's and the lower bandwidth
(Chaos Mesh cannot stack two chaos on one packet), disk faults to IOChaos on the data volume. Kinds that live in
georeg's own seams (routing flags, throttling, HTTP faults at endpoints,
clock, bit rot, destroy) have no equivalent and are refused by name.
The resources' fields are Chaos Mesh's v1alpha1 CRDs', and follow its
webhooks: no ``duration`` inside a Workflow template (its deadline bounds
it), lower-case IOChaos methods, integer rates (``rate``).
"""

from __future__ import annotations

import random
import re

from ..faults.chaos import Scenario, schedule
from .model import DATA_PATH, LABEL, DeployError, Deployment

API = "chaos-mesh.org/v1alpha1"
EIO, ENOSPC = 5, 28
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
RENDERED_KINDS = ("region-outage", "zone-outage", "partition", "link", "disk")


def duration(seconds: float) -> str:
    return f"{max(seconds, 0.001):.3f}".rstrip("0").rstrip(".") + "s"


def millis(ms: float) -> str:
    return f"{ms:.3f}".rstrip("0").rstrip(".") + "ms"


def rate(mbps: float) -> str:
    """A georeg bandwidth (megabits per second) as a Chaos Mesh rate. Chaos Mesh
    reads ``bps``/``kbps``/``mbps`` as *bytes* per second (1024-based) and
    ``bit``/``kbit``/``mbit`` as bits (1000-based), and takes integers only, so
    the rate is written in whole kilobits: exact for every rate georeg models to
    the kilobit, fractional megabits included."""
    return f"{max(1, round(mbps * 1000))}kbit"


def _selector(d: Deployment, **labels: str) -> dict:
    return {"namespaces": [d.namespace],
            "labelSelectors": {f"{LABEL}/{k}": v for k, v in labels.items()}}


def _all_but(d: Deployment, pods: dict) -> dict:
    """Every pod of the namespace except those ``pods`` (a ``_pods`` selector)
    selects: what an isolated region or zone is cut from (its own region's
    other zones, other regions, and clients in the namespace), as one-machine
    isolation cuts every link to and from it."""
    if "pods" in pods:
        key, values = "statefulset.kubernetes.io/pod-name", pods["pods"][d.namespace]
    else:
        key, values = f"{LABEL}/replica", [pods["labelSelectors"][f"{LABEL}/replica"]]
    return {"namespaces": [d.namespace],
            "expressionSelectors": [{"key": key, "operator": "NotIn", "values": values}]}


def wan(d: Deployment) -> list[dict]:
    model = d.spec.wan_model()
    if not model.enabled:
        return []
    out = []
    for a in d.regions:
        for b in d.regions:
            if a == b:
                continue
            link = model.link(a, b)
            spec: dict = {"action": "netem", "mode": "all", "direction": "to",
                          "selector": _selector(d, region=a),
                          "target": {"mode": "all", "selector": _selector(d, region=b)},
                          "delay": {"latency": millis(link.latency_ms),
                                    "jitter": millis(link.jitter_ms)}}
            if link.bandwidth_mbps:
                spec["rate"] = {"rate": rate(link.bandwidth_mbps)}
            out.append({"apiVersion": API, "kind": "NetworkChaos",
                        "metadata": {"name": f"wan-{a}-to-{b}", "namespace": d.namespace,
                                     "labels": {f"{LABEL}/wan": "true"}},
                        "spec": spec})
    return out


def _pods(d: Deployment, region: str, zone: str | None) -> dict:
    _known(d, region)
    if not zone:
        return _selector(d, replica=region, role="node")
    for n in d.nodes:
        if n.plan.region == region and n.plan.zone == str(zone) and not n.plan.copy_of:
            return {"namespaces": [d.namespace], "pods": {d.namespace: [n.pod]}}
    raise DeployError(f"{region} has no zone {zone} in this spec (zones exist only where a "
                      f"replica is zone redundant)")


def _link_netem(d: Deployment, a: str, b: str, args: dict) -> dict:
    """A slowed link from ``a`` to ``b`` composed with the WAN model as georeg
    composes link faults: latencies and jitters add, the lowest bandwidth wins.
    (Chaos Mesh gives each NetworkChaos its own tc band, and a packet takes one
    band, so a fault chaos cannot add to the WAN chaos: it carries the sum.)"""
    link = d.spec.wan_model().link(a, b) if d.spec.wan_model().enabled else None
    latency = (link.latency_ms if link else 0.0) + args.get("latency_ms", 0.0)
    jitter = (link.jitter_ms if link else 0.0) + args.get("jitter_ms", 0.0)
    rates = [r for r in (link.bandwidth_mbps if link else 0.0, args.get("bandwidth_mbps", 0.0))
             if r]
    spec: dict = {"action": "netem", "mode": "all", "direction": "to",
                  "selector": _selector(d, region=a),
                  "target": {"mode": "all", "selector": _selector(d, region=b)},
                  "delay": {"latency": millis(latency), "jitter": millis(jitter)}}
    if rates:
        spec["rate"] = {"rate": rate(min(rates))}
    return spec


def _known(d: Deployment, *regions: str) -> None:
    for region in regions:
        if region not in d.regions:
            raise DeployError(f"region {region!r} has no node in this spec (regions: "
                              f"{', '.join(d.regions)})")


def _templates(d: Deployment, name: str, kind: str, args: dict, seconds: float | None) -> list[dict]:
    """The Chaos Mesh templates of one fault (several when Chaos Mesh needs one
    resource per effect)."""
    deadline = {"deadline": duration(seconds)} if seconds else {}
    if kind in ("region-outage", "zone-outage"):
        pods = _pods(d, args["region"], args.get("zone") if kind == "zone-outage" else None)
        if args.get("mode", "crash") == "isolate":
            return [{"name": name, "templateType": "NetworkChaos", **deadline, "networkChaos": {
                "action": "partition", "mode": "all", "direction": "both", "selector": pods,
                "target": {"mode": "all", "selector": _all_but(d, pods)}}}]
        # No ``duration`` in a chaos a Workflow embeds (its webhook refuses one):
        # the template's deadline bounds it.
        chaos = {"action": "pod-failure" if seconds else "pod-kill", "mode": "all",
                 "selector": pods}
        return [{"name": name, "templateType": "PodChaos", **deadline, "podChaos": chaos}]
    if kind == "partition":
        _known(d, args["a"], args["b"])
        return [{"name": name, "templateType": "NetworkChaos", **deadline, "networkChaos": {
            "action": "partition", "mode": "all",
            "direction": "to" if args.get("one_way") else "both",
            "selector": _selector(d, region=args["a"]),
            "target": {"mode": "all", "selector": _selector(d, region=args["b"])}}}]
    if kind == "link":
        unsupported = set(args) - {"a", "b", "latency_ms", "jitter_ms", "bandwidth_mbps",
                                   "duration_s", "seed"}
        if unsupported or not {"latency_ms", "jitter_ms", "bandwidth_mbps"} & set(args):
            raise DeployError(f"{name}: link fault arguments {sorted(unsupported) or '(none)'} "
                              f"have no rendering here (latency_ms, jitter_ms, bandwidth_mbps do)")
        _known(d, args["a"], args["b"])
        return [{"name": f"{name}-{a}-to-{b}", "templateType": "NetworkChaos", **deadline,
                 "networkChaos": _link_netem(d, a, b, args)}
                for a, b in ((args["a"], args["b"]), (args["b"], args["a"]))]
    if kind == "disk":
        io = {"mode": "all", "selector": _pods(d, args["region"], args.get("zone")),
              "volumePath": DATA_PATH, "path": f"{DATA_PATH}/**/*"}
        if args.get("slow_ms"):
            io |= {"action": "latency", "delay": millis(args["slow_ms"])}
        elif args.get("full"):
            io |= {"action": "fault", "errno": ENOSPC, "methods": ["write"], "percent": 100}
        elif args.get("eio"):
            if float(args.get("probability", 1.0)) < 0.01:
                raise DeployError(f"{name}: Chaos Mesh injects in whole percents; a "
                                  f"probability below 0.01 would inject nothing")
            io |= {"action": "fault", "errno": EIO, "methods": [args["eio"].lower()],
                   "percent": round(100 * float(args.get("probability", 1.0)))}
        else:
            raise DeployError(f"{name}: a disk fault says full, slow_ms or eio")
        return [{"name": name, "templateType": "IOChaos", **deadline, "ioChaos": io}]
    raise DeployError(f"fault kind {kind!r} has no Chaos Mesh equivalent (it is injected at "
                      f"georeg's own seams on one machine); kinds rendered: "
                      f"{', '.join(RENDERED_KINDS)}")


def workflow(d: Deployment, scenario: Scenario) -> dict:
    """``scenario`` as one Chaos Mesh Workflow, its schedule drawn with its seed
    as ``georeg chaos run`` draws it."""
    if not DNS_LABEL.fullmatch(scenario.name):
        raise DeployError(f"the name {scenario.name!r} is no Kubernetes object name: at most "
                          f"63 lowercase letters, digits and '-', starting and ending with a "
                          f"letter or digit")
    steps = schedule(scenario, random.Random(scenario.seed))
    templates: list[dict] = []
    branches = []
    for i, step in enumerate(steps):
        if step.action == "heal":
            raise DeployError(f"step {i} heals {step.heal!r} at a time: a Chaos Mesh fault ends "
                              f"with its own duration; give the fault a duration_s instead")
        seconds = step.arguments.get("duration_s")
        faults = _templates(d, f"step-{i}-{step.kind}", step.kind, step.arguments, seconds)
        wait = {"name": f"step-{i}-wait", "templateType": "Suspend",
                "deadline": duration(step.at_s)}
        branch = {"name": f"step-{i}", "templateType": "Serial",
                  "children": [wait["name"]] + ([faults[0]["name"]] if len(faults) == 1
                                                 else [f"step-{i}-faults"])}
        templates += [wait, *faults]
        if len(faults) > 1:
            templates.append({"name": f"step-{i}-faults", "templateType": "Parallel",
                              "children": [f["name"] for f in faults]})
        templates.append(branch)
        branches.append(branch["name"])
    entry = {"name": "scenario", "templateType": "Parallel", "children": branches}
    return {"apiVersion": API, "kind": "Workflow",
            "metadata": {"name": scenario.name, "namespace": d.namespace,
                         "annotations": {f"{LABEL}/description": scenario.description}},
            "spec": {"entry": entry["name"], "templates": [entry, *templates]}}
