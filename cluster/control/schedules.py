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
one after it ends. Runs of one schedule never overlap, a manual one included
(``georeg schedule run NAME`` while one runs is a 409 naming its start);
each schedule waits on its own, so a long run delays no other. Each run's
start, end, result (``Running``, ``Succeeded`` or ``Failed``) and report or
error are kept, the last ``HISTORY`` of each schedule, in
``<data_dir>/schedules.json`` (0600, synced: ``private_files``; a run left
``Running`` by a killed process reads as failed), and ``georeg schedule
list`` shows the last run and the next.

Time is injected (``now``, ``sleep``): a test moves a clock instead of
waiting for the cron's minute.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import structlog
from cronsim import CronSim, CronSimError

from .errors import Conflict
from .private_files import write_private
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
    ended: float               # 0 while it runs
    result: str                # Running | Succeeded | Failed
    detail: dict

    def as_dict(self) -> dict:
        return {"started": iso(self.started), "ended": iso(self.ended),
                "result": self.result, "detail": self.detail}


def iso(seconds: float | None) -> str | None:
    """Epoch seconds as the UTC time the management API shows (None for 0)."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") \
        if seconds else None


# What a run left "Running" by a control process that stopped reads as.
INTERRUPTED = {"error": "the control process stopped during this run"}


class Scheduler:
    """Runs ``schedules`` with ``run(request) -> report dict`` (a purge), on
    ``now``/``sleep``; keeps runs in ``state_file`` (None: in memory only).
    One run of a schedule at a time (``_running``): the cron's waits for a
    manual one to end, a manual one while another runs is a ``Conflict``."""

    def __init__(self, schedules: Iterable[Schedule],
                 run: Callable[[PurgeRequest], Awaitable[dict]], *,
                 state_file: Path | None = None, now: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.schedules = {s.name: s for s in schedules}
        self._run, self._now, self._sleep = run, now, sleep
        self.state_file = state_file
        self.runs: dict[str, list[Run]] = self._load()
        self.due: dict[str, float] = {}
        self._running = {name: asyncio.Lock() for name in self.schedules}

    def _load(self) -> dict[str, list[Run]]:
        if self.state_file is None or not self.state_file.exists():
            return {}
        try:
            stored = json.loads(self.state_file.read_text())
            runs = {name: [Run(**r) for r in runs] for name, runs in stored.items()
                    if name in self.schedules}
        except (OSError, ValueError, TypeError) as exc:
            log.warning("schedule_runs_unreadable", file=str(self.state_file),
                        error=str(exc)[:200])
            return {}
        return {name: [Run(r.started, r.started, "Failed", INTERRUPTED)
                       if r.result == "Running" else r for r in kept]
                for name, kept in runs.items()}

    def _save(self) -> None:
        if self.state_file is not None:
            write_private(self.state_file, json.dumps(
                {n: [asdict(r) for r in runs] for n, runs in self.runs.items()}).encode())

    def _record(self, name: str, run: Run, *, replacing: Run | None = None) -> None:
        runs = [r for r in self.runs.get(name, []) if r is not replacing]
        self.runs[name] = (runs + [run])[-HISTORY:]
        self._save()

    async def run_now(self, name: str, *, manual: bool = False) -> Run:
        """Run schedule ``name`` once, now; its run is recorded like any other
        (``Running`` from its start, so a killed run shows). ``manual``: a
        ``Conflict`` if a run of it is under way, instead of waiting for it."""
        lock = self._running[name]
        if manual and lock.locked():
            started = self.runs[name][-1].started if self.runs.get(name) else None
            raise Conflict(f"schedule {name!r} is running (started {iso(started)}); "
                           f"run it again once that run ends")
        async with lock:
            return await self._run_once(name)

    async def _run_once(self, name: str) -> Run:
        schedule = self.schedules[name]
        started = self._now()
        running = Run(started, 0, "Running", {})
        self._record(name, running)
        try:
            detail = await self._run(parse_command(schedule.command))
            # Some deletes refused: the run failed, and its report says what it did.
            result = "Failed" if detail.get("failed") else "Succeeded"
        except Exception as exc:     # noqa: BLE001 - a failed run is recorded, not raised
            detail, result = {"error": str(exc)[:500]}, "Failed"
            log.warning("schedule_failed", schedule=name, error=str(exc)[:200])
        run = Run(started, self._now(), result, detail)
        self._record(name, run, replacing=running)
        return run

    async def forever(self) -> None:
        """Run each schedule at its times until cancelled, each on its own
        (a long run of one delays no other)."""
        async with asyncio.TaskGroup() as group:
            for name in self.schedules:
                group.create_task(self._at_its_times(name), name=f"schedule-{name}")

    async def _at_its_times(self, name: str) -> None:
        cron = self.schedules[name].cron
        self.due[name] = next_time(cron, self._now())
        while True:
            now = self._now()
            if self.due[name] > now:
                await self._sleep(min(MAX_SLEEP_S, self.due[name] - now))
                continue
            await self.run_now(name)
            self.due[name] = next_time(cron, self._now())

    def listing(self) -> list[dict]:
        """Each schedule with its last run and its next time (``georeg schedule list``)."""
        out = []
        for name, schedule in self.schedules.items():
            runs = self.runs.get(name, [])
            out.append({"name": name, "cron": schedule.cron, "command": schedule.command,
                        "lastRun": runs[-1].as_dict() if runs else None,
                        "nextRun": iso(self.due.get(name)
                                       or next_time(schedule.cron, self._now()))})
        return out
