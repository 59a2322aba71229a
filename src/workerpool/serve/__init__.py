"""``workerpool serve``: models over HTTP (KServe v2), each served by a Pool of its own.

The layers (DESIGN.md §5): main (command line) -> config (what to serve) -> registry (pools,
readiness, the one infer call) <- app (routes) <- v2_http (wire format); errors (statuses),
metrics (Prometheus), status (the operators' page), server (uvicorn, signals, drain).
"""
