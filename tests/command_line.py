"""The ``georeg`` command line as the tests run it: every command a process of
its own, as ``python -m cluster.cli ARGS`` would be, without paying each time
for an interpreter to import the CLI (~0.6 s of CPU, hundreds of times a run).

``georeg_command`` asks one preloaded interpreter (started once per test
session, with every command family imported and nothing run) to fork; the
child takes the command's argv, environment, working directory and standard
streams (the caller's pipes, passed over a Unix socket), runs the CLI's
``__main__`` as ``python -m`` does, and exits as the interpreter would
(``SystemExit`` codes, a traceback and 1 on an uncaught exception, non-daemon
threads joined, ``atexit`` run, streams flushed). The caller gets the
``subprocess.CompletedProcess`` that ``subprocess.run(..., capture_output=True,
text=True)`` gives, and ``subprocess.TimeoutExpired`` (the process killed) on a
timeout.

What a fork shares with its server and a fresh interpreter would not: modules
were imported under the server's environment (the session's), not the
command's, and the interpreter's start-up options and hash seed are the
server's. No georeg module reads the environment at import time (the command's
is in ``os.environ`` before ``main`` runs), and a test that needs a truly fresh
interpreter says so: ``georeg node`` always gets one (a node tunes its
allocator and loads only what it runs), and ``GEOREG_TEST_CLI=fresh`` gives
every command one (``subprocess.run``, the reference this module is checked
against in ``test_command_line.py``).
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_MESSAGE_LIMIT = 1 << 20


def georeg_command(args: list[str], *, env: dict[str, str] | None = None,
                   timeout: float = 120, cwd: str | Path | None = None,
                   stderr_to_stdout: bool = False) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, "-m", "cluster.cli", *args],
    capture_output=True, text=True, ...)`` with stdin empty, forked from the
    preloaded CLI; ``stderr_to_stdout`` is ``stderr=subprocess.STDOUT``."""
    argv = [sys.executable, "-m", "cluster.cli", *args]
    if args[:1] == ["node"] or os.environ.get("GEOREG_TEST_CLI") == "fresh":
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT if stderr_to_stdout else subprocess.PIPE,
                              text=True, timeout=timeout, env=env, cwd=cwd)
    return _server().run(argv, env=dict(os.environ) if env is None else env,
                         cwd=str(cwd) if cwd is not None else os.getcwd(),
                         timeout=timeout, stderr_to_stdout=stderr_to_stdout)


# -- the caller's side ---------------------------------------------------------------

class PreloadedCli:
    """The server process and the socket it forks commands from."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="georeg-cli-")
        self.socket_path = os.path.join(self._dir, "fork.sock")
        log = open(os.path.join(self._dir, "server.log"), "ab")
        # The server exits at the end of its stdin, which this process holds
        # open until it closes it or dies (the kernel closes it then). Not
        # PR_SET_PDEATHSIG: that fires when the starting *thread* ends, and the
        # first command may come from a worker thread (asyncio.to_thread).
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.command_line", self.socket_path], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        log.close()
        line = self.process.stdout.readline()
        if line.strip() != b"ready":
            self.close()
            raise RuntimeError(f"the preloaded CLI did not start: {self.log()}")

    def log(self) -> str:
        try:
            return Path(self._dir, "server.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        for name in os.listdir(self._dir):
            os.unlink(os.path.join(self._dir, name))
        os.rmdir(self._dir)

    def run(self, argv: list[str], *, env: dict[str, str], cwd: str, timeout: float,
            stderr_to_stdout: bool = False) -> subprocess.CompletedProcess:
        request = json.dumps({"args": argv[3:], "env": env, "cwd": cwd}).encode()
        deadline = time.monotonic() + timeout
        stdin = os.open(os.devnull, os.O_RDONLY)
        out_r, out_w = os.pipe()
        err_r, err_w = (None, out_w) if stderr_to_stdout else os.pipe()
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            try:
                conn.connect(self.socket_path)
                socket.send_fds(conn, [request], [stdin, out_w, err_w])
            finally:
                for fd in {stdin, out_w, err_w}:
                    os.close(fd)
            started = conn.recv(_MESSAGE_LIMIT)
            if not started:
                for fd in (out_r, err_r):
                    if fd is not None:
                        os.close(fd)
                raise RuntimeError(f"the preloaded CLI could not fork {argv[3:]}: {self.log()}")
            out, err, timed_out = _communicate(out_r, err_r, deadline)
            if timed_out:
                os.kill(json.loads(started)["pid"], signal.SIGKILL)
            answer = conn.recv(_MESSAGE_LIMIT)
        if not answer:
            raise RuntimeError(f"the preloaded CLI died running {argv[3:]}: {self.log()}")
        stdout, stderr = _text(out), None if stderr_to_stdout else _text(err)
        if timed_out:
            raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
        return subprocess.CompletedProcess(argv, json.loads(answer)["status"], stdout, stderr)


def _communicate(out_r: int, err_r: int | None,
                 deadline: float) -> tuple[bytes, bytes, bool]:
    """Read both pipes to their end, as ``Popen.communicate`` does; True third
    when ``deadline`` passed first."""
    pipes = [fd for fd in (out_r, err_r) if fd is not None]
    chunks: dict[int, list[bytes]] = {fd: [] for fd in pipes}
    sel = selectors.DefaultSelector()
    for fd in pipes:
        sel.register(fd, selectors.EVENT_READ)
    timed_out = False
    try:
        while sel.get_map() and not timed_out:
            remaining = deadline - time.monotonic()
            timed_out = remaining <= 0
            for key, _ in sel.select(max(remaining, 0)):
                block = os.read(key.fd, 65536)
                if block:
                    chunks[key.fd].append(block)
                else:
                    sel.unregister(key.fd)
    finally:
        sel.close()
        for fd in pipes:
            os.close(fd)
    return b"".join(chunks[out_r]), b"".join(chunks.get(err_r, [])), timed_out


def _text(data: bytes) -> str:
    """What ``text=True`` makes of a stream: decoded, universal newlines."""
    return data.decode().replace("\r\n", "\n").replace("\r", "\n")


_started: PreloadedCli | None = None
_starting = threading.Lock()


def _server() -> PreloadedCli:
    global _started
    with _starting:
        if _started is None or _started.process.poll() is not None:
            _started = PreloadedCli()
            atexit.register(_started.close)
        return _started


# -- the server's side ---------------------------------------------------------------

def serve(socket_path: str) -> None:
    """Import the whole CLI, then fork one child per request until stdin ends.
    Single-threaded, so that a fork copies no half-held lock."""
    from cluster.cli.main import build_parser

    build_parser()                     # imports every command family; runs none
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(socket_path)
    listener.listen(64)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        for key, _ in sel.select():
            if key.data == "stdin":
                if not os.read(key.fd, 4096):
                    return
            elif key.data == "accept":
                conn, _ = listener.accept()
                _fork(conn, listener, sel)
            else:                                    # a child exited
                pid, conn = key.data
                _, status = os.waitpid(pid, 0)
                sel.unregister(key.fd)
                os.close(key.fd)
                try:
                    conn.send(json.dumps({"status": os.waitstatus_to_exitcode(status)}).encode())
                except OSError:
                    pass                              # the caller gave up (a timeout)
                conn.close()


def _fork(conn: socket.socket, listener: socket.socket, sel: selectors.BaseSelector) -> None:
    message, fds, _, _ = socket.recv_fds(conn, _MESSAGE_LIMIT, 3)
    request = json.loads(message)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for key in list(sel.get_map().values()):
            if isinstance(key.data, tuple):
                key.data[1].close()
                os.close(key.fd)
        sel.close()
        listener.close()
        conn.close()
        _run_command(request, fds)               # never returns
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    sel.register(pidfd, selectors.EVENT_READ, (pid, conn))
    conn.send(json.dumps({"pid": pid}).encode())


def _run_command(request: dict, fds: list[int]) -> None:
    """In the child: become ``python -m cluster.cli ARGS`` and exit as it would."""
    import runpy
    import traceback

    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.path[0] = os.getcwd()                   # what `python -m` puts first
        sys.argv = ["-m", *request["args"]]         # runpy sets argv[0] to the module's file
        try:
            runpy.run_module("cluster.cli", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except BaseException:
            traceback.print_exc()
            code = 1
        threading._shutdown()                     # type: ignore[attr-defined] - as at exit
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed pipe cannot fail the exit
                pass
        os._exit(code)


def _exit_code(code: object) -> int:
    """The status the interpreter exits with for ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    serve(sys.argv[1])
