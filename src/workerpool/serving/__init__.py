"""The serving core, protocol-neutral: below ``workerpool serve`` and the Ray Serve deployment.

    dataplane.py   the one inference path and model description every protocol calls
    model.py       a served model version: its pool, signature and lifecycle state
    errors.py      what goes wrong, and the one table of statuses (HTTP, gRPC, metrics)
    limits.py      what one client may make a server hold or do
    kserve.py      KServe v2 over HTTP, the codec (JSON and binary tensors)
    inline.py      a light model called in the serving process itself (no worker)

It imports no server, no web framework, no extra: only the pool and numpy.
"""
