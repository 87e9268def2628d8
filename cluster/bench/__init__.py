"""Benchmarks: a node against the reference registry; replication lag."""
