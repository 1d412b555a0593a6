"""`imgsim serve --engine ray`: the same FastAPI app as Ray Serve replicas across a cluster.

Each replica is the whole service (its models loaded once, its own micro-batcher) behind
Ray Serve's HTTP proxy, which routes requests, restarts replicas that die and can scale
their number on load. Indexes are read from shared storage; an ivfpq index is memory-mapped,
so replicas on one machine share it in the page cache.

Two named Ray actors make the replicas one service (:class:`app.registry.Cluster`):

* the **writer**: every add and delete of every replica runs in this one process, so index
  versions are written one after the other; each replica then picks the new version up
  (the registry follows its indexes every ``reload_seconds``, and at once after its own write);
* the **state**: the active model; a switch on one replica reaches the others within
  ``ACTIVE_POLL_SECONDS``.

Deploying again under the same name (``--detach``) is Ray Serve's rolling update: with
``max_surge_percent=100`` each new replica starts, loads its models and passes its health
check before an old one stops, and old replicas finish the requests they hold: a model
upgrade without downtime.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from app.config import ServiceSettings
from indexer.ray_engine import connect
from indexer.update import Changes, NewItem, apply_changes
from models.errors import ImgsimError

log = logging.getLogger(__name__)
NAMESPACE = "imgsim"
WRITER, STATE, DEPLOYMENT = "imgsim-writer", "imgsim-state", "imgsim"


class IndexWriter:
    """Ray actor (one per cluster): applies every change, in order."""

    def apply(self, index_dir: str, add: Sequence[NewItem], remove: Sequence[int], lock_timeout: float) -> Changes:
        return apply_changes(Path(index_dir), add, remove, lock_timeout)


class ActiveModel:
    """Ray actor (one per cluster): the name of the active model."""

    def __init__(self) -> None:
        self.name: str | None = None

    def get(self) -> str | None:
        return self.name

    def set(self, name: str | None) -> None:
        self.name = name


class RayCluster:
    """What a replica uses to reach the writer and the shared state (see app.registry.Cluster)."""

    def __init__(self) -> None:
        import ray

        self._ray = ray
        self._writer = ray.get_actor(WRITER, namespace=NAMESPACE)
        self._state = ray.get_actor(STATE, namespace=NAMESPACE)

    def _call(self, ref: Any) -> Any:
        try:
            return self._ray.get(ref)
        except self._ray.exceptions.RayTaskError as exc:  # the writer's own error, with its HTTP status
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ImgsimError):
                raise cause from None
            raise

    def write(self, index_dir: Path, add: Sequence[NewItem], remove: Sequence[int], lock_timeout: float) -> Changes:
        return self._call(self._writer.apply.remote(str(index_dir), list(add), list(remove), lock_timeout))

    def active(self) -> str | None:
        return self._call(self._state.get.remote())

    def set_active(self, name: str) -> None:
        self._call(self._state.set.remote(name))


def _build_app(settings: ServiceSettings) -> Any:
    """Runs in each replica: the service, joined to the cluster's writer and state."""
    from app.main import create_app

    return create_app(settings, cluster=RayCluster())


def serve_on_ray(
    settings: ServiceSettings,
    address: str | None,
    replicas: int = 1,
    autoscale: tuple[int, int] | None = None,
    cpus_per_replica: float = 1.0,
    detach: bool = False,
) -> None:
    """Start or update the deployment on the cluster at ``address``.

    ``detach``: return once every replica runs the new version (the deployment stays up);
    otherwise serve until Ctrl-C or SIGTERM, then take the deployment down.
    """
    if detach and address is None:
        raise ImgsimError("--detach needs a cluster that outlives this command: pass --ray-address HOST:PORT or auto")
    connect(address)
    import ray
    from ray import serve

    actors = [
        ray.remote(num_cpus=0)(cls)
        .options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, max_restarts=-1)
        .remote()  # fmt: skip
        for name, cls in ((WRITER, IndexWriter), (STATE, ActiveModel))
    ]
    ray.get(actors[1].set.remote(None))  # a new start: the first model is active again
    scaling: dict[str, Any] = (
        {
            "autoscaling_config": {
                "min_replicas": autoscale[0],
                "max_replicas": autoscale[1],
                "target_ongoing_requests": settings.max_batch_size,
            }
        }  # fmt: skip
        if autoscale
        else {"num_replicas": replicas}
    )
    deployment = serve.deployment(
        serve.ingress(lambda: _build_app(settings))(),
        name=DEPLOYMENT,
        ray_actor_options={"num_cpus": cpus_per_replica},
        max_ongoing_requests=settings.max_queue,
        health_check_period_s=2,
        max_surge_percent=100,  # an update starts the new replicas before it stops old ones
        **scaling,
    )
    serve.start(http_options={"host": settings.host, "port": settings.port})
    log.info("imgsim on Ray Serve: %s at http://%s:%s/", scaling, settings.host, settings.port)
    try:
        serve.run(deployment.bind(), name=DEPLOYMENT, route_prefix="/", blocking=not detach)
    finally:
        if not detach:  # Ctrl-C or SIGTERM: take Serve (its proxy holds the port) and our actors down with us
            shutdown_ray_serve(None)


def shutdown_ray_serve(address: str | None) -> bool:
    """Take the deployment, Ray Serve and the writer and state actors down; False if none ran."""
    if address is not None:
        connect(address)
    import ray
    from ray import serve

    found = False
    for name in (WRITER, STATE):
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
            found = True
        except ValueError:  # no such actor
            pass
    serve.shutdown()
    return found


def parse_autoscale(text: str) -> tuple[int, int]:
    """'MIN:MAX' -> (min, max) replicas."""
    try:
        low, high = (int(v) for v in text.split(":"))
    except ValueError:
        raise ImgsimError(f"--autoscale wants MIN:MAX replicas, e.g. 1:4; got {text!r}") from None
    if not 0 <= low <= high or high < 1:
        raise ImgsimError(f"--autoscale {text}: need 0 <= MIN <= MAX and MAX >= 1")
    return low, high
