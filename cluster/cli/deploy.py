"""`georeg deploy kubernetes|chaos|compose`: the spec's cluster for other engines."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..control import spec as specs
from ..deploy import compose, kubernetes
from ..deploy.chaosmesh import workflow
from ..deploy.model import (
    DEFAULT_IMAGE,
    DEFAULT_NAMESPACE,
    DeployError,
    Materials,
    deployment,
    materials,
)
from ..faults.chaos import ScenarioError, load
from .common import CliError, command

NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="render the cluster for Kubernetes, Chaos Mesh or compose",
                       description="Render the cluster of a spec (the default one unless "
                                   "--config) for another engine; deploy/README.md says how to "
                                   "run the result. Nothing is applied or started.")
    commands = p.add_subparsers(dest="deploy_command", required=True, metavar="COMMAND")

    def common(c: argparse.ArgumentParser, secrets: bool = True) -> None:
        c.add_argument("--config", type=Path, help="the cluster spec (TOML; default: built in)")
        c.add_argument("--image", default=DEFAULT_IMAGE,
                       help=f"the georeg image nodes run (default: {DEFAULT_IMAGE})")
        c.add_argument("--namespace", default=DEFAULT_NAMESPACE,
                       help=f"Kubernetes namespace (default: {DEFAULT_NAMESPACE})")
        if secrets:
            c.add_argument("--secrets-dir", type=Path,
                           help="where the deployment's CA, keys and credentials are made at the "
                                "first render and reused after (default: <spec's data_dir>/deploy); "
                                "keep it out of version control")

    c = commands.add_parser("kubernetes", help="manifests: StatefulSets, Services, Secrets, "
                            "ConfigMap, PodDisruptionBudgets, NetworkPolicies; the WAN as Chaos Mesh",
                            description="Write one JSON manifest per object into DIR (Secrets "
                                        "mode 0600), the WAN model as Chaos Mesh NetworkChaos in "
                                        "DIR/chaos-mesh and a kind cluster in DIR/kind.")
    common(c)
    c.add_argument("-o", "--output", type=Path, required=True, metavar="DIR",
                   help="where to write (it gets Secrets: keep it out of version control, "
                        "e.g. under .georeg/, which git ignores)")
    c.set_defaults(func=command(run_kubernetes))
    c = commands.add_parser("chaos", help="a shipped scenario as a Chaos Mesh Workflow",
                            description="Render a scenario (a shipped name or a TOML file) as a "
                                        "Chaos Mesh Workflow against the pods `deploy kubernetes` "
                                        "makes; its schedule is drawn with the scenario's seed.")
    common(c, secrets=False)
    c.add_argument("--scenario", required=True, metavar="NAME|FILE")
    c.add_argument("-o", "--output", type=Path, required=True, metavar="DIR")
    c.set_defaults(func=command(run_chaos))
    c = commands.add_parser("compose", help="a compose file: a service per node",
                            description="Write a compose file; the nodes' views and access "
                                        "material go beside it (georeg-views/, georeg-secrets/).")
    common(c)
    c.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                   help="the compose file (georeg-secrets/ goes beside it: keep it out of "
                        "version control, e.g. under .georeg/, which git ignores)")
    c.set_defaults(func=command(run_compose))


def _spec(args: argparse.Namespace) -> specs.ClusterSpec:
    if not NAMESPACE.fullmatch(args.namespace):
        raise CliError(f"--namespace {args.namespace!r} is not a Kubernetes namespace name: "
                       f"at most 63 lowercase letters, digits and '-', starting and ending "
                       f"with a letter or digit")
    try:
        return specs.load(args.config)
    except specs.SpecError as exc:
        raise CliError(str(exc)) from None


def _secrets_dir(args: argparse.Namespace, spec: specs.ClusterSpec) -> Path:
    return args.secrets_dir or Path(spec.network.data_dir) / "deploy"


@contextmanager
def _files(what: str, path: Path) -> Iterator[None]:
    """OS and key-material errors while reading or writing ``path`` as a CLI
    error saying which path, never a traceback."""
    try:
        yield
    except OSError as exc:
        where = exc.filename or path
        raise CliError(f"cannot use {where} ({what}): {exc.strerror or exc}") from None
    except ValueError as exc:       # e.g. a CA in --secrets-dir for another registry
        raise CliError(f"{what} {path}: {exc}") from None


def _materials(args: argparse.Namespace, spec: specs.ClusterSpec, d, hosts) -> Materials:
    directory = _secrets_dir(args, spec)
    with _files("--secrets-dir", directory):
        return materials(d, directory, hosts)


def run_kubernetes(args: argparse.Namespace) -> int:
    spec = _spec(args)
    d = deployment(spec, namespace=args.namespace, image=args.image,
                   host=kubernetes.host(args.namespace))
    m = _materials(args, spec, d, lambda n: kubernetes.certificate_names(d, n))
    with _files("-o", args.output):
        written = kubernetes.write(d, m, args.output)
    print(f"wrote {len(written)} files to {args.output} (kubectl apply -f {args.output}; "
          f"then, with Chaos Mesh, -f {args.output / 'chaos-mesh'})")
    return 0


def run_chaos(args: argparse.Namespace) -> int:
    from .chaos import find

    try:
        scenario = load(find(args.scenario))
    except ScenarioError as exc:
        raise CliError(str(exc)) from None
    d = deployment(_spec(args), namespace=args.namespace, image=args.image,
                   host=kubernetes.host(args.namespace))
    try:
        rendered = workflow(d, scenario)
    except DeployError as exc:
        raise CliError(f"scenario {scenario.name}: {exc}") from None
    path = args.output / f"workflow-{scenario.name}.json"
    with _files("-o", args.output):
        args.output.mkdir(parents=True, exist_ok=True)
        path.write_text(kubernetes.dump(rendered))
    print(f"wrote {path}")
    return 0


def run_compose(args: argparse.Namespace) -> int:
    spec = _spec(args)
    d = deployment(spec, namespace=args.namespace, image=args.image, host=compose.host)
    m = _materials(args, spec, d, lambda n: (n.name,))
    with _files("-o", args.output):
        written = compose.write(d, m, args.output)
    print(f"wrote {args.output} and {len(written) - 1} views beside it "
          f"(docker compose -f {args.output} up)")
    return 0
