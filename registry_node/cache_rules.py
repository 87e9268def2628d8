"""Cache rules and credential sets (after ACR's artifact cache): which
repositories of this registry are a pull-through cache of which upstream
repositories, and the credentials the registry pulls from an upstream with.
Both are registry configuration (kinds ``cache-rule`` and ``credential-set``,
``configuration.KINDS``); no I/O here (``pull_through`` does the fetching).

A rule maps a target repository of this registry to a source repository
upstream, ``HOST/REPOSITORY``. A rule is static (``registry.example.com/
library/alpine`` → ``alpine``) or a wildcard, on both sides at once:
``HOST/*`` → ``*`` or ``prefix/*`` (every repository of the upstream) and
``HOST/some/path/*`` → ``prefix/*`` (every repository under a path). A
wildcard target ``prefix/*`` covers ``prefix/x`` and ``prefix/x/y``, never
``prefix`` itself; ``*`` covers every repository.

Overlaps, as ACR has them: two wildcard rules whose targets can cover the
same repository (``*`` and ``library/*``, ``library/*`` and
``library/dotnet/*``) cannot both exist; a static rule may sit inside a
wildcard's target, and wins over it (the more specific rule); two static rules
never share a target. So any repository is covered by at most one rule of
each kind, and ``rule_for`` is a function of the rules, not of their order.

A credential set names an upstream login server and a username and password
for it. The password is sealed with the configuration key
(``configuration_key``), bound to the set's name, wherever it is stored or
replicated; it is opened only on the node about to send it upstream
(``open_password``) and is never logged, shown or put in an error.

Invariants: a rule's source and target have the same shape (both static or
both wildcards); a rule's credential set, if any, is for the rule's source
host (checked by the control plane, which sees both objects).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import msgspec

from .configuration_key import ConfigurationKey, SealedValueError, check_form, is_sealed
from .identities import InvalidValue
from .reference import MAX_NAME_LENGTH, NAME_RE
from .upstream import UpstreamError, parse_source

CACHE_RULE = "cache-rule"
CREDENTIAL_SET = "credential-set"
# ACR: "Artifact cache only supports 1,000 cache rules" (every tier).
MAX_CACHE_RULES = 1000
# georeg's choice (ACR documents none): 1 to 50 letters, digits and hyphens,
# which every example name of ACR's documentation is.
RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,49}")
MAX_USERNAME = 256
MAX_PASSWORD = 4096
WILDCARD = "*"


class CacheRule(msgspec.Struct, frozen=True):
    source_repo: str = ""          # HOST/REPOSITORY, HOST/PATH/* or HOST/*
    target_repo: str = ""          # REPOSITORY, PREFIX/* or *
    credential_set: str = ""       # "" for anonymous pulls
    created: float = 0.0


class CredentialSet(msgspec.Struct, frozen=True):
    login_server: str = ""         # the upstream host[:port]
    username: str = ""
    password: str = ""             # sealed as stored (see the module docstring)
    created: float = 0.0


@dataclass(frozen=True, slots=True)
class Source:
    """A rule's source: the upstream host and the repository (or, for a
    wildcard, the path prefix with its trailing ``/``, "" for the whole
    registry)."""

    host: str
    repository: str
    wildcard: bool


def parse_source_repo(text: str) -> Source:
    """``HOST/REPOSITORY``, ``HOST/PATH/*`` or ``HOST/*``; ``InvalidValue`` says
    what is wrong."""
    if not isinstance(text, str) or not text:
        raise InvalidValue("give the source repository (--source-repo), e.g. "
                           "registry.example.com/library/alpine or registry.example.com/*")
    host, _, path = text.partition("/")
    wildcard = text.endswith("/*")
    if wildcard:
        path = path[:-1]                      # "a/b/" for HOST/a/b/*, "" for HOST/*
    if "@" in text or ":" in path:
        raise InvalidValue(f"--source-repo {text[:200]!r}: a repository, without a tag or "
                           "digest (HOST[:PORT]/REPOSITORY, HOST/PATH/* or HOST/*)")
    try:
        parsed = parse_source(f"{host}/{path}x" if wildcard else text)
    except UpstreamError as exc:
        reason = str(exc).split(": ", 1)[-1].split("; give the source")[0]
        raise InvalidValue(f"--source-repo {text[:200]!r}: {reason}; give HOST/REPOSITORY, "
                           "HOST/PATH/* or HOST/*, e.g. registry.example.com/library/alpine"
                           ) from None
    return Source(parsed.registry, path if wildcard else parsed.repository, wildcard)


def check_target(text: str) -> tuple[str, bool]:
    """``REPOSITORY``, ``PREFIX/*`` or ``*``: (the repository or prefix with
    its trailing ``/``, "" for ``*``; whether it is a wildcard)."""
    if not isinstance(text, str) or not text:
        raise InvalidValue("give the target repository (--target-repo), e.g. alpine, "
                           "hub/* or *")
    if text == WILDCARD:
        return "", True
    wildcard = text.endswith("/*")
    name = text[:-2] if wildcard else text
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name):
        raise InvalidValue(f"--target-repo {text[:200]!r} is not a repository name (lowercase "
                           "path components), PREFIX/* or *")
    return (name + "/", True) if wildcard else (name, False)


def check_cache_rule(name: str, rule: CacheRule) -> None:
    if not RULE_NAME.fullmatch(name):
        raise InvalidValue(f"a cache rule's name is 1 to 50 letters, digits and hyphens, "
                           f"starting with a letter or digit, not {name[:64]!r}")
    source = parse_source_repo(rule.source_repo)
    _, wildcard = check_target(rule.target_repo)
    if source.wildcard != wildcard:
        raise InvalidValue(f"--source-repo {rule.source_repo[:200]!r} and --target-repo "
                           f"{rule.target_repo[:200]!r}: both end in /* (a wildcard rule) or "
                           "neither does")
    if rule.credential_set and not RULE_NAME.fullmatch(rule.credential_set):
        raise InvalidValue(f"{rule.credential_set[:64]!r} is not a credential set's name")


def overlaps(a: CacheRule, b: CacheRule) -> bool:
    """Whether two rules cannot both exist (see the module docstring)."""
    a_target, a_wild = check_target(a.target_repo)
    b_target, b_wild = check_target(b.target_repo)
    if a_wild and b_wild:
        return a_target.startswith(b_target) or b_target.startswith(a_target)
    if not a_wild and not b_wild:
        return a_target == b_target
    return False


@dataclass(frozen=True, slots=True)
class Mapping:
    """What a repository of this registry is a cache of."""

    rule: str                  # the rule's name
    host: str                  # upstream host[:port]
    repository: str            # the upstream repository
    credential_set: str


def rule_for(rules: list[tuple[str, CacheRule]], repository: str) -> Mapping | None:
    """The rule covering ``repository`` (a static rule before a wildcard),
    and the upstream repository it maps to; None if no rule covers it."""
    best: tuple[int, Mapping] | None = None
    for name, rule in rules:
        try:
            target, wildcard = check_target(rule.target_repo)
            source = parse_source_repo(rule.source_repo)
        except InvalidValue:
            continue            # written by a newer georeg, or damaged: covers nothing here
        if not wildcard:
            if target == repository:
                return Mapping(name, source.host, source.repository, rule.credential_set)
            continue
        if repository.startswith(target) and len(repository) > len(target):
            upstream = source.repository + repository[len(target):]
            found = Mapping(name, source.host, upstream, rule.credential_set)
            if best is None or len(target) > best[0]:
                best = (len(target), found)
    return best[1] if best else None


# -- credential sets -----------------------------------------------------------------------


def check_credential_set(name: str, credentials: CredentialSet) -> None:
    if not RULE_NAME.fullmatch(name):
        raise InvalidValue(f"a credential set's name is 1 to 50 letters, digits and hyphens, "
                           f"starting with a letter or digit, not {name[:64]!r}")
    try:
        parsed = parse_source(f"{credentials.login_server}/x")
    except UpstreamError:
        parsed = None
    if parsed is None or parsed.registry != credentials.login_server:
        raise InvalidValue(f"--login-server {credentials.login_server[:200]!r} is not a registry "
                           "host (a host name with a dot or a port, or localhost)")
    if not credentials.username or len(credentials.username) > MAX_USERNAME \
            or any(c in credentials.username for c in "\r\n\0:"):
        raise InvalidValue(f"a username is 1 to {MAX_USERNAME} characters, without ':', line "
                           "breaks or NUL")
    if is_sealed(credentials.password):
        try:
            check_form(credentials.password, 4 * MAX_PASSWORD)
        except SealedValueError as exc:
            raise InvalidValue(f"the password's sealed value {exc}") from None
    else:
        check_password(credentials.password)


def check_password(password: str) -> None:
    # Never echo the value.
    if not password or len(password) > MAX_PASSWORD or any(c in password for c in "\r\n\0"):
        raise InvalidValue(f"a password is 1 to {MAX_PASSWORD} characters, without line breaks "
                           "or NUL")


def _place(name: str) -> tuple[str, str]:
    return ("credential-set-password", name)


def seal_password(key: ConfigurationKey, name: str, password: str) -> str:
    """The password of credential set ``name``, checked and sealed: what the
    control plane writes."""
    check_password(password)
    return key.seal(password, _place(name))


def open_password(key: ConfigurationKey, name: str, password: str) -> str:
    """The plaintext of a stored password; ``InvalidValue`` (naming the set,
    never the value) if it does not open here."""
    if not is_sealed(password):
        return password
    try:
        return key.open(password, _place(name), 4 * MAX_PASSWORD)
    except SealedValueError as exc:
        raise InvalidValue(f"credential set {name!r}: its password {exc} (sealed for another "
                           "set, or with another configuration key); set it again with "
                           "`georeg credential-set update --password`") from None


def sealed_credential_set(key: ConfigurationKey, name: str,
                          credentials: CredentialSet) -> CredentialSet:
    """As a node stores it when written to its route: a plaintext password
    sealed with the node's key, a sealed one kept if it opens here."""
    if is_sealed(credentials.password):
        open_password(key, name, credentials.password)
        return credentials
    return msgspec.structs.replace(credentials, password=seal_password(key, name,
                                                                       credentials.password))
