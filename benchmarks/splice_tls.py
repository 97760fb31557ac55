"""Raw TLS→TLS splice throughput and CPU: `ah_connectivity.splice` vs asyncio streams.

The middle process (this one) accepts a TLS connection from a source, dials a TLS sink and
pumps the bytes, the way the access point splices a CONNECT client with a data channel. Source
and sink run in child processes (`TlsSocket`s, as the ProxyCommand and the follower use), so
only the splice runs in this interpreter; its CPU time (user+system of this process while it
pumps) is reported per 200 MB — the access point's cost per tunnelled 200 MB.

    uv run python benchmarks/splice_tls.py [--mb 200] [--mode splice|asyncio|both]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import time
from pathlib import Path
from typing import Any

from ah_connectivity import FleetCA, issue_server_cert
from ah_connectivity.splice import Splice, SpliceEnd
from ah_connectivity.tls import client_context, server_context
from ah_connectivity.tls_socket import wrap_tls

CHUNK = 256 * 1024


def _identity(cert_pem: bytes, key_pem: bytes) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from ah_connectivity.pki import Identity

    key = serialization.load_pem_private_key(key_pem, None)
    return Identity(key=key, cert=x509.load_pem_x509_certificate(cert_pem))  # type: ignore[arg-type]


def sink(ca_pem: bytes, cert_pem: bytes, key_pem: bytes, q: Any) -> None:
    """Child: a TLS server that counts what it receives."""
    server_ctx = server_context(_identity(cert_pem, key_pem), ca_pem, client_certs=False)
    listener = socket.create_server(("127.0.0.1", 0))
    q.put(listener.getsockname()[1])
    conn, _ = listener.accept()
    tls = wrap_tls(server_ctx, conn, server_side=True)
    buf = bytearray(CHUNK)
    received = 0
    while n := tls.recv_into(buf):
        received += n
    tls.close()
    q.put(received)


def source(ca_pem: bytes, port: int, mb: int, q: Any) -> None:
    """Child: a TLS client that sends `mb` MiB into the middle."""
    raw = socket.create_connection(("127.0.0.1", port))
    tls = wrap_tls(client_context(ca_pem), raw)
    payload = memoryview(bytes(CHUNK))
    start = time.monotonic()
    for _ in range(mb * 1024 * 1024 // CHUNK):
        tls.sendall(payload)
    tls.shutdown(socket.SHUT_WR)
    tls.recv(1)  # the middle closes once the sink has everything
    q.put(time.monotonic() - start)


def run_mode(mode: str, mb: int) -> tuple[float, float]:
    ca = FleetCA.generate("bench.fleet")
    ident = issue_server_cert(ca)
    listener = socket.create_server(("127.0.0.1", 0))
    ctx_server = server_context(ident, ca, client_certs=False)
    ctx_client = client_context(ca)
    sink_q: Any = multiprocessing.Queue()
    source_q: Any = multiprocessing.Queue()
    sink_proc = multiprocessing.Process(
        target=sink, args=(ca.cert_pem, ident.cert_pem, ident.key_pem, sink_q)
    )
    sink_proc.start()
    sink_port = int(sink_q.get())
    source_proc = multiprocessing.Process(
        target=source, args=(ca.cert_pem, listener.getsockname()[1], mb, source_q)
    )

    def go() -> None:
        source_proc.start()

    cpu = os.times()
    if mode == "splice":
        go()
        conn, _ = listener.accept()
        client = wrap_tls(ctx_server, conn, server_side=True)
        upstream = wrap_tls(ctx_client, socket.create_connection(("127.0.0.1", sink_port)))
        Splice(SpliceEnd(client, "src"), SpliceEnd(upstream, "sink")).run()
    else:

        async def main() -> None:
            done = asyncio.Event()

            async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                while data := await r.read(CHUNK):
                    w.write(data)
                    await w.drain()
                w.close()

            async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                ur, uw = await asyncio.open_connection("127.0.0.1", sink_port, ssl=ctx_client)
                await asyncio.gather(pump(r, uw), pump(ur, w))
                done.set()

            server = await asyncio.start_server(handle, sock=listener, ssl=ctx_server)
            go()
            await done.wait()
            server.close()

        asyncio.run(main())
    after = os.times()
    cpu_s = (after.user - cpu.user) + (after.system - cpu.system)
    received = int(sink_q.get())
    seconds = float(source_q.get())
    sink_proc.join()
    source_proc.join()
    assert received == mb * 1024 * 1024, (received, mb)
    return received / seconds / 1e6, cpu_s * 200e6 / received


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--mode", default="both")
    args = parser.parse_args()
    modes = ["splice", "asyncio"] if args.mode == "both" else [args.mode]
    for mode in modes:
        load = Path("/proc/loadavg").read_text().split()[:3]
        rate, cpu = run_mode(mode, args.mb)
        print(
            f"{mode:8s} TLS->TLS splice: {rate:7.1f} MB/s, middle process {cpu:.2f} CPU-s "
            f"per 200 MB (load before {' '.join(load)})",
            flush=True,
        )


if __name__ == "__main__":
    main()
