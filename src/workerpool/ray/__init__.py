"""workerpool on a Ray cluster (``pip install 'workerpool-serve[ray]'``): one copy of the
model's weights per Ray actor (a node, or a share of one), not one per CPU.

    ray.data.Dataset.map_batches(PoolPredictor, compute=ActorPoolStrategy(size=nodes),
                                 num_cpus=cores_per_actor, fn_constructor_kwargs=...)
        each actor: a workerpool Pool (loader process, zygote, one worker per CPU Ray gave
        it); a batch is cut into one slice per worker and scored in parallel

    workerpool score --engine ray: scoring.RayPool, chunks to a Pool per actor
    Ray Serve: serving.deployment(load, predict, num_replicas=nodes), a Pool per replica

Ray's usual actor pool loads the model once per actor, so an actor per CPU means a copy
per CPU; here an actor per node serves all its CPUs from one copy.
"""

from .data import PoolPredictor

__all__ = ["PoolPredictor"]
