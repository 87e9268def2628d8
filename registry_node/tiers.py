"""The registry's tiers (ACR's SKUs) and what each allows, as data: one table
that the node (its storage maximum) and the control plane (counted limits,
SKU changes, ``show-usage``) both read, so a number is written once.

Sources (``docs/tiers.md`` cites them): ACR's "service tier features and
limits" (included storage 10 / 100 / 500 GiB; webhooks 2 / 10 / 500; scope
maps and tokens 100 / 500 / 50,000; geo-replication, zone redundancy,
private endpoints and IP rules Premium only, 200 of each; anonymous pull
Standard and Premium; requests per minute per replica, reads / writes /
deletes / referrers listings: 10,000 / 2,000 / 1,000 / 500 for Basic and
Standard, 20,000 / 4,000 / 4,000 / 2,000 for Premium), the blob bandwidth
of the older SKU page (30 / 60 / 100 MB/s down, 10 / 20 / 50 up;
``docs/bandwidth.md`` says why megabytes), and the registry storage maximum: 40 TiB for every
tier since April 2024, raised to 100 TiB for Premium in 2026 (Azure/acr
#852) — the current numbers are taken, as the issue asks.

Sizes are written as ACR and the spec write them (``200MiB``, ``40TiB``):
``parse_size`` and ``format_size``.

No I/O here: a tier is a name, its limits a frozen value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

BASIC, STANDARD, PREMIUM = "Basic", "Standard", "Premium"
TIERS = (BASIC, STANDARD, PREMIUM)
DEFAULT_TIER = PREMIUM          # georeg's default spec, and a node told no tier

GiB = 1024**3
TiB = 1024**4


@dataclass(frozen=True, slots=True)
class TierLimits:
    included_storage: int          # bytes billed in the tier's price (``show-usage``'s Size limit)
    maximum_storage: int           # bytes a registry may hold at most: uploads past it are refused
    webhooks: int
    scope_maps: int
    tokens: int
    geo_replication: bool          # replicas, and zone redundancy
    anonymous_pull: bool
    private_endpoints: int         # 0: not in this tier (georeg has no private endpoints yet)
    ip_rules: int                  # 0: not in this tier (georeg has no IP rules yet)
    # Requests per minute per replica, by kind (``registry_node.throttle``).
    reads_per_min: int
    writes_per_min: int
    deletes_per_min: int
    referrers_per_min: int
    # Blob bytes per second per replica, (download, upload), in megabytes.
    bandwidth_mbytes_per_s: tuple[int, int]

    def requests_per_min(self) -> dict[str, float]:
        """The request rates, keyed as the spec's ``[limits]`` keys them."""
        return {"reads_per_min": self.reads_per_min, "writes_per_min": self.writes_per_min,
                "deletes_per_min": self.deletes_per_min,
                "referrers_per_min": self.referrers_per_min}


LIMITS: dict[str, TierLimits] = {
    BASIC: TierLimits(included_storage=10 * GiB, maximum_storage=40 * TiB, webhooks=2,
                      scope_maps=100, tokens=100, geo_replication=False, anonymous_pull=False,
                      private_endpoints=0, ip_rules=0, reads_per_min=10_000,
                      writes_per_min=2_000, deletes_per_min=1_000, referrers_per_min=500,
                      bandwidth_mbytes_per_s=(30, 10)),
    STANDARD: TierLimits(included_storage=100 * GiB, maximum_storage=40 * TiB, webhooks=10,
                         scope_maps=500, tokens=500, geo_replication=False, anonymous_pull=True,
                         private_endpoints=0, ip_rules=0, reads_per_min=10_000,
                         writes_per_min=2_000, deletes_per_min=1_000, referrers_per_min=500,
                         bandwidth_mbytes_per_s=(60, 20)),
    PREMIUM: TierLimits(included_storage=500 * GiB, maximum_storage=100 * TiB, webhooks=500,
                        scope_maps=50_000, tokens=50_000, geo_replication=True,
                        anonymous_pull=True, private_endpoints=200, ip_rules=200,
                        reads_per_min=20_000, writes_per_min=4_000, deletes_per_min=4_000,
                        referrers_per_min=2_000, bandwidth_mbytes_per_s=(100, 50)),
}


def limits(tier: str) -> TierLimits:
    """The limits of ``tier``; an unknown name (a newer georeg's tier) reads as
    the default tier's, so a node never refuses for a name it does not know."""
    return LIMITS.get(tier, LIMITS[DEFAULT_TIER])


def canonical(name: str) -> str | None:
    """``name`` as ACR spells the tier (``premium`` → ``Premium``), or None."""
    for tier in TIERS:
        if tier.lower() == name.strip().lower():
            return tier
    return None


_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": GiB, "tib": TiB, "eib": 1024**6}
# Far above any tier's maximum, yet bounded: a number past it is a typo.
MAX_SIZE = 1024**6
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def parse_size(text: str | int) -> int:
    """Bytes from ``200MiB``, ``1.5 GiB``, ``10GB`` (powers of 1000) or a plain
    number, read exactly (a fraction of a byte is dropped) and at most
    ``MAX_SIZE``; ``ValueError`` saying what is accepted."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"a size is not negative, got {text}")
        size = Fraction(text)
    else:
        match = _SIZE.fullmatch(str(text))
        unit = match[2].lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"{str(text)[:40]!r} is not a size: write bytes, or a number with "
                             f"one of B, KiB, MiB, GiB, TiB, EiB (1024s) or KB, MB, GB, TB "
                             f"(1000s)")
        size = Fraction(match[1]) * _UNITS[unit]     # exact: no float, so no overflow
    if size > MAX_SIZE:
        raise ValueError(f"{str(text)[:40]!r} is too large: a size is at most 1 EiB")
    return int(size)


def format_size(n: int) -> str:
    """``n`` bytes for people: ``200.0 MiB``."""
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
