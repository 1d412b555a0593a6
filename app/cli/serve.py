"""`imgsim serve`: the web service (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.cli import options
from models.errors import ImgsimError, NotFound

if TYPE_CHECKING:
    from app.config import ModelPair


def check_model_pairs(pairs: Sequence[ModelPair]) -> None:
    """Refuse bad model/index pairs with one line before uvicorn starts (no Keras needed)."""
    from indexer.store import IndexStore
    from models.encoders import describe

    names: set[str] = set()
    for pair in pairs:
        manifest, identity = describe(pair.model)  # NotFound lists what --model takes
        if not pair.index.is_dir():
            raise NotFound(f"index directory not found: {pair.index}")
        name = pair.name or manifest.name
        if name in names:
            raise ImgsimError(f"two models are named {name!r}; give them distinct names")
        names.add(name)
        IndexStore.open(pair.index, expect_model=identity).close()


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging, plus the service's own ``imgsim.*`` loggers at the same level: without
    them, Python's default (WARNING) hid the INFO lines the docs promise (client disconnects,
    requests cut by the shutdown deadline, index swaps)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["imgsim"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from app.config import ModelPair, ServiceSettings
    from app.main import create_app
    from app.server import guarded_protocol

    if args.shutdown:
        from app.ray_serve import shutdown_ray_serve

        if args.engine != "ray" or not args.ray_address:
            raise ImgsimError("--shutdown stops a detached Ray deployment: give --engine ray --ray-address HOST:PORT")
        found = shutdown_ray_serve(args.ray_address)
        print(f"imgsim: Ray Serve {'shut down' if found else 'was not running; nothing to stop'}", file=sys.stderr)
        return 0
    if args.detach and args.engine != "ray":
        raise ImgsimError("--detach is for --engine ray (a local service runs in the foreground)")
    if len(args.model or []) != len(args.index or []):
        raise ImgsimError("give --model and --index in pairs (one --index per --model)")
    overrides: dict[str, Any] = {}
    if args.model:
        overrides["models"] = [ModelPair(model=m, index=i) for m, i in zip(args.model, args.index, strict=False)]
    for field in ("host", "port", "runtime"):
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
    settings = ServiceSettings(**overrides)
    if not settings.models:
        raise ImgsimError("no models configured: pass --model DIR --index DIR, or set IMGSIM_MODELS")
    check_model_pairs(settings.models)
    url = f"http://{settings.host}:{settings.port}"
    if args.engine == "ray":
        from app.ray_serve import parse_autoscale, serve_on_ray

        autoscale = parse_autoscale(args.autoscale) if args.autoscale else None
        print(f"imgsim: Ray Serve, {args.autoscale or args.replicas} replica(s); API docs {url}/docs", file=sys.stderr)
        serve_on_ray(settings, args.ray_address, args.replicas, autoscale, args.cpus_per_replica, args.detach)
        if args.detach:
            print(f"imgsim: deployed; every replica runs this version. Stop: imgsim serve --engine ray "
                  f"--ray-address {args.ray_address} --shutdown", file=sys.stderr)  # fmt: skip
        return 0
    print(f"imgsim: loading {len(settings.models)} model(s); web page {url}/  API docs {url}/docs", file=sys.stderr)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        log_config=log_config(args.log_level),
        timeout_graceful_shutdown=math.ceil(
            settings.shutdown_seconds
        ),  # uvicorn takes whole seconds  # one slow uploader cannot hold the exit
        http=guarded_protocol(settings.max_header_bytes, settings.header_seconds),
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the web service (FastAPI + uvicorn)",
        parents=[options.runtime()],
        description="Serve search/classify for one or more trained models and their indexes. "
        "Repeat --model/--index pairs; the first is active. Without them, IMGSIM_MODELS is used.",
    )
    p.add_argument(
        "--model", type=Path, action="append", help=f"{options.model_help()} (repeatable, paired with --index)"
    )
    p.add_argument("--index", type=Path, action="append", help="INDEX_DIR built from the preceding --model")
    p.add_argument("--host", default=None, help="bind address (default IMGSIM_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default IMGSIM_PORT or 8000)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: one process (uvicorn, default); ray: replicas behind Ray Serve's proxy, one index writer, "
        "a shared active model (pip install -e '.[cluster]'; indexes on storage every node reads)",
    )
    p.add_argument(
        "--ray-address", default=None, help="Ray cluster address, host:port or 'auto' (default: a local Ray)"
    )
    p.add_argument("--replicas", type=options.positive_int, default=1, help="Ray: replicas (default %(default)s)")
    p.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="Ray: scale replicas on load instead")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray: CPUs each replica reserves (1.0)")
    p.add_argument(
        "--detach",
        action="store_true",
        help="Ray: deploy and return, leaving the deployment running; run again with other models or settings "
        "for a rolling upgrade without downtime (new replicas start before old ones stop)",
    )
    p.add_argument("--shutdown", action="store_true", help="Ray: stop a detached deployment and its writer")
    p.set_defaults(func=run)
