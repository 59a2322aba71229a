"""Ray Serve contender: one local Ray node, one Serve deployment of PEER_WORKERS replicas.

Run in the foreground by ``peer.command``; it stays up until SIGTERM (or SIGINT), then
shuts the Ray node down, so no raylet, gcs_server or worker outlives it.

Environment: PEER_MODEL_DIR (the model), PEER_WORKERS (replicas), PEER_PORT (Serve's HTTP
proxy on 127.0.0.1). In a many-models trial (PEER_MODELS) each model is its own Serve
application of one replica at /NAME, as Serve's guide to several applications does it.

Ports PEER_PORT+1..+9 are ours, and Ray's fixed defaults move there: its metrics export
port to +1, the dashboard agent's HTTP port (52365, which ray.init cannot change) to +2,
the autoscaler's and the dashboard's metrics ports (44217, 44227) to +3 and +4. Every
other Ray port (GCS, raylet, object manager, agents' gRPC, workers) is 0, so the OS hands
out a free one and parallel runs never collide.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

# Ray refuses 127.0.0.1 as a node address on Linux (it resolves it to the host's own
# interface address) unless it is told this is a one-machine Ray: then every Ray address
# is loopback. Set before `import ray`, which reads it; Ray's processes inherit it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
PORT = int(os.environ["PEER_PORT"])
# Two more fixed defaults (44217, 44227) of Ray's Prometheus endpoints, moved into ours.
os.environ.setdefault("AUTOSCALER_METRIC_PORT", str(PORT + 3))
os.environ.setdefault("DASHBOARD_METRIC_PORT", str(PORT + 4))

import ray
from ray._private import parameter as _ray_parameter
from ray import serve
from starlette.requests import Request

import peer_model

WORKERS = int(os.environ.get("PEER_WORKERS", "1"))
SERVED = peer_model.served_models()
# a rayserve+batch contender: @serve.batch gathers up to BATCH requests per replica, waiting
# up to BATCH_WAIT_MS for them (1: no batching)
BATCH, BATCH_WAIT_MS = peer_model.batch_settings()


class _RayParams(_ray_parameter.RayParams):
    """ray.init's node parameters with the dashboard agent's HTTP port moved into ours."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", PORT + 2)
        super().__init__(*args, **kwargs)


_ray_parameter.RayParams = _RayParams  # ray.init looks it up at call time


@serve.deployment
class Model:
    """One replica: the model loaded once, one forward pass per request (unless BATCH)."""

    def __init__(self, model_dir: str):
        self.model = peer_model.load(model_dir)

    async def __call__(self, request: Request) -> dict:
        body = await request.json()
        if BATCH > 1:
            return await self.predict_batch(body["inputs"])
        # A plain blocking call, as Serve's own examples do: the replica runs one
        # forward pass at a time, on its one intra-op thread.
        return peer_model.predict(self.model, body["inputs"])

    @serve.batch(max_batch_size=max(BATCH, 1), batch_wait_timeout_s=BATCH_WAIT_MS / 1000)
    async def predict_batch(self, inputs: list) -> list:
        return peer_model.predict_batch(self.model, inputs)


def _ray_temp_dir() -> str | None:
    """Ray's session files under the working directory when its path is short enough for
    Ray's unix sockets (about 107 bytes with the session name), else Ray's default."""
    path = os.path.join(os.getcwd(), "ray")
    return path if len(path) <= 40 else None


def main() -> int:
    stop = threading.Event()

    # ray.init installs a SIGTERM handler that exits through sys.exit, so a SIGTERM
    # during start-up still reaches the finally below; after it, ours takes over.
    try:
        _serve(stop)
    finally:
        # ray.shutdown() stops the node ray.init started (gcs_server, raylet, agents) and
        # with it every actor: Serve's controller, proxy and replicas. serve.shutdown()
        # first would drain them gracefully, but it blocks 30 s when the harness's
        # SIGTERM has already reached the controller (a signal to the whole group), past
        # the harness's SIGKILL deadline; the benchmark has no request in flight by then.
        ray.shutdown()
        _end_stragglers()
    return 0


def _serve(stop: threading.Event) -> None:
    # CPU accounting: the node gets num_cpus=WORKERS (or one per model) and each replica
    # asks for 1 CPU (Serve's default), so exactly WORKERS replicas fit whatever the
    # machine's core count; the Serve controller and HTTP proxy actors ask for 0 CPUs.
    ray.init(
        num_cpus=len(SERVED) or WORKERS,
        include_dashboard=False,
        object_store_memory=128 * 2**20,  # Serve's small requests never go to plasma
        log_to_driver=False,              # replica logs stay in the session's files
        _metrics_export_port=PORT + 1,
        _temp_dir=_ray_temp_dir(),
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    # Serve's default of 5 max_ongoing_requests makes its router back off while every
    # replica is full: with 32 clients on 1 replica that gave 5.8 req/s and a 5 s p99
    # (256 MiB MLP, where the others do ~60 req/s), so the report lets requests queue in
    # the replica instead, as a user tuning Serve for this load would.
    options = {"ray_actor_options": {"num_cpus": 1}, "max_ongoing_requests": 32}
    if SERVED:
        for name, directory in SERVED.items():
            serve.run(Model.options(num_replicas=1, **options).bind(directory), name=name,
                      route_prefix=f"/{name}")
        print(f"ray serve: {len(SERVED)} applications on http://127.0.0.1:{PORT}/",
              flush=True)
    else:
        app = Model.options(num_replicas=WORKERS, **options).bind(
            os.environ["PEER_MODEL_DIR"])
        serve.run(app, name="peer", route_prefix="/")
        print(f"ray serve: {WORKERS} replica(s) on http://127.0.0.1:{PORT}/", flush=True)
    stop.wait()


def _end_stragglers(grace_s: float = 2.0) -> None:
    """End whatever is left in our process group, when we lead it (the harness starts us
    in a new session): SIGTERM, then SIGKILL after ``grace_s``. After a clean
    ray.shutdown() nothing is left. But a SIGTERM in the middle of ray.init leaves the
    node half built and unknown to ray.shutdown: gcs_server and raylet die with us, while
    the dashboard and runtime-env agents the raylet had just started outlive it, orphaned,
    for about a minute."""
    group = os.getpgrp()
    if group != os.getpid():
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (left := _group_members(group)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _group_members(group: int) -> list[int]:
    """Live processes of process group ``group`` other than this one (from /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == group:  # state, ppid, pgrp
            members.append(int(entry))
    return members


if __name__ == "__main__":
    sys.exit(main())
