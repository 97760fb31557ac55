"""Serve an ASGI app (the API) under uvicorn, TLS only, on a socket bound before start-up."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Generator
from pathlib import Path

import uvicorn
from litestar import Litestar

__all__ = ["ApiServer", "ApiServerError"]

_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0


class ApiServerError(RuntimeError):
    """The API server could not start (bad certificate, port in use, app start-up failed)."""


class _EmbeddedServer(uvicorn.Server):
    """uvicorn's server without its signal handlers: the embedding daemon owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class ApiServer:
    """One uvicorn HTTPS listener for ``app``.

    uvicorn logs to the stdlib ``uvicorn`` / ``uvicorn.error`` / ``uvicorn.access`` loggers
    and never configures logging itself, so the embedding process decides where they go.
    The access log is off unless ``access_log=True``.
    """

    def __init__(
        self,
        app: Litestar,
        *,
        certfile: str | Path,
        keyfile: str | Path,
        ca_certs: str | Path | None = None,
        require_client_cert: bool = False,
        access_log: bool = False,
        graceful_shutdown_s: float = 5.0,
    ) -> None:
        """``ca_certs`` lets clients present certificates from that CA; with
        ``require_client_cert`` every client must present one."""
        if require_client_cert and ca_certs is None:
            raise ValueError("require_client_cert needs ca_certs (the CA client certs chain to)")
        self._app = app
        self._certfile = str(certfile)
        self._keyfile = str(keyfile)
        self._ca_certs = None if ca_certs is None else str(ca_certs)
        self._cert_reqs = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
        if ca_certs is not None and not require_client_cert:
            self._cert_reqs = ssl.CERT_OPTIONAL
        self._access_log = access_log
        self._graceful_shutdown_s = graceful_shutdown_s
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None
        self.port: int | None = None
        """The bound port while running."""

    async def start(self, host: str, port: int) -> int:
        """Bind ``host:port`` (0: any free port), serve TLS, and return the bound port once
        uvicorn accepts connections on it. Raises :class:`ApiServerError` when it cannot."""
        if self._task is not None:
            raise RuntimeError("ApiServer.start called twice")
        for path, what in ((self._certfile, "certificate"), (self._keyfile, "private key")):
            if not Path(path).is_file():
                raise ApiServerError(f"TLS {what} file {path} does not exist")
        config = uvicorn.Config(
            self._app,
            ssl_certfile=self._certfile,
            ssl_keyfile=self._keyfile,
            ssl_ca_certs=self._ca_certs,
            ssl_cert_reqs=self._cert_reqs,
            log_config=None,
            access_log=self._access_log,
            lifespan="on",
            ws="none",
            http="h11",
            server_header=False,
            timeout_graceful_shutdown=int(max(1, self._graceful_shutdown_s)),
        )
        try:
            config.load()
        except (OSError, ssl.SSLError) as exc:
            raise ApiServerError(f"cannot load TLS material {self._certfile}: {exc}") from exc

        sock = _bind(host, port)
        bound_port = int(sock.getsockname()[1])
        server = _EmbeddedServer(config)
        task = asyncio.create_task(_serve(server, sock), name=f"ah-api:{bound_port}")
        self._server, self._task, self._sock = server, task, sock
        try:
            await _wait_started(server, task, f"{host}:{bound_port}")
        except BaseException:
            await self.stop()
            raise
        self.port = bound_port
        return bound_port

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), run app shutdown."""
        server, task, sock = self._server, self._task, self._sock
        self._server = self._task = self._sock = None
        self.port = None
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            await asyncio.wait_for(
                asyncio.shield(task), self._graceful_shutdown_s + _STOP_TIMEOUT_S
            )
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        except Exception:
            # Start-up failures already surfaced from start(); nothing more to report.
            pass
        finally:
            if sock is not None:
                sock.close()


async def _serve(server: uvicorn.Server, sock: socket.socket) -> None:
    try:
        await server.serve(sockets=[sock])
    except SystemExit as exc:
        # uvicorn calls sys.exit() when the app's start-up fails; inside a task that would
        # escape the event loop and end the whole embedding process.
        raise ApiServerError(
            f"uvicorn gave up (exit status {exc.code}); see the uvicorn log"
        ) from None


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ApiServerError(f"cannot resolve API bind address {host!r}: {exc}") from exc
    family, type_, proto, _, address = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ApiServerError(f"cannot listen on {host}:{port} for the API: {exc}") from exc
    return sock


async def _wait_started(server: uvicorn.Server, task: asyncio.Task[None], where: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _START_TIMEOUT_S
    # uvicorn offers no start-up event; poll its flag while watching the serve task die early.
    delay = 0.001
    while not server.started:
        if task.done():
            exc = task.exception() if not task.cancelled() else None
            raise ApiServerError(f"API server on {where} stopped during start-up: {exc!r}")
        if loop.time() > deadline:
            raise ApiServerError(f"API server on {where} did not start in {_START_TIMEOUT_S}s")
        await asyncio.wait({task}, timeout=delay)
        delay = min(delay * 2, 0.05)
