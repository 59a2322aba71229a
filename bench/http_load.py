"""A small HTTP/1.1 load generator for bench/serve.py: N keep-alive connections, each sending
the same request and reading the whole response, again and again, for a number of requests.

Its own process (so its CPU is not the server's), asyncio on uvloop, raw sockets: a Python
HTTP client library would cost more CPU than the server it measures. Prints JSON: requests,
errors, seconds, requests/s, latency p50/p99/mean in ms.

    python bench/http_load.py HOST PORT PATH BODY_FILE --headers-json '{...}' \
        --connections 32 --requests 4000 [--warmup 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import numpy as np


def request_bytes(host: str, path: str, body: bytes, headers: dict) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}",
             *[f"{k}: {v}" for k, v in headers.items()]]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def one_request(reader, writer, payload: bytes) -> int:
    writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


async def connection(host: str, port: int, payload: bytes, count: int, latencies: list,
                     errors: list) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for _ in range(count):
            started = time.perf_counter()
            status = await one_request(reader, writer, payload)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                errors.append(status)
    finally:
        writer.close()


async def run(args) -> dict:
    with open(args.body_file, "rb") as file:
        body = file.read()
    payload = request_bytes(args.host, args.path, body, json.loads(args.headers_json))
    per_connection = max(1, args.requests // args.connections)
    warm: list = []
    await asyncio.gather(*[connection(args.host, args.port, payload,
                                      max(1, args.warmup // args.connections), warm, [])
                           for _ in range(args.connections)])
    latencies: list[float] = []
    errors: list[int] = []
    started = time.perf_counter()
    await asyncio.gather(*[connection(args.host, args.port, payload, per_connection,
                                      latencies, errors) for _ in range(args.connections)])
    seconds = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": len(errors), "seconds": seconds,
            "requests_per_s": len(latencies) / seconds,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("path")
    parser.add_argument("body_file")
    parser.add_argument("--headers-json", default="{}")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    args = parser.parse_args()
    try:
        import uvloop
        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
