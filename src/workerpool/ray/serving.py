"""A Ray Serve deployment wrapping a Pool: ``workerpool serve``'s way past one machine.

    serve.run(deployment(load, predict, num_replicas=nodes))
        each replica: an actor reserving a node's CPUs, holding one Pool (load() in a
        loader, a worker per CPU): one weight copy per node, the workers doing the work
        HTTP   POST <route prefix>  a KServe v2 infer request (JSON or binary tensors),
               answered by ``workerpool serve``'s data plane and codec (the same checks,
               output naming and selection, errors)
        Python handle.predict.remote(*args)  ->  predict(model, *args)

Ray Serve routes each request to a replica; the replica's Pool queues, batches (its
``max_batch_size``) and retries on its own workers, so a replica takes many requests at once.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from ..serving import kserve
from ..serving.dataplane import DataPlane
from ..serving.errors import message_of, status_of
from ..serving.model import ServedModel, SingleModel
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
        # the data plane of ``workerpool serve``: the same checks, selection and errors
        self.plane = DataPlane(SingleModel(ServedModel.of_pool(name, self.pool)))

    async def predict(self, *args, **kwargs):
        """``predict(model, *args, **kwargs)`` on this replica's pool."""
        return await self.pool.submit_async(*args, **kwargs)

    def stats(self) -> dict:
        return self.pool.stats()

    async def __call__(self, request):
        from starlette.responses import Response

        try:
            with self.plane.inference(self.name, None, "ray_serve") as call:
                infer = kserve.parse_infer(
                    await request.body(), request.headers.get("inference-header-content-length"),
                    self.plane.max_tensor_bytes)
                outputs = await call.run(infer.inputs, infer.output_names,
                                        placed=infer.placed)
                parts, headers = kserve.encode_response(self.name, call.model.version, infer,
                                                        outputs)
                body = b"".join(parts)
        except Exception as error:  # noqa: BLE001 - every error is an answer, as in serve
            status, _ = status_of(error)
            return Response(json.dumps({"error": message_of(error)}), status_code=status,
                            media_type="application/json")
        return Response(body, headers={k.decode(): v.decode() for k, v in headers})

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
