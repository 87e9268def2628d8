"""Request throttling, as ACR does it: token buckets per replica and per
identity, continuously refilled, by kind of request.

Kinds (``request_kind`` in ``api.throttling`` decides a request's):
``read`` (GET, HEAD, OPTIONS), ``write`` (PUT, PATCH, POST), ``delete``,
and ``referrers`` (a referrers listing, which counts there and not as a read).

Buckets, each refilled at its rate per minute and holding ``burst_s``
seconds of it (a minute's worth unless told; at least one request):

* the replica's, one per limited kind, at the rate of ``RequestLimits``;
* each identity's, at ``per_identity_fraction`` of it (ACR: half), created
  when the identity first asks, the least recently used forgotten past
  ``MAX_IDENTITY_BUCKETS``; a request with no identity (a node without
  auth) has none. Requests whose identity is not known (the token endpoint
  before it checks the login, anonymous pulls) are one pseudo-identity,
  ``api.throttling.UNAUTHENTICATED``, so together they take at most one
  identity's share and leave the rest to those who logged in;
* a throttling fault's (``set_fault``), one per kind it names, for the
  whole replica, on top of the others, holding ``FAULT_BURST_S`` of its rate
  (at least one request): a fault is a replica at its limit already.

A request is admitted when every bucket it draws on holds a whole token, and
then takes one from each; otherwise it takes none and is refused with the
time until each empty bucket holds one again — ``Throttled.retry_after``,
whole seconds, rounded up (at most ``MAX_RETRY_AFTER_S``), which counts down
across retries because refused requests take nothing. A request admitted and
then not served after all (a download hand-over declined) gives its token
back (``refund``).

New limits (``configure``, a reload of the node's view) re-rate only the
kinds whose rate or burst changed, keeping what their buckets hold (no
reload is a free refill); the others' buckets, and identities', go on as
they were.

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
(``refusals``, the node's metrics and status), for at most
``MAX_REFUSED_IDENTITIES`` identities; later ones are counted as ``OTHER``,
so no flood of identities grows the counts or the metrics' labels. Nothing here does I/O; the
clock is injected.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated

import msgspec

from .config import RequestLimits, request_rate, with_overrides

READ, WRITE, DELETE, REFERRERS = "read", "write", "delete", "referrers"
KINDS = (READ, WRITE, DELETE, REFERRERS)
# Which limit refused a request.
REPLICA, IDENTITY, FAULT = "replica", "identity", "fault"
# What a request with no identity is counted as (a node without auth).
NO_IDENTITY = ""
# Identity buckets kept at most; past it the least recently used goes
# (forgiving what it owed).
MAX_IDENTITY_BUCKETS = 10_000
# Identities whose refusals are counted by name; the rest are counted as OTHER.
MAX_REFUSED_IDENTITIES = 100
OTHER = "(other)"
# The longest Retry-After told: a day (a rate of a request in 100 minutes, shared
# by a millionth, would otherwise say years).
MAX_RETRY_AFTER_S = 86_400
# The most one sibling's report may count for one bucket (a report covers a
# quarter of a second; this is far past any node's rate, and keeps the
# arithmetic on floats).
MAX_DEBIT = 1_000_000_000
# The most a sibling's reports can put a bucket in debt: a minute of its rate.
MAX_DEBT_S = 60.0
FAULT_BURST_S = 1.0


class TokenBucket:
    """One bucket: ``tokens`` refilled at ``rate`` a second, up to ``capacity``
    (``burst_s`` seconds of its rate, at least one), as of ``stamp``. A request
    takes a whole token; a sibling's report (``debit``) may leave it in debt,
    at most ``MAX_DEBT_S`` of its rate."""

    __slots__ = ("rate", "capacity", "tokens", "stamp", "per_minute", "burst_s")

    def __init__(self, per_minute: float, burst_s: float, now: float) -> None:
        self.per_minute, self.burst_s = per_minute, burst_s
        self.rate = per_minute / 60.0               # tokens per second
        self.capacity = max(1.0, self.rate * burst_s)
        self.tokens = self.capacity
        self.stamp = now

    def rerate(self, per_minute: float, burst_s: float, now: float) -> None:
        """Refill at ``per_minute`` from now on, keeping what it holds (up to its
        new capacity)."""
        self.refill(now)
        self.per_minute, self.burst_s = per_minute, burst_s
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.tokens = min(self.tokens, self.capacity)

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
        """Whole seconds, rounded up, never 0, at most ``MAX_RETRY_AFTER_S``."""
        if not self.wait_s < MAX_RETRY_AFTER_S:
            return MAX_RETRY_AFTER_S
        return max(1, math.ceil(self.wait_s - 1e-9))


# Debits as siblings send them: {"replica": {kind: n}, "fault": {kind: n},
# "identities": {identity: {kind: n}}}.
Debits = dict[str, dict]
_Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_DEBIT)]


class DebitReport(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A zone sibling's report (``Debits``), checked whole before any of it is
    taken (``Throttle.debit``): counts are whole numbers from 0 to ``MAX_DEBIT``."""

    replica: dict[str, _Count] = {}
    fault: dict[str, _Count] = {}
    identities: dict[str, dict[str, _Count]] = {}


class Throttle:
    """The node's buckets. ``active`` is False while nothing is limited (no
    limits, no fault): callers skip ``admit`` then."""

    def __init__(self, limits: RequestLimits | None = None,
                 monotonic: Callable[[], float] = time.monotonic, *,
                 shared: bool = False, overrides: Mapping[str, float] | None = None) -> None:
        """``shared``: this node has zone siblings; what it admits is kept for
        them (``take_debits``), and ``on_debits`` is called whenever some
        starts waiting. ``overrides``: ``RequestLimits``' fields the node's
        command line set, kept over every ``limits`` configured."""
        self._clock = monotonic
        self._sharing = shared
        self.overrides = dict(overrides or {})
        self.on_debits: Callable[[], None] = lambda: None
        self.limits: RequestLimits | None = None
        self.fault_rates: dict[str, float] = {}
        self._replica: dict[str, TokenBucket] = {}
        self._fault: dict[str, TokenBucket] = {}
        self._identity_rates: dict[str, float] = {}
        # Least recently used first.
        self._identities: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()
        self._debits: dict[tuple[str, str, str], int] = {}   # (scope, identity, kind) -> taken
        # (kind, identity, limit) -> requests refused
        self.refusals: dict[tuple[str, str, str], int] = {}
        self._refused_identities: set[str] = set()
        self.active = False
        self.configure(limits)

    # -- settings ------------------------------------------------------------------------

    def configure(self, limits: RequestLimits | None) -> None:
        """Limit requests as ``limits`` says from now on (None: not at all, faults
        aside), with the command line's ``overrides`` over them. A kind newly
        limited starts with a full bucket; one whose rate or burst changed is
        re-rated, keeping what its buckets hold; the rest go on as they were."""
        now = self._clock()
        limits = with_overrides(limits, self.overrides)
        self.limits = limits
        rates = limits.per_minute() if limits is not None else {}
        burst = limits.burst_s if limits is not None else 0.0
        fraction = limits.per_identity_fraction if limits is not None else 1.0
        replica: dict[str, TokenBucket] = {}
        for kind, rate in rates.items():
            bucket = self._replica.get(kind)
            if bucket is None:
                bucket = TokenBucket(rate, burst, now)
            elif (bucket.per_minute, bucket.burst_s) != (rate, burst):
                bucket.rerate(rate, burst, now)
            replica[kind] = bucket
        self._replica = replica
        self._identity_rates = {kind: rate * fraction for kind, rate in rates.items()}
        for key, bucket in list(self._identities.items()):
            rate = self._identity_rates.get(key[1])
            if rate is None:
                del self._identities[key]
            elif (bucket.per_minute, bucket.burst_s) != (rate, burst):
                bucket.rerate(rate, burst, now)
        self._update_active()

    def set_fault(self, rates: Mapping[str, float]) -> None:
        """Throttle the replica to ``rates`` (per minute, by kind) on top of its
        limits, until set again (``{}``: the fault is healed)."""
        checked = {}
        for kind, rate in rates.items():
            if kind not in KINDS:
                raise ValueError(f"{kind!r} is not a kind of request; one of {', '.join(KINDS)}")
            checked[kind] = request_rate(rate, f"a {kind} rate")
        rates = checked
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
                else:
                    self._identities.move_to_end((identity, kind))
                if own.refill(now) < 1.0 and own.wait() > wait:
                    wait, limit, rate = own.wait(), IDENTITY, own.rate
        if limit:
            who = NO_IDENTITY if identity is None else identity
            if counted:
                self._count_refusal(kind, who, limit)
            raise Throttled(kind, who, limit, wait, rate * 60.0)
        if replica is not None:
            replica.tokens -= 1.0
        if fault is not None:
            fault.tokens -= 1.0
        if own is not None:
            own.tokens -= 1.0
        if self._sharing:
            self._owe(kind, replica, fault, own, identity)

    def refund(self, kind: str, identity: str | None) -> None:
        """Give back the token ``admit`` took for a request that was not served
        after all (the hand-over declined it, and the HTTP chain takes its own)."""
        now = self._clock()
        buckets = [self._replica.get(kind), self._fault.get(kind) if self._fault else None]
        if identity is not None:
            buckets.append(self._identities.get((identity, kind)))
        for bucket in buckets:
            if bucket is not None:
                bucket.refill(now)
                bucket.tokens = min(bucket.capacity, bucket.tokens + 1.0)
        if self._sharing:       # not reported yet: not reported at all
            for key in (("replica", "", kind), ("fault", "", kind),
                        ("identity", identity, kind)):
                if self._debits.get(key, 0) > 1:
                    self._debits[key] -= 1
                else:
                    self._debits.pop(key, None)

    def _count_refusal(self, kind: str, identity: str, limit: str) -> None:
        key = (kind, identity, limit)
        if key not in self.refusals and identity not in self._refused_identities:
            if len(self._refused_identities) >= MAX_REFUSED_IDENTITIES:
                key = (kind, OTHER, limit)
            else:
                self._refused_identities.add(identity)
        self.refusals[key] = self.refusals.get(key, 0) + 1

    def _identity_bucket(self, identity: str, kind: str, rate: float, now: float) -> TokenBucket:
        if len(self._identities) >= MAX_IDENTITY_BUCKETS:
            self._identities.popitem(last=False)
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

    def debit(self, debits: Debits | DebitReport) -> None:
        """Take what a zone sibling admitted out of this node's buckets. Kinds
        or scopes this node does not limit are ignored; ``ValueError`` for a
        report that is not one, before any of it is taken."""
        if not isinstance(debits, DebitReport):
            try:
                debits = msgspec.convert(debits, DebitReport)
            except msgspec.ValidationError as exc:
                raise ValueError(f"not a report of counts by kind: {exc}") from None
        now = self._clock()
        for counts, buckets in ((debits.replica, self._replica), (debits.fault, self._fault)):
            for kind, count in counts.items():
                bucket = buckets.get(kind)
                if bucket is not None:
                    bucket.debit(count, now)
        for identity, counts in debits.identities.items():
            for kind, count in counts.items():
                rate = self._identity_rates.get(kind)
                if rate is None:
                    continue
                bucket = self._identities.get((identity, kind))
                if bucket is None:
                    bucket = self._identity_bucket(identity, kind, rate, now)
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


def _by_identity(refusals: dict[tuple[str, str, str], int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (kind, identity, _), count in refusals.items():
        counts = out.setdefault(identity or "-", {})
        counts[kind] = counts.get(kind, 0) + count
    return out
