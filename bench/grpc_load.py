"""A small gRPC load generator for bench/grpc.py: N concurrent calls on one channel (HTTP/2
streams, as gRPC clients do), each sending the same serialized request again and again.

Its own process (so its CPU is not the server's), grpc.aio; requests go as pre-serialized
bytes and responses come back as bytes (no message classes on this side), so it costs the
client as little as bench/http_load.py's raw sockets do. Prints JSON: requests, errors,
seconds, requests/s, latency p50/p99/mean in ms.

    python bench/grpc_load.py HOST:PORT /package.Service/Method BODY_FILE \
        --connections 32 --requests 4000 [--warmup 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import grpc
import numpy as np


async def run(address: str, method: str, body: bytes, connections: int, requests: int,
              warmup: int) -> dict:
    async with grpc.aio.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", -1)]) as channel:
        call = channel.unary_unary(method)  # bytes in, bytes out
        latencies: list[float] = []
        errors = 0

        async def client(count: int, record: bool) -> None:
            nonlocal errors
            for _ in range(count):
                started = time.perf_counter()
                try:
                    await call(body, timeout=60)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                if record:
                    latencies.append(time.perf_counter() - started)

        await asyncio.gather(*[client(max(1, warmup // connections), False)
                               for _ in range(connections)])
        started = time.perf_counter()
        await asyncio.gather(*[client(requests // connections, True)
                               for _ in range(connections)])
        seconds = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "errors": errors, "seconds": seconds,
            "requests_per_s": len(latencies) / seconds,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("method")
    parser.add_argument("body")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    args = parser.parse_args()
    with open(args.body, "rb") as f:
        body = f.read()
    print(json.dumps(asyncio.run(run(args.address, args.method, body, args.connections,
                                     args.requests, args.warmup))))


if __name__ == "__main__":
    main()
