"""georeg's pytest plugin: a real multi-region registry for your tests.

Installed with georeg (entry point ``pytest11``), it provides:

``georeg_cluster``
    A started cluster (``cluster.testing.RunningCluster``): node processes,
    WAN links, global and regional endpoints, on free loopback ports, in a
    temp dir; stopped after the test. Works in sync and async tests. Like ACR
    (and ``georeg up``), it wants credentials: the admin user's are
    ``georeg_cluster.credentials`` (username, password), ready-made as an auth
    file for skopeo/podman/docker/oras (``login(path)``), as headers
    (``auth_headers()``) or an aiohttp session (``http()``)::

        import subprocess

        def test_pull_after_failover(georeg_cluster, tmp_path):
            auth = georeg_cluster.login(tmp_path / "auth.json")
            east = georeg_cluster.endpoint("eastus").removeprefix("http://")
            subprocess.run(["skopeo", "copy", "--authfile", str(auth), "--dest-tls-verify=false",
                            "oci:./image:v1", f"docker://{east}/demo/app:v1"], check=True)
            georeg_cluster.crash("eastus-1")
            georeg_cluster.set_routing("eastus", False)
            ...pull through the same endpoint with the same auth file...

        def test_a_clock_running_ahead(georeg_cluster):
            with georeg_cluster.clock_skewed("westeurope", offset_s=300):
                georeg_cluster.wait_for(
                    lambda: georeg_cluster.node_clock("westeurope")["skewed"])
                ...writes through westeurope get 503 (reads go on); docs/faults.md...

        async def test_raw_http(georeg_cluster):
            async with georeg_cluster.http() as http:   # sends the admin login
                async with http.get(georeg_cluster.endpoint("eastus") + "/v2/") as r:
                    assert r.status == 200

    With ``auth = "none"`` in the spec (an open cluster) ``credentials`` is
    None, the auth file holds no login and the session sends none: the same
    test code runs against both.

``georeg_spec``
    The spec the cluster starts from; override this fixture in your
    ``conftest.py``, or mark a test ``@pytest.mark.georeg_spec({...})`` with
    the same keys as a TOML spec file. Default: ``cluster.testing.SMALL_SPEC``
    (eastus with zones, westeurope, brazilsouth; auth on, as every spec
    unless it says ``auth = "none"``). With ``{"tls": True}`` every URL is
    https; clients trust ``georeg_cluster.ca_file`` (the cluster CA).
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
