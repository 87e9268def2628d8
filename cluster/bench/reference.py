"""The reference registry: CNCF distribution (Debian's ``docker-registry``) as
a child process, configured like a stock single-node deployment.

The config written for it: filesystem storage rooted in the benchmark's temp
dir, ``http.addr`` on a free loopback port, deletes enabled, no auth, log
level warn, no Redis. The in-memory blob descriptor cache stays on: it is what
distribution's shipped configuration (``/etc/docker/registry/config.yml`` in
Debian, ``config-example.yml`` upstream) enables, so this is the registry as
people run it. Its access log (Apache combined format, on by default) stays on
too and goes to a file, as georeg's does.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

from .server import ServerProcess, ServerStartError

DEFAULT_BINARY = "/usr/bin/docker-registry"

CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {root}
  cache:
    blobdescriptor: inmemory
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: georeg-bench-{port}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_binary(binary: str | None = None) -> str | None:
    candidate = binary or DEFAULT_BINARY
    return candidate if Path(candidate).is_file() else shutil.which(Path(candidate).name)


class ReferenceRegistry(ServerProcess):
    """``ReferenceRegistry(workdir).start()``; then ``url``, ``pid``, ``stop()``."""

    name = "reference registry"

    def __init__(self, workdir: Path, binary: str | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir / "reference.log")
        self.workdir = workdir
        self.root = workdir / "storage"
        self.config_path = workdir / "config.yml"
        found = find_binary(binary)
        if found is None:
            raise ServerStartError(f"the reference registry {binary or DEFAULT_BINARY} is not "
                                   f"installed; `make install` installs Debian's docker-registry")
        self.binary = found

    def start(self, timeout_s: float = 30.0, attempts: int = 3) -> ReferenceRegistry:
        # The port is picked, released, then bound by the registry: another process
        # can take it in between, so a bind failure is retried on a fresh port.
        for attempt in range(attempts):
            port = free_port()
            self.root.mkdir(parents=True, exist_ok=True)
            self.config_path.write_text(CONFIG.format(root=self.root, port=port))
            self.url = f"http://127.0.0.1:{port}"
            self._spawn([self.binary, "serve", str(self.config_path)])
            try:
                self.wait_until_answering(time.monotonic() + timeout_s)
                return self
            except ServerStartError:
                if attempt == attempts - 1:
                    raise
        return self
