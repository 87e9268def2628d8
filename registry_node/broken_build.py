"""TEST ONLY: a deliberately broken build, to show the random nemesis
(``georeg chaos random``, ``tests/test_chaos_random.py``) catches one.

A node started with ``GEOREG_TEST_UNCHECKED_REPLICATION=1`` in its
environment takes replicated bytes unchecked: its replication messages over
plain gRPC are neither sealed nor checked (``replicator.wire.integrity``), and
a replicated blob is stored without checking its digest
(``registry_node.replica``). A corrupting link then gets damaged blobs stored
and served.

Invariants: the variable is read once, when the node starts
(``from_environment``, called by ``georeg node``), and travels from there as
data (``NodeConfig.unchecked_replication``); a node running with it logs a
warning at start and says so in ``GET /georeg/v1/node``, which ``georeg
health`` shows as an error. The supervisor never passes ``GEOREG_TEST_*``
variables from its own environment to nodes (``cluster.control.supervisor``):
only a test harness that asks for it explicitly (``Cluster(node_env=...)``)
starts a broken node.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

VARIABLE = "GEOREG_TEST_UNCHECKED_REPLICATION"
# Every test-only variable starts so; the supervisor strips them from nodes' environment.
TEST_PREFIX = "GEOREG_TEST_"
LOG_EVENT = "BROKEN_BUILD_UNCHECKED_REPLICATION"


def from_environment(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this node runs the broken build (test only); read once at start."""
    return environ.get(VARIABLE) == "1"
