"""The spec's ``[[schedules]]`` (``cluster.control.schedules``): strict
validation naming the schedule, and the scheduler running each one at its
cron's times on an injected clock (never waiting for a minute), recording
each run where ``georeg schedule list`` reads it, across a restart."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from cluster.control import spec as specs
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
    """Wall time moved by the scheduler's own sleeps: a day passes in no time."""

    def __init__(self, start: datetime) -> None:
        self.now = start.timestamp()
        self.sleeps = 0

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds
        await asyncio.sleep(0)


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
        for _ in range(10_000):           # bounded: a day of the clock, in sleeps of ≤ 60 s
            await asyncio.sleep(0)
            if clock.now >= datetime(2026, 3, 2, 1, 30, tzinfo=UTC).timestamp():
                break
    finally:
        task.cancel()
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
