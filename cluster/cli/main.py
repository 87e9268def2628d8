"""The ``georeg`` command line: builds the parser from the command modules
and dispatches. Each command family lives in its own module beside this one
and registers its subcommands; what they share is in ``common``.
"""

from __future__ import annotations

import argparse
import sys

from . import node


def build_parser(only_node: bool = False) -> argparse.ArgumentParser:
    """The whole CLI; with ``only_node``, just `georeg node` — a node process then
    imports nothing it does not run (no rich tables, no cluster control, no
    benchmarks), which keeps each of a cluster's processes a few MiB smaller."""
    parser = argparse.ArgumentParser(
        prog="georeg",
        description="georeg: a geo-replicating OCI container registry cluster on one machine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    node.register(sub)
    if only_node:
        return parser
    from . import (
        bench,
        build,
        ca,
        cache,
        chaos,
        cluster,
        credential,
        dashboard,
        deploy,
        fault,
        identity,
        import_,
        login,
        purge,
        registry,
        replication,
        repository,
        schedule,
        scope_map,
        task,
        token,
        verify,
        webhook,
    )

    cluster.register(sub)
    login.register(sub)
    registry.register(sub)
    credential.register(sub)
    ca.register(sub)
    token.register(sub)
    scope_map.register(sub)
    identity.register(sub)
    identity.register_role(sub)
    webhook.register(sub)
    replication.register(sub)
    repository.register(sub)
    import_.register(sub)
    build.register(sub)
    task.register(sub)
    purge.register(sub)
    schedule.register(sub)
    cache.register(sub)
    cache.register_credential_set(sub)
    fault.register(sub)
    verify.register(sub)
    dashboard.register(sub)
    chaos.register(sub)
    cluster.register_region(sub)
    bench.register(sub)
    deploy.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(only_node=argv[:1] == ["node"]).parse_args(argv)
    return args.func(args)
