"""The access log (``--access-log text|json``, ``[server] access_log``): one line on stderr per
request, HTTP or gRPC, written when its answer is done.

    text  2026-12-04T02:55:01.123Z 127.0.0.1:53422 kserve_http POST /v2/models/m/infer
          model=m version=1 status=200 duration_ms=1.234 request_id=4f1c2a9e0b7d-2a
    json  {"time": ..., "client": ..., "protocol": ..., "method": ..., "path": ...,
           "model": ..., "version": ..., "status": ..., "duration_ms": ..., "request_id": ...}

``protocol`` is the metrics' label of the inference (kserve_http, kserve_grpc, tfserving_rest,
...) or plain "http" / "grpc" for other routes; ``status`` an HTTP status or a gRPC code
name (None: the client left before an answer began); model and version are those that
answered, when a model did. Front-end processes (``--http-workers``) log the requests they
answer; the server's process does not log them again.
"""

from __future__ import annotations

import datetime
import json
import sys
import time

from .. import request_ids

STYLES = ("text", "json")


class AccessLog:
    def __init__(self, style: str, stream=None):
        if style not in STYLES:
            raise ValueError(f"access_log must be one of {STYLES}, got {style!r}")
        self.style = style
        self.stream = stream

    def write(self, *, client: str, protocol: str, method: str, path: str, status,
              started: float, request_id: str) -> None:
        """A line for a request that ``started`` (perf_counter) and is answered now."""
        served = request_ids.served.get()
        model, version = (served[0], served[1]) if served else (None, None)
        if served:
            protocol = served[2]
        entry = {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "client": client, "protocol": protocol, "method": method, "path": path,
            "model": model, "version": version, "status": status,
            "duration_ms": round(1000 * (time.perf_counter() - started), 3),
            "request_id": request_id}
        if self.style == "json":
            line = json.dumps(entry)
        else:
            line = (f"{entry['time']} {client} {protocol} {method} {path} model={model or '-'} "
                    f"version={version or '-'} status={status if status is not None else '-'} "
                    f"duration_ms={entry['duration_ms']} request_id={request_id}")
        (self.stream or sys.stderr).write(line + "\n")


def client_of(scope) -> str:
    """``host:port`` of an ASGI scope's client ("-" when not known)."""
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"
