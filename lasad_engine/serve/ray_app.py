"""lasad-serve on Ray Serve: one slot scheduler per replica (one replica per GPU), Ray's proxy
routing requests to replicas, and the replica count scaled on the requests each replica holds.

    serve run lasad_engine/serve/ray_serve.yaml               # the config beside this file
    serve run lasad_engine.serve.ray_app:build_app checkpoint=default slots=64 max_replicas=4

Each replica runs the same ASGI app as `lasad-serve` (app.create_app), built on the replica from
the options given to `build_app`, so the API, the errors, /metrics (per replica) and the
reproducibility promise are the same. Use it when one GPU is not enough (several GPUs or hosts),
or to scale to zero and back; on one GPU, `lasad-serve` alone is simpler and has no proxy hop.
Autoscaling: Ray's `target_ongoing_requests` per replica is set to its slots, so replicas are
added when requests wait beyond the slots a replica can run at once.
"""

from __future__ import annotations

import json
import os

ENV = "LASAD_SERVE_OPTIONS"
DEFAULTS = dict(checkpoint=None, tokenizer=None, slots=64, max_queue=None, max_images=16, backend=None,
                device=None, precision=None, model_id="default", timeout=600.0, grace=60.0, warmup=True,
                num_replicas=None, min_replicas=1, max_replicas=1, gpus_per_replica=None)


def _asgi_app():
    """Built on each replica: the pipeline (its engine and slots) and the app in front of it."""
    from ..pipeline import LasadPipeline
    from .app import create_app
    o = json.loads(os.environ[ENV])
    slots = int(o["slots"])
    pipe = LasadPipeline.from_checkpoint(o["checkpoint"], tokenizer=o["tokenizer"], backend=o["backend"],
                                         device=o["device"], precision=o["precision"], max_batch=slots,
                                         max_queue=4 * slots if o["max_queue"] is None else int(o["max_queue"]))
    return create_app(pipe, model_id=o["model_id"], max_images=int(o["max_images"]), timeout=float(o["timeout"]),
                      grace=float(o["grace"]), warmup=bool(o["warmup"]))


def build_app(args: dict | None = None):
    """The Ray Serve application (`serve run ...:build_app key=value ...` or a config's `args`).

    Args (all optional): checkpoint, tokenizer, slots, max_queue, max_images, backend, device,
    precision, model_id, timeout, grace, warmup (lasad-serve's options); num_replicas (fixed), or
    min_replicas / max_replicas (autoscaled); gpus_per_replica (default: 1 when a GPU is visible
    to Ray, else 0).
    """
    from ray import serve

    unknown = sorted(set(args or {}) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r}; the options are {', '.join(DEFAULTS)}")
    o = {**DEFAULTS, **(args or {})}
    gpus = o["gpus_per_replica"]
    if gpus is None:
        import ray
        gpus = 1 if (ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0) else 0
    slots = int(o["slots"])
    queue = 4 * slots if o["max_queue"] is None else int(o["max_queue"])
    scaling = ({"num_replicas": int(o["num_replicas"])} if o["num_replicas"] is not None else
               {"autoscaling_config": {"min_replicas": int(o["min_replicas"]), "max_replicas": int(o["max_replicas"]),
                                       "target_ongoing_requests": slots}})
    deployment = serve.deployment(
        serve.ingress(_asgi_app)(), name="lasad", max_ongoing_requests=slots + queue,
        ray_actor_options={"num_gpus": float(gpus), "runtime_env": {"env_vars": {ENV: json.dumps(o)}}},
        health_check_period_s=10, graceful_shutdown_timeout_s=float(o["grace"]), **scaling)
    return deployment.bind()
