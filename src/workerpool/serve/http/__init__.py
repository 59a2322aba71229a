"""The HTTP side of ``workerpool serve``: KServe v2 and TF Serving REST routes on one ASGI app
(app.py), request heads bounded (guard.py)."""
