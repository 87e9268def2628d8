"""The spec's ``[[schedules]]`` (``cluster.control.schedules``): strict
validation naming the schedule, and the scheduler running each one at its
cron's times on an injected clock (never waiting for a minute), recording
each run where ``georeg schedule list`` reads it, across a restart."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from cluster.control import spec as specs
from cluster.control.errors import Conflict
from cluster.control.schedules import Scheduler

NIGHTLY = {"name": "nightly-purge", "cron": "0 1 * * *",
           "command": "purge --filter 'hello-world:.*' --ago 7d --untagged"}


def test_a_spec_with_schedules_loads():
    spec = specs.parse({"schedules": [NIGHTLY]})
    assert spec.schedules == (specs.ScheduleSpec(**NIGHTLY),)


@pytest.mark.parametrize("change,why", [
    ({"cron": "0 25 * * *"}, "schedules[0] (nightly-purge): cron '0 25 * * *': Bad hour"),
    ({"cron": "0 1 * *"}, "is five fields"),
    ({"cron": "*/5 0 1 * * *"}, "is five fields"),
    ({"cron": "0 0 31 2 *"}, "Bad day-of-month"),      # February never has a 31st
    ({"command": "import --source x"}, "the command is 'purge"),
    ({"command": "purge --filter 'a:(' --ago 1d"}, "does not compile"),
    ({"command": "purge --filter a:b --ago 1y"}, "--ago '1y' is a duration"),
    ({"command": "purge --filter a:b"}, "--ago"),
    ({"name": "-x"}, "name is 1 to 50"),
    ({"every": "day"}, "unknown key schedules[0].'every'"),
])
def test_a_bad_schedule_is_a_spec_error_naming_it(change, why):
    with pytest.raises(specs.SpecError) as raised:
        specs.parse({"schedules": [{**NIGHTLY, **change}]})
    assert why in str(raised.value), str(raised.value)


def test_two_schedules_may_not_share_a_name():
    with pytest.raises(specs.SpecError, match="another schedule has this name"):
        specs.parse({"schedules": [NIGHTLY, NIGHTLY]})


class Clock:
    """Virtual wall time shared by the scheduler's tasks: each sleep waits
    until the test moves the clock to the earliest wake-up (a day passes in
    no time, and no task oversleeps another's)."""

    def __init__(self, start: datetime) -> None:
        self.now = start.timestamp()
        self.waiting: list[tuple[float, asyncio.Future]] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        wake = asyncio.get_running_loop().create_future()
        self.waiting.append((self.now + seconds, wake))
        await wake

    def advance(self) -> None:
        """To the earliest wake-up, waking whatever is due then."""
        self.now = max(self.now, min(at for at, _ in self.waiting))
        for entry in [e for e in self.waiting if e[0] <= self.now]:
            self.waiting.remove(entry)
            entry[1].set_result(None)


async def test_each_schedule_runs_at_its_times_and_its_runs_are_kept(tmp_path):
    clock = Clock(datetime(2026, 3, 1, 0, 30, tzinfo=UTC))
    ran: list[tuple[float, list[str]]] = []
    failing = {"fail": True}

    async def run(request):
        ran.append((clock.now, [f.text for f in request.filters]))
        if failing["fail"]:
            failing["fail"] = False
            raise RuntimeError("the home region cannot be reached")
        return {"tagsDeleted": ["hello-world:old"], "manifestsDeleted": [], "skipped": []}

    schedules = [specs.ScheduleSpec(**NIGHTLY),
                 specs.ScheduleSpec("hourly", "15 * * * *", "purge --filter 'x:.*' --ago 1h")]
    state = tmp_path / "schedules.json"
    scheduler = Scheduler(schedules, run, state_file=state, now=clock.time, sleep=clock.sleep)
    task = asyncio.create_task(scheduler.forever())
    try:
        for _ in range(100_000):          # bounded: a day of the clock, in sleeps of ≤ 60 s
            await asyncio.sleep(0)
            if clock.now >= datetime(2026, 3, 2, 1, 30, tzinfo=UTC).timestamp():
                break
            if len(clock.waiting) == len(schedules):      # every schedule waits: move on
                clock.advance()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    times = {name: [datetime.fromtimestamp(t, UTC).strftime("%d %H:%M") for t, f in ran
                    if f == [("hello-world:.*" if name == "nightly-purge" else "x:.*")]]
             for name in ("nightly-purge", "hourly")}
    assert times["nightly-purge"] == ["01 01:00", "02 01:00"]
    assert times["hourly"][:2] == ["01 01:15", "01 02:15"] and len(times["hourly"]) == 25
    listing = {s["name"]: s for s in scheduler.listing()}
    assert listing["nightly-purge"]["lastRun"]["result"] == "Succeeded"
    assert listing["nightly-purge"]["lastRun"]["detail"]["tagsDeleted"] == ["hello-world:old"]
    assert listing["nightly-purge"]["nextRun"] == "2026-03-03T01:00:00Z"
    first = scheduler.runs["nightly-purge"][0]          # the first run of all, at 01:00
    assert first.result == "Failed" and "cannot be reached" in first.detail["error"]
    # The runs outlive the process that made them.
    again = Scheduler(schedules, run, state_file=state, now=clock.time, sleep=clock.sleep)
    assert again.listing()[0]["lastRun"] == listing["nightly-purge"]["lastRun"]


async def test_one_run_of_a_schedule_at_a_time_and_a_killed_run_shows(tmp_path):
    """A manual run while one runs is a Conflict naming its start; the run is
    on record as Running from its start (0600), and a process killed during it
    leaves a run that reads as failed."""
    clock = Clock(datetime(2026, 3, 1, 0, 30, tzinfo=UTC))
    release = asyncio.Event()

    async def run(request):
        await release.wait()
        return {"tagsDeleted": [], "manifestsDeleted": [], "skipped": [],
                "failed": [{"image": "x:v1", "reason": "503 quorum"}]}

    state = tmp_path / "schedules.json"
    scheduler = Scheduler([specs.ScheduleSpec(**NIGHTLY)], run, state_file=state,
                          now=clock.time, sleep=clock.sleep)
    first = asyncio.create_task(scheduler.run_now("nightly-purge"))
    for _ in range(100):
        await asyncio.sleep(0)
        if scheduler.runs.get("nightly-purge"):
            break
    assert scheduler.listing()[0]["lastRun"]["result"] == "Running"
    assert state.stat().st_mode & 0o777 == 0o600
    killed = Scheduler([specs.ScheduleSpec(**NIGHTLY)], run, state_file=state, now=clock.time)
    assert killed.runs["nightly-purge"][-1].result == "Failed"
    assert "stopped during this run" in killed.runs["nightly-purge"][-1].detail["error"]
    with pytest.raises(Conflict, match="is running \\(started 2026-03-01T00:30:00Z\\)"):
        await scheduler.run_now("nightly-purge", manual=True)
    release.set()
    done = await first
    assert done.result == "Failed" and done.detail["failed"]       # partial: its report kept
    assert [r.result for r in scheduler.runs["nightly-purge"]] == ["Failed"]
