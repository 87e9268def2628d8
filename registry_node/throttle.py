"""Request throttling, as ACR does it: token buckets per replica and per
identity, continuously refilled, by kind of request.

Kinds (``request_kind`` in ``api.throttling`` decides a request's):
``read`` (GET, HEAD, OPTIONS), ``write`` (PUT, PATCH, POST), ``delete``,
and ``referrers`` (a referrers listing, which counts there and not as a read).

Buckets, each refilled at its rate per minute and holding ``burst_s``
seconds of it (a minute's worth unless told; at least one request):

* the replica's, one per limited kind, at the rate of ``RequestLimits``;
* each identity's, at ``per_identity_fraction`` of it (ACR: half), created
  when the identity first asks; a request with no identity (a node without
  auth) has none;
* a throttling fault's (``set_fault``), one per kind it names, for the
  whole replica, on top of the others, holding ``FAULT_BURST_S`` of its rate
  (at least one request): a fault is a replica at its limit already.

A request is admitted when every bucket it draws on holds a whole token, and
then takes one from each; otherwise it takes none and is refused with the
time until each empty bucket holds one again — ``Throttled.retry_after``,
whole seconds, rounded up, which counts down across retries because refused
requests take nothing.

Zones. A zone-redundant replica's nodes are separate processes, and routing
sends each repository to one zone (``cluster.routing.policy``), so an even
split of the rate would give a one-repository client a third of the
replica's limit. Instead every zone node runs the replica's full buckets and
reports what it admitted to its siblings (``take_debits``, sent by
``zone_debits``); a sibling's report is taken out of the same buckets here
(``debit``), which may leave them in debt. Over any stretch the replica
admits its rate (and a bucket's worth); in a burst that reaches several
zones at once it may admit more, per other zone what that zone admits before
its report lands (about one report interval's worth, never more than a
bucket holds), repaid by waits once the reports land. A report lost to a
sibling that cannot be reached is not repaid.

Refusals are counted by kind, identity and which limit refused
(``refusals``, the node's metrics and status). Nothing here does I/O; the
clock is injected.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .config import RequestLimits

READ, WRITE, DELETE, REFERRERS = "read", "write", "delete", "referrers"
KINDS = (READ, WRITE, DELETE, REFERRERS)
# Which limit refused a request.
REPLICA, IDENTITY, FAULT = "replica", "identity", "fault"
# What a request with no identity is counted as (a node without auth).
NO_IDENTITY = ""
# Identity buckets kept at most; past it the oldest goes (forgiving what it owed).
MAX_IDENTITY_BUCKETS = 10_000
# The most a sibling's reports can put a bucket in debt: a minute of its rate.
MAX_DEBT_S = 60.0
FAULT_BURST_S = 1.0


class TokenBucket:
    __slots__ = ("rate", "capacity", "tokens", "stamp")

    def __init__(self, per_minute: float, burst_s: float, now: float) -> None:
        self.rate = per_minute / 60.0               # tokens per second
        self.capacity = max(1.0, self.rate * burst_s)
        self.tokens = self.capacity
        self.stamp = now

    def refill(self, now: float) -> float:
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.capacity:
            tokens = self.capacity
        self.tokens = tokens
        self.stamp = now
        return tokens

    def wait(self) -> float:
        """Seconds until the bucket (as last refilled) holds a whole token."""
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def debit(self, count: int, now: float) -> None:
        self.refill(now)
        self.tokens = max(self.tokens - count, -self.rate * MAX_DEBT_S)


@dataclass(frozen=True, slots=True)
class Throttled(Exception):
    """A request refused: ``limit`` (REPLICA, IDENTITY or FAULT) is the one with
    the longest wait; ``wait_s`` until every bucket it draws on holds a token."""

    kind: str
    identity: str
    limit: str
    wait_s: float
    per_minute: float           # the refusing limit's rate

    @property
    def retry_after(self) -> int:
        """Whole seconds, rounded up, never 0."""
        return max(1, math.ceil(self.wait_s - 1e-9))


# Debits as siblings send them: {"replica": {kind: n}, "fault": {kind: n},
# "identities": {identity: {kind: n}}}.
Debits = dict[str, dict]


class Throttle:
    """The node's buckets. ``active`` is False while nothing is limited (no
    limits, no fault): callers skip ``admit`` then."""

    def __init__(self, limits: RequestLimits | None = None,
                 monotonic: Callable[[], float] = time.monotonic, *,
                 shared: bool = False) -> None:
        """``shared``: this node has zone siblings; what it admits is kept for
        them (``take_debits``), and ``on_debits`` is called whenever some
        starts waiting."""
        self._clock = monotonic
        self._sharing = shared
        self.on_debits: Callable[[], None] = lambda: None
        self.limits: RequestLimits | None = None
        self.fault_rates: dict[str, float] = {}
        self._replica: dict[str, TokenBucket] = {}
        self._fault: dict[str, TokenBucket] = {}
        self._identity_rates: dict[str, float] = {}
        self._identities: dict[tuple[str, str], TokenBucket] = {}
        self._debits: dict[tuple[str, str, str], int] = {}   # (scope, identity, kind) -> taken
        # (kind, identity, limit) -> requests refused
        self.refusals: dict[tuple[str, str, str], int] = {}
        self.active = False
        self.configure(limits)

    # -- settings ------------------------------------------------------------------------

    def configure(self, limits: RequestLimits | None) -> None:
        """Limit requests as ``limits`` says from now on (None: not at all, faults
        aside). Buckets start full; identities' start afresh."""
        now = self._clock()
        self.limits = limits
        rates = limits.per_minute() if limits is not None else {}
        burst = limits.burst_s if limits is not None else 0.0
        self._replica = {kind: TokenBucket(rate, burst, now) for kind, rate in rates.items()}
        fraction = limits.per_identity_fraction if limits is not None else 1.0
        self._identity_rates = {kind: rate * fraction for kind, rate in rates.items()}
        self._identities.clear()
        self._update_active()

    def set_fault(self, rates: Mapping[str, float]) -> None:
        """Throttle the replica to ``rates`` (per minute, by kind) on top of its
        limits, until set again (``{}``: the fault is healed)."""
        for kind, rate in rates.items():
            if kind not in KINDS:
                raise ValueError(f"{kind!r} is not a kind of request; one of {', '.join(KINDS)}")
            if not rate > 0:
                raise ValueError(f"a {kind} rate must be more than 0 requests per minute")
        now = self._clock()
        self.fault_rates = dict(rates)
        self._fault = {kind: TokenBucket(rate, FAULT_BURST_S, now) for kind, rate in rates.items()}
        self._update_active()

    def _update_active(self) -> None:
        self.active = bool(self._replica or self._fault)

    # -- the request chain ------------------------------------------------------------------

    def admit(self, kind: str, identity: str | None, *, counted: bool = True) -> None:
        """Take a token for a ``kind`` request by ``identity`` (None: none known)
        from every bucket it draws on, or raise ``Throttled`` and take nothing
        (and count the refusal unless not ``counted``: a caller that passes the
        request on to be refused again)."""
        now = self._clock()
        wait, limit, rate = 0.0, "", 0.0
        replica = self._replica.get(kind)
        if replica is not None and replica.refill(now) < 1.0:
            wait, limit, rate = replica.wait(), REPLICA, replica.rate
        fault = self._fault.get(kind) if self._fault else None
        if fault is not None and fault.refill(now) < 1.0 and fault.wait() > wait:
            wait, limit, rate = fault.wait(), FAULT, fault.rate
        own = None
        if identity is not None:
            own_rate = self._identity_rates.get(kind)
            if own_rate is not None:
                own = self._identities.get((identity, kind))
                if own is None:
                    own = self._identity_bucket(identity, kind, own_rate, now)
                if own.refill(now) < 1.0 and own.wait() > wait:
                    wait, limit, rate = own.wait(), IDENTITY, own.rate
        if limit:
            who = NO_IDENTITY if identity is None else identity
            if counted:
                key = (kind, who, limit)
                self.refusals[key] = self.refusals.get(key, 0) + 1
            raise Throttled(kind, who, limit, wait, rate * 60.0)
        if replica is not None:
            replica.tokens -= 1.0
        if fault is not None:
            fault.tokens -= 1.0
        if own is not None:
            own.tokens -= 1.0
        if self._sharing:
            self._owe(kind, replica, fault, own, identity)

    def _identity_bucket(self, identity: str, kind: str, rate: float, now: float) -> TokenBucket:
        if len(self._identities) >= MAX_IDENTITY_BUCKETS:
            del self._identities[next(iter(self._identities))]
        bucket = self._identities[identity, kind] = TokenBucket(rate, self.limits.burst_s, now)
        return bucket

    def _owe(self, kind: str, replica: TokenBucket | None, fault: TokenBucket | None,
             own: TokenBucket | None, identity: str | None) -> None:
        debits = self._debits
        if not debits:
            self.on_debits()
        if replica is not None:
            key = ("replica", "", kind)
            debits[key] = debits.get(key, 0) + 1
        if fault is not None:
            key = ("fault", "", kind)
            debits[key] = debits.get(key, 0) + 1
        if own is not None:
            key = ("identity", identity, kind)
            debits[key] = debits.get(key, 0) + 1

    # -- zones ---------------------------------------------------------------------------

    def take_debits(self) -> Debits | None:
        """What this node admitted since the last call, for its zone siblings
        (None: nothing)."""
        if not self._debits:
            return None
        out: Debits = {}
        for (scope, identity, kind), count in self._debits.items():
            if scope == "identity":
                out.setdefault("identities", {}).setdefault(identity, {})[kind] = count
            else:
                out.setdefault(scope, {})[kind] = count
        self._debits.clear()
        return out

    def debit(self, debits: Debits) -> None:
        """Take what a zone sibling admitted out of this node's buckets. Kinds
        or scopes this node does not limit are ignored; ``ValueError`` for a
        report that is not one."""
        now = self._clock()
        for scope, buckets in (("replica", self._replica), ("fault", self._fault)):
            for kind, count in _counts(debits.get(scope, {})).items():
                bucket = buckets.get(kind)
                if bucket is not None:
                    bucket.debit(count, now)
        identities = debits.get("identities", {})
        if not isinstance(identities, dict):
            raise ValueError("identities must map identities to counts by kind")
        for identity, counts in identities.items():
            for kind, count in _counts(counts).items():
                rate = self._identity_rates.get(kind)
                if rate is None:
                    continue
                bucket = self._identities.get((identity, kind))
                if bucket is None:
                    bucket = self._identity_bucket(str(identity), kind, rate, now)
                bucket.debit(count, now)

    # -- reporting ------------------------------------------------------------------------

    def refused_by_kind(self) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for (kind, _, _), count in self.refusals.items():
            out[kind] += count
        return out

    def describe(self) -> dict:
        """Limits, fault, what the replica's and the fault's buckets hold now,
        and refusals, as the node reports them."""
        limits = self.limits
        now = self._clock()
        return {
            "limits": None if limits is None else {
                "per_minute": limits.per_minute(),
                "per_identity_fraction": limits.per_identity_fraction,
                "burst_s": limits.burst_s},
            "shared_with_zones": self._sharing,
            "fault": dict(self.fault_rates),
            "tokens": {scope: {kind: round(bucket.refill(now), 3) for kind, bucket in buckets.items()}
                       for scope, buckets in ((REPLICA, self._replica), (FAULT, self._fault))},
            "refused": self.refused_by_kind(),
            "refused_by_identity": _by_identity(self.refusals),
        }


def _counts(raw: object) -> dict[str, int]:
    if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in raw.items()):
        raise ValueError("counts must map kinds to whole numbers of requests")
    return raw


def _by_identity(refusals: dict[tuple[str, str, str], int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (kind, identity, _), count in refusals.items():
        counts = out.setdefault(identity or "-", {})
        counts[kind] = counts.get(kind, 0) + count
    return out
