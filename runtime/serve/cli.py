"""``safeclip-serve``: serve a bundle over HTTP (OpenAI chat completions) with the kiosk page at ``/``.

    safeclip-serve --bundle engines/demo                         # http://127.0.0.1:8000/
    SAFECLIP_API_KEY=... safeclip-serve --bundle engines/demo --host 0.0.0.0 --port 8000

Binds to loopback unless told otherwise; ``--api-key`` (or ``SAFECLIP_API_KEY``, which keeps the key out
of the process list) makes every ``/v1`` route demand ``Authorization: Bearer <key>``. ``--port 0`` picks a
free port; the first line on stderr names the address actually bound.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path

from ..backends.pick import BACKEND_CHOICES, BACKEND_HELP
from ..gate import POLICIES
from ..error_text import EXIT_INTERRUPTED, EXIT_USAGE, fail
from ..signing import TRUSTED_KEY_HELP
from . import PROG

# --max-batch by export target (BENCHMARKS.md "Continuous batching"): cpu decodes up to 4 together (a step of 4
# costs 1.3x a step of 1 at TinyLlama-1.1B shape: 3.1x the tokens/s; 8 give 4.7x at 1.7x the step, but twice
# the KV slots: 0.7 GB at TinyLlama/2048, 34 GB at a 7B/4096 fp32), lowered to what fits the memory. datacenter
# GPUs decode 8 together (a memory-bound step reads the weights once for all of them; the engine's decode
# profile takes 16). jetson serves one at a time by default: a kiosk has one user, and each slot costs shared
# DRAM (2 GiB for a 7B at 4096 tokens); its engine takes 4 (--max-batch 4). Never more than the engine covers.
DEFAULT_MAX_BATCH = {"cpu": 4, "jetson": 1, "datacenter": 8}


def serve_parser() -> argparse.ArgumentParser:
    from .request import DEFAULTS
    p = argparse.ArgumentParser(prog="safeclip-serve", description="Serve a bundle's gated vision-language model "
                                "over an OpenAI-compatible HTTP API, with a kiosk page at /.")
    p.add_argument("--bundle", required=True, type=Path, help="bundle folder (engines/<name>)")
    n = p.add_argument_group("network")
    n.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    n.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    n.add_argument("--api-key", default=os.environ.get("SAFECLIP_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $SAFECLIP_API_KEY)")
    n.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (off by default: the server never touches the network)")
    n.add_argument("--allow-private-image-hosts", action="store_true",
                   help="with --allow-remote-images: also fetch from loopback and private addresses (refused by "
                   "default: they reach this machine's and the LAN's services)")
    n.add_argument("--fetch-timeout", type=float, default=DEFAULTS["fetch_timeout_s"],
                   help="total seconds one remote image fetch may take (default %(default)g)")
    n.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://kiosk.local:3000, or *) call the API; repeat for "
                   "more (default: none, no CORS headers)")
    n.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a host name clients may use besides loopback ones (e.g. kiosk.local); repeat for more. "
                   "A loopback server refuses any other Host header (DNS rebinding); see README")
    n.add_argument("--max-connections", type=int, default=64, help="generation requests in flight (counted "
                   "once their body is complete) before the server answers 503 (default 64)")
    n.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send its request headers (default %(default)g)")
    n.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="on SIGTERM, seconds the running request may go on (default %(default)g)")
    g = p.add_argument_group("gate")
    g.add_argument("--policy", choices=POLICIES, help="what a flagged image does for every request "
                   "(default: the bundle's; clients cannot change it)")
    lim = p.add_argument_group("limits")
    lim.add_argument("--max-body-mb", type=float, default=DEFAULTS["max_body_bytes"] / 2 ** 20,
                     help="largest request body in MiB (default %(default)g)")
    lim.add_argument("--max-pixels", type=int, default=DEFAULTS["max_pixels"],
                     help="largest image in pixels (default %(default)d)")
    lim.add_argument("--max-queue", type=int, default=DEFAULTS["max_queue"],
                     help="requests that may wait while one runs; more get 503 (default %(default)d)")
    lim.add_argument("--prefix-cache-mb", type=float, default=DEFAULTS["prefix_cache_mb"],
                     help="host memory in MiB for conversations' KV snapshots, so a re-sent history is not "
                     "prefilled again (LRU; 0 = off; default %(default)g)")
    lim.add_argument("--queue-timeout", type=float, default=DEFAULTS["queue_timeout_s"],
                     help="seconds a request may wait in line before a 503 (default %(default)g)")
    lim.add_argument("--max-tokens", type=int, default=DEFAULTS["max_tokens"],
                     help="largest max_tokens a request may ask for (default %(default)d)")
    lim.add_argument("--default-max-tokens", type=int, default=DEFAULTS["default_max_tokens"],
                     help="max_tokens when a request names none (default %(default)d, capped by --max-tokens)")
    lim.add_argument("--max-prompt-chars", type=int, default=DEFAULTS["max_prompt_chars"],
                     help="longest prompt text in characters (default %(default)d)")
    m = p.add_argument_group("model")
    m.add_argument("--context", type=int, default=None, help="KV-cache capacity (default: the model's context)")
    m.add_argument("--max-batch", type=int, default=None,
                   help="requests decoded together, each with its own KV slot of --context positions (default: "
                   f"by target, {DEFAULT_MAX_BATCH}, at most what fits the memory and a TensorRT engine's "
                   "decode profile)")
    m.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime (default: all)")
    m.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help=BACKEND_HELP)
    m.add_argument("--full-verify", action="store_true", help="hash every bundle file (no verification cache)")
    m.add_argument("--trusted-key", action="append", type=Path, default=None, metavar="PEM", help=TRUSTED_KEY_HELP)
    r = p.add_argument_group("ray (the [ray] extra; ray_app.py)")
    r.add_argument("--ray", action="store_true", help="serve N replicas behind Ray Serve instead of one process")
    r.add_argument("--ray-address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else local)")
    r.add_argument("--replicas", type=int, default=1, help="replicas (autoscaling: the initial number)")
    r.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound (with --max-replicas)")
    r.add_argument("--max-replicas", type=int, default=None, help="turn autoscaling on, up to this many replicas")
    r.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="autoscaling target of requests in flight per replica (default 2)")
    r.add_argument("--max-ongoing-requests", type=int, default=4, help="requests a replica holds; the rest wait "
                   "in Ray's queue (default %(default)d)")
    r.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each replica reserves (default 1)")
    r.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs each replica reserves (default 0)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="the server's log on stderr: start-up, access and error lines (default %(default)s)")
    return p


def _check_args(a) -> str | None:
    if not 0 <= a.port <= 65535:
        return "--port must be in 0..65535"
    for name in ("max_pixels", "max_tokens", "default_max_tokens", "max_prompt_chars", "max_connections"):
        if getattr(a, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    if a.max_queue < 0:
        return "--max-queue must be >= 0"
    if not a.prefix_cache_mb >= 0:
        return "--prefix-cache-mb must be >= 0 (0 turns the prefix cache off)"
    for name in ("max_body_mb", "queue_timeout", "fetch_timeout", "header_timeout", "shutdown_timeout"):
        if not getattr(a, name) > 0:
            return f"--{name.replace('_', '-')} must be positive"
    if a.allow_private_image_hosts and not a.allow_remote_images:
        return "--allow-private-image-hosts needs --allow-remote-images"
    if a.max_batch is not None and a.max_batch < 1:
        return "--max-batch must be at least 1"
    if a.context is not None and a.context < 1:
        return "--context must be at least 1"
    if a.api_key is not None and not a.api_key.strip():
        return "--api-key is empty"
    return None


def default_max_batch(pipe, asked: int | None) -> int:
    """``--max-batch``, else the target's default (``DEFAULT_MAX_BATCH``), at most the KV slots that fit the
    memory and what a TensorRT engine's decode profile covers (``TrtDecoder.max_batch``)."""
    if asked is not None:
        return asked
    from .batching import slots_that_fit
    dec = pipe.language_model.decoder if pipe.has_language_model else None
    engine = getattr(dec, "max_batch", None) or 1 << 30
    return max(1, min(DEFAULT_MAX_BATCH.get(pipe.manifest.target, 1), engine, slots_that_fit(pipe)))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host.strip("[]"), port), family=family, backlog=128)
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    args = serve_parser().parse_args(argv)
    problem = _check_args(args)
    if problem:
        return fail(PROG, problem, EXIT_USAGE)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        return fail(PROG, f"{e.name or 'fastapi'} is not installed; install the serving extra: "
                    "pip install 'safeclip-edge[serve]'")
    if args.ray:
        try:
            from .ray_app import ray_main
        except ImportError:
            return fail(PROG, "--ray needs Ray: pip install 'safeclip-edge[ray]'")
        return ray_main(args)
    from ..pipeline import Pipeline
    from .app import create_app
    from .server import log_line, make_server

    try:
        pipe = Pipeline.load(args.bundle, backend=args.backend, full_verify=args.full_verify, threads=args.threads,
                             context=args.context, trusted_keys=args.trusted_key)
        app = create_app(pipe, api_key=args.api_key, max_body_bytes=int(args.max_body_mb * 2 ** 20),
                         max_pixels=args.max_pixels, max_queue=args.max_queue,
                         allow_remote_images=args.allow_remote_images, policy=args.policy,
                         max_tokens=args.max_tokens, default_max_tokens=min(args.default_max_tokens, args.max_tokens),
                         max_prompt_chars=args.max_prompt_chars, queue_timeout_s=args.queue_timeout,
                         fetch_timeout_s=args.fetch_timeout, allow_private_image_hosts=args.allow_private_image_hosts,
                         cors_origins=args.cors_origin, prefix_cache_mb=args.prefix_cache_mb,
                         allowed_hosts=args.allowed_host,
                         max_batch=default_max_batch(pipe, args.max_batch))
    except Exception as e:                 # library errors are typed one-liners; never show a traceback
        return fail(PROG, e)
    try:
        sock = _listen(args.host, args.port)
    except OSError as e:
        return fail(PROG, f"cannot listen on {args.host}:{args.port} ({e.strerror or e})")
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    # printed whatever --log-level says (it names the address), in the log's one format (server.log_line)
    print(log_line(f"serving {pipe.manifest.name} ({pipe.backend}) on http://{shown}:{port}/ (policy "
                   f"{args.policy or pipe.policy}{', API key required' if args.api_key else ''})"),
          file=sys.stderr, flush=True)
    if not _is_loopback(args.host) and not args.api_key:
        print(log_line("listening beyond this machine without --api-key: anyone on the network can use the model",
                       logging.WARNING), file=sys.stderr, flush=True)
    server = make_server(app, max_requests=args.max_connections, header_timeout_s=args.header_timeout,
                         shutdown_deadline_s=args.shutdown_timeout, log_level=args.log_level)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
