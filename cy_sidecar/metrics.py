"""Prometheus metrics of every process, in prometheus_client's multiprocess mode.

The supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` (``<state_dir>/metrics``) and wipes that
directory at start, before any process imports prometheus_client; each child imports this
module after the fork, so its per-process files carry its own pid. The meter process serves
the aggregate on ``metrics_port``. When a child dies the supervisor calls
``mark_process_dead`` so its live gauges vanish from the scrape.

Gauge modes are chosen per meaning: open streams add up over live processes (``livesum``);
the worker connection status is the worst live proxy's (``livemin``); ledger gauges come
from the one meter process (``livemax``); restarts are counters of the supervisor.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LAT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_DUR_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

TOKENS_PROCESSED = Counter(
    "sidecar_tokens_processed",
    "Tokens delivered to the Gateway, by model",
    ["model"],
)
TOKENS_BY_STATUS = Counter(
    "sidecar_tokens_by_status",
    "Delivered tokens of closed usage records, by model and record status",
    ["model", "status"],
)
_worker_connection_status: Gauge | None = None


def worker_connection_status() -> Gauge:
    """sidecar_worker_connection_status, created by the first proxy process that sets it.

    An unlabelled gauge writes a value file for every process that creates it, and the
    supervisor's and the meter's would hold 0 for ever, pinning the minimum at 0. Created
    only where it is set, it is the minimum over the live proxies alone.
    """
    global _worker_connection_status
    if _worker_connection_status is None:
        _worker_connection_status = Gauge(
            "sidecar_worker_connection_status",
            "1 when every live proxy process has a ready inference worker connection, else 0",
            multiprocess_mode="livemin",
        )
    return _worker_connection_status


WORKER_STATE = Gauge(
    "sidecar_worker_state",
    "Proxy processes per inference worker state",
    ["state"],
    multiprocess_mode="livesum",
)
REQUESTS = Counter("sidecar_requests", "StreamPredict calls received")
REQUESTS_SUCCESS = Counter("sidecar_requests_success", "StreamPredict calls that finished OK")
REQUESTS_FAILED = Counter(
    "sidecar_requests_failed",
    "StreamPredict calls that ended otherwise, by record status",
    ["status"],
)
REQUEST_DURATION = Histogram(
    "sidecar_request_duration_seconds",
    "StreamPredict duration from admission to the last message",
    buckets=_DUR_BUCKETS,
)
ACTIVE_CONNECTIONS = Gauge(
    "sidecar_active_connections",
    "Open StreamPredict streams over all live proxy processes",
    multiprocess_mode="livesum",
)
WORKER_CONNECTION_ERRORS = Counter(
    "sidecar_worker_connection_errors",
    "Failed connects to, and lost connections with, the inference worker",
)
GATEWAY_SEND_ERRORS = Counter(
    "sidecar_gateway_send_errors",
    "Writes to a Gateway stream that failed (the caller had gone)",
)
TTFT = Histogram(
    "sidecar_time_to_first_token_seconds",
    "From admission to the first token written to the Gateway",
    buckets=_LAT_BUCKETS,
)
INTER_TOKEN = Histogram(
    "sidecar_inter_token_latency_seconds",
    "Mean gap between chunks of one stream, observed once per stream",
    buckets=_LAT_BUCKETS,
)
FRAME_ERRORS = Counter(
    "sidecar_worker_frame_errors",
    "Malformed frames from the inference worker (the connection was reset)",
)
LEDGER_PENDING = Gauge(
    "sidecar_ledger_pending_records",
    "Usage records committed locally and not yet acknowledged by the Gateway",
    multiprocess_mode="livemax",
)
LEDGER_OLDEST_AGE = Gauge(
    "sidecar_ledger_oldest_pending_age_seconds",
    "Age of the oldest pending usage record",
    multiprocess_mode="livemax",
)
RECORDS_COMMITTED = Counter(
    "sidecar_ledger_records_committed",
    "Usage records committed to the ledger, by status",
    ["status"],
)
UPLOADS = Counter("sidecar_uploads", "Upload calls to the usage service, by result", ["result"])
UPLOAD_ERRORS = Counter("sidecar_upload_errors", "Upload calls that failed")
ROLLUPS = Counter(
    "sidecar_ledger_rollups",
    "Records folded into exact rollups because the offline queue was full",
)
RESTARTS = Counter("sidecar_process_restarts", "Child processes restarted, by role", ["role"])
METER_DELIVERED = Gauge(
    "sidecar_meter_delivered_tokens",
    "Cumulative delivered tokens of this boot (the meter reading)",
    multiprocess_mode="livemax",
)
METER_SEQ = Gauge(
    "sidecar_meter_last_seq",
    "Sequence number of the last committed record of this boot",
    multiprocess_mode="livemax",
)
