"""``georeg ca export``: where the cluster CA's certificate is and how clients
trust it.

A cluster with ``tls = true`` (or ``auth = "token"``) makes its CA at first
start (``cluster.control.ca``, in ``<data dir>/auth/ca/ca.pem``); every node
and endpoint of a TLS cluster serves a certificate it issued for 127.0.0.1,
localhost and the registry's login server. This command reads only the data
dir (the cluster need not run) and writes nothing unless ``--cert-dir`` asks
it to: then a directory with ``ca.crt``, the layout skopeo's
``--cert-dir``/``--src-cert-dir``/``--dest-cert-dir`` and
``/etc/containers/certs.d/HOST:PORT/`` read (containers-certs.d(5)).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..control.plan import ca_file, plan
from ..control.state import saved_spec
from .common import CliError, add_data_dir, command, data_dir_of

# The name containers-certs.d(5) (skopeo, podman, buildah) and Docker's
# certs.d take as a CA to trust.
CA_NAME = "ca.crt"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ca", help="the cluster CA: where it is and how clients trust it")
    commands = p.add_subparsers(dest="ca_command", required=True, metavar="COMMAND")
    c = commands.add_parser(
        "export", help="print where the CA certificate is and how to trust it",
        description="Print the path of the cluster CA's certificate (PEM) and how each client "
                    "trusts it: curl --cacert, skopeo --cert-dir (a directory holding ca.crt), "
                    "and /etc/containers/certs.d/HOST:PORT/ca.crt for every endpoint and node "
                    "(podman, skopeo and buildah system-wide). The CA is made at the first "
                    "start of a cluster with tls = true (georeg up --tls) or auth = \"token\"; "
                    "the cluster need not be running. Exit status 2 if it has no CA.")
    add_data_dir(c)
    c.add_argument("--cert-dir", type=Path, metavar="PATH",
                   help="also write PATH/ca.crt (creating PATH): a directory to give skopeo "
                        "as --cert-dir, --src-cert-dir or --dest-cert-dir")
    c.add_argument("--json", action="store_true",
                   help="machine-readable: {ca_file, fingerprint_sha256, not_after, tls, "
                        "addresses, cert_dir}")
    c.set_defaults(func=command(run_export))


def run_export(args: argparse.Namespace) -> int:
    data_dir = data_dir_of(args).resolve()
    spec = saved_spec(data_dir)
    if spec is None:
        raise CliError(f"{data_dir} holds no georeg cluster; start one with "
                       f"`georeg up --tls --data-dir {data_dir}`")
    pem_path = ca_file(data_dir)
    try:
        pem = pem_path.read_bytes()
    except FileNotFoundError:
        raise CliError(f"the cluster in {data_dir} has no CA ({pem_path} does not exist): a "
                       f"cluster makes one at its first start with tls = true or auth = "
                       f"\"token\"; `georeg up --tls --data-dir {data_dir}` serves HTTPS") from None
    except OSError as exc:
        raise CliError(f"cannot read {pem_path}: {exc.strerror or exc}") from None
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CliError(f"{pem_path} is not a PEM certificate: {exc}") from None
    der = certificate.public_bytes(serialization.Encoding.DER)
    fingerprint = hashlib.sha256(der).hexdigest().upper()
    addresses = plan(spec, data_dir).client_addresses()
    written = None
    if args.cert_dir is not None:
        written = _write_cert_dir(args.cert_dir, pem)
    if args.json:
        print(json.dumps({"ca_file": str(pem_path), "fingerprint_sha256": fingerprint,
                          "not_after": certificate.not_valid_after_utc.isoformat(),
                          "tls": spec.tls, "addresses": addresses,
                          "cert_dir": str(written.parent) if written else None}, indent=2))
        return 0
    first = addresses[0] if addresses else "127.0.0.1:5000"
    scheme = spec.scheme
    cert_dir = written.parent if written else Path("DIR")
    print(f"Cluster CA certificate (PEM): {pem_path}")
    print(f"  SHA-256 fingerprint {_colons(fingerprint)}, valid until "
          f"{certificate.not_valid_after_utc:%Y-%m-%d}")
    if not spec.tls:
        print("  This cluster serves plain HTTP (tls = false): its CA signs tokens and "
              "replication certificates. `georeg up --tls` serves HTTPS with it.")
    if written:
        print(f"Wrote {written}")
    print("Trust it:")
    print(f"  curl:   curl --cacert {pem_path} {scheme}://{first}/v2/")
    print(f"  skopeo: skopeo copy --src-cert-dir {cert_dir} ... / --dest-cert-dir {cert_dir} "
          f"(or --cert-dir for inspect, login), {cert_dir} holding {CA_NAME}"
          + ("" if written else f"; `georeg ca export --cert-dir {cert_dir}` writes one"))
    print(f"  podman, skopeo, buildah, every user: as root, the CA as "
          f"/etc/containers/certs.d/HOST:PORT/{CA_NAME} for every endpoint and node:")
    print(f"    for a in {' '.join(addresses)}; do install -D -m 0644 {pem_path} "
          f"/etc/containers/certs.d/$a/{CA_NAME}; done")
    return 0


def _write_cert_dir(directory: Path, pem: bytes) -> Path:
    """``directory/ca.crt`` holding the CA (public: mode 0644), replaced atomically."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / CA_NAME
        tmp = target.with_name(CA_NAME + ".tmp")
        tmp.write_bytes(pem)
        tmp.chmod(0o644)
        os.replace(tmp, target)
    except OSError as exc:
        raise CliError(f"cannot write {directory / CA_NAME}: {exc.strerror or exc}") from None
    return target


def _colons(hex_digest: str) -> str:
    return ":".join(hex_digest[i:i + 2] for i in range(0, len(hex_digest), 2))
