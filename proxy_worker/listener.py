"""Taking a proxy's listening socket out of the SO_REUSEPORT group while its server keeps serving.

On a reload the retiring proxy must stop receiving new connections before its gRPC server
stops: ``server.stop()`` sends GOAWAY, but gRPC's core also cancels every call that reaches
it from then on, so a connection accepted in the last instant before the stop would have its
first call cancelled. gRPC has no call that only closes the listener, so this module finds
the process's own listening sockets on the port and shuts them down. The kernel then removes
them from the port's SO_REUSEPORT group at once, so new connections go to the processes still
listening, while the connections already accepted keep being served. gRPC's acceptor sees
its socket fail (it logs ``Failed accept4: Invalid argument`` once, which the proxy logs at
info level) and stops polling it.

A connection that completed its handshake but was not yet accepted when the socket is shut
down is reset by the kernel, unless ``net.ipv4.tcp_migrate_req`` is 1 (Linux 5.14 or newer):
then the kernel moves it to another listener of the same group. :func:`migrate_req_enabled`
reads that setting so the supervisor can say which case applies.
"""

from __future__ import annotations

import contextlib
import os
import socket

import psutil

MIGRATE_REQ_PATH = "/proc/sys/net/ipv4/tcp_migrate_req"


def listening_fds(port: int) -> list[int]:
    """File descriptors of this process that listen on TCP `port` (IPv4 or IPv6)."""
    return sorted(
        c.fd for c in psutil.Process().net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.fd >= 0
    )


def close_listeners(port: int) -> int:
    """Shut down this process's listening sockets on `port`; returns how many there were.

    The descriptors stay open (gRPC owns and closes them); only the sockets stop listening.
    """
    from cy_sidecar import logs

    logs.expect_native("Failed accept4: Invalid argument")
    done = 0
    for fd in listening_fds(port):
        # A dup shares the socket: shutting it down affects gRPC's descriptor too, and
        # closing the dup afterwards leaves gRPC's own descriptor valid.
        dup = os.dup(fd)
        sock = socket.socket(fileno=dup)
        try:
            sock.shutdown(socket.SHUT_RD)
            done += 1
        except OSError:
            pass
        finally:
            sock.close()
    return done


def migrate_req_enabled() -> bool | None:
    """The kernel's net.ipv4.tcp_migrate_req: True, False, or None when it cannot be read."""
    with contextlib.suppress(OSError, ValueError):
        with open(MIGRATE_REQ_PATH) as f:
            return int(f.read().strip()) != 0
    return None
