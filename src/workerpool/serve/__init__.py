"""``workerpool serve``: models over HTTP and gRPC, each version served by a Pool of its own.

    main (command line) -> settings (ServerSettings) + config (ModelSpecs) -> server (the
    loop, signals, drain) -> http/ (KServe v2, TF Serving REST, metrics, status page) and
    grpc/ (KServe v2, TF Serving) -> the data plane (workerpool.serving) -> registry (the
    models' versions and their pools: load, swap, unload)

Each protocol module only decodes its wire format, calls the data plane and encodes the
answer; registry.py owns the models' lifecycle; metrics.py, status.py and watch.py read it.
"""
