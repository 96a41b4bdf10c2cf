"""Worker SDK: what an inference engine imports to serve the sidecar (see server.py).

The built-in demo inference worker lives in :mod:`cy_sidecar.worker_sdk.demo`.
"""

from cy_sidecar.worker_sdk.server import Chunk, Request, WorkerError, WorkerServer

__all__ = ["Chunk", "Request", "WorkerError", "WorkerServer"]
