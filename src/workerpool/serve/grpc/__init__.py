"""The gRPC side of ``workerpool serve``: KServe v2 and TF Serving services on grpcio's asyncio
server (server.py), beside HTTP on the same loop."""
