"""Property: random secrets logged in messages or extra fields never reach any sink."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from loguru import logger

from ah_logging import LogSettings, configure_logging

SENSITIVE_NAMES = [
    "token",
    "password",
    "Passwd",
    "client_secret",
    "Authorization",
    "private_key",
    "api-key",
    "apiKey",
    "jwt",
    "ssh_key",
    "signingKey",
    "x_auth_token",
]
B64URL = string.ascii_letters + string.digits + "-_"
B64TOKEN = B64URL + ".~+/"
BARE = string.ascii_letters + string.digits + "-_.~+%!$*"
# Long enough that a secret cannot turn up in a timestamp, a level name or a logger name.


def secret_text(alphabet: str | None = None) -> st.SearchStrategy[str]:
    chars = st.characters(codec="utf-8") if alphabet is None else st.sampled_from(alphabet)
    return st.text(chars, min_size=12, max_size=40)


@dataclass(frozen=True)
class Case:
    message: str
    extra: dict[str, Any]
    secrets: tuple[str, ...]
    via_stdlib: bool


@st.composite
def cases(draw: st.DrawFn) -> Case:
    form = draw(
        st.sampled_from(["extra", "extra-nested", "bearer", "jwt", "pem", "assignment", "quoted"])
    )
    name = draw(st.sampled_from(SENSITIVE_NAMES))
    via_stdlib = draw(st.booleans())
    if form == "extra":
        secret = draw(secret_text().filter(lambda s: s.strip()))
        return Case("structured", {name: secret, "host": "h1"}, (secret,), via_stdlib)
    if form == "extra-nested":
        secret = draw(secret_text().filter(lambda s: s.strip()))
        return Case("nested", {"cfg": {"peers": [{name: secret}]}}, (secret,), via_stdlib)
    if form == "bearer":
        secret = draw(secret_text(B64TOKEN))
        return Case(f"sending Authorization: Bearer {secret} now", {}, (secret,), via_stdlib)
    if form == "jwt":
        header = base64.urlsafe_b64encode(b'{"alg":"EdDSA","typ":"JWT"}').rstrip(b"=").decode()
        payload = draw(secret_text(B64URL))
        signature = draw(secret_text(B64URL))
        token = f"{header}.{payload}.{signature}"
        return Case(f"token is {token}.", {}, (payload, signature), via_stdlib)
    if form == "pem":
        lines = draw(
            st.lists(
                secret_text(B64URL.replace("-", "+").replace("_", "/")),
                min_size=1,
                max_size=3,
            )
        )
        body = "\n".join(lines)
        pem = f"-----BEGIN EC PRIVATE KEY-----\n{body}\n-----END EC PRIVATE KEY-----"
        return Case(f"loaded key:\n{pem}\ndone", {}, tuple(lines), via_stdlib)
    if form == "assignment":
        secret = draw(secret_text(BARE))
        return Case(f"GET /v1/x?a=1&{name}={secret}&b=2", {}, (secret,), via_stdlib)
    printable = "".join(c for c in string.printable if c not in '"\\')
    secret = draw(secret_text(printable).filter(lambda s: s.strip()))
    return Case(f'body {{"{name}": "{secret}", "n": 1}}', {}, (secret,), via_stdlib)


def emit(case: Case) -> None:
    if case.via_stdlib:
        logging.getLogger("ah_custom.stdlib").warning("%s", case.message, extra={"ignored": True})
        # stdlib extras are attributes, not loguru extras: log structured ones via loguru too
        if case.extra:
            logger.bind(**case.extra).warning("{}", case.message)
    else:
        logger.bind(**case.extra).warning("{}", case.message)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in [str(key), *_strings(item)]]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return [str(value)]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_random_secrets_never_reach_a_sink(tmp_path: Path, log_format: Any) -> None:
    path = tmp_path / "sink.log"
    handle = configure_logging(
        "ah-followerd", "daemon", LogSettings(file=str(path), format=log_format), env={}
    )

    @settings(
        max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(case=cases())
    def check(case: Case) -> None:
        for secret in case.secrets:
            assume(secret not in case.message.replace(secret, ""))
        start = path.stat().st_size
        captured = io.StringIO()
        with contextlib.redirect_stderr(captured):
            emit(case)
        with path.open("rb") as stream:
            stream.seek(start)
            file_output = stream.read().decode("utf-8")
        for output in (captured.getvalue(), file_output):
            assert output.strip(), "nothing was logged"
            for secret in case.secrets:
                assert secret not in output
            if log_format == "json":
                for line in output.splitlines():
                    for text in _strings(json.loads(line)):
                        for secret in case.secrets:
                            assert secret not in text

    try:
        check()
    finally:
        handle.close()
