"""A registry under benchmark, run as a child process: started on loopback,
ready only once it answers, always stopped.

Invariants
    * Readiness is observed (an answer, or the line a server prints once it
      serves), polled against a deadline; never assumed after a fixed sleep.
    * Each server runs in its own session with ``PR_SET_PDEATHSIG``, so neither
      Ctrl-C at the terminal nor the benchmark dying leaves one running;
      ``stop()`` (SIGTERM, then SIGKILL after a grace period) is idempotent and
      is called from ``finally`` blocks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
from pathlib import Path

from ..control.management_client import open_direct
from ..control.supervisor import dies_with_parent

_die_with_parent = dies_with_parent(signal.SIGTERM)


class ServerStartError(RuntimeError):
    """The server exited or did not become ready in time; the message carries its log's tail."""


class ServerProcess:
    """One registry server child process; ``url`` is ``http://127.0.0.1:PORT``."""

    name = "server"

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.url = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not started"
        return self.proc.pid

    def _spawn(self, argv: list[str], *, stdout=None, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.Popen:
        """Start ``argv``; stderr (and stdout, unless piped) goes to the log file."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=stdout or log, stderr=log,
                                         stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_die_with_parent,
                                         env=env, cwd=cwd)
        return self.proc

    def _failed(self, why: str) -> ServerStartError:
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
        return ServerStartError(f"{self.name} {why}; its log ({self.log_path}) ends with:\n{tail}")

    def wait_until_answering(self, deadline: float) -> None:
        """Poll ``GET /v2/`` until it answers 200 (or 401: serving, with auth)."""
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise self._failed(f"exited with status {self.proc.returncode} before answering")
            try:
                with open_direct(self.url + "/v2/", timeout=1) as response:
                    if response.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                if exc.code == 401:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise self._failed("did not answer GET /v2/ in time")
            time.sleep(0.02)  # poll interval, bounded by the deadline above

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM the server's process group, SIGKILL it after ``grace_s``; its exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(grace_s)
            except ProcessLookupError:
                proc.wait(grace_s)
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode
