"""A webhook's custom header values at rest, on one node: sealed in its
metastore whoever wrote them, opened only to be sent, bound to their webhook
and header, never shown or logged. Real nodes in this process (their routes
over HTTP, their RocksDB files read as bytes), a real aiohttp receiver. The
same on a running cluster, through the CLI: ``test_webhook_commands``."""

from __future__ import annotations

import os
import uuid

import pytest

from registry_node.configuration_key import SEALED_PREFIX, ConfigurationKey
from registry_node.identities import InvalidValue
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
