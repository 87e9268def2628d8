"""Data residency as data: which regions' content may travel where.

By default, Azure's rule: content first written in Brazil South or Southeast
Asia never leaves its region; everything else may go everywhere. Overrides by
repository pattern can confine more (a repository pinned to its origin region)
or release a repository from a confined region. The replicator asks one
question, ``allows(origin_region, repository, destination_region)``, at the
sender (nothing is sent that may not be) and again at the receiver.
"""

from __future__ import annotations

import fnmatch

import msgspec

DEFAULT_CONFINED = ("brazilsouth", "southeastasia")


class RepositoryRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    repository: str              # a glob, e.g. "team-a/*"
    confined: bool               # True: stays in its origin region; False: may go anywhere


class ResidencyPolicy(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    confined_regions: tuple[str, ...] = DEFAULT_CONFINED
    repositories: tuple[RepositoryRule, ...] = ()

    def confined(self, origin_region: str, repository: str) -> bool:
        for rule in self.repositories:
            if fnmatch.fnmatchcase(repository, rule.repository):
                return rule.confined
        return origin_region in self.confined_regions

    def allows(self, origin_region: str, repository: str, destination_region: str) -> bool:
        return origin_region == destination_region or not self.confined(origin_region, repository)
