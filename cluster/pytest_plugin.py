"""georeg's pytest plugin: a real multi-region registry for your tests.

Installed with georeg (entry point ``pytest11``), it provides:

``georeg_cluster``
    A started cluster (``cluster.testing.RunningCluster``): node processes,
    WAN links, global and regional endpoints, on free loopback ports, in a
    temp dir; stopped after the test. Works in sync and async tests.

        def test_pull_after_failover(georeg_cluster):
            url = georeg_cluster.endpoint("eastus")          # http://127.0.0.1:PORT
            ...push with skopeo/oras/requests...
            georeg_cluster.crash("eastus-1")
            georeg_cluster.set_routing("eastus", False)

``georeg_spec``
    The spec the cluster starts from; override this fixture in your
    ``conftest.py``, or mark a test ``@pytest.mark.georeg_spec({...})`` with
    the same keys as a TOML spec file. Default: ``cluster.testing.SMALL_SPEC``
    (eastus with zones, westeurope, brazilsouth). With ``{"tls": True}`` every
    URL is https; clients trust ``georeg_cluster.ca_file`` (the cluster CA).
"""

from __future__ import annotations

import pytest

from .control import spec as specs
from .testing import SMALL_SPEC, RunningCluster


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "georeg_spec(spec): the cluster spec (a dict of TOML keys) for georeg_cluster")


@pytest.fixture
def georeg_spec(request: pytest.FixtureRequest) -> specs.ClusterSpec:
    marker = request.node.get_closest_marker("georeg_spec")
    if marker is not None:
        given = marker.args[0] if marker.args else marker.kwargs
        return given if isinstance(given, specs.ClusterSpec) else specs.parse(dict(given),
                                                                              "georeg_spec marker")
    return SMALL_SPEC


@pytest.fixture
def georeg_cluster(georeg_spec: specs.ClusterSpec, tmp_path_factory: pytest.TempPathFactory):
    running = RunningCluster(georeg_spec, tmp_path_factory.mktemp("georeg")).start()
    try:
        yield running
    finally:
        running.stop()
