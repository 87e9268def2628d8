"""Tokens and the cluster CA: what a node mints, every node verifies, and nothing
else passes — each refusal its own test."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import stat

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from cluster.control.ca import ClusterCA, location_of
from registry_node.auth.scopes import repository
from registry_node.auth.tokens import (
    ACCESS,
    ACCESS_LIFETIME_S,
    LEEWAY_S,
    REFRESH,
    REFRESH_LIFETIME_S,
    AuthConfigError,
    InvalidToken,
    SigningKey,
    TokenAuthority,
    Trust,
)

T0 = 1_900_000_000.0
SERVICE = "reg.example"


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ca")


def authority(ca: ClusterCA, node: str, clock: Clock, service: str = SERVICE) -> TokenAuthority:
    cert = ca.node_certificate(node, "eastus", "1")
    trust = Trust.load(cert.ca_file, clock)
    return TokenAuthority(SigningKey.load(cert.key_file, cert.cert_file, trust), trust, service, clock)


@pytest.fixture
def clock():
    # Node certificates are valid from "now" (real time); the tokens' clock starts there.
    return Clock(dt.datetime.now(dt.UTC).timestamp())


@pytest.fixture
def ca(ca_dir):
    return ClusterCA.open(ca_dir)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segments(token: str) -> tuple[dict, dict, str]:
    head, body, sig = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return (json.loads(base64.urlsafe_b64decode(pad(head))),
            json.loads(base64.urlsafe_b64decode(pad(body))), sig)


def test_a_token_minted_by_one_node_verifies_on_another(ca, clock):
    a, b = authority(ca, "node-a", clock), authority(ca, "node-b", clock)
    minted = a.mint("token:puller", "fp", ACCESS, [repository("app", "pull")])
    claims = b.verify(minted.token, ACCESS)
    assert (claims.subject, claims.credential) == ("token:puller", "fp")
    assert claims.access == (repository("app", "pull"),)
    header, payload, _ = _segments(minted.token)
    assert header["alg"] == "ES256" and header["kid"] == a.signing.kid and header["x5c"]
    assert payload["aud"] == SERVICE and payload["exp"] - payload["iat"] == ACCESS_LIFETIME_S
    assert minted.expires_in == ACCESS_LIFETIME_S
    refresh = a.mint("identity:x", "fp", REFRESH)
    assert b.verify(refresh.token, REFRESH).subject == "identity:x"
    assert refresh.expires_in == REFRESH_LIFETIME_S


def test_refuses_alg_none(ca, clock):
    a = authority(ca, "node-a", clock)
    header, payload, _ = _segments(a.mint("admin:r", "fp", ACCESS).token)
    forged = f"{_b64(json.dumps({**header, 'alg': 'none'}).encode())}.{_b64(json.dumps(payload).encode())}."
    with pytest.raises(InvalidToken):
        a.verify(forged, ACCESS)


def test_refuses_hs256_keyed_with_the_public_key(ca, clock):
    a = authority(ca, "node-a", clock)
    header, payload, _ = _segments(a.mint("admin:r", "fp", ACCESS).token)
    public_pem = a.signing.certificate.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = (f"{_b64(json.dumps({**header, 'alg': 'HS256'}).encode())}."
                     f"{_b64(json.dumps(payload).encode())}")
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(InvalidToken):
        a.verify(f"{signing_input}.{_b64(signature)}", ACCESS)


def test_refuses_a_key_the_cluster_ca_did_not_issue(ca, clock, tmp_path):
    stranger = authority(ClusterCA.open(tmp_path / "other-ca"), "node-a", clock)
    ours = authority(ca, "node-a", clock)
    with pytest.raises(InvalidToken, match="not issued by the cluster CA"):
        ours.verify(stranger.mint("admin:r", "fp", ACCESS).token, ACCESS)


def test_refuses_a_token_for_another_service(ca, clock):
    other = authority(ca, "node-a", clock, service="other.example")
    with pytest.raises(InvalidToken):
        authority(ca, "node-b", clock).verify(other.mint("admin:r", "fp", ACCESS).token, ACCESS)


def test_refuses_an_expired_token_after_a_small_leeway(ca, clock):
    a = authority(ca, "node-a", clock)
    token = a.mint("admin:r", "fp", ACCESS).token
    clock.now += ACCESS_LIFETIME_S + LEEWAY_S - 1
    a.verify(token, ACCESS)                       # within the leeway
    clock.now += 2
    with pytest.raises(InvalidToken, match="expired"):
        a.verify(token, ACCESS)
    fresh = authority(ca, "node-b", clock)        # and a node that never saw it before
    with pytest.raises(InvalidToken, match="expired"):
        fresh.verify(token, ACCESS)


def test_refuses_a_token_not_valid_yet(ca, clock):
    minter = authority(ca, "node-a", Clock(clock.now + 3600))
    with pytest.raises(InvalidToken, match="not valid yet"):
        authority(ca, "node-b", clock).verify(minter.mint("admin:r", "fp", ACCESS).token, ACCESS)


def test_refuses_a_tampered_payload(ca, clock):
    a = authority(ca, "node-a", clock)
    token = a.mint("token:puller", "fp", ACCESS, [repository("app", "pull")]).token
    head, body, sig = token.split(".")
    _, payload, _ = _segments(token)
    payload["access"][0]["actions"] = ["pull", "push"]
    with pytest.raises(InvalidToken):
        a.verify(f"{head}.{_b64(json.dumps(payload).encode())}.{sig}", ACCESS)


def test_refuses_a_tampered_signature(ca, clock):
    a = authority(ca, "node-a", clock)
    head, body, sig = a.mint("admin:r", "fp", ACCESS).token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
    raw[5] ^= 0x01
    with pytest.raises(InvalidToken):
        a.verify(f"{head}.{body}.{_b64(bytes(raw))}", ACCESS)


def test_a_refresh_token_is_not_an_access_token_and_vice_versa(ca, clock):
    a = authority(ca, "node-a", clock)
    with pytest.raises(InvalidToken):
        a.verify(a.mint("identity:x", "fp", REFRESH).token, ACCESS)
    with pytest.raises(InvalidToken):
        a.verify(a.mint("identity:x", "fp", ACCESS).token, REFRESH)


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "e30.e30.", "...", "ü.ü.ü",
                                     "eyJhbGciOiJFUzI1NiIsIng1YyI6WzFdfQ.e30.AA",   # x5c: [1]
                                     "eyJhbGciOiJFUzI1NiIsIng1YyI6WyIhIl19.e30.AA"])  # x5c: ["!"]
def test_garbage_is_an_invalid_token_not_an_exception(ca, clock, garbage):
    with pytest.raises(InvalidToken):
        authority(ca, "node-a", clock).verify(garbage, ACCESS)


def test_a_ca_issued_key_of_the_wrong_type_is_refused_not_a_crash(ca, clock):
    """An RSA key certified by the CA, signing RS256 under an ES256 header: the kind
    of key mix-up that makes PyJWT raise InvalidKeyError, outside InvalidTokenError."""
    a = authority(ca, "node-a", clock)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa")]))
            .issuer_name(ca.certificate.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
            .sign(ca.key, hashes.SHA256()))
    x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
    _, payload, _ = _segments(a.mint("admin:r", "fp", ACCESS).token)
    token = jwt.encode(payload, key, algorithm="RS256", headers={"x5c": x5c})
    head, body, sig = token.split(".")
    header = {**_segments(token)[0], "alg": "ES256"}
    with pytest.raises(InvalidToken):
        a.verify(f"{_b64(json.dumps(header).encode())}.{body}.{sig}", ACCESS)
    with pytest.raises(InvalidToken):
        a.verify(token, ACCESS)


def test_a_node_refuses_to_start_with_a_certificate_from_another_ca(ca, tmp_path, clock):
    foreign = ClusterCA.open(tmp_path / "foreign").node_certificate("node-a", "eastus")
    with pytest.raises(AuthConfigError, match="not issued by the cluster CA"):
        SigningKey.load(foreign.key_file, foreign.cert_file, Trust(ca.certificate, clock))
    ours = ca.node_certificate("node-a", "eastus", "1")
    with pytest.raises(AuthConfigError, match="does not certify"):
        SigningKey.load(foreign.key_file, ours.cert_file, Trust(ca.certificate, clock))


# -- the CA ------------------------------------------------------------------------------


def test_the_ca_issues_node_certificates_with_names_region_and_zone(tmp_path):
    ca = ClusterCA.open(tmp_path / "ca")
    issued = ca.node_certificate("westeurope-2", "westeurope", "2", hosts=("reg.example",))
    cert = x509.load_pem_x509_certificate(issued.cert_file.read_bytes())
    cert.verify_directly_issued_by(ca.certificate)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "reg.example"}
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://georeg/region/westeurope/zone/2"]
    assert location_of(cert) == ("westeurope", "2")
    for key in (tmp_path / "ca" / "ca.key", issued.key_file):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_a_restart_reuses_the_ca_and_matching_certificates(tmp_path):
    first = ClusterCA.open(tmp_path / "ca")
    issued = first.node_certificate("n1", "eastus", "1")
    before = issued.cert_file.read_bytes(), issued.key_file.read_bytes()
    again = ClusterCA.open(tmp_path / "ca")
    assert again.certificate == first.certificate
    reissued = again.node_certificate("n1", "eastus", "1")
    assert (reissued.cert_file.read_bytes(), reissued.key_file.read_bytes()) == before
    # A node that moved zone gets a new certificate saying so.
    moved = again.node_certificate("n1", "eastus", "2")
    assert location_of(x509.load_pem_x509_certificate(moved.cert_file.read_bytes())) == ("eastus", "2")
