"""A webhook's custom header values at rest, on one node: sealed in its
metastore whoever wrote them, opened only to be sent, bound to their webhook
and header, never shown or logged. Real nodes in this process (their routes
over HTTP, their RocksDB files read as bytes), a real aiohttp receiver. The
same on a running cluster, through the CLI: ``test_webhook_commands``."""

from __future__ import annotations

import os
import uuid

import pytest

from cluster.control import spec as specs
from cluster.control.access import configuration_key
from cluster.control.plan import plan
from cluster.control.supervisor import Supervisor
from registry_node.config import NodeConfig
from registry_node.configuration_key import SEALED_PREFIX, ConfigurationKey
from registry_node.crypto import KeyFileError
from registry_node.identities import InvalidValue
from registry_node.node import Node
from registry_node.webhooks import open_headers, seal_headers


def secret() -> str:
    return f"Bearer pl41n-{uuid.uuid4().hex}"


# -- the key and the form of a sealed value (no node) ------------------------------------------


def test_a_sealed_value_opens_only_for_its_webhook_and_header_and_key():
    key, other_key = ConfigurationKey(os.urandom(32)), ConfigurationKey(os.urandom(32))
    value = secret()
    sealed = seal_headers(key, "deploy1", {"Authorization": value})["Authorization"]
    assert sealed.startswith(SEALED_PREFIX) and value not in sealed
    assert seal_headers(key, "deploy1", {"Authorization": value})["Authorization"] != sealed
    assert open_headers(key, "deploy1", {"Authorization": sealed}) == {"Authorization": value}
    for where, (k, name, header) in {
            "another webhook": (key, "deploy2", "Authorization"),
            "another header": (key, "deploy1", "X-Deploy-Key"),
            "a header name in another case": (key, "deploy1", "authorization"),
            "another key": (other_key, "deploy1", "Authorization")}.items():
        with pytest.raises(InvalidValue) as refused:
            open_headers(k, name, {header: sealed})
        message = str(refused.value)
        assert f"header {header}" in message and "does not open" in message, where
        assert value not in message and sealed not in message, where
    # A value sealed elsewhere and cut, or not base64 at all: refused the same way.
    for broken in (sealed[:-8], SEALED_PREFIX + "%%%", SEALED_PREFIX):
        with pytest.raises(InvalidValue, match="header Authorization: "):
            open_headers(key, "deploy1", {"Authorization": broken})
    # A value stored before values were sealed reads as the plaintext it is.
    assert open_headers(key, "deploy1", {"X-Env": "prod"}) == {"X-Env": "prod"}


def test_the_key_is_never_shown():
    key = ConfigurationKey(b"k" * 32)
    assert "k" * 8 not in repr(key) and "k" * 8 not in str(key)
    with pytest.raises(ValueError, match="32 bytes"):
        ConfigurationKey(b"short")


# -- how nodes get the cluster's key -----------------------------------------------------------


def test_every_serving_node_is_given_the_cluster_key_file_by_its_path(tmp_path):
    """Made once, mode 0600, reused at every start; named in each serving
    node's plan and passed on its command line as a path (never the key); a
    paired-region copy, which never delivers, gets none."""
    cluster_plan = plan(specs.parse({"auth": "none", "replicas": [{"region": "westeurope"}]})
                        .seeded(1).with_port_base(20000), tmp_path)
    key = configuration_key(cluster_plan)
    path = tmp_path / "auth" / "configuration.key"
    assert path.stat().st_mode & 0o777 == 0o600 and len(path.read_bytes()) == 32
    sealed = seal_headers(key, "deploy1", {"X-Key": "v"})
    assert open_headers(configuration_key(cluster_plan), "deploy1", sealed) == {"X-Key": "v"}
    supervisor = Supervisor(cluster_plan)
    assert cluster_plan.pair_copies
    for node in cluster_plan.all_nodes:
        command = supervisor.node_command(node)
        if node.copy_of:
            assert node.configuration_key is None and "--configuration-key-file" not in command
        else:
            assert node.configuration_key == path
            assert command[command.index("--configuration-key-file") + 1] == str(path)
        assert path.read_bytes().hex() not in " ".join(command)


def test_a_node_refuses_to_start_with_a_key_file_others_may_read(tmp_path):
    path = tmp_path / "configuration.key"
    path.write_bytes(os.urandom(32))
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="readable by other users"):
        Node.open(NodeConfig(data_dir=tmp_path / "node", configuration_key_file=path))
