"""The ``IdentitySource`` contract: what the access code relies on from whatever holds
the registry's identities. ``IdentitySourceContract`` is written once; each
implementation runs it by subclassing with its own ``build`` (the replicated
configuration store will join ``InMemoryIdentitiesContract`` here)."""

from __future__ import annotations

from collections.abc import Callable

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


class TestInMemoryIdentitiesFromJson(IdentitySourceContract):
    """The file ``georeg node --auth-identities`` reads holds what was written."""

    def build(self, settings):
        inner, write = TestInMemoryIdentities().build(settings)

        class Reloaded:
            @property
            def generation(self):
                return inner.generation

            def __getattr__(self, name):
                return getattr(InMemoryIdentities.from_json(inner.to_json()), name)

        return Reloaded(), write


def test_secrets_are_stored_salted_and_checked_in_constant_time():
    first, second = hash_secret("s3cret"), hash_secret("s3cret")
    assert first != second and "s3cret" not in first
    assert secret_matches("s3cret", first) and secret_matches("s3cret", second)
    assert not secret_matches("other", first)
    for broken in ("", "md5$00$00", "sha256$zz$00", "sha256"):
        assert not secret_matches("s3cret", broken)


@pytest.mark.parametrize("text", ["{}", "[]", '{"registry": {}}', "not json"])
def test_a_broken_identities_file_is_an_error_not_a_crash_at_request_time(text):
    with pytest.raises((ValueError, KeyError, TypeError)):
        InMemoryIdentities.from_json(text)
