"""Many georeg nodes as one registry, in wings by concern:

    control/   what the cluster is and how it runs: regions, the spec, the plan,
               the supervisor of node processes, the Python API (``Cluster``),
               the management REST API and its client, the data dir's state
    routing/   how clients reach it: routing policy (no I/O), the streaming
               proxy, the global and regional endpoints, download hand-over
    network/   what lies between regions: the WAN model and the links that
               carry (and break) inter-node traffic
    faults/    breaking it and checking it: fault injection, chaos scenarios,
               ``georeg verify``
    cli/       the ``georeg`` command, one module per command family
    bench/     benchmarks against the WAN model's floor and the reference registry
    testing.py, pytest_plugin.py   a cluster for tests, and the pytest plugin

Dependencies point from cli/ and bench/ to control/, routing/, faults/ and
network/; nothing imports cli/. The node itself is the ``registry_node``
package, replication the ``replicator`` package.
"""
