"""What the benchmark reads from ``/proc``: a server's memory and CPU time,
the machine's CPU time (to notice other work competing for the cores), and the
machine it ran on.

psutil is not a dependency; everything here is a few lines of ``/proc``
parsing. ``PeakRss`` measures the peak resident set of a process over a window
two ways: the kernel's own high-water mark (``VmHWM``, reset at the start of the
window through ``clear_refs``) and sampling of ``VmRSS``; it reports the larger,
so a short spike between samples is not missed where the kernel allows the reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024


def _status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``), in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(f"/proc/{pid}/status has no {field}")


def rss_bytes(pid: int) -> int:
    return _status_kib(pid, "VmRSS") * 1024


def reset_peak_rss(pid: int) -> bool:
    """Reset ``VmHWM`` to the current RSS ("5" to ``clear_refs``, Linux 4.0+)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of every thread of ``pid`` so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime


def cpu_seconds_by_name(pids: dict[str, int]) -> dict[str, float]:
    """``cpu_seconds`` of each named process; one that has gone is left out."""
    out = {}
    for name, pid in pids.items():
        with contextlib.suppress(OSError):
            out[name] = cpu_seconds(pid)
    return out


def machine_user_seconds() -> float:
    """User-space CPU time of every process on the machine so far, all cores together.
    (Kernel time is left out: much of it, writeback and loopback networking, is
    done on behalf of the registries under test, but not charged to them.)"""
    with open("/proc/stat") as stat:
        user, nice = (int(x) for x in stat.readline().split()[1:3])
    return (user + nice) / _CLOCK_TICKS


def user_seconds(pid: int) -> float:
    """User-space CPU time of every thread of ``pid`` so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[11]) / _CLOCK_TICKS


def own_user_seconds() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


async def wait_for_quiet(pids: list[int], max_wait_s: float, threshold: float = 0.1,
                         window_s: float = 0.5) -> float:
    """Wait until processes other than ``pids`` and this one use less than
    ``threshold`` of a core over a ``window_s`` window, for at most ``max_wait_s``.
    Returns the last window's load (fraction of one core)."""
    deadline = time.monotonic() + max_wait_s

    def others() -> float:
        return machine_user_seconds() - own_user_seconds() - sum(user_seconds(p) for p in pids)

    while True:
        before = others()
        await asyncio.sleep(window_s)  # the measuring window, not a readiness wait
        load = max(0.0, others() - before) / window_s
        if load < threshold or time.monotonic() >= deadline:
            return load


class OtherCpu:
    """CPU used by processes other than ``pids`` and this one, from now on (user
    time, as ``machine_user_seconds``): how much of the machine other work took
    while a benchmark measured."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self._t0 = time.monotonic()
        self._others0 = self._others()

    def _others(self) -> float:
        total = machine_user_seconds() - own_user_seconds()
        for pid in self.pids:
            with contextlib.suppress(OSError):
                total -= user_seconds(pid)
        return total

    def cores(self) -> float:
        seconds = time.monotonic() - self._t0
        return max(0.0, self._others() - self._others0) / seconds if seconds else 0.0


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class PeakRss:
    """``async with PeakRss(pid) as peak: …`` then ``peak.bytes``."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.sampled = 0
        self.high_water: int | None = None
        self._task: asyncio.Task | None = None
        self._reset = False

    @property
    def bytes(self) -> int:
        return max(self.sampled, self.high_water or 0)

    async def __aenter__(self) -> PeakRss:
        self._reset = reset_peak_rss(self.pid)
        self.sampled = rss_bytes(self.pid)
        self._task = asyncio.create_task(self._sample())
        return self

    async def _sample(self) -> None:
        while True:
            self.sampled = max(self.sampled, rss_bytes(self.pid))
            await asyncio.sleep(self.interval_s)

    async def __aexit__(self, *exc) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sampled = max(self.sampled, rss_bytes(self.pid))
        if self._reset:
            self.high_water = _status_kib(self.pid, "VmHWM") * 1024


@dataclass(frozen=True)
class Machine:
    cpu_model: str
    cores: int
    python: str
    kernel: str
    georeg_commit: str
    reference_version: str

    def describe(self) -> str:
        return (f"{self.cpu_model}, {self.cores} cores · Linux {self.kernel} · "
                f"Python {self.python} · georeg {self.georeg_commit} · {self.reference_version}")


def cpu_model() -> str:
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return model


def machine(reference_binary: str) -> Machine:
    return Machine(cpu_model=cpu_model(), cores=os.cpu_count() or 0, python=platform.python_version(),
                   kernel=platform.release(), georeg_commit=_georeg_commit(),
                   reference_version=_reference_version(reference_binary))


def _georeg_commit() -> str:
    source = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(source), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _reference_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "reference registry: not found"
    words = (out.stdout or out.stderr).split()
    # "/usr/bin/docker-registry github.com/docker/distribution 2.8.2+ds1"
    return "distribution " + words[-1] if words else "distribution (unknown version)"
