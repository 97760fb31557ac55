"""Every endpoint over real HTTPS, every JSON body checked against the served OpenAPI schema."""

from __future__ import annotations

import re
import time
from typing import Any

import jsonschema
import pytest
from litestar.routes import HTTPRoute

from ah_api import DOCS_PATH, OPENAPI_PATH
from ah_connectivity.pki import ca_fingerprint
from ah_connectivity.tokens import TokenSigner

FOLLOWERS = "/api/v1/followers"
EXEC = "/api/v1/exec"


def user_token(signer: TokenSigner, *scopes: str, hosts: str = "*", **kwargs: Any) -> str:
    return signer.issue_user("alice", scopes=scopes, hosts=hosts, **kwargs)


def names(body: dict[str, Any]) -> list[str]:
    return [f["info"]["name"] for f in body["followers"]]


def test_healthz_and_readyz(api: Any, check: Any) -> None:
    with api.client() as client:
        health = check.json(client.get("/api/v1/healthz"), "/api/v1/healthz", status=200)
        assert health == {"status": "ok", "version": api.version}
        ready = check.json(client.get("/api/v1/readyz"), "/api/v1/readyz", status=200)
        assert ready == {"status": "ready", "version": api.version}

        api.fleet.ready = False
        problem = check.json(client.get("/api/v1/readyz"), "/api/v1/readyz", status=503)
        assert problem["type"] == "urn:ah:problem:not-ready"
        # Liveness does not depend on readiness.
        assert client.get("/api/v1/healthz").status_code == 200


def test_openapi_documents_every_route_and_the_bearer_scheme(api: Any, check: Any) -> None:
    openapi = check.openapi
    expected = {
        "/api/v1/healthz": {"get"},
        "/api/v1/readyz": {"get"},
        "/api/v1/ca": {"get"},
        "/api/v1/enroll": {"post"},
        FOLLOWERS: {"get"},
        "/api/v1/endpoints": {"get"},
        EXEC: {"post"},
    }
    documented = {path: set(item) for path, item in openapi["paths"].items()}
    assert documented == expected
    # ...and nothing the app serves under /api/v1 is missing from the document.
    served = {
        (route.path, method.lower())
        for route in api.app.routes
        if isinstance(route, HTTPRoute) and route.path.startswith("/api/v1/")
        for method in route.methods - {"OPTIONS", "HEAD"}
    }
    undocumented = {
        (path, method)
        for path, method in served
        if path not in (OPENAPI_PATH,)
        and not path.startswith(DOCS_PATH)
        and method not in documented.get(path, set())
    }
    assert undocumented == set()
    assert openapi["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": openapi["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    secured = {
        (path, method)
        for path, item in openapi["paths"].items()
        for method, operation in item.items()
        if operation.get("security") == [{"bearerAuth": []}]
    }
    assert secured == {(FOLLOWERS, "get"), ("/api/v1/endpoints", "get"), (EXEC, "post")}
    # Every documented schema is itself valid JSON Schema and every $ref resolves.
    for item in openapi["paths"].values():
        for operation in item.values():
            for response in operation["responses"].values():
                for media in response.get("content", {}).values():
                    schema = {**media["schema"], "components": openapi["components"]}
                    jsonschema.Draft202012Validator.check_schema(schema)
    assert openapi["info"]["version"] == api.version
    for struct in ("FollowersResponse", "ExecApiRequest", "HostExec", "Problem", "EnrollRequest"):
        assert struct in openapi["components"]["schemas"]
    # Wire names are camelCase.
    assert "tookMs" in openapi["components"]["schemas"]["HostExec"]["properties"]


def test_docs_page_is_served_without_auth(api: Any) -> None:
    with api.client() as client:
        response = client.get("/api/v1/docs")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert "swagger" in response.text.lower()
        # The page embeds the same document that /api/v1/openapi.json serves.
        for path in client.get(OPENAPI_PATH).json()["paths"]:
            assert f'"{path}"' in response.text
        # Its scripts and stylesheet come from the access point itself, never from a CDN.
        assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', response.text)
        assert len(assets) == 3, assets
        for asset in assets:
            assert asset.startswith("/api/v1/docs/assets/"), asset
            served = client.get(asset)
            assert served.status_code == 200 and len(served.content) > 10_000, asset
        missing = client.get("/api/v1/docs/nonexistent-page")
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("application/problem+json")


def test_ca_is_the_fleet_ca_pem(api: Any) -> None:
    with api.client() as client:
        response = client.get("/api/v1/ca")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text.startswith("-----BEGIN CERTIFICATE-----")
    assert ca_fingerprint(response.text) == api.tls.ca.fingerprint
    assert response.headers["x-ah-ca-fingerprint"] == api.tls.ca.fingerprint


def test_followers_lists_sorted_and_filters_by_tags(
    api: Any, check: Any, signer: TokenSigner
) -> None:
    with api.client(user_token(signer, "read-logs")) as client:
        everyone = check.json(client.get(FOLLOWERS), FOLLOWERS, status=200)
        assert names(everyone) == ["lin-a", "lin-b", "mac-1", "win-1"]
        mac = next(f for f in everyone["followers"] if f["info"]["name"] == "mac-1")
        assert mac["health"] == "offline"
        assert mac["info"]["os"] == "macos"
        assert mac["lastHeartbeatMs"] == 1_700_000_000_000

        linux = client.get(FOLLOWERS, params={"tag": "os=linux"})
        assert names(check.json(linux, FOLLOWERS, status=200)) == ["lin-a", "lin-b"]
        both = client.get(FOLLOWERS, params=[("tag", "os=linux"), ("tag", "arch=arm64")])
        assert names(check.json(both, FOLLOWERS, status=200)) == ["lin-a"]
        configured = client.get(FOLLOWERS, params={"tag": "pool=dev"})
        assert names(check.json(configured, FOLLOWERS, status=200)) == ["mac-1"]
        none = client.get(FOLLOWERS, params=[("tag", "os=linux"), ("tag", "pool=dev")])
        assert names(check.json(none, FOLLOWERS, status=200)) == []

        bad = client.get(FOLLOWERS, params=[("tag", "os=linux"), ("tag", "oslinux")])
        problem = check.json(bad, FOLLOWERS, status=400)
        assert problem["type"] == "urn:ah:problem:bad-tag"
        assert "'oslinux'" in problem["detail"]


def test_followers_accepts_exec_scope_and_honours_the_hosts_glob(
    api: Any, check: Any, signer: TokenSigner
) -> None:
    with api.client(user_token(signer, "exec", hosts="lin-*")) as client:
        body = check.json(client.get(FOLLOWERS), FOLLOWERS, status=200)
    assert names(body) == ["lin-a", "lin-b"]
    with api.client(user_token(signer, "ssh")) as client:
        problem = check.json(client.get(FOLLOWERS), FOLLOWERS, status=403)
    assert problem["type"] == "urn:ah:problem:missing-scope"
    assert "read-logs" in problem["detail"] and "exec" in problem["detail"]


def test_exec_runs_on_every_requested_host(api: Any, check: Any, signer: TokenSigner) -> None:
    request = {"hosts": ["lin-b", "mac-1"], "command": ["make", "test"], "timeoutMs": 5000}
    with api.client(user_token(signer, "exec")) as client:
        body = check.json(client.post(EXEC, json=request), EXEC, status=200)
    assert api.fleet.exec_calls == [(["lin-b", "mac-1"], ["make", "test"], 5000)]
    assert body == {
        "hosts": [
            {
                "host": "lin-b",
                "state": "ok",
                "exitCode": 0,
                "stdout": "lin-b: make test\n",
                "stderr": "",
                "tookMs": 3,
                "error": None,
            },
            {
                "host": "mac-1",
                "state": "unreachable",
                "exitCode": None,
                "stdout": "",
                "stderr": "",
                "tookMs": 0,
                "error": "mac-1 is offline",
            },
        ]
    }


@pytest.mark.parametrize(
    ("case", "expected_type"),
    [
        ("none", "urn:ah:problem:token-missing"),
        ("not-bearer", "urn:ah:problem:token-malformed"),
        ("garbage", "urn:ah:problem:token-malformed"),
        ("expired", "urn:ah:problem:token-expired"),
        ("forged", "urn:ah:problem:token-forged"),
        ("wrong-audience", "urn:ah:problem:token-wrong-audience"),
    ],
)
def test_bad_tokens_are_401_problems(
    api: Any, check: Any, signer: TokenSigner, case: str, expected_type: str
) -> None:
    headers: dict[str, str] = {}
    if case == "not-bearer":
        headers["Authorization"] = "Basic YWxpY2U6c2VjcmV0"
    elif case == "garbage":
        headers["Authorization"] = "Bearer not.a.jwt"
    elif case == "expired":
        stale = user_token(signer, "exec", ttl=60, now=time.time() - 3600)
        headers["Authorization"] = f"Bearer {stale}"
    elif case == "forged":
        forger = TokenSigner.generate(api.trust_domain)
        headers["Authorization"] = f"Bearer {user_token(forger, 'exec')}"
    elif case == "wrong-audience":
        other_fleet = TokenSigner(signer.key, "other.fleet")
        headers["Authorization"] = f"Bearer {user_token(other_fleet, 'exec')}"
    with api.client() as client:
        listed = client.get(FOLLOWERS, headers=headers)
        ran = client.post(EXEC, json={"hosts": ["lin-a"], "command": ["true"]}, headers=headers)
    for response, path in ((listed, FOLLOWERS), (ran, EXEC)):
        problem = check.json(response, path, status=401)
        assert problem["type"] == expected_type
        assert problem["instance"] == path
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert api.fleet.exec_calls == []


def test_exec_needs_the_exec_scope(api: Any, check: Any, signer: TokenSigner) -> None:
    with api.client(user_token(signer, "read-logs", "ssh")) as client:
        response = client.post(EXEC, json={"hosts": ["lin-a"], "command": ["true"]})
    problem = check.json(response, EXEC, status=403)
    assert problem["type"] == "urn:ah:problem:missing-scope"
    assert "'exec'" in problem["detail"]
    assert api.fleet.exec_calls == []


def test_exec_refuses_hosts_outside_the_token_glob(
    api: Any, check: Any, signer: TokenSigner
) -> None:
    with api.client(user_token(signer, "exec", hosts="lin-*")) as client:
        response = client.post(EXEC, json={"hosts": ["lin-a", "win-1"], "command": ["true"]})
    problem = check.json(response, EXEC, status=403)
    assert problem["type"] == "urn:ah:problem:host-forbidden"
    assert "'win-1'" in problem["detail"] and "'lin-*'" in problem["detail"]
    assert api.fleet.exec_calls == []


def test_exec_on_an_unknown_host_is_404_naming_it(
    api: Any, check: Any, signer: TokenSigner
) -> None:
    with api.client(user_token(signer, "exec")) as client:
        response = client.post(EXEC, json={"hosts": ["lin-a", "ghost-7"], "command": ["true"]})
    problem = check.json(response, EXEC, status=404)
    assert problem["type"] == "urn:ah:problem:unknown-host"
    assert "'ghost-7'" in problem["detail"]
    assert api.fleet.exec_calls == []


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"hosts": [], "command": ["true"]}, "hosts"),
        ({"hosts": ["lin-a"], "command": []}, "command"),
        ({"hosts": ["lin-a"]}, "command"),
        ({"hosts": ["lin-a"], "command": ["true"], "timeoutMs": 0}, "timeoutMs"),
        ({"hosts": ["bad name!"], "command": ["true"]}, "hosts"),
        ({"hosts": ["lin-a", "lin-a"], "command": ["true"]}, "'lin-a' listed twice"),
    ],
)
def test_malformed_exec_bodies_are_400_problems(
    api: Any,
    check: Any,
    signer: TokenSigner,
    body: dict[str, Any],
    fragment: str,
) -> None:
    with api.client(user_token(signer, "exec")) as client:
        response = client.post(EXEC, json=body)
    problem = check.json(response, EXEC, status=400)
    assert problem["type"] == "urn:ah:problem:invalid-request"
    assert fragment in problem["detail"]
    assert api.fleet.exec_calls == []


def test_non_json_body_is_a_400_problem(api: Any, check: Any, signer: TokenSigner) -> None:
    with api.client(user_token(signer, "exec")) as client:
        response = client.post(
            EXEC, content=b"{not json", headers={"content-type": "application/json"}
        )
    check.json(response, EXEC, status=400)


def test_unknown_route_and_wrong_method_are_problems(api: Any, check: Any) -> None:
    with api.client() as client:
        missing = check.problem(client.get("/api/v1/no-such-thing"), 404)
        assert missing["type"] == "urn:ah:problem:not-found"
        assert "/api/v1/no-such-thing" in missing["detail"]
        outside = check.problem(client.post("/elsewhere"), 404)
        assert outside["instance"] == "/elsewhere"
        wrong = client.delete("/api/v1/healthz")
        problem = check.problem(wrong, 405)
        assert problem["type"] == "urn:ah:problem:method-not-allowed"
        assert "GET" in wrong.headers["allow"]


def test_unhandled_backend_error_is_a_500_problem_without_internals(
    api: Any, check: Any, signer: TokenSigner
) -> None:
    api.fleet.exec_failure = RuntimeError("secret-internal-state at /srv/state.db")
    with api.client(user_token(signer, "exec")) as client:
        response = client.post(EXEC, json={"hosts": ["lin-a"], "command": ["true"]})
    problem = check.problem(response, 500)
    assert problem["type"] == "urn:ah:problem:internal"
    assert "secret-internal-state" not in response.text
    assert "Traceback" not in response.text
    assert "RuntimeError" not in response.text


def test_endpoints_need_a_token_and_match_the_contract(
    api: Any, check: Any, signer: TokenSigner
) -> None:
    # This app was built without an endpoints callable: it serves no CONNECT listener.
    with api.client(user_token(signer, "ssh")) as client:
        body = check.json(client.get("/api/v1/endpoints"), "/api/v1/endpoints", status=200)
    assert body["connectPort"] is None and body["quicPort"] is None
    with api.client(None) as client:
        problem = check.json(client.get("/api/v1/endpoints"), "/api/v1/endpoints", status=401)
    assert problem["status"] == 401
