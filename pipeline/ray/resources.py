"""What a generation actor asks of the cluster: CPUs, GPUs, how many actors fit (generation, generator training)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import RunConfig
from pipeline.errors import GenerationError


@dataclass(frozen=True)
class PoolSpec:
    """How many generator actors, and what each one asks Ray for."""

    size: int
    num_cpus: float
    num_gpus: float


def pool_spec(cfg: RunConfig, max_shards: int, resources: dict[str, float]) -> PoolSpec:
    """Size the actor pool from the config and the cluster's resources (``ray.cluster_resources()``).

    GPU actors (``ray.gpus_per_actor`` GPUs each) when ``ray.use_gpu`` is ``yes``, or ``auto``
    with GPUs in the cluster and ``device`` not ``cpu``; otherwise CPU actors. Never more
    actors than ``max_shards`` (the most shards any round still has to run), never fewer than 1.
    """
    r = cfg.ray
    gpus = float(resources.get("GPU", 0.0))
    use_gpu = r.use_gpu == "yes" or (r.use_gpu == "auto" and gpus > 0 and r.gpus_per_actor > 0 and cfg.device != "cpu")
    if use_gpu:
        if r.gpus_per_actor <= 0:
            raise GenerationError("ray.use_gpu is 'yes' but ray.gpus_per_actor is 0")
        fits = int(gpus // r.gpus_per_actor)
        num_gpus = r.gpus_per_actor
    else:
        fits = int(float(resources.get("CPU", 1.0)) // r.cpus_per_actor)
        num_gpus = 0.0
    size = r.generation_actors or fits
    return PoolSpec(size=max(1, min(size, max_shards)), num_cpus=r.cpus_per_actor, num_gpus=num_gpus)
