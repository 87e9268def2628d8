"""What a webhook value may be (the configuration kind ``webhook``) and what
its scope selects; the control plane and delivery build on these."""

import pytest

from registry_node import configuration
from registry_node.errors import RegistryError
from registry_node.webhooks import in_scope

KIND = configuration.kind_of("webhook")
GOOD = {"uri": "https://hooks.example/deploy", "actions": ["push", "replicated"],
        "scope": "app:*", "headers": {"Authorization": "Bearer s3cret"}, "location": "westeurope"}


def test_a_valid_webhook_is_stored_as_given():
    hook = configuration.validate(KIND, GOOD, "deploy1")
    assert hook.actions == ("push", "replicated") and hook.headers == GOOD["headers"]
    assert hook.status == "enabled" and hook.receiver_location == ""


@pytest.mark.parametrize("change, says", [
    ({"uri": "ftp://hooks.example/"}, "http:// or https://"),
    ({"uri": "/relative"}, "http:// or https://"),
    ({"uri": "http://hooks.example:port/"}, "port"),
    ({"actions": []}, "at least one action"),
    ({"actions": ["pull"]}, "unknown actions"),
    ({"actions": ["push", "push"]}, "once"),
    ({"scope": "App:v1"}, "repository name"),
    ({"scope": "app:v1:x"}, "not a tag"),
    ({"headers": {"Content-Type": "text/plain"}}, "set by the delivery"),
    ({"headers": {"X-Key": "a\r\nInjected: 1"}}, "line breaks"),
    ({"headers": {"bad name": "v"}}, "header name"),
    ({"status": "paused"}, "enabled or disabled"),
    ({"location": ""}, "location is required"),
    ({"colour": "red"}, "unknown fields"),
])
def test_an_invalid_webhook_is_refused_with_what_to_change(change, says):
    with pytest.raises(RegistryError) as refused:
        configuration.validate(KIND, {**GOOD, **change}, "deploy1")
    assert refused.value.status == 400 and says in refused.value.detail
    assert "a\r\nInjected" not in refused.value.detail     # a header value is never echoed


@pytest.mark.parametrize("name", ["dep", "deploy-1", "x" * 51])
def test_a_webhook_name_is_five_to_fifty_letters_and_digits(name):
    with pytest.raises(RegistryError, match="5 to 50"):
        configuration.validate(KIND, GOOD, name)


@pytest.mark.parametrize("scope, repository, tag, selected", [
    ("", "any/repo", "v1", True),
    ("app", "app", "latest", True),
    ("app", "app", "v1", False),
    ("app:*", "app", "v1", True),
    ("app:*", "app2", "v1", False),
    ("app:v1", "app", "v1", True),
    ("app:v1", "app", "v2", False),
    ("app:v1", "app", "", True),        # a delete by digest names no tag
])
def test_scope_selects_as_in_acr(scope, repository, tag, selected):
    assert in_scope(scope, repository, tag) is selected
