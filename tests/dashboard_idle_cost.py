"""What an open dashboard adds to an idle cluster's CPU (issue 22: < 2 % of one core).

    .venv/bin/python -m tests.dashboard_idle_cost [--window 30] [--rounds 2] [--config FILE]

Not a test (pytest does not collect it): a measurement, printed. It starts a
cluster with ``georeg up --detach`` (the default spec unless ``--config``) in a
temporary data dir, lets it settle, then alternates windows without and with
the dashboard open in Debian's headless chromium (signed in by ``georeg
dashboard --open``): the CPU (user + system, ``/proc``) of the supervisor
process (management server, links, endpoints) and of every node process over
each window, as a fraction of one core, and the snapshots the page's stream
sent meanwhile (an idle cluster's snapshot stands still: it should send few).
The browser's own CPU is not the cluster's and is not counted. The machine's
load average is printed beside the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cluster.bench.procfs import cpu_seconds_by_name

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def georeg(*args: str, data_dir: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "cluster.cli", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, env={**os.environ, "BROWSER": "true"},
                          timeout=300)
    if done.returncode:
        raise SystemExit(f"georeg {' '.join(args)} failed: {done.stderr[-2000:]}")
    return done.stdout


def processes(supervisor: int) -> dict[str, int]:
    """The supervisor and its child processes (the nodes)."""
    out = {"supervisor": supervisor}
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children")
    for pid in children.read_text().split():
        out[f"node {pid}"] = int(pid)
    return out


async def window(pids: dict[str, int], seconds: float) -> tuple[float, float]:
    """(supervisor, nodes) CPU over ``seconds``, as fractions of one core."""
    before = cpu_seconds_by_name(pids)
    await asyncio.sleep(seconds)        # the measuring window itself
    after = cpu_seconds_by_name(pids)
    used = {name: after[name] - before[name] for name in after if name in before}
    supervisor = used.pop("supervisor") / seconds
    return supervisor, sum(used.values()) / seconds


async def count_frames(url: str, owner: str, stop: asyncio.Event) -> int:
    """Snapshots one more stream receives until ``stop`` (what the page receives)."""
    import aiohttp
    frames = 0
    async with aiohttp.ClientSession() as http, http.get(
            f"{url}api/events", headers={"Authorization": f"Bearer {owner}"}) as r:
        while not stop.is_set():
            try:
                line = await asyncio.wait_for(r.content.readline(), 0.5)
            except TimeoutError:
                continue
            frames += line.startswith(b"data: ")
    return frames


async def measure(args: argparse.Namespace, data: Path) -> None:
    from playwright.async_api import async_playwright

    state = json.loads((data / "cluster.json").read_text())
    pids = processes(state["pid"])
    owner = (data / "auth" / "owner.secret").read_text().strip()
    print(f"cluster: {len(pids) - 1} node processes; settling {args.settle:.0f} s")
    await asyncio.sleep(args.settle)          # startup's catch-up and first compactions
    rows = []
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                          args=["--no-sandbox", "--disable-gpu"])
        try:
            for _ in range(args.rounds):
                rows.append(("closed", *await window(pids, args.window), None))
                url = (await asyncio.to_thread(georeg, "dashboard", "--open", data_dir=data)
                       ).strip().splitlines()[0]
                page = await browser.new_page(viewport={"width": 1280, "height": 800})
                await page.goto(url)
                await page.wait_for_selector("#live.on")
                stop = asyncio.Event()
                counting = asyncio.create_task(count_frames(url.split("#")[0], owner, stop))
                measured = await window(pids, args.window)
                stop.set()
                rows.append(("open", *measured, await counting))
                await page.close()
        finally:
            await browser.close()
    load = os.getloadavg()[0]
    print(f"{'dashboard':10} {'supervisor':>11} {'nodes':>8} {'frames':>7}   "
          f"(% of one core over {args.window:.0f} s windows; load {load:.1f})")
    for what, supervisor, nodes, frames in rows:
        print(f"{what:10} {supervisor * 100:10.2f}% {nodes * 100:7.2f}% "
              f"{'' if frames is None else frames:>7}")
    closed = [s + n for what, s, n, _ in rows if what == "closed"]
    opened = [s + n for what, s, n, _ in rows if what == "open"]
    print(f"added by an open page: {(sum(opened) / len(opened) - sum(closed) / len(closed)) * 100:.2f}% "
          f"of one core (cluster total, mean of {args.rounds} windows each)")


def main(args: argparse.Namespace) -> None:
    data = Path(tempfile.mkdtemp(prefix="dashboard-idle-"))
    try:
        georeg("up", "--detach", *(["--config", args.config] if args.config else []), data_dir=data)
        asyncio.run(measure(args, data))
    finally:
        subprocess.run([sys.executable, "-m", "cluster.cli", "down", "--data-dir", str(data)],
                       capture_output=True, timeout=120)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settle", type=float, default=20.0)
    parser.add_argument("--config", help="cluster spec (TOML); default: the built-in one")
    main(parser.parse_args())
