"""HTTP-level faults at an endpoint: what a client's retry logic must survive
(after LocalStack's chaos API and Toxiproxy's toxics).

A rule matches requests by method and path (a regular expression searched
in the path, query excluded) and, with its probability, does one of:

* ``status``: the endpoint answers itself, with that status and an OCI error
  body (``TOOMANYREQUESTS`` with ``Retry-After`` for 429, ``UNAVAILABLE``
  with ``Retry-After`` for 503, ``UNKNOWN`` otherwise); no node sees the
  request, so the answer is definite: it did not happen;
* ``reset``: the client's connection is reset before the request goes
  anywhere (Toxiproxy's ``reset_peer``);
* ``truncate``: the request goes to its node as usual, and the response's
  body is cut off halfway (after its head): the client's connection closes
  early, as Toxiproxy's ``limit_data`` does. The client holds a short body,
  which no client of a registry mistakes for content (digest, length).

Rules are evaluated in the order they were added; the first that matches
and whose draw falls under its probability acts. Each endpoint draws from
its own ``random.Random`` per rule, seeded from the rule's seed and the
endpoint's name, so the same seed gives an endpoint the same decisions for
the same sequence of requests. IO-free: the proxy (``cluster.routing.proxy``)
asks ``HttpFaults.decide`` once per request and acts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from ..network.links import link_seed

ACTIONS = ("status", "reset", "truncate")
METHODS = ("GET", "HEAD", "PUT", "PATCH", "POST", "DELETE")   # what a registry client sends
STATUSES = (429, 500, 502, 503, 504)
# Seconds a 429 or 503 asks the client to wait (short: tests retry through it).
RETRY_AFTER_S = 1
_CODES = {429: "TOOMANYREQUESTS", 502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "UNAVAILABLE"}


@dataclass(frozen=True, slots=True)
class HttpFaultRule:
    """One fault (``cluster.faults.controller``): its id, what it does, to what."""

    fault_id: str
    action: str
    probability: float = 1.0
    status: int = 503
    method: str | None = None           # upper case; None: every method
    path_regex: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}, not {self.action!r}")
        if not 0 < self.probability <= 1:
            raise ValueError(f"probability must be in (0, 1], not {self.probability!r}")
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.action == "status" and self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(map(str, STATUSES))}, "
                             f"not {self.status!r}")
        if self.path_regex is not None:
            try:
                re.compile(self.path_regex)
            except re.error as exc:
                raise ValueError(f"path regex {self.path_regex!r} is invalid: {exc}") from None

    def matches(self, method: str, path: str) -> bool:
        return ((self.method is None or self.method == method)
                and (self.path_regex is None or re.search(self.path_regex, path) is not None))


@dataclass(frozen=True, slots=True)
class HttpFaultDecision:
    fault_id: str
    action: str
    status: int

    def error(self) -> tuple[str, str, dict[str, str]]:
        """The OCI error code, message and extra headers of a ``status`` answer."""
        code = _CODES.get(self.status, "UNKNOWN")
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status in (429, 503) else {}
        message = (f"injected by fault {self.fault_id} (georeg fault http): HTTP {self.status}; "
                   "the request did not reach the registry")
        return code, message, headers


@dataclass
class HttpFaults:
    """The rules active at one endpoint, each with its own seeded draws."""

    endpoint: str
    rules: list[tuple[HttpFaultRule, random.Random]] = field(default_factory=list)
    injected: dict[str, int] = field(default_factory=dict)   # per fault id

    def set_rules(self, rules: list[HttpFaultRule]) -> None:
        """Replace the rules; a rule kept keeps its draws where they were."""
        kept = {rule: rng for rule, rng in self.rules}
        self.rules = [(rule, kept.get(rule) or random.Random(self.seed_of(rule.seed)))
                      for rule in rules]

    def seed_of(self, seed: int) -> int:
        """This endpoint's draws for a rule seeded ``seed``."""
        return link_seed(seed, self.endpoint, "http")

    def decide(self, method: str, path: str) -> HttpFaultDecision | None:
        for rule, rng in self.rules:
            if rule.matches(method, path) and (rule.probability >= 1
                                               or rng.random() < rule.probability):
                self.injected[rule.fault_id] = self.injected.get(rule.fault_id, 0) + 1
                return HttpFaultDecision(rule.fault_id, rule.action, rule.status)
        return None
