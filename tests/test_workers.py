from __future__ import annotations

import asyncio
import socket

from sentinel_proxy.workers import listening_socket


async def test_connections_accepted_on_a_worker_socket_have_nagle_off() -> None:
    # uvicorn writes the head and the body of an answer separately; with Nagle on, the
    # body waits for the client's delayed ACK (40 ms on Linux).
    sock = listening_socket("127.0.0.1", 0)
    sock.listen()
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            conn = transport.get_extra_info("socket")
            accepted.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
    async with server:
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        assert await asyncio.wait_for(accepted, 5) != 0
        writer.close()
