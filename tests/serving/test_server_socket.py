"""The service's listening socket is a TCP socket asyncio sets TCP_NODELAY on (no Nagle + delayed-ACK stalls)."""

from __future__ import annotations

import socket

from funnelrec.serving.server import bind_socket


def test_bound_socket_is_tcp_so_accepted_connections_get_nodelay():
    sock = bind_socket("127.0.0.1", 0)
    try:
        # asyncio's transports call _set_nodelay only for AF_INET/AF_INET6 + SOCK_STREAM + proto IPPROTO_TCP;
        # a socket made with proto 0 left every response's body waiting ~40 ms for the client's delayed ACK
        assert sock.proto == socket.IPPROTO_TCP and sock.type == socket.SOCK_STREAM
        sock.listen()
        client = socket.create_connection(sock.getsockname())
        conn, _ = sock.accept()
        assert conn.proto == socket.IPPROTO_TCP  # what asyncio checks on the accepted connection
        conn.close()
        client.close()
    finally:
        sock.close()
