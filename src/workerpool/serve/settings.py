"""A server's settings: one validated, frozen object, like PoolConfig for a pool.

    command line  >  [server] table of --config  >  defaults below

Every setting is checked once, here (a bad one is a ConfigError naming it); the rest of the
server reads attributes, never a dict of string keys.
"""

from __future__ import annotations

import dataclasses
import os
import re

from ..errors import ConfigError
from ..serving.limits import DEFAULT_MAX_REQUEST_BYTES

DEFAULT_PORT = 8000
DEFAULT_MAX_HEADER_BYTES = 64 * 1024  # nginx allows 4 x 8 KiB, Node 16 KiB
MAX_HEADERS = 100  # Apache's LimitRequestFields
DEFAULT_HEADER_TIMEOUT_S = 30.0  # uvicorn's keep-alive timeout
# Model versions a repository load may bring the server to: each is a pool of processes,
# and a client of the repository API must not add them without end.
DEFAULT_MAX_MODELS = 64


_UNITS = {"": 1, "k": 1000, "m": 1000 ** 2, "g": 1000 ** 3, "t": 1000 ** 4,
          "ki": 1024, "mi": 1024 ** 2, "gi": 1024 ** 3, "ti": 1024 ** 4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)


def parse_size(value) -> int:
    """Bytes from an int or a string such as "6GiB", "512 MiB", "2G" (powers of 1000 without
    the i, as in Kubernetes). Written here, not taken from a package: one regex."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"a size must be positive, got {value}")
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"not a size: {value!r} (say e.g. 6GiB, 512MiB, or bytes)")
    size = int(float(match[1]) * _UNITS[(match[2] or "").lower()])
    if size <= 0:
        raise ValueError(f"a size must be positive, got {value!r}")
    return size


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    metrics_port: int | None = None
    grpc_port: int | None = None
    tf_serving_port: int | None = None
    api_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S
    max_models: int = DEFAULT_MAX_MODELS
    drain_timeout: float = 30.0
    debug: bool = False
    allow_sources: tuple[str, ...] = ()
    watch: bool = False
    watch_interval: float = 2.0
    max_memory: int | None = None  # bytes the server's process tree may hold (PSS)
    http_workers: int = 1  # front-end processes on the port; 1: the server's own process
    tls_cert: str | None = None  # PEM certificate (chain) for every port: TLS only
    tls_key: str | None = None
    access_log: str | None = None  # "text" or "json": a line per request on stderr
    tracing: bool = False  # OpenTelemetry spans per request (serve/tracing.py)
    history_interval: float = 5.0  # seconds between the status page's samples
    http: str = "httptools"
    loop: str = "uvloop"

    # [server] keys of a serve.toml (the command line's names, with _ for -)
    FILE_KEYS = ("host", "port", "metrics_port", "grpc_port", "tf_serving_port", "api_key",
                 "max_request_bytes", "max_header_bytes", "header_timeout", "max_models",
                 "drain_timeout", "debug", "allow_sources", "watch", "watch_interval",
                 "max_memory", "http_workers", "tls_cert", "tls_key", "access_log",
                 "tracing", "history_interval")

    def __post_init__(self):
        self._type("host", str)
        for key in ("port", "metrics_port", "grpc_port", "tf_serving_port"):
            value = getattr(self, key)
            if value is not None and (not _is_int(value) or not 0 <= value <= 65535):
                raise ConfigError(f"{key} must be a port number (0: any free one), got "
                                  f"{value!r}")
        for key in ("max_request_bytes", "max_header_bytes", "max_models", "http_workers"):
            value = getattr(self, key)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        for key in ("header_timeout", "drain_timeout", "watch_interval", "history_interval"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{key} must be a positive number of seconds, got {value!r}")
        if self.api_key is not None:
            self._type("api_key", str)
        if self.max_memory is not None:
            try:
                object.__setattr__(self, "max_memory", parse_size(self.max_memory))
            except ValueError as exc:
                raise ConfigError(f"max_memory: {exc}") from None
        for key in ("debug", "watch", "tracing"):
            self._type(key, bool)
        if not all(isinstance(path, str) for path in self.allow_sources):
            raise ConfigError(f"allow_sources must be a list of paths, got "
                              f"{self.allow_sources!r}")
        self._check_tls()
        if self.access_log is not None and self.access_log not in ("text", "json"):
            raise ConfigError(f"access_log must be text or json, got {self.access_log!r}")
        if self.http not in ("httptools", "h11"):
            raise ConfigError(f"http must be httptools or h11, got {self.http!r}")
        if self.loop not in ("uvloop", "asyncio"):
            raise ConfigError(f"loop must be uvloop or asyncio, got {self.loop!r}")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def _check_tls(self) -> None:
        """Both files or neither, and a pair that loads (a wrong key or a missing file says
        so at start, not at the first client's handshake)."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both tls_cert and tls_key (--tls-cert, --tls-key)")
        if self.tls_cert is None:
            return
        self._type("tls_cert", str)
        self._type("tls_key", str)
        import ssl

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot use tls_cert {self.tls_cert!r} with tls_key "
                              f"{self.tls_key!r}: {exc}") from None

    def tls_pair(self) -> tuple[bytes, bytes] | None:
        """(certificate chain, private key) as PEM bytes, for gRPC; None without TLS."""
        if not self.tls:
            return None
        with open(self.tls_cert, "rb") as cert, open(self.tls_key, "rb") as key:
            return cert.read(), key.read()

    def _type(self, key: str, kind: type) -> None:
        if not isinstance(getattr(self, key), kind):
            raise ConfigError(f"{key} must be a {kind.__name__}, got {getattr(self, key)!r}")

    @classmethod
    def resolve(cls, args, file_settings: dict) -> "ServerSettings":
        """The settings of a command line (argparse namespace) over a [server] table."""
        unknown = set(file_settings) - set(cls.FILE_KEYS)
        if unknown:
            raise ConfigError(f"unknown [server] settings {sorted(unknown)}; known: "
                              f"{sorted(cls.FILE_KEYS)}")
        values = dict(file_settings)
        for key in cls.FILE_KEYS:
            given = getattr(args, key, None)
            # a switch's False means "not given" (port 0 does not: it means any free port)
            if given is not None and given is not False:
                values[key] = given
        values.setdefault("api_key", os.environ.get("WORKERPOOL_API_KEY") or None)
        from_file = file_settings.get("allow_sources", [])
        if not isinstance(from_file, list):
            raise ConfigError(f"allow_sources must be a list of paths, got {from_file!r}")
        values["allow_sources"] = (*getattr(args, "allow_source", []), *from_file)
        values["http"], values["loop"] = args.http, args.loop
        return cls(**values)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
