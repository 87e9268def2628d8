"""The Docker scope grammar, ACR's permission model and grants (no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry_node.auth import permissions as perms
from registry_node.auth.scopes import (
    ANY,
    REPOSITORY_ACTIONS,
    Scope,
    catalog,
    format_scopes,
    grant,
    missing,
    parse_scope,
    parse_scopes,
    repository,
)

# -- grammar -------------------------------------------------------------------------


def test_parses_what_clients_send():
    assert parse_scope("repository:team/app:pull,push") == repository("team/app", "pull", "push")
    assert parse_scope("registry:catalog:*") == catalog()
    # A name may start with host:port (one colon inside the name).
    assert parse_scope("repository:localhost:5000/app:pull") == repository("localhost:5000/app", "pull")
    # The deprecated resource class means the bare type.
    assert parse_scope("repository(plugin):app:pull") == repository("app", "pull")


@pytest.mark.parametrize("text", ["", "repository", "repository:app", "repository::pull",
                                  "repository:app:", "Repository:app:pull",
                                  "repository:app:PULL", "repository:app:pull;rm"])
def test_malformed_scopes_are_skipped_not_fatal(text):
    assert parse_scope(text) is None
    assert parse_scopes([text, "repository:ok:pull"]) == [repository("ok", "pull")]


def test_one_parameter_or_many_merge_per_resource():
    space_joined = parse_scopes(["repository:a:pull repository:b:pull repository:a:push"])
    repeated = parse_scopes(["repository:a:pull", "repository:b:pull", "repository:a:push"])
    assert space_joined == repeated == [repository("a", "pull", "push"), repository("b", "pull")]
    assert format_scopes(repeated) == "repository:a:pull,push repository:b:pull"


_component = st.from_regex(r"[a-z0-9]+([._-][a-z0-9]+)?", fullmatch=True)
_names = st.builds(lambda host, parts: (host + "/" if host else "") + "/".join(parts),
                   st.sampled_from(["", "localhost:5000", "registry.example"]),
                   st.lists(_component, min_size=1, max_size=3))
_actions = st.frozensets(st.sampled_from([*REPOSITORY_ACTIONS, ANY, "custom-action"]), min_size=1)
_scopes = st.builds(Scope, st.sampled_from(["repository", "registry", "artifact-repository"]),
                    _names, _actions)


@given(_scopes)
def test_format_then_parse_is_the_identity(scope):
    assert parse_scope(scope.format()) == scope


@given(st.lists(_scopes, max_size=6))
def test_a_list_round_trips_through_one_parameter(scopes):
    merged = parse_scopes(s.format() for s in scopes)
    assert parse_scopes([format_scopes(merged)]) == merged
    assert len({s.resource for s in merged}) == len(merged)


@given(st.lists(_scopes, max_size=6), st.dictionaries(
    st.tuples(st.sampled_from(["repository", "registry"]), _names), _actions, max_size=6))
def test_a_grant_never_exceeds_what_was_asked_nor_what_is_held(asked, held):
    def allowed(kind, name):
        return held.get((kind, name), frozenset())

    for scope in grant(asked, allowed):
        asked_here = frozenset().union(*(s.actions for s in asked if s.resource == scope.resource))
        holds = allowed(*scope.resource)
        for action in scope.actions:
            assert action in asked_here or ANY in asked_here
            assert action in holds or ANY in holds


def test_grant_is_the_intersection_and_may_be_empty():
    held = perms.for_scope_map(perms.SYSTEM_SCOPE_MAPS["_repositories_pull"])
    assert grant([repository("app", "pull", "push")], held.actions_on) == [repository("app", "pull")]
    assert grant([repository("app", "push"), catalog()], held.actions_on) == []
    # `*` asks for everything the resource has: the holder gets what it holds.
    assert grant([repository("app", "*")], held.actions_on) == [repository("app", "pull")]
    assert grant([catalog()], perms.ADMIN.actions_on) == [catalog()]


# -- ACR's permissions ------------------------------------------------------------------


def test_scope_map_actions_map_to_token_actions_with_prefix_wildcards():
    held = perms.for_scope_map(["repositories/team/*/content/read",
                                "repositories/team/*/content/write",
                                "repositories/shared/metadata/read",
                                "repositories/shared/content/delete"])
    assert held.actions_on("repository", "team/app") == {"pull", "push"}
    assert held.actions_on("repository", "team/a/b") == {"pull", "push"}
    assert held.actions_on("repository", "team") == frozenset()       # the prefix itself: no
    assert held.actions_on("repository", "teammate/x") == frozenset()
    assert held.actions_on("repository", "shared") == {"metadata_read", "delete"}
    assert held.actions_on("registry", "catalog") == frozenset()        # tokens never list


@pytest.mark.parametrize("action", [
    "repositories/sample/*/x/content/read",   # a wildcard in the middle
    "repositories/sample/x*/content/read",    # not after a slash
    "repositories/*/*/content/read",          # two wildcards
    "repositories/app/content/readall",
    "repository/app/content/read",
    "repositories/content/read",
])
def test_scope_map_grammar_refuses_what_acr_refuses(action):
    with pytest.raises(perms.ScopeMapError):
        perms.parse_scope_map_action(action)


def test_system_scope_maps():
    def on_any(name):
        return perms.for_scope_map(perms.SYSTEM_SCOPE_MAPS[name]).actions_on("repository", "x/y")

    assert on_any("_repositories_pull") == {"pull"}
    assert on_any("_repositories_pull_metadata_read") == {"pull", "metadata_read"}
    assert on_any("_repositories_push") == {"pull", "push"}
    assert on_any("_repositories_push_metadata_write") == {
        "pull", "push", "metadata_read", "metadata_write"}
    assert on_any("_repositories_admin") == set(REPOSITORY_ACTIONS)


def test_roles_and_roles_limited_to_a_repository():
    assert perms.for_role("AcrPull").actions_on("repository", "any") == {"pull", "metadata_read"}
    assert "push" in perms.for_role("AcrPush").actions_on("repository", "any")
    assert perms.for_role("AcrDelete").actions_on("repository", "any") == {"delete", "metadata_read"}
    assert perms.for_role("AcrImageSigner").actions_on("repository", "any") == frozenset()
    assert perms.for_role("Owner").actions_on("repository", "any") == set(REPOSITORY_ACTIONS)
    assert perms.for_role("Reader").actions_on("registry", "catalog") == {"*"}
    assert perms.for_role("NoSuchRole").actions_on("repository", "any") == frozenset()
    limited = perms.for_role("AcrPush", repository="shared")
    assert limited.actions_on("repository", "shared") == {"pull", "push", "metadata_read"}
    assert limited.actions_on("repository", "other") == frozenset()
    assert limited.actions_on("registry", "catalog") == frozenset()


def test_missing_names_only_what_is_not_held():
    held = perms.for_scope_map(["repositories/app/content/read"])
    assert missing([repository("app", "pull", "push")], held.actions_on) == [repository("app", "push")]
    assert missing([repository("app", "pull")], held.actions_on) == []
    assert missing([repository("app", "delete")], perms.ADMIN.actions_on) == []
