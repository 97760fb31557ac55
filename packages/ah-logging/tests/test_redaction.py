"""Redaction as pure functions: key names, inline patterns, deep copies, properties."""

from __future__ import annotations

import base64
import json
import string
from collections import namedtuple
from dataclasses import dataclass

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from ah_logging import MASK, is_sensitive_key, redact, redact_text


@pytest.mark.parametrize(
    "name",
    [
        "token",
        "access_token",
        "accessToken",
        "X-Auth-Token",
        "Password",
        "db_passwd",
        "passphrase",
        "client_secret",
        "Authorization",
        "Proxy-Authorization",
        "private_key",
        "private-key",
        "privateKey",
        "ssh_key",
        "signing-key",
        "signingKey",
        "api_key",
        "apiKey",
        "X-API-KEY",
        "jwt",
        "user_jwt",
        "credentials",
        "Cookie",
        "key_material",
    ],
)
def test_sensitive_key_names(name: str) -> None:
    assert is_sensitive_key(name)


@pytest.mark.parametrize(
    "name",
    [
        "public_key",
        "host_public_key",
        "publicKey",
        "pubkey",
        "host_key_fingerprint",
        "fingerprint",
        "key",
        "key_id",
        "keyId",
        "monkey",
        "host",
        "message",
        "level",
        "selector",
        42,
    ],
)
def test_harmless_key_names(name: object) -> None:
    assert not is_sensitive_key(name)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer abc.def-ghi", "Authorization: Bearer ***"),
        ("proxy-authorization: bearer abc", "proxy-authorization: bearer ***"),
        ('"Authorization": "Bearer abc"', '"Authorization": "***"'),
        ("Basic dXNlcjpwYXNzd29yZA==", "Basic ***"),
        ("basic setup done", "basic setup done"),
        ("GET /x?a=1&token=abc123&b=2", "GET /x?a=1&token=***&b=2"),
        ("GET /x?access_token=abc%2F==", "GET /x?access_token=***"),
        ("a=token=abc", "a=token=***"),
        ("run --token XYZ --name n", "run --token *** --name n"),
        ("run --password=XYZ", "run --password=***"),
        ('{"password": "a\\"b c", "user": "bob"}', '{"password": "***", "user": "bob"}'),
        ("Creds(token='abc', name='x')", "Creds(token='***', name='x')"),
        ("{'api_key': 'k1', 'host': 'h'}", "{'api_key': '***', 'host': 'h'}"),
        ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.sig_-9 end", "jwt *** end"),
        ("https://bob:hunter2@example.org/x", "https://bob:***@example.org/x"),
        (
            "host_key=AAAA public_key=BBBB key=log.level",
            "host_key=*** public_key=BBBB key=log.level",
        ),
        ("password: 'unterminated", "password: '***"),
        # Things that look a bit like secrets but are not.
        ("ah_connectivity::quic=trace", "ah_connectivity::quic=trace"),
        ("ip-10-0-0-1.eu-west-1.compute.internal", "ip-10-0-0-1.eu-west-1.compute.internal"),
        ("version 1.2.3 of ah_logging.redaction", "version 1.2.3 of ah_logging.redaction"),
        ("sha256:AbCdEf", "sha256:AbCdEf"),
        ("", ""),
    ],
)
def test_redact_text_examples(text: str, expected: str) -> None:
    assert redact_text(text) == expected


def test_pem_private_key_blocks_are_masked_and_public_ones_kept() -> None:
    body = "MIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgHcTz6sE2I2yPB\naGVsbG8="
    private = f"key:\n-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----\nok"
    masked = redact_text(private)
    assert "MIIEowIBAAKCAQEA" not in masked and "aGVsbG8" not in masked
    assert masked.endswith("-----END RSA PRIVATE KEY-----\nok")
    truncated = redact_text(f"-----BEGIN OPENSSH PRIVATE KEY-----\n{body}")
    assert "MIIEowIBAAKCAQEA" not in truncated
    public = f"-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----"
    assert redact_text(public) == public


def test_redact_deep_copies_and_masks_nested_values() -> None:
    Pair = namedtuple("Pair", ["name", "token"])

    @dataclass
    class Creds:
        user: str
        password: str

    original = {
        "host": "a",
        "auth": {"Password": "p1", "token": None, "nested": [{"api_key": "k"}]},
        "pair": Pair("n", "t1"),
        "creds": Creds("u", "p2"),
        "items": ("Bearer abc", {"secret": {"deep": "x"}}),
        "tags": {"plain"},
        "blob": b"token=raw",
        "count": 3,
    }
    result = redact(original)
    assert result == {
        "host": "a",
        "auth": {"Password": MASK, "token": None, "nested": [{"api_key": MASK}]},
        "pair": {"name": "n", "token": MASK},
        "creds": {"user": "u", "password": MASK},
        "items": ("Bearer ***", {"secret": MASK}),
        "tags": {"plain"},
        "blob": b"token=***",
        "count": 3,
    }
    assert original["auth"] == {"Password": "p1", "token": None, "nested": [{"api_key": "k"}]}


def test_redact_survives_cycles() -> None:
    loop: dict[str, object] = {"token": "t"}
    loop["self"] = loop
    assert redact(loop) == {"token": MASK, "self": "<cycle>"}


# -- properties ------------------------------------------------------------------------

SENSITIVE_WORDS = [
    "token",
    "password",
    "passwd",
    "secret",
    "authorization",
    "private_key",
    "api_key",
    "apikey",
    "jwt",
    "ssh_key",
    "signing-key",
    "passphrase",
]
B64URL = string.ascii_letters + string.digits + "-_"
B64TOKEN = B64URL + ".~+/"
BARE_VALUE = string.ascii_letters + string.digits + "-_.~+/%:@!$*"


@st.composite
def sensitive_names(draw: st.DrawFn) -> str:
    word = draw(st.sampled_from(SENSITIVE_WORDS))
    word = "".join(c.upper() if draw(st.booleans()) else c for c in word)
    prefix = draw(st.sampled_from(["", "x_", "client_", "proxy-"]))
    suffix = draw(st.sampled_from(["", "_value", "s"]))
    if word.lower().endswith("key"):
        suffix = ""  # "ssh_key_value" is not key material by name
    return prefix + word + suffix


def secrets(alphabet: str, min_size: int = 10) -> st.SearchStrategy[str]:
    return st.text(alphabet=alphabet, min_size=min_size, max_size=40)


@st.composite
def jwts(draw: st.DrawFn) -> tuple[str, list[str]]:
    claims = draw(st.dictionaries(st.text(B64URL, min_size=1, max_size=5), st.integers()))
    header = base64.urlsafe_b64encode(b'{"alg":"HS256"}').rstrip(b"=").decode()
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    signature = draw(secrets(B64URL, min_size=16))
    return f"{header}.{payload}.{signature}", [payload, signature]


@st.composite
def inline_secrets(draw: st.DrawFn) -> tuple[str, list[str]]:
    """(text embedding secrets, the secrets)."""
    kind = draw(st.sampled_from(["bearer", "jwt", "pem", "bare", "quoted", "flag", "url"]))
    if kind == "bearer":
        secret = draw(secrets(B64TOKEN))
        scheme = draw(st.sampled_from(["Bearer", "bearer", "BEARER"]))
        return f"Authorization: {scheme} {secret}", [secret]
    if kind == "jwt":
        token, parts = draw(jwts())
        return f"got {token} from server", parts
    if kind == "pem":
        lines = draw(
            st.lists(
                secrets(string.ascii_letters + string.digits + "+/", 16), min_size=1, max_size=4
            )
        )
        label = draw(st.sampled_from(["", "RSA ", "EC ", "OPENSSH ", "ENCRYPTED "]))
        body = "\n".join(lines)
        return (
            f"-----BEGIN {label}PRIVATE KEY-----\n{body}\n-----END {label}PRIVATE KEY-----",
            lines,
        )
    name = draw(sensitive_names())
    if kind == "bare":
        secret = draw(secrets(BARE_VALUE))
        assume(secret.lower() not in ("bearer", "basic"))
        separator = draw(st.sampled_from(["=", ": ", ":", " = "]))
        return f"?a=1&{name}{separator}{secret}&b=2", [secret]
    if kind == "quoted":
        printable = "".join(c for c in string.printable if c not in '"\\')
        secret = draw(secrets(printable))
        assume(secret.strip())
        return f'{{"{name}": "{secret}", "host": "h"}}', [secret]
    if kind == "flag":
        secret = draw(secrets(BARE_VALUE))
        return f"exec ah-followerd enroll --{name} {secret} --name n1", [secret]
    secret = draw(secrets(BARE_VALUE.replace("@", "").replace(":", "").replace("/", "")))
    return f"dialing https://user:{secret}@host:443/x", [secret]


CONTEXT = "prefix text; "


@given(inline_secrets(), st.text(alphabet=string.ascii_letters + " ", max_size=20))
def test_inline_secrets_never_survive(case: tuple[str, list[str]], filler: str) -> None:
    text, hidden = case
    for secret in hidden:
        assume(secret not in CONTEXT + filler)
    masked = redact_text(f"{CONTEXT}{filler} {text} {filler}")
    for secret in hidden:
        assert secret not in masked
    assert MASK in masked


@given(
    sensitive_names(),
    st.text(min_size=1, max_size=40),
    st.sampled_from(["flat", "nested", "list"]),
)
def test_structured_secrets_never_survive(name: str, secret: str, shape: str) -> None:
    def shaped(inner: object) -> object:
        if shape == "nested":
            return {"outer": {"host": "h", name: inner}}
        if shape == "list":
            return {"items": [{"n": 1}, {name: inner}]}
        return {name: inner}

    masked = redact(shaped(secret))
    assert masked == shaped(MASK)
    skeleton = json.dumps(shaped(MASK), ensure_ascii=False)
    assume(secret not in skeleton)
    assert secret not in json.dumps(masked, ensure_ascii=False)


@given(st.text(alphabet=string.ascii_letters + string.digits + " .,:-_/", max_size=60))
def test_text_without_secret_markers_is_unchanged(text: str) -> None:
    lowered = text.lower()
    assume(
        not any(
            word in lowered
            for word in [
                "token",
                "passw",
                "secret",
                "key",
                "jwt",
                "authorization",
                "bearer",
                "credential",
                "cookie",
                "passphrase",
                "eyj",
                "basic",
            ]
        )
    )
    # Long dotted base64url triples count as tokens; keep them out of this property.
    assume(not any(len(part) >= 16 for part in text.replace(" ", ".").split(".")))
    assert redact_text(text) == text
