"""The node benchmark's results: which metrics it reports, their targets, the
table printed for people and the JSON written for machines.

A metric is derived from the samples of one step (see ``workload``): the
median over the repeats, except peak RSS, which is the maximum over every run
(a limit holds only if the worst run stays under it). Ratios are always
georeg ÷ reference; for latencies (lower is better) they are shown but carry
no target. Targets are checked here and reported, never asserted elsewhere.
The table warns when other processes took a noticeable share of the CPU while
steps were measured: on a two-core machine that moves every number.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .procfs import MIB, Machine
from .workload import Sample

GEOREG = "georeg"
REFERENCE = "reference"
# Above this much CPU (fraction of one core) used by other processes during the
# measurements, the table carries a warning: on two cores it visibly moves results.
OTHER_LOAD_WARNING = 0.15


@dataclass(frozen=True)
class Goal:
    """georeg ÷ reference at least ``ratio``, or georeg's own value below ``below``."""

    ratio: float | None = None
    below: float | None = None

    def describe(self, unit: str) -> str:
        return f"≥ {self.ratio:g}×" if self.ratio is not None else f"< {self.below:g} {unit}"

    def met(self, georeg: float | None, reference: float | None) -> bool | None:
        if georeg is None:
            return None
        if self.below is not None:
            return georeg < self.below
        if reference is None or reference <= 0:
            return None
        return georeg / reference >= self.ratio


@dataclass(frozen=True)
class Metric:
    key: str
    label: str          # may name workload fields: {layers}, {layer}, {big}, {c}
    unit: str
    step: str
    field: str = "value"           # which Sample field
    goal: Goal | None = None
    worst: bool = False            # report the maximum over runs, not the median


METRICS: tuple[Metric, ...] = (
    Metric("push_mb_s", "push {layers}×{layer} layers, c={c}", "MB/s", "push", goal=Goal(ratio=1.2)),
    Metric("pull_mb_s", "pull {layers}×{layer}, c={c}, sha256 checked", "MB/s", "pull",
           goal=Goal(ratio=1.0)),
    Metric("head_blob_ops_s", "HEAD blob, c={c}", "ops/s", "head_blob", goal=Goal(ratio=1.0)),
    Metric("head_blob_p99_ms", "HEAD blob p99", "ms", "head_blob", "p99_ms"),
    Metric("get_manifest_ops_s", "GET manifest by tag, c={c}", "ops/s", "get_manifest",
           goal=Goal(ratio=1.0)),
    Metric("get_manifest_p99_ms", "GET manifest p99", "ms", "get_manifest", "p99_ms"),
    Metric("tags_list_ops_s", "GET tags list, c={c}", "ops/s", "tags_list", goal=Goal(ratio=1.0)),
    Metric("tags_list_p99_ms", "GET tags list p99", "ms", "tags_list", "p99_ms"),
    Metric("big_upload_mb_s", "{big} blob streamed up", "MB/s", "big_upload", goal=Goal(ratio=1.0)),
    Metric("big_download_mb_s", "{big} blob streamed down", "MB/s", "big_download",
           goal=Goal(ratio=0.8)),
    Metric("big_peak_rss_mib", "server peak RSS during {big} up+down", "MiB", "big",
           "peak_rss", goal=Goal(below=150), worst=True),
)

STEPS = ("push", "pull", "head_blob", "get_manifest", "tags_list", "big_upload", "big_download")


def size_label(n: int) -> str:
    if n >= MIB and n % MIB == 0:
        return f"{n // MIB} MiB"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024} KiB"
    return f"{n} B"


@dataclass
class Results:
    machine: Machine
    workload: dict[str, int | bool | str]
    repeat: int
    targets: list[str]
    profiled: bool = False
    # step → target → one Sample per repeat
    samples: dict[str, dict[str, list[Sample]]] = field(default_factory=dict)

    def add(self, step: str, target: str, sample: Sample) -> None:
        self.samples.setdefault(step, {}).setdefault(target, []).append(sample)

    def runs(self, metric: Metric, target: str) -> list[float]:
        steps = ("big_upload", "big_download") if metric.step == "big" else (metric.step,)
        values = []
        for step in steps:
            for sample in self.samples.get(step, {}).get(target, []):
                value = getattr(sample, metric.field)
                if value is not None:
                    values.append(value / MIB if metric.field == "peak_rss" else value)
        return values

    def value(self, metric: Metric, target: str) -> float | None:
        runs = self.runs(metric, target)
        if not runs:
            return None
        return max(runs) if metric.worst else statistics.median(runs)

    def label(self, metric: Metric) -> str:
        w = self.workload
        return metric.label.format(layers=w["layers"], layer=size_label(int(w["layer_bytes"])),
                                   big=size_label(int(w["big_bytes"])), c=w["concurrency"])

    def other_load(self) -> float:
        """CPU that other processes used during the measured steps, as a fraction
        of one core (averaged over the steps' wall time)."""
        samples = [s for by_target in self.samples.values() for ss in by_target.values() for s in ss]
        seconds = sum(s.seconds for s in samples)
        return sum(s.other_cpu_s for s in samples) / seconds if seconds else 0.0

    def to_json(self) -> dict:
        metrics = {}
        for metric in METRICS:
            g, r = self.value(metric, GEOREG), self.value(metric, REFERENCE)
            metrics[metric.key] = {
                "label": self.label(metric), "unit": metric.unit,
                "statistic": "max" if metric.worst else "median",
                GEOREG: g, REFERENCE: r,
                "ratio": g / r if g is not None and r else None,
                "target": metric.goal.describe(metric.unit) if metric.goal else None,
                "met": metric.goal.met(g, r) if metric.goal else None,
                "runs": {t: self.runs(metric, t) for t in self.targets},
            }
        return {
            "machine": dataclasses.asdict(self.machine),
            "workload": self.workload, "repeat": self.repeat, "profiled": self.profiled,
            "other_load": self.other_load(),
            "metrics": metrics,
            "samples": {step: {t: [dataclasses.asdict(s) for s in samples]
                               for t, samples in by_target.items()}
                        for step, by_target in self.samples.items()},
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")


def _number(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def _cell(results: Results, metric: Metric, target: str) -> str:
    runs = results.runs(metric, target)
    text = _number(results.value(metric, target))
    if len(runs) > 1:
        text += f" [dim]({_number(min(runs))}–{_number(max(runs))})[/dim]"
    return text


def print_table(results: Results, console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]machine[/bold]  {results.machine.describe()}")
    statistic = f"median of {results.repeat} runs" if results.repeat > 1 else "1 run"
    note = " · the first run of each step ran under py-spy" if results.profiled else ""
    table = Table(title=f"georeg node vs reference registry ({statistic}, range in brackets; "
                        f"MB = 10⁶ bytes; ratio = georeg ÷ reference{note})",
                  title_justify="left")
    table.add_column("metric")
    for target in results.targets:
        table.add_column(target, justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("target", justify="center")
    table.add_column("", justify="center")
    for metric in METRICS:
        g, r = results.value(metric, GEOREG), results.value(metric, REFERENCE)
        ratio = f"{g / r:.2f}×" if g is not None and r else "—"
        met = metric.goal.met(g, r) if metric.goal else None
        mark = {True: "[green]✓[/green]", False: "[red]✗[/red]", None: ""}[met]
        table.add_row(f"{results.label(metric)} ({metric.unit})",
                      *(_cell(results, metric, t) for t in results.targets), ratio,
                      metric.goal.describe(metric.unit) if metric.goal else "", mark)
    console.print(table)
    console.print(_cpu_table(results))
    other = results.other_load()
    if other > OTHER_LOAD_WARNING:
        console.print(f"[yellow]warning:[/yellow] other processes used {other:.0%} of a core on "
                      f"average while steps were measured; the numbers above are disturbed. "
                      f"Run again on a quiet machine.")


def _cpu_table(results: Results) -> Table:
    """Median CPU use during each step, in % of one core (the machine has ``cores``)."""
    table = Table(title=f"CPU during each step, % of one core (median; {results.machine.cores} "
                        "cores shared by client and server)", title_justify="left")
    table.add_column("step")
    for target in results.targets:
        table.add_column(f"{target} server", justify="right")
        table.add_column("client", justify="right")
    table.add_column("other processes", justify="right")
    for step in STEPS:
        row = [step]
        every = [s for ss in results.samples.get(step, {}).values() for s in ss]
        for target in results.targets:
            samples = results.samples.get(step, {}).get(target, [])
            if not samples:
                row += ["—", "—"]
                continue
            row.append(f"{statistics.median(s.server_cpu_s / s.seconds for s in samples):.0%}")
            row.append(f"{statistics.median(s.client_cpu_s / s.seconds for s in samples):.0%}")
        row.append(f"{statistics.median(s.other_cpu_s / s.seconds for s in every):.0%}" if every else "—")
        table.add_row(*row)
    return table
