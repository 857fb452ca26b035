"""``python -m raykd.serve [--family FILE | --model PATH ...]``: start the Serve application.

Connects to ``--address`` / ``$RAY_ADDRESS`` or starts a local Ray cluster, binds the HTTP proxy to
``--host:--port`` and blocks until interrupted. The same application starts with
``serve run raykd.serve.app:build_app family=FILE`` or ``serve deploy deploy/serve_config.yaml``.
Set ``RAYKD_API_KEY`` to require an API key: a local cluster started here inherits it from this
process's environment; a running cluster (``--address``) needs it in its own environment (and this
shell too, for the check below). Without a key it fails closed, before Ray starts
(:func:`raykd.serve.guard.check_bind`): a loopback ``--host`` serves with a warning, any other host
exits 2 unless ``--allow-unauthenticated`` is given.

Load limits: ``--max-queued-requests`` (Serve's queue at the proxy), ``--max-pixels-in-flight`` (each
replica's decoded pixels), ``--request-timeout-s`` (each request in its replica, the body upload
included) and ``--proxy-timeout-s`` (the proxy's end-to-end limit), :mod:`raykd.serve.options`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import typing

from raykd.cli import HelpFormatter
from raykd.cluster import init_local_ray
from raykd.console import configure
from raykd.serve.guard import api_key_from_env, check_bind
from raykd.serve.options import ServeArgs, ServerOptions, default

APP_NAME = "raykd"
PROG = "python -m raykd.serve"

#: Flags that are not spelled from their field's name, or take more than a value: argparse keywords
#: (``help_suffix`` is appended to the field's description). ``family`` and ``models`` are the
#: two sources, one of which is required.
FLAG_OVERRIDES: dict[str, dict] = {
    "family": {"metavar": "FILE", "help_suffix": " (this or --model is required)"},
    "models": {"flags": ("--model",), "action": "append", "metavar": "[NAME=]PATH", "default": None,
               "help_suffix": "; repeatable (this or --family is required)"},
    "direct_port": {"metavar": "PORT"},
}
SOURCES = ("family", "models")
#: ServeArgs fields that only a Serve config or ``serve run`` sets (no flag).
NOT_FLAGS = ("max_ongoing_requests", "onnx_cache_dir")


def _flag_fields() -> list[tuple[type, str]]:
    """``(model, field name)`` of every flag, in the order ``--help`` lists them."""
    return ([(ServeArgs, name) for name in ServeArgs.model_fields if name not in NOT_FLAGS]
            + [(ServerOptions, name) for name in ServerOptions.model_fields])


def _add_option(p, model: type, name: str) -> None:
    """One field as a flag: ``--name-with-dashes``, its type (a ``Literal``'s values as choices),
    default and help (the field's description); a boolean is ``--name/--no-name``."""
    info = model.model_fields[name]
    extra = dict(FLAG_OVERRIDES.get(name, {}))
    flags = extra.pop("flags", ("--" + name.replace("_", "-"),))
    kwargs: dict = {"dest": name, "default": info.get_default(call_default_factory=True),
                    "help": info.description + extra.pop("help_suffix", "")}
    tp = info.annotation
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    inner = args[0] if len(args) == 1 else tp  # ``int | None`` -> int (and ``list[str]`` -> str)
    if typing.get_origin(tp) is typing.Literal:
        kwargs["choices"] = args
    elif inner is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif inner in (int, float):
        kwargs["type"] = inner
    p.add_argument(*flags, **{**kwargs, **extra})


def parse_args(argv: list[str] | None = None, *, prog: str = PROG) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    for model, name in _flag_fields():
        _add_option(src if name in SOURCES else p, model, name)
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


def args_to_serve_args(ns: argparse.Namespace) -> ServeArgs:
    """The :class:`ServeArgs` of the parsed flags (the fields without a flag at their defaults)."""
    values = {name: getattr(ns, name) for model, name in _flag_fields() if model is ServeArgs}
    return ServeArgs(**{**values, "models": ns.models or []})


def server_options(ns: argparse.Namespace) -> ServerOptions:
    """Where the parsed flags say to serve."""
    return ServerOptions(**{name: getattr(ns, name) for name in ServerOptions.model_fields})


def http_options(args: ServeArgs, host: str, port: int,
                 proxy_timeout_s: float = default(ServerOptions, "proxy_timeout_s")) -> dict:
    """Serve's ``http_options`` for ``raykd serve``: the bind and the proxy's end-to-end timeout.

    A proxy timeout at or below ``args.request_timeout_s`` is allowed, with a warning: the proxy's
    plain-text 408 would then pre-empt the app's own JSON answers (408 for a slow body, 503 for a
    slow prediction).
    """
    if proxy_timeout_s <= args.request_timeout_s:
        logging.getLogger(__name__).warning(
            "--proxy-timeout-s %g is not above --request-timeout-s %g: slow requests will get the "
            "proxy's plain-text 408 instead of the app's JSON answer", proxy_timeout_s, args.request_timeout_s)
    return {"host": host, "port": port, "request_timeout_s": proxy_timeout_s}


def run_serve(args, *, host: str = default(ServerOptions, "host"), port: int = default(ServerOptions, "port"),
              address: str | None = None, name: str = APP_NAME, blocking: bool = True,
              env_vars: dict[str, str] | None = None, direct_port: int | None = None,
              proxy_timeout_s: float = default(ServerOptions, "proxy_timeout_s")):
    """Start Serve on ``host:port`` and run the app built from ``args`` (a ``ServeArgs``); ``host``,
    ``port``, ``address``, ``direct_port`` and ``proxy_timeout_s`` are :class:`ServerOptions`' (with
    its defaults).

    ``env_vars`` are set in the replicas' environment (``runtime_env``), e.g. ``RAYKD_API_KEY`` in
    tests. Returns the app's deployment handle when ``blocking`` is False (tests, benchmarks).

    Fails closed before anything starts: without a key (in ``env_vars`` or this environment)
    :func:`~raykd.serve.guard.check_bind` refuses a ``host`` other machines can reach unless
    ``args.allow_unauthenticated``. Direct ingress binds the replicas' ports to the same ``host``
    (Ray 2.60 gives them the proxy's HTTP options with their own port), so one check covers both.
    """
    key = api_key_from_env({**os.environ, **(env_vars or {})})
    warning = check_bind(host, key, args.allow_unauthenticated)
    if warning:
        logging.getLogger(__name__).warning(warning)
    from ray import serve  # lazy: ray is heavy

    from raykd.serve.app import bind_app  # lazy: imports ray

    app = bind_app(args, env_vars=env_vars)  # validates the family before touching the cluster
    if direct_port is not None:
        os.environ.update(direct_ingress_env(direct_port, args.num_replicas))  # the processes Ray starts read them
    init_local_ray(address)
    serve.start(http_options=http_options(args, host, port, proxy_timeout_s))
    logging.getLogger(__name__).info("raykd serving on http://%s:%d (POST /predict, GET /models)", host, port)
    if direct_port is not None:
        logging.getLogger(__name__).info("each replica also answers on its own port from http://%s:%d "
                                         "(direct ingress, no proxy hop)", host, direct_port)
    return serve.run(app, name=name, route_prefix="/", blocking=blocking)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    configure()
    ns = parse_args(argv, prog=prog)
    # Ctrl-C stops serving even when a shell started us in the background with SIGINT ignored
    # (SIGTERM is handled by Ray itself: it drains the node and stops its processes).
    signal.signal(signal.SIGINT, _interrupt)
    try:
        serve_args = args_to_serve_args(ns)
        run_serve(serve_args, **server_options(ns).model_dump())
    except (FileNotFoundError, ValueError, KeyError) as exc:  # a wrong file, model name or option
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # KeyError quotes str()
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from ray import serve  # lazy: ray is heavy

        logging.getLogger("raykd.serve").info("shutting down the Serve application")
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
