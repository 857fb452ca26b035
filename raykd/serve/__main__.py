"""``python -m raykd.serve [--family FILE | --model PATH ...]``: start the Serve application.

Connects to ``--address`` / ``$RAY_ADDRESS`` or starts a local Ray cluster, binds the HTTP proxy to
``--host:--port`` and blocks until interrupted. The same application starts with
``serve run raykd.serve.app:build_app registry=FILE`` or ``serve deploy deploy/serve_config.yaml``.
Set ``RAYKD_API_KEY`` to require an API key: a local cluster started here inherits it from this
process's environment; a running cluster (``--address``) needs it in its own environment.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from raykd.cli import HelpFormatter
from raykd.serve.intake import Limits

APP_NAME = "raykd"
PROG = "python -m raykd.serve"


def parse_args(argv: list[str] | None = None, *, prog: str = PROG) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--family", "--registry", dest="registry", metavar="FILE",
                     help="family file (family.json) written by the tune job, a path or a URI such as s3://bucket/runs/family.json (this or --model is required)")
    src.add_argument("--model", action="append", dest="models", metavar="[NAME=]PATH",
                     help="artifact/run folder or .onnx file; repeatable (this or --family is required)")
    p.add_argument("--winner", help="default model (default: the family's winner / first --model)")
    p.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto",
                   help="auto: torch on GPU when present, else ONNX Runtime on CPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="device of the torch backend; auto picks cuda when present")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="most requests a replica runs as one batch; 1 turns batching off")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.0,
                   help="seconds a replica waits to fill a batch")
    p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes,
                   help="largest request body accepted")
    p.add_argument("--max-image-pixels", type=int, default=Limits.max_image_pixels,
                   help="largest image accepted, in width x height pixels")
    p.add_argument("--request-timeout-s", type=float, default=30.0,
                   help="seconds a prediction may take before it answers 503")
    p.add_argument("--num-replicas", type=int, default=1, help="replicas of the deployment")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address; 0.0.0.0 to expose")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--direct-port", type=int, default=None, metavar="PORT",
                   help="also answer on each replica's own port (PORT, PORT+1, ...), skipping Serve's proxy "
                        "hop (Ray Serve's direct ingress; a local cluster started here only)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or local)")
    return p.parse_args(argv)


def direct_ingress_env(first_port: int, replicas: int = 1) -> dict[str, str]:
    """The environment that turns on Ray Serve's direct ingress: besides the proxy, each replica of
    the application answers HTTP on its own port, from ``first_port`` up. It skips the proxy hop,
    most of Serve's own latency on a small machine (``bench/serve.py`` measures both paths).

    Ray 2.60 reads these variables in the Serve controller and replica processes, so they apply
    to a cluster started with them in its environment (the local one ``raykd serve`` starts, or a
    cluster's pods); they do nothing for a cluster already running without them.
    """
    if not 1 <= first_port <= 65535 - replicas:
        raise ValueError(f"--direct-port {first_port}: needs {replicas} free port(s) from it, below 65536")
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(first_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(first_port + replicas + 7),  # room for restarts
    }


def args_to_serve_args(ns: argparse.Namespace):
    from raykd.serve.app import ServeArgs

    return ServeArgs(
        registry=ns.registry, models=ns.models or [], winner=ns.winner, backend=ns.backend,
        device=ns.device, max_batch_size=ns.max_batch_size, batch_wait_timeout_s=ns.batch_wait_timeout_s,
        max_body_bytes=ns.max_body_bytes, max_image_pixels=ns.max_image_pixels,
        request_timeout_s=ns.request_timeout_s,
        num_replicas=ns.num_replicas, num_cpus=ns.num_cpus, num_gpus=ns.num_gpus,
    )


def run_serve(args, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
              name: str = APP_NAME, blocking: bool = True, env_vars: dict[str, str] | None = None,
              direct_port: int | None = None):
    """Start Serve on ``host:port`` and run the app built from ``args`` (a ``ServeArgs``).

    ``env_vars`` are set in the replicas' environment (``runtime_env``), e.g. ``RAYKD_API_KEY`` in
    tests. Returns the app's deployment handle when ``blocking`` is False (tests, benchmarks).
    """
    from ray import serve

    from raykd.cluster import init_local_ray
    from raykd.serve.app import bind_app

    app = bind_app(args, env_vars=env_vars)  # validates the family before touching the cluster
    if direct_port is not None:
        import os

        os.environ.update(direct_ingress_env(direct_port, args.num_replicas))  # the processes Ray starts read them
    init_local_ray(address)
    serve.start(http_options={"host": host, "port": port})
    logging.getLogger(__name__).info("raykd serving on http://%s:%d (POST /predict, GET /models)", host, port)
    if direct_port is not None:
        logging.getLogger(__name__).info("each replica also answers on its own port from http://%s:%d "
                                         "(direct ingress, no proxy hop)", host, direct_port)
    return serve.run(app, name=name, route_prefix="/", blocking=blocking)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ns = parse_args(argv, prog=prog)
    # Ctrl-C stops serving even when a shell started us in the background with SIGINT ignored
    # (SIGTERM is handled by Ray itself: it drains the node and stops its processes).
    signal.signal(signal.SIGINT, _interrupt)
    try:
        serve_args = args_to_serve_args(ns)
        run_serve(serve_args, host=ns.host, port=ns.port, address=ns.address, direct_port=ns.direct_port)
    except (FileNotFoundError, ValueError, KeyError) as exc:  # a wrong file, model name or option
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # KeyError quotes str()
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from ray import serve

        logging.getLogger("raykd.serve").info("shutting down the Serve application")
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
