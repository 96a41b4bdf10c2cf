"""Configuration: sidecar.toml, environment overrides, validation.

Every setting is one row of ``SETTINGS``: its section, key, type, default, the check that
decides what is allowed, and the environment variable that overrides it. Loading reads the
file (``--config``, else ``$SIDECAR_CONFIG``, else built-in defaults), applies the
environment, validates every value, and remembers where each came from so that
``cy-sidecar config show`` can say it. A bad value raises :class:`ConfigError` with one line
naming the key, the value and what is allowed. Checks that involve several keys (a prompt
must fit in a frame, the control socket path must fit in sun_path, the gRPC and metrics ports
differ) run once every value is known and name each key involved, so that ``start`` does
not refuse a value that ``config check`` accepted (it still checks what it finds on the
machine: ports in use, the state directory, a file where the control socket goes).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import tomllib
from typing import Any, Callable

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
# What an environment variable may say for a boolean; a file says true or false.
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True,
               "false": False, "0": False, "no": False, "off": False}


class ConfigError(ValueError):
    """A configuration value that is not allowed; str() is the one-line explanation."""


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_HOSTNAME_HINT = "a host name of letters, digits, dots and hyphens"
# A frame carries a request's prompt plus its other fields (model, parameters, metadata);
# this much of max_frame_bytes is kept for them.
FRAME_HEADROOM_BYTES = 65536
# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107


def _is_ip(text: str, version: int) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return address.version == version


def _is_hostname(text: str) -> bool:
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253:
        return False
    if set(name) <= set("0123456789."):
        return False  # digits and dots only: meant as an IPv4 address, and it is not one
    return all(_HOST_LABEL.fullmatch(label) for label in name.split("."))


def _host_port(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if (not sep or not host or not (port.isascii() and port.isdigit())
            or not 0 < int(port) < 65536):
        return "host:port with a port from 1 to 65535, e.g. 0.0.0.0:50051"
    if host.startswith("[") and host.endswith("]"):
        ok = _is_ip(host[1:-1], 6)
    else:
        ok = _is_ip(host, 4) or _is_hostname(host)
    if not ok:
        return (f"host:port whose host is an IPv4 address, a bracketed IPv6 address such as "
                f"[::] or {_HOSTNAME_HINT}, e.g. 0.0.0.0:50051")
    return None


def _host(value: str) -> str | None:
    if _is_ip(value, 4) or _is_ip(value, 6) or _is_hostname(value):
        return None
    return (f"an IP address (IPv6 without brackets, e.g. ::) or {_HOSTNAME_HINT}, "
            "e.g. 0.0.0.0")


def _upload_target(value: str) -> str | None:
    return None if value == "" else _host_port(value)


def _unix_url(value: str) -> str | None:
    if not value.startswith("unix://") or len(value) <= len("unix://"):
        return "unix://PATH, e.g. unix:///tmp/cy_worker.sock"
    return _socket_path_problem(socket_path(value))


def _socket_path_problem(path: str) -> str | None:
    if "\0" in path:
        return "a socket path without NUL bytes"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        return f"a socket path of at most {MAX_SOCKET_PATH_BYTES} bytes"
    return None


def _control_socket(value: str) -> str | None:
    if value == "":
        return None
    problem = _socket_path_problem(value)
    return f"empty (<state_dir>/control.sock) or {problem}" if problem else None


def _number(value: float) -> str:
    """A limit as an operator writes it: 16777216, 0.05 (never 1.67772e+07)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _between(lo: float, hi: float) -> Callable[[Any], str | None]:
    limits = f"from {_number(lo)} to {_number(hi)}"

    def check(value: Any) -> str | None:
        return None if lo <= value <= hi else f"a number {limits}"

    check.limits = limits  # type: ignore[attr-defined]  # named when the type is wrong too
    return check


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else "one of " + ", ".join(choices)

    return check


def _path(value: str) -> str | None:
    return None if value.strip() and "\0" not in value else "a non-empty path without NUL bytes"


def _any(value: Any) -> str | None:
    return None


def _node_name(value: str) -> str | None:
    if len(value) <= 128 and value.isprintable() and not any(c.isspace() for c in value):
        return None
    return "empty (the host name) or at most 128 printable characters without spaces"


@dataclasses.dataclass(frozen=True)
class Setting:
    section: str
    key: str
    type: type
    default: Any
    check: Callable[[Any], str | None]
    env: str = ""
    doc: str = ""


SETTINGS: tuple[Setting, ...] = (
    Setting("server", "bind_addr", str, "0.0.0.0:50051", _host_port, "SIDECAR_BIND_ADDR",
            "address the proxy processes serve the Gateway API on (SO_REUSEPORT)"),
    Setting("server", "worker_uds", str, "unix:///tmp/cy_worker.sock", _unix_url,
            "SIDECAR_WORKER_UDS", "Unix socket of the inference worker"),
    Setting("server", "procs", int, 1, _between(1, 64), "SIDECAR_PROCS",
            "proxy processes; `start --procs` overrides"),
    Setting("server", "max_concurrent_streams", int, 256, _between(1, 100_000),
            "SIDECAR_MAX_CONCURRENT_STREAMS",
            "open StreamPredict calls per proxy process; more get RESOURCE_EXHAUSTED"),
    Setting("server", "max_prompt_bytes", int, 262_144, _between(1, 8 << 20),
            "SIDECAR_MAX_PROMPT_BYTES",
            "longest prompt accepted, in UTF-8 bytes; at most max_frame_bytes - 65536"),
    Setting("server", "max_frame_bytes", int, 1 << 20, _between(4096, 16 << 20),
            "SIDECAR_MAX_FRAME_BYTES", "largest frame on the worker socket"),
    Setting("server", "stream_window", int, 64, _between(1, 65_536), "SIDECAR_STREAM_WINDOW",
            "chunks the inference worker may send ahead of the Gateway reader, per stream"),
    Setting("server", "merge_chunks", int, 32, _between(0, 4096), "SIDECAR_MERGE_CHUNKS",
            "when a Gateway reads slower than the worker writes, send up to this many "
            "waiting chunks of a stream as one message (token_count stays exact); 0: never"),
    Setting("server", "drain_grace_secs", float, 30.0, _between(0, 3600),
            "SIDECAR_DRAIN_GRACE_SECS", "on SIGTERM, how long open streams may still run"),
    Setting("server", "keepalive_time_secs", float, 20.0, _between(1, 7200),
            "SIDECAR_KEEPALIVE_TIME_SECS",
            "ping an idle Gateway connection this often (server keepalive)"),
    Setting("server", "keepalive_timeout_secs", float, 10.0, _between(1, 600),
            "SIDECAR_KEEPALIVE_TIMEOUT_SECS",
            "close a Gateway connection whose ping is unanswered this long"),
    Setting("server", "control_socket", str, "", _control_socket, "SIDECAR_CONTROL_SOCKET",
            "socket of `cy-sidecar status/stop/reload`; empty: <state_dir>/control.sock; "
            "at most 107 bytes"),
    Setting("metering", "enabled", bool, True, _any, "SIDECAR_METERING",
            "meter tokens; false only for benchmarks (no usage records at all)"),
    Setting("metering", "batch_interval_secs", float, 10.0, _between(0.05, 86_400),
            "SIDECAR_BATCH_INTERVAL_SECS", "how often pending usage records are uploaded"),
    Setting("metering", "offline_queue_size", int, 10_000, _between(10, 100_000_000),
            "SIDECAR_OFFLINE_QUEUE_SIZE",
            "pending records kept one by one; beyond it the oldest are rolled up exactly"),
    Setting("metering", "upload_target", str, "", _upload_target, "SIDECAR_UPLOAD_TARGET",
            "host:port of the Gateway usage service; empty: keep records locally"),
    Setting("metering", "upload_batch_size", int, 500, _between(1, 100_000),
            "SIDECAR_UPLOAD_BATCH_SIZE", "records per upload call"),
    Setting("metering", "state_dir", str, "/var/lib/cy-sidecar", _path, "SIDECAR_STATE_DIR",
            "ledger, shared-memory meter file and control socket"),
    Setting("metering", "sidecar_id", str, "", _node_name, "SIDECAR_ID",
            "node name sent with uploads; empty: the host name"),
    Setting("health", "check_interval_secs", float, 5.0, _between(0.05, 3600),
            "SIDECAR_CHECK_INTERVAL_SECS", "ping interval on the worker connection"),
    Setting("health", "reconnect_delay_secs", float, 2.0, _between(0.01, 3600),
            "SIDECAR_RECONNECT_DELAY_SECS", "first delay between worker reconnect attempts"),
    Setting("health", "max_reconnect_attempts", int, 5, _between(1, 1_000_000),
            "SIDECAR_MAX_RECONNECT_ATTEMPTS",
            "backoff attempts before probing slowly (every 30 s)"),
    Setting("health", "reload_grace_secs", float, 30.0, _between(0, 3600),
            "SIDECAR_RELOAD_GRACE_SECS",
            "how long requests are held while the worker loads, or restarts after saying so"),
    Setting("observability", "metrics_port", int, 9090, _between(0, 65535),
            "SIDECAR_METRICS_PORT",
            "Prometheus /metrics port (on observability.metrics_host); 0 disables"),
    Setting("observability", "metrics_host", str, "0.0.0.0", _host, "SIDECAR_METRICS_HOST",
            "address the metrics endpoint binds: an IP address or a host name"),
    Setting("observability", "log_level", str, "info", _one_of(*LOG_LEVELS),
            "SIDECAR_LOG_LEVEL", "debug, info, warning or error"),
    Setting("observability", "log_format", str, "text", _one_of(*LOG_FORMATS),
            "SIDECAR_LOG_FORMAT", "text (key=value) or json (one object a line)"),
)

SECTIONS = tuple(dict.fromkeys(s.section for s in SETTINGS))
_BY_NAME = {(s.section, s.key): s for s in SETTINGS}


def socket_path(url: str) -> str:
    """The filesystem path of a unix:// URL."""
    return url[len("unix://"):] if url.startswith("unix://") else url


@dataclasses.dataclass(frozen=True)
class Config:
    values: dict[str, dict[str, Any]]
    sources: dict[str, str]  # "section.key" -> "default" | "file PATH" | "env NAME"
    path: str | None = None

    def get(self, section: str, key: str) -> Any:
        return self.values[section][key]

    def __getattr__(self, name: str) -> Any:
        # Flat access for the common case: cfg.bind_addr, cfg.state_dir, ...
        for section in SECTIONS:
            if name in self.values.get(section, {}):
                return self.values[section][name]
        raise AttributeError(name)

    @property
    def worker_path(self) -> str:
        return socket_path(self.values["server"]["worker_uds"])

    @property
    def control_path(self) -> str:
        return self.values["server"]["control_socket"] or os.path.join(
            self.values["metering"]["state_dir"], "control.sock"
        )

    def with_overrides(self, **flat: Any) -> "Config":
        """A copy with some keys replaced (each validated), e.g. procs from the command line."""
        values = {sec: dict(keys) for sec, keys in self.values.items()}
        sources = dict(self.sources)
        for key, value in flat.items():
            setting = _find(key)
            values[setting.section][key] = _validate(setting, value, "command line")
            sources[f"{setting.section}.{key}"] = "command line"
        _check_together(values, sources)
        return Config(values, sources, self.path)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {sec: dict(keys) for sec, keys in self.values.items()}


def _find(key: str) -> Setting:
    for setting in SETTINGS:
        if setting.key == key:
            return setting
    raise KeyError(key)


def _coerce(setting: Setting, value: Any, where: str, text: bool) -> Any:
    """The value as the setting's type. `text`: it comes from an environment variable, so a
    number or a boolean is spelled as a string; in a file it must be a TOML number or
    boolean."""
    name = f"{setting.section}.{setting.key}"
    if setting.type is bool:
        if isinstance(value, bool):
            return value
        if text and isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
    elif setting.type is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        # ASCII digits with at most one sign, and short: int() would also take "²" or
        # "1_000", and refuses (with a ValueError) more than 4300 digits.
        if (text and isinstance(value, str)
                and re.fullmatch(r"[+-]?[0-9]{1,18}", value.strip())):
            return int(value.strip())
    elif setting.type is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if text and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif setting.type is str and isinstance(value, str):
        return value
    shown = repr(value)
    if len(shown) > 80:
        shown = f"{shown[:60]}... ({len(shown)} characters)"
    raise ConfigError(
        f"{name} = {shown} ({where}) is not allowed: expected {_expected(setting, value, text)}"
    )


def _expected(setting: Setting, value: Any, text: bool) -> str:
    """What a value of the wrong type should have been, with the limits where there are."""
    if setting.type is bool:
        if text:
            return "one of " + ", ".join(_BOOL_WORDS)
        wanted = "true or false"
    else:
        wanted = {int: "an integer", float: "a number", str: "a string"}[setting.type]
        limits = getattr(setting.check, "limits", "")
        wanted = f"{wanted} {limits}" if limits else wanted
    if not text and isinstance(value, str):
        wanted += " (written without quotes)"
    return wanted


def _validate(setting: Setting, value: Any, where: str, text: bool = False) -> Any:
    value = _coerce(setting, value, where, text)
    problem = setting.check(value)
    if problem:
        raise ConfigError(
            f"{setting.section}.{setting.key} = {value!r} ({where}) is not allowed: "
            f"expected {problem}"
        )
    return value


def load(path: str | None = None, env: dict[str, str] | None = None) -> Config:
    """Read the configuration; raises ConfigError for any bad file, key or value."""
    env = os.environ if env is None else env
    path = path or env.get("SIDECAR_CONFIG") or None
    values = {sec: {} for sec in SECTIONS}
    sources: dict[str, str] = {}
    for s in SETTINGS:
        values[s.section][s.key] = s.default
        sources[f"{s.section}.{s.key}"] = "default"

    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            line = exc.object.count(b"\n", 0, exc.start) + 1
            raise ConfigError(
                f"config file {path} is not valid UTF-8 TOML: {exc.reason} "
                f"0x{exc.object[exc.start]:02x} on line {line} (byte offset {exc.start})"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        except ValueError as exc:  # the TOML parser's own limits, e.g. a 5000-digit number
            reason = str(exc).split(";")[0]
            raise ConfigError(f"config file {path} is not usable TOML: {reason}") from None
        for section, keys in data.items():
            if section in values and isinstance(keys, list):
                raise ConfigError(f"[[{section}]] in {path} is an array of tables: write "
                                  f"one [{section}] table")
            if section in values and not isinstance(keys, dict):
                raise ConfigError(f"{section} = {keys!r} in {path} is a value at the top "
                                  f"level: settings go in a [{section}] table")
            if section not in values:
                if not isinstance(keys, dict):
                    raise ConfigError(
                        f"{section} = {keys!r} in {path} is not a setting: settings go in "
                        "one of the tables " + ", ".join(f"[{sec}]" for sec in SECTIONS))
                raise ConfigError(
                    f"[{section}] in {path} is not a known section: expected one of "
                    + ", ".join(SECTIONS)
                )
            for key, value in keys.items():
                setting = _BY_NAME.get((section, key))
                if setting is None:
                    known = ", ".join(s.key for s in SETTINGS if s.section == section)
                    raise ConfigError(
                        f"{section}.{key} in {path} is not a known key: expected one of {known}"
                    )
                values[section][key] = _validate(setting, value, f"file {path}")
                sources[f"{section}.{key}"] = f"file {path}"

    for s in SETTINGS:
        if s.env and s.env in env:
            values[s.section][s.key] = _validate(s, env[s.env], f"env {s.env}", text=True)
            sources[f"{s.section}.{s.key}"] = f"env {s.env}"
    _check_together(values, sources)
    return Config(values, sources, path)


def _check_together(values: dict[str, dict[str, Any]], sources: dict[str, str]) -> None:
    """Checks that involve more than one key; each error names every key involved."""

    def said(section: str, key: str) -> str:
        name = f"{section}.{key}"
        return f"{name} = {values[section][key]!r} ({sources[name]})"

    server, metering = values["server"], values["metering"]
    if server["max_prompt_bytes"] + FRAME_HEADROOM_BYTES > server["max_frame_bytes"]:
        raise ConfigError(
            f"{said('server', 'max_prompt_bytes')} and {said('server', 'max_frame_bytes')} "
            f"are not allowed together: expected max_prompt_bytes + {FRAME_HEADROOM_BYTES} "
            "<= max_frame_bytes, so that a request with the longest prompt fits in one frame"
        )
    if not server["control_socket"]:
        derived = os.path.join(metering["state_dir"], "control.sock")
        if len(os.fsencode(derived)) > MAX_SOCKET_PATH_BYTES:
            raise ConfigError(
                f"{said('metering', 'state_dir')} is not allowed with "
                f"{said('server', 'control_socket')}: the control socket {derived} would be "
                f"{len(os.fsencode(derived))} bytes long, expected at most "
                f"{MAX_SOCKET_PATH_BYTES} (use a shorter state_dir or set "
                "server.control_socket)"
            )
    metrics_port = values["observability"]["metrics_port"]
    bind_port = int(server["bind_addr"].rpartition(":")[2])
    if metrics_port and metrics_port == bind_port:
        raise ConfigError(
            f"{said('server', 'bind_addr')} and {said('observability', 'metrics_port')} "
            "are not allowed together: expected two different ports"
        )


def render_toml(cfg: Config | None = None) -> str:
    """The configuration as a commented sidecar.toml (defaults when cfg is None)."""
    lines = []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for s in SETTINGS:
            if s.section != section:
                continue
            value = cfg.get(section, s.key) if cfg else s.default
            lines.append(f"# {s.doc}" + (f" (env {s.env})" if s.env else ""))
            lines.append(f"{s.key} = {toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # JSON's escapes are all TOML escapes too; TOML also wants DEL escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return repr(value)
