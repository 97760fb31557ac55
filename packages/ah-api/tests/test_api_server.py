"""ApiServer: TLS only, port 0, clean start-up failures, stop releases the port."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from litestar import Litestar, get

from ah_api import ApiServer, ApiServerError
from ah_connectivity.pki import (
    generate_private_key,
    issue_from_csr,
    make_csr,
    spiffe_id_for_follower,
)


@get("/ping", sync_to_thread=False)
def ping() -> dict[str, str]:
    return {"pong": "yes"}


def ping_app() -> Litestar:
    return Litestar(route_handlers=[ping], logging_config=None, openapi_config=None)


def test_port_zero_gives_distinct_ports_and_stop_releases_them(tls: Any) -> None:
    async def scenario() -> None:
        first = ApiServer(ping_app(), certfile=tls.certfile, keyfile=tls.keyfile)
        second = ApiServer(ping_app(), certfile=tls.certfile, keyfile=tls.keyfile)
        port_a = await first.start("127.0.0.1", 0)
        port_b = await second.start("127.0.0.1", 0)
        assert port_a != port_b and 0 not in (port_a, port_b)
        assert first.port == port_a
        async with httpx.AsyncClient(verify=tls.client_context(), timeout=10) as client:
            for port in (port_a, port_b):
                # start() returned, so the listener answers TLS requests right away.
                response = await client.get(f"https://127.0.0.1:{port}/ping")
                assert response.json() == {"pong": "yes"}
        await first.stop()
        await second.stop()
        assert first.port is None
        for port in (port_a, port_b):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
        await first.stop()  # idempotent

    asyncio.run(scenario())


def test_plain_http_and_untrusting_clients_are_refused(tls: Any) -> None:
    async def scenario() -> None:
        server = ApiServer(ping_app(), certfile=tls.certfile, keyfile=tls.keyfile)
        port = await server.start("127.0.0.1", 0)
        try:
            async with httpx.AsyncClient(timeout=10) as plain:
                with pytest.raises(httpx.TransportError):
                    await plain.get(f"http://127.0.0.1:{port}/ping")
            async with httpx.AsyncClient(verify=ssl.create_default_context(), timeout=10) as other:
                with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                    await other.get(f"https://127.0.0.1:{port}/ping")
            async with httpx.AsyncClient(verify=tls.client_context(), timeout=10) as trusting:
                assert (await trusting.get(f"https://127.0.0.1:{port}/ping")).status_code == 200
        finally:
            await server.stop()

    asyncio.run(scenario())


def test_client_certificates_can_be_required(tls: Any, tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(tls.ca.cert_pem)
    key = generate_private_key()
    cert = issue_from_csr(
        tls.ca, make_csr(key, "lin-a"), spiffe_id_for_follower(tls.ca.trust_domain, "lin-a")
    )
    cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    async def scenario() -> None:
        server = ApiServer(
            ping_app(),
            certfile=tls.certfile,
            keyfile=tls.keyfile,
            ca_certs=ca_file,
            require_client_cert=True,
        )
        port = await server.start("127.0.0.1", 0)
        try:
            async with httpx.AsyncClient(verify=tls.client_context(), timeout=10) as anonymous:
                with pytest.raises(httpx.TransportError):
                    await anonymous.get(f"https://127.0.0.1:{port}/ping")
            with_cert = tls.client_context()
            with_cert.load_cert_chain(cert_file, key_file)
            async with httpx.AsyncClient(verify=with_cert, timeout=10) as client:
                assert (await client.get(f"https://127.0.0.1:{port}/ping")).status_code == 200
        finally:
            await server.stop()

    asyncio.run(scenario())


def test_start_up_failures_raise_instead_of_exiting(tls: Any, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"

    def broken_start_up() -> None:
        raise RuntimeError("database unavailable")

    async def scenario() -> None:
        no_cert = ApiServer(ping_app(), certfile=missing, keyfile=tls.keyfile)
        with pytest.raises(ApiServerError, match=re.escape(str(missing))):
            await no_cert.start("127.0.0.1", 0)

        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy_port = holder.getsockname()[1]
        try:
            taken = ApiServer(ping_app(), certfile=tls.certfile, keyfile=tls.keyfile)
            with pytest.raises(ApiServerError, match=re.escape(f"127.0.0.1:{busy_port}")):
                await taken.start("127.0.0.1", busy_port)
        finally:
            holder.close()

        app = Litestar(route_handlers=[ping], on_startup=[broken_start_up], logging_config=None)
        failing = ApiServer(app, certfile=tls.certfile, keyfile=tls.keyfile)
        with pytest.raises(ApiServerError, match=r"start-up|gave up"):
            await failing.start("127.0.0.1", 0)

    # Reaching the end proves uvicorn's sys.exit() did not escape the event loop.
    asyncio.run(scenario())


def test_uvicorn_logs_to_stdlib_loggers_without_access_log(
    tls: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        server = ApiServer(ping_app(), certfile=tls.certfile, keyfile=tls.keyfile)
        port = await server.start("127.0.0.1", 0)
        async with httpx.AsyncClient(verify=tls.client_context(), timeout=10) as client:
            assert (await client.get(f"https://127.0.0.1:{port}/ping")).status_code == 200
        await server.stop()

    with caplog.at_level(logging.INFO, logger="uvicorn"):
        asyncio.run(scenario())
    loggers = {record.name for record in caplog.records}
    assert "uvicorn.error" in loggers
    assert "uvicorn.access" not in loggers
