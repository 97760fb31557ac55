"""``enroll``: join a fleet with a one-time token.

1. Read the token's claims *without* verifying them (the follower does not have the access
   point's key): the follower name, its tags and the fleet CA fingerprint (``caf``).
2. Fetch the fleet CA from ``GET /api/v1/ca`` and refuse unless its sha256 fingerprint equals
   the pinned one. From here on every connection is verified against that CA.
3. Generate a private key and a CSR, ``POST /api/v1/enroll``; the access point verifies the
   token (signature, expiry, name, one-time use) and returns the signed certificate.
4. Store key (0600), certificate, CA and ``follower.toml``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import shutil
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec
from cryptography import x509
from loguru import logger

from ah_connectivity import (
    CA_CERT_FILE,
    SERVE_SPIFFE,
    Identity,
    PeerVerificationError,
    TokenError,
    ca_fingerprint,
    generate_private_key,
    load_ca_certificate,
    make_csr,
    peek_enroll_claims,
    peer_spiffe_id,
    spiffe_id_for_follower,
    verify_peer,
)
from ah_domain_types import EnrollRequest, EnrollResponse, ExitCode, parse_host_port

from .state import (
    CERT_FILE,
    KEY_FILE,
    SETTINGS_FILE,
    STATE_FILES,
    FollowerSettings,
    FollowerStateError,
    write_settings,
)

__all__ = ["EnrollError", "EnrollOutcome", "enroll"]

_log = logger.bind(component="ah-followerd.enroll")

API_BASE = "/api/v1"
DEFAULT_TIMEOUT_S = 15.0


class EnrollError(Exception):
    """Enrollment failed; ``exit_code`` is 4 (refused / not the pinned CA), 5 (unreachable),
    7 (bad input) or 8 (state directory)."""

    def __init__(self, exit_code: ExitCode, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message
        self.reason = reason

    def __str__(self) -> str:
        return self.message


class _Problem(msgspec.Struct, frozen=True):
    type: str = ""
    title: str = ""
    detail: str = ""


@dataclass(frozen=True)
class EnrollOutcome:
    settings: FollowerSettings
    state_dir: Path


def _trust_domain_of(ca_cert: x509.Certificate) -> str:
    uri = peer_spiffe_id(ca_cert)
    if uri is None or not uri.startswith("spiffe://") or uri.count("/") != 2:
        raise EnrollError(
            ExitCode.AUTH, "the fleet CA certificate lacks its spiffe://<trust-domain> name"
        )
    return uri.removeprefix("spiffe://")


class _Api:
    """HTTPS requests to one access point (http.client: one connection per request)."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s

    @property
    def where(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        context: ssl.SSLContext,
        *,
        body: bytes | None = None,
        expect_spiffe: tuple[x509.Certificate, str] | None = None,
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection(
            self.host, self.port, timeout=self.timeout_s, context=context
        )
        url = f"{self.where}{API_BASE}{path}"
        try:
            try:
                conn.connect()
            except ssl.SSLCertVerificationError as exc:
                raise EnrollError(
                    ExitCode.AUTH,
                    f"access point {self.where} is not served by the pinned fleet CA: "
                    f"{exc.verify_message or exc}",
                ) from None
            if expect_spiffe is not None:
                sock = conn.sock
                der = (
                    sock.getpeercert(binary_form=True) if isinstance(sock, ssl.SSLSocket) else None
                )
                if der is None:
                    raise EnrollError(
                        ExitCode.AUTH, f"access point {self.where} sent no certificate"
                    )
                ca_cert, spiffe = expect_spiffe
                try:
                    verify_peer(der, ca_cert, spiffe)
                except PeerVerificationError as exc:
                    raise EnrollError(
                        ExitCode.AUTH, f"access point {self.where} is not {spiffe}: {exc}"
                    ) from None
            headers = {"Accept": "application/json"}
            if body is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, f"{API_BASE}{path}", body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        except EnrollError:
            raise
        except (OSError, http.client.HTTPException) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise EnrollError(
                ExitCode.NETWORK,
                f"cannot reach access point {self.where} ({method} {url}): "
                f"{reason or type(exc).__name__}",
            ) from None
        finally:
            conn.close()


def _unverified_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _pinned_context(ca_pem: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca_pem)
    # The access point is identified by its SPIFFE ID (checked after the handshake), not by
    # the name or address it was dialled at; the chain must still end at the pinned CA.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def enroll(
    *,
    access_point: str | None,
    token: str,
    state_dir: Path,
    name: str | None = None,
    tags: Mapping[str, str] | None = None,
    force: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> EnrollOutcome:
    """Enroll and write the state directory; raises EnrollError."""
    try:
        claims = peek_enroll_claims(token)
    except TokenError as exc:
        raise EnrollError(
            ExitCode.AUTH,
            f"enrollment token refused before use ({exc.reason}): {exc.message}",
            reason=exc.reason,
        ) from None
    follower_name = name or claims.name
    address = access_point or claims.ap
    if not address:
        raise EnrollError(
            ExitCode.VALIDATION,
            "no access point address: pass --access-point HOST:PORT (the token carries none)",
        )
    try:
        host, port = parse_host_port(address)
    except ValueError as exc:
        raise EnrollError(ExitCode.VALIDATION, f"--access-point: {exc}") from None
    state_dir = Path(state_dir)
    existing = [n for n in STATE_FILES if (state_dir / n).exists()]
    if existing and not force:
        raise EnrollError(
            ExitCode.CONFIGURATION,
            f"{state_dir} already holds an enrolled follower ({', '.join(existing)}); "
            "refusing to overwrite it (pass --force to enroll again)",
        )
    api = _Api(host, port, timeout_s)

    # This first request cannot verify the server: the follower has no trust anchor yet. It
    # fetches the CA over an unverified connection and trusts it ONLY if its fingerprint
    # equals the one pinned in the token, which came out of band from the access point's
    # operator. Every later connection verifies the server against that CA.
    status, body = api.request("GET", "/ca", _unverified_context())
    if status != 200:
        raise EnrollError(
            ExitCode.NETWORK,
            f"access point {api.where} answered {status} to GET {API_BASE}/ca: "
            f"{body[:200].decode(errors='replace')}",
        )
    ca_pem = body.decode("utf-8", errors="replace")
    try:
        ca_cert = load_ca_certificate(ca_pem)
    except ValueError as exc:
        raise EnrollError(
            ExitCode.AUTH, f"access point {api.where} sent no valid CA certificate: {exc}"
        ) from None
    found = ca_fingerprint(ca_cert)
    if found != claims.caf:
        raise EnrollError(
            ExitCode.AUTH,
            f"fleet CA fingerprint mismatch: the token pins {claims.caf} but access point "
            f"{api.where} presents a CA with {found}; refusing to trust it",
            reason="ca-fingerprint-mismatch",
        )
    trust_domain = _trust_domain_of(ca_cert)
    pinned = _pinned_context(ca_pem)
    serve_id = SERVE_SPIFFE(trust_domain)

    key = generate_private_key()
    request = EnrollRequest(
        token=token,
        name=follower_name,
        csr_pem=make_csr(key, follower_name).decode(),
        tags=dict(tags or {}),
    )
    status, body = api.request(
        "POST",
        "/enroll",
        pinned,
        body=msgspec.json.encode(request),
        expect_spiffe=(ca_cert, serve_id),
    )
    if status != 200:
        raise _refusal(api.where, follower_name, status, body)
    try:
        response = msgspec.json.decode(body, type=EnrollResponse)
        cert = x509.load_pem_x509_certificate(response.certificate_pem.encode())
    except (msgspec.DecodeError, ValueError) as exc:
        raise EnrollError(
            ExitCode.NETWORK,
            f"access point {api.where} sent an unreadable enrollment answer: {exc}",
        ) from None
    expected = spiffe_id_for_follower(trust_domain, follower_name)
    try:
        verify_peer(cert, ca_cert, expected)
    except PeerVerificationError as exc:
        raise EnrollError(
            ExitCode.AUTH, f"the certificate issued by {api.where} is not acceptable: {exc}"
        ) from None
    if cert.public_key() != key.public_key():
        raise EnrollError(
            ExitCode.AUTH, f"the certificate issued by {api.where} is for another key"
        )
    try:
        parse_host_port(response.access_point_quic)
    except ValueError as exc:
        raise EnrollError(
            ExitCode.NETWORK, f"access point {api.where} sent a bad QUIC address: {exc}"
        ) from None

    settings = FollowerSettings(
        name=follower_name,
        trust_domain=trust_domain,
        access_point=f"{'[' + host + ']' if ':' in host else host}:{port}",
        quic_address=response.access_point_quic,
        ca_fingerprint=found,
        enrolled_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        tags={**dict(tags or {}), **claims.tags},
    )
    _write_state(state_dir, Identity(key=key, cert=cert), ca_pem, settings)
    _log.info(
        "enrolled as {} with access point {} (QUIC {})",
        expected,
        api.where,
        response.access_point_quic,
    )
    return EnrollOutcome(settings=settings, state_dir=state_dir)


def _refusal(where: str, name: str, status: int, body: bytes) -> EnrollError:
    try:
        problem = msgspec.json.decode(body, type=_Problem)
    except msgspec.DecodeError:
        problem = _Problem(detail=body[:300].decode(errors="replace"))
    reason = problem.type.rsplit(":", 1)[-1].removeprefix("enroll-") if problem.type else None
    detail = problem.detail or problem.title or f"HTTP {status}"
    if status in (401, 403, 409):
        return EnrollError(
            ExitCode.AUTH,
            f"access point {where} refused to enroll {name!r}: token {reason or 'refused'}: {detail}",
            reason=reason,
        )
    if status == 400:
        return EnrollError(
            ExitCode.VALIDATION,
            f"access point {where} rejected the enrollment request of {name!r}: {detail}",
            reason=reason,
        )
    return EnrollError(
        ExitCode.NETWORK,
        f"access point {where} failed to enroll {name!r} (HTTP {status}): {detail}",
        reason=reason,
    )


def _write_state(
    state_dir: Path, identity: Identity, ca_pem: str, settings: FollowerSettings
) -> None:
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = state_dir / f".enroll-{socket.gethostname()}-{id(settings)}"
        staging.mkdir(mode=0o700)
        try:
            identity.write(staging / CERT_FILE, staging / KEY_FILE)
            (staging / CA_CERT_FILE).write_text(ca_pem)
            write_settings(staging / SETTINGS_FILE, settings)
            # follower.toml last: its presence means "enrolled".
            for name in (KEY_FILE, CERT_FILE, CA_CERT_FILE, SETTINGS_FILE):
                (staging / name).replace(state_dir / name)
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(staging)
    except OSError as exc:
        raise FollowerStateError(f"cannot write state directory {state_dir}: {exc}") from None
