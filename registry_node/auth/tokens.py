"""Access and refresh tokens: ES256 JWTs that any node mints and every node verifies
on its own.

Each node signs with its own P-256 key, whose certificate the cluster CA issued;
the certificate travels in the token (``x5c``, its SHA-256 as ``kid``), and a
verifier trusts it only when the CA it was configured with signed it. So a token
minted by any replica verifies on every replica with no call to another node and
no key to replicate first, and a node cannot sign as another.

Claims (Docker token spec, ACR's extras): ``iss`` (``ISSUER``), ``sub`` (the
principal), ``aud`` (the service: the registry's login server), ``exp``, ``nbf``,
``iat``, ``jti``, ``grant_type`` (``access_token`` | ``refresh_token``, which keeps
one kind from passing as the other), ``cred`` (which credential the principal
logged in with, so a regenerated password ends its tokens) and, in access tokens,
``access``: ``[{"type", "name", "actions"}]``.

Invariants: verification accepts ES256 only (never ``none``, never an HMAC keyed
with a public key), only a key certified by the trusted CA and valid now, only this
service, only the kind asked for, within ``LEEWAY_S`` of ``nbf``/``exp``; every
failure — PyJWT's ``InvalidKeyError`` included, which is not an
``InvalidTokenError`` — is one ``InvalidToken``, never an unexpected exception.
Time comes from an injected clock.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .scopes import Scope

ISSUER = "georeg"
ALGORITHM = "ES256"
ACCESS = "access_token"
REFRESH = "refresh_token"
# ACR's lifetimes: access tokens 75 minutes, refresh tokens 3 hours.
ACCESS_LIFETIME_S = 4500
REFRESH_LIFETIME_S = 10800
# Clocks of nodes on one machine agree; the leeway covers a client's skew.
LEEWAY_S = 30
_REQUIRED = ("iss", "sub", "aud", "exp", "nbf", "iat", "jti", "grant_type")
_CACHE_LIMIT = 4096


class InvalidToken(Exception):
    """The token cannot be used; the message says why (for logs, never the token)."""


class AuthConfigError(ValueError):
    """The node's authentication settings are unusable; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    subject: str
    credential: str
    grant_type: str
    access: tuple[Scope, ...]
    expires: float
    token_id: str


@dataclass(frozen=True, slots=True)
class Minted:
    token: str
    issued_at: float
    expires_in: int

    @property
    def issued_at_text(self) -> str:
        return datetime.fromtimestamp(self.issued_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def fingerprint(certificate: x509.Certificate) -> str:
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def _pem_certificates(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise AuthConfigError(f"cannot read certificates from {path}: {exc}") from None
    if not certs:
        raise AuthConfigError(f"{path} holds no PEM certificate")
    return certs


class Trust:
    """The cluster CA, and the signing certificates it is known to have issued."""

    def __init__(self, ca: x509.Certificate, now: Callable[[], float] = time.time) -> None:
        self.ca = ca
        self.now = now
        self._keys: dict[str, tuple[ec.EllipticCurvePublicKey, float, float]] = {}

    @classmethod
    def load(cls, ca_file: Path, now: Callable[[], float] = time.time) -> Trust:
        return cls(_pem_certificates(ca_file)[0], now)

    def check(self, certificate: x509.Certificate) -> ec.EllipticCurvePublicKey:
        """The certificate's key, if the CA issued it, it is valid now and P-256."""
        key = certificate.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise InvalidToken("the signing certificate's key is not P-256")
        try:
            certificate.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature):
            raise InvalidToken("the signing certificate was not issued by the cluster CA") from None
        self._valid_now(certificate.not_valid_before_utc.timestamp(),
                        certificate.not_valid_after_utc.timestamp())
        return key

    def key_for(self, x5c: object, kid: object) -> ec.EllipticCurvePublicKey:
        if not isinstance(x5c, list) or not x5c or not isinstance(x5c[0], str):
            raise InvalidToken("the token names no signing certificate (x5c)")
        try:
            der = base64.b64decode(x5c[0], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidToken("x5c is not base64") from None
        fp = hashlib.sha256(der).hexdigest()
        if kid is not None and kid != fp:
            raise InvalidToken("kid does not name the x5c certificate")
        cached = self._keys.get(fp)
        if cached is not None:
            key, not_before, not_after = cached
            self._valid_now(not_before, not_after)
            return key
        try:
            certificate = x509.load_der_x509_certificate(der)
        except ValueError:
            raise InvalidToken("x5c is not a certificate") from None
        key = self.check(certificate)
        if len(self._keys) >= _CACHE_LIMIT:
            self._keys.clear()
        self._keys[fp] = (key, certificate.not_valid_before_utc.timestamp(),
                          certificate.not_valid_after_utc.timestamp())
        return key

    def _valid_now(self, not_before: float, not_after: float) -> None:
        if not not_before <= self.now() <= not_after:
            raise InvalidToken("the signing certificate is not valid now")


class SigningKey:
    """This node's private key and the CA-issued certificate that vouches for it."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        self.key = key
        self.certificate = certificate
        self.kid = fingerprint(certificate)
        self.x5c = [base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode()]

    @classmethod
    def load(cls, key_file: Path, cert_file: Path, trust: Trust) -> SigningKey:
        try:
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise AuthConfigError(f"cannot read the signing key {key_file}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise AuthConfigError(f"{key_file} is not a P-256 (ES256) private key")
        certificate = _pem_certificates(cert_file)[0]
        if certificate.public_key() != key.public_key():
            raise AuthConfigError(f"{cert_file} does not certify the key in {key_file}")
        try:
            trust.check(certificate)
        except InvalidToken as exc:
            raise AuthConfigError(f"{cert_file}: {exc}") from None
        return cls(key, certificate)


class TokenAuthority:
    """Mints and verifies this registry's tokens (audience ``service``)."""

    def __init__(self, signing: SigningKey, trust: Trust, service: str,
                 now: Callable[[], float] = time.time) -> None:
        self.signing = signing
        self.trust = trust
        self.service = service
        self.now = now
        self._verified: dict[str, TokenClaims] = {}

    def mint(self, subject: str, credential: str, grant_type: str,
             access: Sequence[Scope] = ()) -> Minted:
        now = int(self.now())
        lifetime = ACCESS_LIFETIME_S if grant_type == ACCESS else REFRESH_LIFETIME_S
        claims: dict[str, object] = {
            "iss": ISSUER, "sub": subject, "aud": self.service, "iat": now, "nbf": now,
            "exp": now + lifetime, "jti": os.urandom(16).hex(), "grant_type": grant_type,
            "cred": credential,
        }
        if grant_type == ACCESS:
            claims["access"] = [{"type": s.type, "name": s.name, "actions": sorted(s.actions)}
                                for s in access]
        token = jwt.encode(claims, self.signing.key, algorithm=ALGORITHM,
                           headers={"kid": self.signing.kid, "x5c": self.signing.x5c})
        return Minted(token, now, lifetime)

    def verify(self, token: str, grant_type: str) -> TokenClaims:
        """The token's claims, or ``InvalidToken`` saying why it cannot be used."""
        claims = self._verified.get(token)
        if claims is None:
            claims = self._verify(token)
            if len(self._verified) >= _CACHE_LIMIT:
                self._verified.clear()
            self._verified[token] = claims
        if claims.grant_type != grant_type:
            raise InvalidToken(f"a {claims.grant_type} cannot be used as a {grant_type}")
        if self.now() > claims.expires + LEEWAY_S:
            self._verified.pop(token, None)
            raise InvalidToken("the token has expired")
        return claims

    def _verify(self, token: str) -> TokenClaims:
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") != ALGORITHM:
                raise InvalidToken(f"algorithm {header.get('alg')!r} is not accepted")
            key = self.trust.key_for(header.get("x5c"), header.get("kid"))
            claims = jwt.decode(
                token, key, algorithms=[ALGORITHM], audience=self.service, issuer=ISSUER,
                options={"require": list(_REQUIRED), "strict_aud": True,
                         # Time is checked below, against the injected clock.
                         "verify_exp": False, "verify_nbf": False, "verify_iat": False})
        except jwt.PyJWTError as exc:      # InvalidTokenError and InvalidKeyError alike
            raise InvalidToken(type(exc).__name__) from None
        except (ValueError, TypeError) as exc:
            raise InvalidToken(f"malformed token ({type(exc).__name__})") from None
        return self._claims(claims)

    def _claims(self, claims: dict) -> TokenClaims:
        now = self.now()
        times = [claims.get(k) for k in ("exp", "nbf", "iat")]
        if not all(isinstance(t, int | float) and not isinstance(t, bool) for t in times):
            raise InvalidToken("exp, nbf and iat must be numbers")
        exp, nbf, _ = times
        if now > exp + LEEWAY_S:
            raise InvalidToken("the token has expired")
        if now < nbf - LEEWAY_S:
            raise InvalidToken("the token is not valid yet")
        subject, credential, grant_type = claims["sub"], claims.get("cred", ""), claims["grant_type"]
        if not (isinstance(subject, str) and isinstance(credential, str)
                and grant_type in (ACCESS, REFRESH) and isinstance(claims["jti"], str)):
            raise InvalidToken("malformed claims")
        return TokenClaims(subject, credential, grant_type, _access(claims.get("access", [])),
                           float(exp), claims["jti"])


def _access(entries: object) -> tuple[Scope, ...]:
    if not isinstance(entries, list):
        raise InvalidToken("access must be a list")
    out = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise InvalidToken("an access entry must be an object")
        kind, name, actions = entry.get("type"), entry.get("name"), entry.get("actions")
        if not (isinstance(kind, str) and isinstance(name, str) and isinstance(actions, list)
                and all(isinstance(a, str) for a in actions)):
            raise InvalidToken("malformed access entry")
        out.append(Scope(kind, name, frozenset(actions)))
    return tuple(out)
