"""``safeclip-serve --ray``: the same OpenAI-compatible app, N replicas behind Ray Serve (the ``[ray]`` extra).

Each replica is one Ray actor holding one :class:`~safeclip.runtime.pipeline.Pipeline` and the FastAPI app
``create_app`` builds around it: the app is the server's own (routes, limits, error bodies, streaming, the
``safeclip`` verdict on every answer), handed to ``@serve.ingress`` through ``__serve_build_asgi_app__``,
so nothing is served twice or differently. Ray Serve's proxy routes each request to a replica with room
(``max_ongoing_requests`` each; the rest wait in Ray's queue), scales between ``min_replicas`` and
``max_replicas`` when ``autoscaling`` is set (target: ``target_ongoing_requests`` a replica), and restarts
a replica that dies. Every response names its replica in ``x-safeclip-replica``.

A replica lost mid-request: the requests it held fail, never silently. A plain request gets a 5xx from the
proxy (the ``openai`` client retries 5xx by itself, onto a live replica); a stream already under way ends
without its final chunk and the client raises. The replacement replica loads the bundle and joins; until
then the others take the load.

Two ways to run it::

    safeclip-serve --bundle engines/demo --ray --replicas 2 --port 8000            # local Ray or $RAY_ADDRESS
    serve run safeclip.runtime.serve.ray_app:build_app bundle=/shared/engines/demo num_replicas=4 \\
        gpus_per_replica=1                                                    # Ray's own CLI (any key below)

``build_app(args)`` keys (strings from ``serve run`` are converted): ``bundle`` (required; the path every
node sees), ``num_replicas`` (default 1), ``min_replicas``/``max_replicas``/``target_ongoing_requests``
(autoscaling, on when ``max_replicas`` is given), ``max_ongoing_requests`` (default 4),
``cpus_per_replica`` (default 1), ``gpus_per_replica`` (default 0), ``backend``, ``threads``, ``context``,
and the app's own options (``api_key``, ``policy``, ``max_queue``, ``max_tokens``, ... as ``create_app``
names them). What ``server.py`` adds to uvicorn (header deadline, connection cap, SIGTERM drain) is not
there: Ray Serve's proxy runs the HTTP side.
"""
from __future__ import annotations

import inspect

from ray import serve

PIPELINE_KEYS = ("backend", "threads", "context", "trusted_keys")   # trusted_keys: PEM paths or a TrustedKeys
DEPLOYMENT_KEYS = ("num_replicas", "min_replicas", "max_replicas", "target_ongoing_requests",
                   "max_ongoing_requests", "cpus_per_replica", "gpus_per_replica")


class _ReplicaHeader:
    """ASGI wrapper: ``x-safeclip-replica: <Ray Serve replica id>`` on every HTTP response."""

    def __init__(self, app, replica: str):
        self.app, self.replica = app, replica.encode()
        self.state = getattr(app, "state", None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) +
                           [(b"x-safeclip-replica", self.replica)]}
            await send(message)

        await self.app(scope, receive, tagged)


@serve.deployment(name="safeclip")
@serve.ingress()
class SafeclipDeployment:
    """One replica: the pipeline loads once in the constructor, the app is built around it."""

    def __init__(self, bundle: str, pipeline_options: dict | None = None, app_options: dict | None = None):
        from ..pipeline import Pipeline

        self.pipe = Pipeline.load(bundle, **(pipeline_options or {}))
        self.app_options = dict(app_options or {})

    def __serve_build_asgi_app__(self):
        from .app import create_app

        try:
            ctx = serve.get_replica_context()
            replica = getattr(ctx.replica_id, "unique_id", None) or str(ctx.replica_id)
        except Exception:                 # not inside Serve (a direct call in a test)
            replica = "local"
        return _ReplicaHeader(create_app(self.pipe, **self.app_options), replica)


def _convert(key: str, value):
    if not isinstance(value, str):
        return value
    ints = {"num_replicas", "min_replicas", "max_replicas", "max_ongoing_requests", "threads", "context",
            "max_body_bytes", "max_pixels", "max_queue", "max_tokens", "default_max_tokens", "max_prompt_chars"}
    floats = {"target_ongoing_requests", "cpus_per_replica", "gpus_per_replica", "queue_timeout_s",
              "body_timeout_s", "fetch_timeout_s"}
    bools = {"allow_remote_images", "allow_private_image_hosts"}
    try:
        if key in ints:
            return int(value)
        if key in floats:
            return float(value)
    except ValueError:
        raise ValueError(f"{key} must be a number, got {value!r}") from None
    if key in bools:
        return value.strip().lower() in ("1", "true", "yes", "on")
    if key in ("cors_origins", "allowed_hosts"):
        return tuple(v for v in value.split(",") if v)
    return value


def build_app(args: dict):
    """The bound Serve application for ``args`` (see the module docstring); ``serve run`` calls this."""
    from .app import create_app

    args = {k: _convert(k, v) for k, v in dict(args).items()}
    bundle = args.pop("bundle", None)
    if not bundle:
        raise ValueError("build_app needs bundle=<bundle folder>")
    app_keys = set(inspect.signature(create_app).parameters) - {"pipeline"}
    unknown = set(args) - app_keys - set(PIPELINE_KEYS) - set(DEPLOYMENT_KEYS)
    if unknown:
        raise ValueError(f"unknown option(s): {', '.join(sorted(unknown))}")
    pipeline_options = {k: args[k] for k in PIPELINE_KEYS if args.get(k) is not None}
    app_options = {k: v for k, v in args.items() if k in app_keys and v is not None}
    get = lambda k, default: default if args.get(k) is None else args[k]          # noqa: E731
    if get("max_ongoing_requests", 4) < 1:
        raise ValueError(f"max_ongoing_requests must be at least 1, got {args['max_ongoing_requests']}")
    opts: dict = {"max_ongoing_requests": get("max_ongoing_requests", 4),
                  "ray_actor_options": {"num_cpus": get("cpus_per_replica", 1.0),
                                        "num_gpus": get("gpus_per_replica", 0.0)}}
    if args.get("max_replicas") is not None:
        lo, hi = get("min_replicas", 1), args["max_replicas"]
        if not 0 <= lo <= hi or hi < 1:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got {lo}, {hi}")
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi,
                                      "initial_replicas": max(lo, min(hi, get("num_replicas", max(lo, 1)))),
                                      "target_ongoing_requests": get("target_ongoing_requests", 2)}
    else:
        n = get("num_replicas", 1)
        if n < 1:
            raise ValueError(f"num_replicas must be at least 1, got {n}")
        opts["num_replicas"] = n
    return SafeclipDeployment.options(**opts).bind(str(bundle), pipeline_options, app_options)


def run(args: dict, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
        blocking: bool = False, name: str = "safeclip"):
    """Start Ray (``address``: a cluster, else ``$RAY_ADDRESS`` or a local one) and Serve on ``host:port``, deploy
    ``build_app(args)`` at ``/`` and wait until its replicas are up; returns the app's handle."""
    import ray

    app = build_app(args)
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(app, name=name, route_prefix="/", blocking=blocking)


def ray_main(a) -> int:
    """``safeclip-serve --ray``: ``a`` is ``cli.serve_parser()``'s namespace."""
    import sys

    from ..error_text import EXIT_INTERRUPTED, fail
    from ..signing import SigningError, trusted_keys
    from . import PROG

    try:                                 # the driver reads the keys; replicas get the keys themselves, not paths
        keys = trusted_keys(getattr(a, "trusted_key", None))
    except SigningError as e:
        return fail(PROG, e)
    args = {"bundle": str(a.bundle), "trusted_keys": keys, "num_replicas": a.replicas, "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas, "target_ongoing_requests": a.target_ongoing_requests,
            "max_ongoing_requests": a.max_ongoing_requests, "cpus_per_replica": a.cpus_per_replica,
            "gpus_per_replica": a.gpus_per_replica, "backend": a.backend, "threads": a.threads,
            "context": a.context, "api_key": a.api_key, "policy": a.policy,
            "max_body_bytes": int(a.max_body_mb * 2 ** 20), "max_pixels": a.max_pixels, "max_queue": a.max_queue,
            "allow_remote_images": a.allow_remote_images, "max_tokens": a.max_tokens,
            "default_max_tokens": min(a.default_max_tokens, a.max_tokens), "max_prompt_chars": a.max_prompt_chars,
            "queue_timeout_s": a.queue_timeout, "fetch_timeout_s": a.fetch_timeout,
            "allow_private_image_hosts": a.allow_private_image_hosts, "cors_origins": tuple(a.cors_origin),
            "allowed_hosts": tuple(a.allowed_host)}
    try:
        build_app(args)                              # option and bundle errors before Ray starts
        from ..manifest import load_manifest
        if load_manifest(a.bundle, trusted_keys=keys).decoder is None:
            raise ValueError(f"{a.bundle}: bundle has no language model (exported with --no-decoder); "
                             "safeclip-serve needs one")
    except Exception as e:
        return fail(PROG, e)
    print(f"safeclip-serve: starting Ray Serve on http://{a.host}:{a.port}/ ({a.replicas} replica(s)"
          f"{', autoscaling' if a.max_replicas else ''})", file=sys.stderr, flush=True)
    try:
        run(args, host=a.host, port=a.port, address=a.ray_address, blocking=True)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:
        return fail(PROG, e)
    finally:                      # this app only: other Serve apps on a shared cluster go on
        try:
            serve.delete("safeclip")
        except Exception:
            pass
    return 0
