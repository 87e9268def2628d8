"""The ``IdentitySource`` contract: what the access code relies on from whatever holds
the registry's identities. ``IdentitySourceContract`` is written once; each
implementation runs it by subclassing with its own ``build``: the in-memory source
and the replicated configuration store (``ConfigurationIdentities``), written the
way a replica receives it (replicated ``config_set``/``config_delete`` events)."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from registry_node.auth.identities import (
    DISABLED,
    IdentityRecord,
    IdentitySource,
    InMemoryIdentities,
    Password,
    RegistrySettings,
    RoleAssignment,
    ScopeMapRecord,
    TokenRecord,
    hash_secret,
    secret_matches,
)
from registry_node.config import NodeConfig
from registry_node.configuration import RegistryProperties
from registry_node.identities import (
    Assignment,
    ConfigurationIdentities,
    Identity,
    ScopeMap,
    Secret,
    Token,
)
from registry_node.node import Node
from registry_node.records import Event, EventKind, encode

# A writer is what the test calls to change the source: (kind, record) → None, where
# kind is "registry", "token", "scope_map", "identity", "role_assignment" or
# "delete_token" (record: the name).
Writer = Callable[[str, object], None]


class IdentitySourceContract:
    def build(self, settings: RegistrySettings) -> tuple[IdentitySource, Writer]:
        raise NotImplementedError

    def test_reads_what_was_written(self):
        source, write = self.build(RegistrySettings("reg"))
        token = TokenRecord("ci", "_repositories_pull", passwords=(Password("password1", "h"),))
        write("token", token)
        write("scope_map", ScopeMapRecord("m", ("repositories/a/content/read",)))
        write("identity", IdentityRecord("id-1", (Password("secret", "h2"),)))
        write("role_assignment", RoleAssignment("id-1", "AcrPull"))
        write("role_assignment", RoleAssignment("id-2", "AcrPush", "shared"))
        write("registry", RegistrySettings("reg", admin_enabled=True, anonymous_pull_enabled=True))
        assert source.token("ci") == token
        assert source.scope_map("m").actions == ("repositories/a/content/read",)
        assert source.identity("id-1").secrets == (Password("secret", "h2"),)
        assert list(source.role_assignments("id-1")) == [RoleAssignment("id-1", "AcrPull")]
        assert source.settings().admin_enabled and source.settings().anonymous_pull_enabled

    def test_unknown_names_are_none(self):
        source, _ = self.build(RegistrySettings("reg"))
        assert source.token("nope") is None and source.scope_map("nope") is None
        assert source.identity("nope") is None and list(source.role_assignments("nope")) == []

    def test_every_change_grows_the_generation(self):
        source, write = self.build(RegistrySettings("reg"))
        seen = [source.generation]
        for kind, record in (("token", TokenRecord("t", "m")), ("scope_map", ScopeMapRecord("m", ())),
                             ("token", TokenRecord("t", "m", status=DISABLED)),
                             ("delete_token", "t"), ("identity", IdentityRecord("i")),
                             ("role_assignment", RoleAssignment("i", "Reader")),
                             ("registry", RegistrySettings("reg", admin_enabled=True))):
            write(kind, record)
            seen.append(source.generation)
        assert seen == sorted(set(seen)), seen
        assert source.token("t") is None


class TestInMemoryIdentities(IdentitySourceContract):
    def build(self, settings):
        source = InMemoryIdentities(settings)

        def write(kind, record):
            {"registry": lambda r: source.update_registry(
                 admin_enabled=r.admin_enabled, admin_passwords=r.admin_passwords,
                 anonymous_pull_enabled=r.anonymous_pull_enabled),
             "token": source.put_token, "scope_map": source.put_scope_map,
             "identity": source.put_identity, "role_assignment": source.assign,
             "delete_token": source.delete_token}[kind](record)

        return source, write


def test_secrets_are_stored_salted_and_checked_in_constant_time():
    first, second = hash_secret("s3cret"), hash_secret("s3cret")
    assert first != second and "s3cret" not in first
    assert secret_matches("s3cret", first) and secret_matches("s3cret", second)
    assert not secret_matches("other", first)
    for broken in ("", "md5$00$00", "sha256$zz$00", "sha256"):
        assert not secret_matches("s3cret", broken)


class TestConfigurationIdentities(IdentitySourceContract):
    """The source every node with auth on reads: its registry configuration, as
    replication brings it (``Configuration.apply``, what a replica runs)."""

    @pytest.fixture(autouse=True)
    def _nodes(self):
        self.opened: list[Node] = []
        with tempfile.TemporaryDirectory() as root:
            self.root = Path(root)
            yield
            for node in self.opened:
                node.close()

    def build(self, settings):
        node = Node.open(NodeConfig(data_dir=self.root / str(len(self.opened)), port=0,
                                    region="westeurope"))
        self.opened.append(node)
        config = node.configuration
        hlc = itertools.count(1000)

        def secrets(passwords):
            return tuple(Secret(p.name, p.hashed, expiry=p.expiry) for p in passwords)

        def apply(kind, name, value=None):
            config.apply(Event(
                kind=EventKind.CONFIG_SET if value is not None else EventKind.CONFIG_DELETE,
                repository="", origin_region="eastus", origin_zone="", hlc=next(hlc),
                config_kind=kind, config_name=name,
                config_value=encode(value) if value is not None else b""))

        def write(kind, record):
            if kind == "registry":
                apply("registry", "default", RegistryProperties(
                    record.admin_enabled, record.anonymous_pull_enabled, record.name,
                    secrets(record.admin_passwords)))
            elif kind == "token":
                apply("token", record.name, Token(record.scope_map, record.status,
                                                  secrets(record.passwords)))
            elif kind == "scope_map":
                apply("scope-map", record.name, ScopeMap(actions=record.actions))
            elif kind == "identity":
                apply("identity", record.id, Identity(secrets=secrets(record.secrets)))
            elif kind == "role_assignment":
                apply("role-assignment", f"ra-{next(hlc)}",
                      Assignment(record.assignee, record.role, record.repository))
            elif kind == "delete_token":
                apply("token", record)
            else:
                raise AssertionError(kind)

        return ConfigurationIdentities(config, settings.name), write


def test_the_configuration_source_names_the_registry_as_the_control_plane_wrote_it(tmp_path):
    node = Node.open(NodeConfig(data_dir=tmp_path, port=0))
    try:
        source = ConfigurationIdentities(node.configuration, "fallback")
        assert source.settings() == RegistrySettings("fallback")
        node.configuration.apply(Event(
            kind=EventKind.CONFIG_SET, repository="", origin_region="eastus", hlc=5,
            config_kind="registry", config_name="default",
            config_value=encode(RegistryProperties(name="georegtest"))))
        assert source.settings().name == "georegtest"
    finally:
        node.close()
