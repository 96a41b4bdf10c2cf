"""Client side of the supervisor's control socket (`cy-sidecar status`, `stop`, `reload`).

The socket is a Unix stream socket with owner-only permissions at ``server.control_socket``
(default ``<state_dir>/control.sock``). A request is one JSON object on one line, e.g.
``{"cmd": "status"}``; the reply is one JSON object on one line with ``ok`` and the result.
"""

from __future__ import annotations

import json
import socket


class ControlError(RuntimeError):
    """No sidecar answered at the control socket; str() says where and why."""


def request(path: str, cmd: str, timeout: float = 5.0) -> dict:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ControlError(
                f"no sidecar is running with control socket {path} (the file does not exist)"
            ) from None
        except ConnectionRefusedError:
            raise ControlError(
                f"no sidecar is running with control socket {path} (stale socket file)"
            ) from None
        except PermissionError:
            raise ControlError(
                f"control socket {path} is not accessible to this user (owner-only)"
            ) from None
        sock.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        buf = bytearray()
        while b"\n" not in buf:
            data = sock.recv(65536)
            if not data:
                break
            buf += data
    except socket.timeout:
        raise ControlError(f"sidecar at {path} did not answer within {timeout:.0f} s") from None
    finally:
        sock.close()
    try:
        return json.loads(bytes(buf).split(b"\n", 1)[0])
    except ValueError:
        raise ControlError(f"sidecar at {path} sent an unreadable reply") from None
