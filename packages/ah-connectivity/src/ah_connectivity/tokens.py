"""Enrollment and user tokens: EdDSA (Ed25519) JWTs signed by the access point.

* Enrollment tokens (``typ="enroll"``) are one-time and short-lived; they name the follower,
  its tags, the fleet CA fingerprint (``caf``) so the follower can pin the CA before it trusts
  anything, and optionally the access point address (``ap``).
* User tokens (``typ="user"``) carry a subject, scopes and a host glob for the leader.

Verification maps every failure to a `TokenError` subclass whose ``.reason`` is one of a
small, stable set of strings (used in problem+json bodies and logs).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import secrets
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypeVar, get_args

import jwt
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ah_connectivity.pki import validate_follower_name, write_private_file
from ah_domain_types import parse_duration

__all__ = [
    "ALGORITHM",
    "EnrollClaims",
    "InMemoryUsedTokenStore",
    "Scope",
    "TokenError",
    "TokenErrorReason",
    "TokenExpired",
    "TokenForged",
    "TokenMalformed",
    "TokenMissing",
    "TokenMissingScope",
    "TokenReused",
    "TokenSigner",
    "TokenVerifier",
    "TokenWrongAudience",
    "TokenWrongName",
    "UsedTokenStore",
    "UserClaims",
    "enroll_audience",
    "parse_ttl",
    "peek_enroll_claims",
    "user_audience",
]

ALGORITHM = "EdDSA"
_T = TypeVar("_T")

Scope = Literal["exec", "ssh", "read-logs"]
ALL_SCOPES: frozenset[str] = frozenset(get_args(Scope))

TokenErrorReason = Literal[
    "missing",
    "malformed",
    "forged",
    "expired",
    "wrong-audience",
    "wrong-name",
    "missing-scope",
    "reused",
]


def enroll_audience(trust_domain: str) -> str:
    return f"ah-fleet-enroll:{trust_domain}"


def user_audience(trust_domain: str) -> str:
    return f"ah-fleet:{trust_domain}"


class TokenError(Exception):
    """A token was refused; ``reason`` says why in one stable word."""

    reason: ClassVar[TokenErrorReason]

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TokenMissing(TokenError):
    reason = "missing"


class TokenMalformed(TokenError):
    reason = "malformed"


class TokenForged(TokenError):
    reason = "forged"


class TokenExpired(TokenError):
    reason = "expired"


class TokenWrongAudience(TokenError):
    reason = "wrong-audience"


class TokenWrongName(TokenError):
    reason = "wrong-name"


class TokenMissingScope(TokenError):
    reason = "missing-scope"


class TokenReused(TokenError):
    reason = "reused"


class EnrollClaims(msgspec.Struct, frozen=True, kw_only=True):
    typ: Literal["enroll"]
    name: str
    tags: dict[str, str]
    jti: str
    iat: int
    exp: int
    aud: str
    caf: str
    ap: str | None = None


class UserClaims(msgspec.Struct, frozen=True, kw_only=True):
    typ: Literal["user"]
    sub: str
    scopes: list[Scope]
    hosts: str
    jti: str
    iat: int
    exp: int
    aud: str

    def has_scope(self, scope: Scope) -> bool:
        return scope in self.scopes

    def allows_host(self, name: str) -> bool:
        """True if the follower `name` matches this token's host glob."""
        return fnmatch.fnmatchcase(name, self.hosts)


class UsedTokenStore(Protocol):
    """Remembers consumed one-time token ids (``jti``); the access point persists it."""

    def mark_used(self, jti: str, expires_at: int) -> bool:
        """Record `jti` as used; return False if it was already used."""
        ...


class InMemoryUsedTokenStore:
    """A process-local `UsedTokenStore` (tests, single-process access points)."""

    def __init__(self) -> None:
        self._used: dict[str, int] = {}
        self._lock = threading.Lock()

    def mark_used(self, jti: str, expires_at: int) -> bool:
        now = int(time.time())
        with self._lock:
            # Expired tokens fail verification anyway, so their ids can be forgotten.
            for old in [k for k, exp in self._used.items() if exp < now]:
                del self._used[old]
            if jti in self._used:
                return False
            self._used[jti] = expires_at
            return True


def parse_ttl(ttl: float | int | dt.timedelta | str) -> float:
    """Seconds from a number, a timedelta or a duration string (``"90s"``, ``"1h30m"``)."""
    if isinstance(ttl, dt.timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, str):
        seconds = parse_duration(ttl)
    else:
        seconds = float(ttl)
    if seconds <= 0:
        raise ValueError(f"token ttl must be positive, got {ttl!r}")
    return seconds


class TokenSigner:
    """Holds the access point's Ed25519 token-signing key."""

    def __init__(self, key: Ed25519PrivateKey, trust_domain: str) -> None:
        self.key = key
        self.trust_domain = trust_domain

    @classmethod
    def generate(cls, trust_domain: str) -> TokenSigner:
        return cls(Ed25519PrivateKey.generate(), trust_domain)

    @classmethod
    def create(cls, path: Path, trust_domain: str) -> TokenSigner:
        """Generate a key and write it to `path` (0600); refuses to overwrite."""
        path = Path(path)
        if path.exists():
            raise FileExistsError(
                f"{path} already exists; refusing to replace the token-signing key"
            )
        signer = cls.generate(trust_domain)
        write_private_file(
            path,
            signer.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        return signer

    @classmethod
    def load(cls, path: Path, trust_domain: str) -> TokenSigner:
        path = Path(path)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{path}: token-signing key missing (run `init` first)"
            ) from None
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: expected an Ed25519 key, got {type(key).__name__}")
        return cls(key, trust_domain)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.key.public_key()

    def verifier(self) -> TokenVerifier:
        return TokenVerifier(self.public_key, self.trust_domain)

    def _sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self.key, algorithm=ALGORITHM, headers={"typ": "JWT"})

    def issue_enroll(
        self,
        name: str,
        *,
        ca_fingerprint: str,
        tags: Mapping[str, str] | None = None,
        ttl: float | dt.timedelta | str = "1h",
        access_point: str | None = None,
        now: float | None = None,
    ) -> str:
        """A one-time enrollment token for follower `name`."""
        validate_follower_name(name)
        if not ca_fingerprint.startswith("sha256:"):
            raise ValueError(
                f"ca_fingerprint must look like 'sha256:<hex>', got {ca_fingerprint!r}"
            )
        iat = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "typ": "enroll",
            "name": name,
            "tags": dict(tags or {}),
            "jti": secrets.token_urlsafe(16),
            "iat": iat,
            "exp": iat + int(parse_ttl(ttl)),
            "aud": enroll_audience(self.trust_domain),
            "caf": ca_fingerprint,
        }
        if access_point is not None:
            claims["ap"] = access_point
        return self._sign(claims)

    def issue_user(
        self,
        subject: str,
        *,
        scopes: Iterable[str],
        hosts: str = "*",
        ttl: float | dt.timedelta | str = "12h",
        now: float | None = None,
    ) -> str:
        """A user (leader) token for `subject` with the given scopes and host glob."""
        scope_list = sorted(set(scopes))
        unknown = [s for s in scope_list if s not in ALL_SCOPES]
        if unknown:
            raise ValueError(
                f"unknown scope(s) {', '.join(unknown)}: expected a subset of {sorted(ALL_SCOPES)}"
            )
        if not subject:
            raise ValueError("user token subject must not be empty")
        iat = int(time.time() if now is None else now)
        return self._sign(
            {
                "typ": "user",
                "sub": subject,
                "scopes": scope_list,
                "hosts": hosts,
                "jti": secrets.token_urlsafe(16),
                "iat": iat,
                "exp": iat + int(parse_ttl(ttl)),
                "aud": user_audience(self.trust_domain),
            }
        )


def _check_present(token: str | None) -> str:
    """The bare JWT from `token`, which may carry an HTTP ``Bearer`` prefix."""
    text = (token or "").strip()
    scheme, _, rest = text.partition(" ")
    if scheme.lower() == "bearer":
        text = rest.strip()
    if not text:
        raise TokenMissing("no token given: expected 'Bearer <jwt>'")
    return text


def _convert(raw: dict[str, Any], type_: type[_T], what: str) -> _T:
    try:
        return msgspec.convert(raw, type_)
    except msgspec.ValidationError as exc:
        raise TokenMalformed(f"{what} claims invalid: {exc}") from exc


def peek_enroll_claims(token: str) -> EnrollClaims:
    """Read an enrollment token's claims WITHOUT verifying it.

    Only for the follower: it learns the CA fingerprint (``caf``) to pin and the access point
    address (``ap``) before it can verify anything.
    """
    token = _check_present(token)
    try:
        raw = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise TokenMalformed(f"enrollment token is not a JWT: {exc}") from exc
    return _convert(raw, EnrollClaims, "enrollment token")


class TokenVerifier:
    """Verifies tokens against the access point's Ed25519 public key."""

    def __init__(
        self, public_key: Ed25519PublicKey, trust_domain: str, *, leeway_s: float = 5.0
    ) -> None:
        self.public_key = public_key
        self.trust_domain = trust_domain
        self.leeway_s = leeway_s

    def _decode(self, token: str | None, audience: str, what: str) -> dict[str, Any]:
        token = _check_present(token)
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenMalformed(f"{what} is not a JWT: {exc}") from exc
        if header.get("alg") != ALGORITHM:
            raise TokenForged(f"{what} uses algorithm {header.get('alg')!r}, expected {ALGORITHM}")
        try:
            raw: dict[str, Any] = jwt.decode(
                token,
                self.public_key,
                algorithms=[ALGORITHM],
                audience=audience,
                leeway=self.leeway_s,
                options={"require": ["exp", "iat", "aud", "jti", "typ"]},
            )
        except jwt.InvalidSignatureError as exc:
            raise TokenForged(
                f"{what} signature does not verify with this access point's key"
            ) from exc
        except jwt.ExpiredSignatureError as exc:
            raise TokenExpired(f"{what} expired") from exc
        except jwt.InvalidAudienceError as exc:
            try:
                got = jwt.decode(token, options={"verify_signature": False}).get("aud")
            except jwt.PyJWTError:
                got = None
            raise TokenWrongAudience(f"{what} audience is {got!r}, expected {audience!r}") from exc
        except jwt.PyJWTError as exc:
            raise TokenMalformed(f"{what} rejected: {exc}") from exc
        return raw

    def verify_user(
        self,
        token: str | None,
        audience: str | None = None,
        required_scope: Scope | None = None,
    ) -> UserClaims:
        """Verify a user token; `audience` defaults to ``ah-fleet:<trust-domain>``."""
        audience = audience or user_audience(self.trust_domain)
        claims = _convert(self._decode(token, audience, "user token"), UserClaims, "user token")
        if required_scope is not None and required_scope not in claims.scopes:
            raise TokenMissingScope(
                f"user token for {claims.sub!r} lacks scope {required_scope!r} "
                f"(has {', '.join(claims.scopes) or 'none'})"
            )
        return claims

    def verify_enroll(
        self,
        token: str | None,
        requested_name: str | None,
        used_tokens: UsedTokenStore | None = None,
    ) -> EnrollClaims:
        """Verify an enrollment token for follower `requested_name` (None: the token's name).

        With `used_tokens`, the token is consumed as the last step, so a second use raises
        `TokenReused`.
        """
        audience = enroll_audience(self.trust_domain)
        claims = _convert(
            self._decode(token, audience, "enrollment token"), EnrollClaims, "enrollment token"
        )
        if requested_name is not None and requested_name != claims.name:
            raise TokenWrongName(
                f"enrollment token is for follower {claims.name!r}, not {requested_name!r}"
            )
        if used_tokens is not None and not used_tokens.mark_used(claims.jti, claims.exp):
            raise TokenReused(f"enrollment token {claims.jti} for {claims.name!r} was already used")
        return claims
