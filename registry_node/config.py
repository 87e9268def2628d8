"""A node's settings: where its data lives, where it listens, who it is."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# How long requests in flight (downloads handed over included) may take to
# finish once the node is told to stop.
SHUTDOWN_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class NodeConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 5000
    region: str = "local"
    zone: str = ""
    key_file: Path | None = None        # default: <data_dir>/node.key, created if absent
    gc_grace_s: float = 3600.0          # unreferenced blobs younger than this are kept
    gc_interval_s: float = 60.0
    upload_ttl_s: float = 24 * 3600.0   # idle upload sessions older than this expire
    shutdown_grace_s: float = SHUTDOWN_GRACE_S
    sync: bool = True                   # fsync metadata and blobs before acknowledging
    io_threads: int = 4
    extra: dict[str, str] = field(default_factory=dict)
    # Authentication of the data plane: off unless the CA file is given, and then
    # the node's signing key and certificate (issued by that CA) are needed too.
    auth_ca_file: Path | None = None
    auth_key_file: Path | None = None
    auth_cert_file: Path | None = None
    auth_service: str = ""              # the login server (token audience); default: "georeg"
    # The cluster's internal credential (a file holding it): the node's internal
    # routes then answer only requests carrying it (registry_node.api.internal).
    internal_credential_file: Path | None = None
    # HTTPS: off unless the certificate is given; then the node serves TLS only.
    # The CA (the one that issued the certificate) is what it trusts for peers
    # in replication when it has no --auth-ca.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None

    @property
    def auth_enabled(self) -> bool:
        return self.auth_ca_file is not None

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def scheme(self) -> str:
        return "https" if self.tls_enabled else "http"

    @property
    def key_path(self) -> Path:
        return self.key_file or self.data_dir / "node.key"
