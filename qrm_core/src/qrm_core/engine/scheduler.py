"""Matching virtual environments' requirements to idle resources, in memory.

The reconciler loads the idle, unassigned resources once per pass and asks
this pool for each VE in turn, so placing a thousand VEs costs one query plus
in-memory work. Candidates are grouped by (kind, hypervisor) and kept sorted by
size: a VE gets the *smallest* resources that meet its minimums (best fit, so
big machines stay free for big VEs). A shared pool is spread: each next member
comes from the host with the fewest members of that VE so far.
"""

from __future__ import annotations

import bisect
import operator
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    id: int
    kind: str
    hypervisor: str | None
    cpus: int
    memory_mb: int
    host_key: int  # the physical machine it runs on (itself for a physical resource)


@dataclass(frozen=True, slots=True)
class Requirements:
    kind: str | None
    hypervisor: str | None
    cpus: int
    memory_mb: int
    prefer: frozenset[int] = frozenset()  # resource ids to take first (VMs made for this VE)

    def describe(self) -> str:
        parts = []
        if self.hypervisor:
            parts.append(f"virtual ({self.hypervisor})")
        elif self.kind:
            parts.append(self.kind)
        if self.cpus:
            parts.append(f"at least {self.cpus} CPUs")
        if self.memory_mb:
            parts.append(f"at least {self.memory_mb} MB")
        return ", ".join(parts) if parts else "any resource"


#: Candidates sort by size, then id: ``(cpus, memory_mb, id)``. An attrgetter
#: (C) rather than a function: it runs for every comparison of the sort and of
#: every bisection (placing 1,000 VEs on 10,000 resources: 35 -> 18 ms).
_sort_key: Callable[[Candidate], tuple[int, int, int]] = operator.attrgetter("cpus", "memory_mb", "id")


class CandidatePool:
    """Idle resources not yet taken in this pass."""

    def __init__(self, candidates: Iterable[Candidate]) -> None:
        self.groups: dict[tuple[str, str | None], list[Candidate]] = {}
        for c in candidates:
            self.groups.setdefault((c.kind, c.hypervisor), []).append(c)
        for group in self.groups.values():
            group.sort(key=_sort_key)
        self.by_id = {c.id: c for group in self.groups.values() for c in group}

    def __len__(self) -> int:
        return len(self.by_id)

    def _matching_groups(self, req: Requirements) -> list[list[Candidate]]:
        return [
            group
            for (kind, hypervisor), group in self.groups.items()
            if (req.kind is None or kind == req.kind)
            and (req.hypervisor is None or hypervisor == req.hypervisor)
        ]

    @staticmethod
    def _fits(c: Candidate, req: Requirements) -> bool:
        return c.cpus >= req.cpus and c.memory_mb >= req.memory_mb

    def _remove(self, c: Candidate) -> None:
        group = self.groups[(c.kind, c.hypervisor)]
        index = bisect.bisect_left(group, _sort_key(c), key=_sort_key)
        assert group[index] is c
        del group[index]
        del self.by_id[c.id]

    def _best_fit(self, req: Requirements) -> Candidate | None:
        best: Candidate | None = None
        for group in self._matching_groups(req):
            start = bisect.bisect_left(group, (req.cpus, -1, -1), key=_sort_key)
            for c in group[start:]:
                if c.memory_mb >= req.memory_mb:
                    if best is None or _sort_key(c) < _sort_key(best):
                        best = c
                    break
        return best

    def take(self, req: Requirements, count: int, spread: Counter[int] | None = None) -> list[Candidate]:
        """Take up to ``count`` resources meeting ``req``; fewer if there are not enough.

        With ``spread`` (host -> members of this VE already there), each member
        comes from the least used host, best fit among that host's resources.
        """
        chosen: list[Candidate] = []
        for rid in sorted(req.prefer):
            if len(chosen) == count:
                break
            c = self.by_id.get(rid)
            if (
                c is not None
                and self._fits(c, req)
                and (req.hypervisor is None or c.hypervisor == req.hypervisor)
            ):
                self._remove(c)
                chosen.append(c)
        while len(chosen) < count:
            if spread is None:
                c = self._best_fit(req)
            else:
                c = None
                for group in self._matching_groups(req):
                    start = bisect.bisect_left(group, (req.cpus, -1, -1), key=_sort_key)
                    for cand in group[start:]:
                        if cand.memory_mb < req.memory_mb:
                            continue
                        if c is None or (spread[cand.host_key], _sort_key(cand)) < (
                            spread[c.host_key],
                            _sort_key(c),
                        ):
                            c = cand
            if c is None:
                break
            self._remove(c)
            chosen.append(c)
            if spread is not None:
                spread[c.host_key] += 1
        return chosen

    def explain(self, req: Requirements, need: int) -> str:
        """One line saying why ``need`` more resources meeting ``req`` cannot be found."""
        wanted = f"needs {need} more resource{'s' if need != 1 else ''} ({req.describe()})"
        if not self.by_id:
            return f"{wanted}: no idle resource is left"
        reasons: Counter[str] = Counter()
        for c in self.by_id.values():
            if req.hypervisor is not None and (c.kind != "virtual" or c.hypervisor != req.hypervisor):
                reasons["are not virtual machines of " + req.hypervisor] += 1
            elif req.kind is not None and c.kind != req.kind:
                reasons[f"are not {req.kind}"] += 1
            elif c.cpus < req.cpus:
                reasons[f"have fewer than {req.cpus} CPUs"] += 1
            elif c.memory_mb < req.memory_mb:
                reasons[f"have less than {req.memory_mb} MB"] += 1
        total = len(self.by_id)
        detail = ", ".join(f"{n} {why}" for why, n in reasons.most_common())
        return f"{wanted}: of {total} idle resource{'s' if total != 1 else ''}, {detail}"
