from __future__ import annotations

import aiohttp
import pytest

from registry_node import logs
from registry_node.config import NodeConfig

from . import profiles
from .helpers import ManualClock, NodeProcess, started_node

# Nodes in this process log warnings and errors only; child processes log to files.
logs.configure("console", "warning")

profiles.register()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Settle the Hypothesis profile and seed (``tests/profiles.py``) before
    Hypothesis's own plugin reads its options and applies them."""
    name, seed = profiles.choose(config.getoption("hypothesis_profile"),
                                 config.getoption("hypothesis_seed"))
    config.option.hypothesis_profile = name
    config.option.hypothesis_seed = seed


def pytest_report_header(config):
    return profiles.header()


# `make test` hands whole files to two workers in collection order
# (`--dist loadfile --no-loadscope-reorder`): a long file handed out last keeps
# one worker busy while the other has nothing left. These go first, longest
# first (from the CI log's slowest tests); the rest keep their order.
LONGEST_FIRST = ("test_chaos.py", "test_cluster.py", "test_faults.py",
                 "test_replication_stateful.py", "test_bench_scale.py", "test_properties.py",
                 "test_dashboard.py", "test_multihost.py", "test_architecture.py",
                 "test_identities.py", "test_bench_lag.py", "test_webhook_control.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


@pytest.fixture
def node_config(tmp_path) -> NodeConfig:
    return NodeConfig(data_dir=tmp_path / "node", port=0)


@pytest.fixture
async def node(node_config):
    """A real node serving on a loopback port, in this process."""
    async with started_node(node_config) as running:
        yield running


@pytest.fixture
def clock() -> ManualClock:
    """The test's clock, for nodes that read it (``started_node(config, clock)``)."""
    return ManualClock()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


@pytest.fixture
def node_process(tmp_path):
    """Factory for `georeg node` child processes, all killed at teardown."""
    started: list[NodeProcess] = []

    def make(name: str = "proc", *args: str) -> NodeProcess:
        proc = NodeProcess(tmp_path / name, list(args)).start()
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.close()
