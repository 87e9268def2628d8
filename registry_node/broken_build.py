"""TEST ONLY: a deliberately broken build, to show the random nemesis
(``georeg chaos random``, ``tests/test_chaos_random.py``) catches one.

``GEOREG_TEST_UNCHECKED_REPLICATION=1`` in a node's environment makes it take
replicated bytes unchecked: its replication messages over plain gRPC are
neither sealed nor checked (``replicator.wire.integrity``), and a replicated
blob is stored without checking its digest (``registry_node.replica``). A
corrupting link then gets damaged blobs stored and served. The variable is
read here and nowhere else; never set it outside tests.
"""

from __future__ import annotations

import os

VARIABLE = "GEOREG_TEST_UNCHECKED_REPLICATION"


def unchecked_replication() -> bool:
    """Whether this process runs the broken build (test only)."""
    return os.environ.get(VARIABLE) == "1"
