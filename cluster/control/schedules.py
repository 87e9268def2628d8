"""Scheduled jobs: the spec's ``[[schedules]]``, run by the control process
(the one ``georeg up`` starts, which serves the management API) on its clock,
as ACR runs ``acr purge`` in a task with a timer trigger.

    [[schedules]]
    name = "nightly-purge"
    cron = "0 1 * * *"
    command = "purge --filter 'hello-world:.*' --ago 7d --untagged"

``cron`` is five fields — minute, hour, day of month, month, day of week —
in UTC, as ACR's timer triggers; it is parsed and its times computed by
``cronsim`` (a maintained, dependency-free evaluator that rejects what it
cannot evaluate), never by hand. ``command`` is ``purge`` with ``georeg
purge``'s options (``cluster.control.purge``), the one command a schedule
runs for now. Both are checked when the spec is loaded: a bad one is a spec
error naming the schedule (``schedule_problems``).

Runs. A schedule runs at each time its cron names, from when the control
process starts: times missed while it was down are not made up (cron's
rule), and a run that outlasts its period makes the next due time the first
one after it ends (runs of one schedule never overlap). Each run's start,
end, result (``Succeeded`` or ``Failed``) and report or error are kept, the
last ``HISTORY`` of each schedule, in ``<data_dir>/schedules.json`` (so they
outlive a restart), and ``georeg schedule list`` shows the last run and the
next. ``georeg schedule run NAME`` runs one now, outside its times.

Time is injected (``now``, ``sleep``): a test moves a clock instead of
waiting for the cron's minute.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import structlog
from cronsim import CronSim, CronSimError

from .purge import PurgeRequest, parse_command

log = structlog.get_logger("georeg.schedules")

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,49}")
HISTORY = 20                   # runs kept per schedule
MAX_SLEEP_S = 60.0             # the clock is looked at again at least this often


class Schedule(Protocol):
    name: str
    cron: str
    command: str


def next_time(cron: str, after: float) -> float:
    """The first time ``cron`` names strictly after ``after`` (epoch seconds, UTC)."""
    start = datetime.fromtimestamp(after, UTC).replace(microsecond=0)
    return next(CronSim(cron, start)).timestamp()


def check_cron(cron: str) -> None:
    """``ValueError`` unless ``cron`` is five fields cronsim evaluates."""
    if len(cron.split()) != 5:
        raise ValueError(f"cron {cron!r} is five fields (minute hour day-of-month month "
                         f"day-of-week), e.g. '0 1 * * *'")
    try:
        next_time(cron, time.time())
    except (CronSimError, StopIteration) as exc:
        raise ValueError(f"cron {cron!r}: {exc or 'names no time'}") from None


def schedule_problems(schedules: Sequence[Schedule]) -> list[str]:
    """What is wrong with a spec's schedules, each naming the schedule."""
    problems = []
    seen: set[str] = set()
    for i, schedule in enumerate(schedules):
        where = f"schedules[{i}]" + (f" ({schedule.name})" if schedule.name else "")
        if not NAME.fullmatch(schedule.name):
            problems.append(f"{where}: name is 1 to 50 letters, digits and '-', starting with "
                            f"a letter or digit")
        elif schedule.name in seen:
            problems.append(f"{where}: another schedule has this name")
        seen.add(schedule.name)
        for check, value in ((check_cron, schedule.cron), (parse_command, schedule.command)):
            try:
                check(value)
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
    return problems


@dataclass
class Run:
    started: float
    ended: float
    result: str                # Succeeded | Failed
    detail: dict

    def as_dict(self) -> dict:
        return {"started": _iso(self.started), "ended": _iso(self.ended),
                "result": self.result, "detail": self.detail}


def _iso(seconds: float | None) -> str | None:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") \
        if seconds else None


class Scheduler:
    """Runs ``schedules`` with ``run(request) -> report dict`` (a purge), on
    ``now``/``sleep``; keeps runs in ``state_file`` (None: in memory only)."""

    def __init__(self, schedules: Iterable[Schedule],
                 run: Callable[[PurgeRequest], Awaitable[dict]], *,
                 state_file: Path | None = None, now: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.schedules = {s.name: s for s in schedules}
        self._run, self._now, self._sleep = run, now, sleep
        self.state_file = state_file
        self.runs: dict[str, list[Run]] = self._load()
        self.due: dict[str, float] = {}

    def _load(self) -> dict[str, list[Run]]:
        if self.state_file is None:
            return {}
        try:
            stored = json.loads(self.state_file.read_text())
            return {name: [Run(**r) for r in runs] for name, runs in stored.items()
                    if name in self.schedules}
        except (OSError, ValueError, TypeError):
            return {}

    def _save(self) -> None:
        if self.state_file is None:
            return
        temporary = self.state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps({n: [asdict(r) for r in runs]
                                         for n, runs in self.runs.items()}))
        os.replace(temporary, self.state_file)

    async def run_now(self, name: str) -> Run:
        """Run schedule ``name`` once, now; its run is recorded like any other."""
        schedule = self.schedules[name]
        started = self._now()
        try:
            detail = await self._run(parse_command(schedule.command))
            # Some deletes refused: the run failed, and its report says what it did.
            result = "Failed" if detail.get("failed") else "Succeeded"
        except Exception as exc:     # noqa: BLE001 - a failed run is recorded, not raised
            detail, result = {"error": str(exc)[:500]}, "Failed"
            log.warning("schedule_failed", schedule=name, error=str(exc)[:200])
        run = Run(started, self._now(), result, detail)
        self.runs[name] = (self.runs.get(name, []) + [run])[-HISTORY:]
        self._save()
        return run

    async def forever(self) -> None:
        """Run each schedule at its times until cancelled."""
        if not self.schedules:
            return
        for name, schedule in self.schedules.items():
            self.due[name] = next_time(schedule.cron, self._now())
        while True:
            now = self._now()
            due = [name for name, at in self.due.items() if at <= now]
            for name in due:
                await self.run_now(name)
                self.due[name] = next_time(self.schedules[name].cron, self._now())
            if not due:
                await self._sleep(min(MAX_SLEEP_S, max(0.0, min(self.due.values()) - now)))

    def listing(self) -> list[dict]:
        """Each schedule with its last run and its next time (``georeg schedule list``)."""
        out = []
        for name, schedule in self.schedules.items():
            runs = self.runs.get(name, [])
            out.append({"name": name, "cron": schedule.cron, "command": schedule.command,
                        "lastRun": runs[-1].as_dict() if runs else None,
                        "nextRun": _iso(self.due.get(name)
                                        or next_time(schedule.cron, self._now()))})
        return out
