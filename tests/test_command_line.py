"""The tests' way of running the ``georeg`` CLI (``tests/command_line.py``):
a command forked from the preloaded interpreter says and exits exactly what
the same command in a fresh ``python -m cluster.cli`` does, in the caller's
environment and working directory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cluster.control import spec as specs
from cluster.control.state import save_spec

from .command_line import georeg_command


def both(args: list[str], monkeypatch, **options) -> tuple[subprocess.CompletedProcess, ...]:
    """The command forked, then run in a fresh interpreter."""
    monkeypatch.delenv("GEOREG_TEST_CLI", raising=False)
    forked = georeg_command(args, **options)
    monkeypatch.setenv("GEOREG_TEST_CLI", "fresh")
    fresh = georeg_command(args, **options)
    monkeypatch.delenv("GEOREG_TEST_CLI")
    return forked, fresh


def outcome(done: subprocess.CompletedProcess) -> tuple[int, str, str | None]:
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("args", [
    ["--help"],                                   # exits 0 from argparse's SystemExit
    ["nonsense"],                                 # argparse's usage error: 2, on stderr
    ["replication", "list", "--json", "--data-dir", "nowhere"],   # the CLI's own error
])
def test_a_forked_command_says_and_exits_what_a_fresh_interpreter_does(args, monkeypatch,
                                                                       tmp_path):
    forked, fresh = both(args, monkeypatch, cwd=tmp_path)
    assert outcome(forked) == outcome(fresh)
    assert forked.args == fresh.args == [sys.executable, "-m", "cluster.cli", *args]


def test_the_command_sees_the_callers_environment_not_the_servers(monkeypatch):
    """argparse wraps help to $COLUMNS, read when the command runs."""
    narrow, narrow_fresh = both(["--help"], monkeypatch, env={**os.environ, "COLUMNS": "50"})
    wide = georeg_command(["--help"], env={**os.environ, "COLUMNS": "200"})
    assert narrow.stdout == narrow_fresh.stdout != wide.stdout
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 50


def test_the_command_runs_in_the_callers_directory(monkeypatch, tmp_path):
    """A relative --data-dir is the caller's: this one holds an open cluster's spec."""
    (tmp_path / "data").mkdir()
    save_spec(tmp_path / "data", specs.parse({"home_region": "westeurope", "auth": "none"}))
    forked, fresh = both(["login", "--data-dir", "data"], monkeypatch, cwd=tmp_path)
    assert outcome(forked) == outcome(fresh)
    assert forked.returncode == 2 and "runs without auth" in forked.stderr


def test_stderr_can_join_stdout_in_order(monkeypatch, tmp_path):
    forked, fresh = both(["nonsense"], monkeypatch, cwd=tmp_path, stderr_to_stdout=True)
    assert outcome(forked) == outcome(fresh)
    assert forked.stderr is None and forked.stdout.startswith("usage: georeg")
