"""Start Ray and the Serve application of ``python -m pipelines.serve`` (docs/serving.md).

Embedded (no ``RAY_ADDRESS``): a private Ray on loopback (``pipelines.runtime.init_ray``), the
HTTP proxy on 127.0.0.1, and the command runs until interrupted, then shuts Serve down. Against a
cluster (``RAY_ADDRESS``, ``ray job submit``): the application is deployed and the command
returns; Serve keeps it running in the cluster.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import types

from pipelines.runtime import LOOPBACK, init_ray
from pipelines.serve_app import build

APP_NAME = "aunet"


def metrics_port() -> int | None:
    """The Prometheus port of this node's Ray metrics agent (None: not known)."""
    import ray

    node = getattr(ray._private.worker.global_worker, "node", None)
    return getattr(node, "metrics_export_port", None)


def deploy(args: argparse.Namespace, source: str) -> str:
    """Start the HTTP proxy on 127.0.0.1 and run the application -> its base URL."""
    from ray import serve

    serve.start(http_options={"host": LOOPBACK, "port": args.port})
    app = build(
        source,
        replicas=args.replicas,
        max_batch_size=args.max_batch_size,
        quantize=args.quantize,
        max_queued_requests=args.max_queued_requests,
        num_cpus=args.num_cpus,
        step_budget_s=args.step_budget_ms / 1000,
    )
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{LOOPBACK}:{args.port}"


def run_server(args: argparse.Namespace, source: str) -> None:
    """Start Ray (embedded on loopback unless ``RAY_ADDRESS``), deploy, and wait if embedded."""
    embedded = not os.environ.get("RAY_ADDRESS")
    cpus = max(2, int(args.replicas * args.num_cpus) + 1) if embedded else None
    tracking = os.environ.get("MLFLOW_TRACKING_URI")
    init_ray(
        types.SimpleNamespace(ray_address=None),
        cpus,
        include_dashboard=False,
        tracking_uri=tracking,
    )
    url = deploy(args, source)
    print(f"serving {args.source} at {url}/generate", flush=True)
    port = metrics_port()
    if port:
        print(f"metrics: http://{LOOPBACK}:{port}/metrics", flush=True)
    if not embedded:
        return
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    from ray import serve

    serve.shutdown()
