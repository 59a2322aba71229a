"""A Ray Serve deployment wrapping a Pool: ``workerpool serve``'s way past one machine.

    serve.run(deployment(load, predict, num_replicas=nodes))
        each replica: an actor reserving a node's CPUs, holding one Pool (load() in a
        loader, a worker per CPU): one weight copy per node, the workers doing the work
        HTTP   POST <route prefix>  a KServe v2 infer request (JSON or binary tensors),
               answered as ``workerpool serve`` answers it (output_0..., or dict keys)
        Python handle.predict.remote(*args)  ->  predict(model, *args)

Ray Serve routes each request to a replica; the replica's Pool queues, batches (its
``max_batch_size``) and retries on its own workers, so a replica takes many requests at once.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from ..serve.errors import message_of, status_of
from ..serve.limits import DEFAULT_MAX_REQUEST_BYTES
from ..serve.v2_http import encode_response, parse_infer
from ..tensors import call_argument, name_outputs
from .data import actor_pool
from .scoring import node_cpus


class PoolDeployment:
    """A Ray Serve replica holding a Pool (give the class to ``serve.deployment``, or use
    :func:`deployment`). Pool options as for :class:`workerpool.Pool`; ``load_in``
    defaults to ``"loader"`` and results come back as numpy arrays."""

    def __init__(self, load: Callable[[], Any] | str, predict: Callable[..., Any], *,
                 name: str = "model", workers: int | None = None, **pool_options):
        self.name = name
        self.pool = actor_pool(load, predict, workers, pool_options)

    async def predict(self, *args, **kwargs):
        """``predict(model, *args, **kwargs)`` on this replica's pool."""
        return await self.pool.submit_async(*args, **kwargs)

    def stats(self) -> dict:
        return self.pool.stats()

    async def __call__(self, request):
        from starlette.responses import Response

        try:
            infer = parse_infer(await request.body(),
                                request.headers.get("inference-header-content-length"),
                                DEFAULT_MAX_REQUEST_BYTES)
            result = await self.pool.submit_async(call_argument(infer.inputs))
            body, headers = encode_response(self.name, self.pool.version, infer,
                                            name_outputs(result, None))
        except Exception as error:  # noqa: BLE001 - every error is an answer, as in serve
            status, _ = status_of(error)
            return Response(json.dumps({"error": message_of(error)}), status_code=status,
                            media_type="application/json")
        return Response(body, headers=headers)

    def __del__(self):
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.close(drain=False)


def deployment(load: Callable[[], Any] | str, predict: Callable[..., Any], *,
               name: str = "model", num_replicas: int = 1,
               cpus_per_replica: int | None = None, **pool_options):
    """A bound Ray Serve application: ``num_replicas`` replicas (one per node is the
    point), each reserving ``cpus_per_replica`` CPUs (default: the smallest node's) and
    running that many workers. ``serve.run(deployment(...), route_prefix="/m")``."""
    from ray import serve

    cpus = cpus_per_replica or min(node_cpus())
    return serve.deployment(PoolDeployment, name=name, num_replicas=num_replicas,
                            ray_actor_options={"num_cpus": cpus}).bind(
        load, predict, name=name, workers=cpus, **pool_options)
