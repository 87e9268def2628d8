"""Sampling profiles of a server during one benchmark step, with py-spy.

``py-spy record`` attaches to the running server (no restart, no code in the
server), samples until it is interrupted, and writes the file on SIGINT. The
recorder waits until py-spy reports that it is sampling before the step starts,
so the profile covers the whole step.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

FORMATS = {"flamegraph": "svg", "speedscope": "json", "raw": "txt"}


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profile:
    """``with Profile(pid, path): …`` records the server ``pid`` while the block runs."""

    def __init__(self, pid: int, path: Path, fmt: str = "raw", rate: int = 100,
                 native: bool = False) -> None:
        binary = find_py_spy()
        if binary is None:
            raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
        self.path = path
        self.argv = [binary, "record", "--pid", str(pid), "--output", str(path),
                     "--format", fmt, "--rate", str(rate), "--threads", "--idle"]
        if native:
            self.argv.append("--native")
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Profile:
        log_path = self.path.with_suffix(self.path.suffix + ".log")
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while b"Sampling process" not in log_path.read_bytes():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self._stop()
                raise RuntimeError(f"py-spy did not start sampling: {log_path.read_text()[-500:]}")
            time.sleep(0.02)  # poll interval, bounded by the deadline above
        return self

    def _stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __exit__(self, *exc) -> None:
        self._stop()
