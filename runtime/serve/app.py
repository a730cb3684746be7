"""OpenAI-compatible HTTP app around one :class:`~safeclip.runtime.pipeline.Pipeline` (FastAPI + uvicorn).

Routes: ``POST /v1/chat/completions`` (plain JSON or ``stream: true`` as server-sent events in the OpenAI
chunk format), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``, and the kiosk page at ``/``
(``static/``, no CDN, works offline). Every completion carries the gate's verdict in an extra ``safeclip``
object (``gated, flagged, category, score, probs, policy, action, finish_reason``, and ``images``: every image
of the conversation; in a stream: on the first chunk, before any text, and on the last).

Conversations (``conversation.py``): system/developer prompt and a multi-turn history, rendered through
``runtime/chat.py``'s ``Chat``. Stateless like OpenAI's; the prefix cache (``runtime/prefix_cache.py``,
``prefix_cache_mb``, 0 = off) keeps KV snapshots of finished answers keyed by token ids, so a re-sent history
is prefilled only after its longest common prefix with a snapshot; its stats are in ``/health`` and
``/v1/models`` and the reuse in ``usage.prompt_tokens_details.cached_tokens``. A flagged image is handled by the server's policy (the bundle's
unless ``policy=`` overrides it); clients cannot weaken it per request.

Limits, each answered with a 4xx in OpenAI's error format (``{"error": {message, type, code, param}}``),
never a 500 or a hang: body size (413), body read time and rate (408; ``intake.py``, which also bounds the
bytes of bodies held at once), ``Host``/``Origin`` against DNS rebinding (403; ``hosts.py``), content type
(415), malformed JSON and unknown fields (400), image bytes/format/pixels (400 ``invalid_image``), prompt
length and context (400 ``context_length_exceeded``), ``max_tokens`` (400), remote image URLs (400 unless
allowed), missing or wrong
key (401). Admission (``admission.py``): one model runs one request at a time (``OneAtATime``, the slot): at most
``max_queue`` further requests wait, in arrival order; a full queue or a wait longer than ``queue_timeout_s``
answers 503 with ``Retry-After``. With ``max_batch`` > 1, up to that many decode together instead
(``batching.Batched``: continuous batching).
A client that disconnects while queued, or mid-generation (plain or streamed), gives its place back at once;
the token being computed finishes on the model thread and the generator is closed there.

Other routes: ``/v1/completions`` (the legacy text API, which LlamaIndex's ``OpenAILike`` calls unless
``is_chat_model=True``) answers 404 saying to use chat completions; ``OPTIONS`` answers 204 with ``Allow`` (and
is a CORS preflight when the request's ``Origin`` is in ``cors_origins``, empty by default: no CORS headers
at all); ``HEAD`` works wherever ``GET`` does. Every 4xx has an error ``type`` other than ``server_error``.

Shutdown (``begin_shutdown``, called by ``server.SafeclipServer`` on SIGTERM): queued requests and new ones
get 503 with ``Retry-After``; the running request may finish until the deadline; a stream still running then
ends with an error event and ``[DONE]`` (the ``openai`` client raises ``APIError``), a plain one gets a 503.

Threads: all model work runs on one dedicated thread (``ThreadPoolExecutor(1)``), step by step (one token
per call), so the event loop stays free and work of two requests can never interleave. Images are decoded
(with the pixel limit) on the default thread pool, at most two at a time, before a request queues.
"""
from __future__ import annotations

import asyncio
import calendar
import hmac
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..gate import check_policy
from ..backends.base import ContextError
from ..fetch import FetchError, fetch_image
from ..image import ImageError, load_image
from ..prompt import PromptError
from .cors import CORSAndOptions
from .hosts import HostCheck
from .intake import Intake, ReleaseAfter
from .admission import END, Busy, Disconnected, Job, OneAtATime
from ..prefix_cache import PrefixCache
from .conversation import images_json, start_chat
from .batching import Batched
from .request import DEFAULTS, ChatRequest, RequestError, error_body, parse_chat_request, parse_json_body

log = logging.getLogger("safeclip.serve")
STATIC = Path(__file__).resolve().parent / "static"
_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
_STOPPING = "the server is shutting down; try again shortly"
# fetch.FetchError.kind -> (HTTP status, OpenAI error code); any other kind: 400 invalid_image
_FETCH_ERRORS = {"refused": (400, "remote_image_refused"), "too_large": (413, "request_too_large")}


def _error(status: int, message: str, code: str | None = None, param: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


class _SSEResponse(StreamingResponse):
    """A streaming response that always closes its generator and its job, so a dropped client frees the slot
    even when it left before the generator ever started."""

    def __init__(self, content, job: Job, **kw):
        super().__init__(content, **kw)
        self.job = job

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
            self.job.close()


class _Server:
    def __init__(self, pipe, *, api_key: str | None, policy: str | None, allow_remote_images: bool,
                 allow_private_image_hosts: bool, limits: dict, max_batch: int):
        self.pipe, self.api_key, self.policy, self.allow_remote = pipe, api_key, policy, allow_remote_images
        self.limits = limits
        self.model_id = pipe.manifest.name
        # the id /v1/models lists; also the bundle's folder name, which differs when a bundle was renamed
        self.model_ids = {self.model_id, Path(str(pipe.manifest.root)).name}
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safeclip-model")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        # admission.py's face: one request at a time (the slot), or a batch (batching.py)
        self.admission = (Batched(pipe, self.run, max_batch, limits["max_queue"]) if max_batch > 1 else
                          OneAtATime(self.run, self.executor, limits["max_queue"], limits["queue_timeout_s"]))
        self.decode_sem: asyncio.Semaphore | None = None
        self.allow_private = allow_private_image_hosts
        self.stopping = False
        self.stop_deadline = float("inf")           # time.monotonic() when a running request is cut
        self.prefix_cache = PrefixCache(limits["prefix_cache_bytes"])
        self.tokens = {"prefilled": 0, "cached": 0}
        self.intake = Intake(limits["max_body_bytes"], limits["body_timeout_s"], limits["body_budget_bytes"],
                             wait_s=limits["queue_timeout_s"])

    def begin_shutdown(self, deadline_s: float) -> None:
        """Stop taking work: queued requests get 503 now, the running one may go on for ``deadline_s``."""
        self.stopping = True
        self.stop_deadline = time.monotonic() + deadline_s
        self.admission.fail_waiters(Busy(_STOPPING, self.stop_retry_after()))

    def stop_retry_after(self) -> int:
        return 5

    def past_deadline(self) -> bool:
        return self.stopping and time.monotonic() >= self.stop_deadline

    # -- helpers ----------------------------------------------------------------------------------------
    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise RequestError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                               "invalid_api_key")

    def check_content_type(self, request: Request) -> None:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise RequestError(415, f"content type must be application/json, got '{ctype or 'none'}'",
                               "unsupported_media_type")

    def fetch_remote(self, url: str) -> bytes:
        """Only with allow_remote_images: GET an http(s) image, bounded in total time, size and addresses; a
        ``FetchError`` becomes the client's error (400 ``remote_image_refused`` / ``invalid_image``, 413)."""
        try:
            return fetch_image(url, max_bytes=self.limits["max_body_bytes"],
                               timeout_s=self.limits["fetch_timeout_s"], allow_private=self.allow_private)
        except FetchError as e:
            status, code = _FETCH_ERRORS.get(e.kind, (400, "invalid_image"))
            raise RequestError(status, str(e), code, "messages.content.image_url") from None

    async def decode_image(self, source: bytes | str):
        if self.decode_sem is None:
            self.decode_sem = asyncio.Semaphore(2)
        async with self.decode_sem:
            if isinstance(source, str):
                source = await anyio.to_thread.run_sync(self.fetch_remote, source)
            try:
                return await anyio.to_thread.run_sync(load_image, source, self.limits["max_pixels"])
            except ImageError as e:
                raise RequestError(400, str(e).replace("<bytes>: ", "image: "), "invalid_image",
                                   "messages.content.image_url") from None

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def start_stream(self, images: list, req: ChatRequest):
        """The conversation's ChatStream (every image gated), or a RequestError for the client's input."""
        max_new = req.max_tokens or min(self.limits["default_max_tokens"], self.limits["max_tokens"])
        try:
            return start_chat(self.pipe, req.conversation, images, prefix_cache=self.prefix_cache,
                              policy=self.policy, max_pixels=self.limits["max_pixels"], reserve=req.max_tokens or 0,
                              max_new_tokens=max_new, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                              stop=req.stop)
        except ContextError as e:
            raise RequestError(400, str(e), "context_length_exceeded", "messages") from None
        except ImageError as e:
            raise RequestError(400, str(e), "invalid_image", "messages.content.image_url") from None
        except PromptError as e:
            raise RequestError(400, str(e), "invalid_prompt", "messages") from None
        except ValueError as e:                     # the pipeline's other request checks (one-line messages)
            raise RequestError(400, str(e), "invalid_request") from None

    def count(self, a) -> None:
        """Tokens prefilled and reused (the prefix cache's effect), per finished answer."""
        t = a.timings or {}
        self.tokens["prefilled"] += int(t.get("prefill_tokens", 0))
        self.tokens["cached"] += int(t.get("cached_tokens", 0))

    def stats(self) -> dict:
        return {**self.prefix_cache.stats(), "prefilled_tokens": self.tokens["prefilled"],
                "cached_tokens": self.tokens["cached"]}

    def gate_json(self, s, answer=None, conv=None) -> dict:
        v = s.verdict
        d = {"gated": v is not None, "flagged": bool(v is not None and v.flagged),
             "category": None if v is None else v.category, "score": None, "probs": None,
             "policy": s.policy, "action": s.action}
        if v is not None:
            j = v.to_json()
            d.update(score=j["score"], probs=j["probs"])
            if j.get("reason"):
                d["reason"] = j["reason"]
        if conv is not None:
            d["images"] = images_json(conv, getattr(s, "verdicts", ()))
        if answer is not None:
            d["finish_reason"] = answer.finish_reason
            d["timings"] = answer.timings
        return d

    def models_json(self) -> dict:
        m = self.pipe.manifest
        g, ctx = m.gate_config, (m.model_facts.context_length if m.decoder is not None else 0)
        return {"id": self.model_id, "object": "model", "created": _created(m.created),
                "owned_by": "safeclip-edge",
                "safeclip": {"classes": list(g.classes), "safe_classes": list(g.safe_classes),
                             "threshold": g.threshold, "policy": self.policy or self.pipe.policy,
                             "context_length": ctx, "max_tokens": self.limits["max_tokens"],
                             "backend": self.pipe.backend, "prefix_cache": self.stats()}}


def _created(stamp) -> int:
    try:
        return calendar.timegm(time.strptime(str(stamp), "%Y-%m-%dT%H:%M:%SZ"))
    except (ValueError, OverflowError):
        return 0


_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "refused": "content_filter"}


def create_app(pipeline, *, api_key: str | None = None, max_body_bytes: int = DEFAULTS["max_body_bytes"],
               max_pixels: int = DEFAULTS["max_pixels"], max_queue: int = DEFAULTS["max_queue"],
               allow_remote_images: bool = False, policy: str | None = None,
               max_tokens: int = DEFAULTS["max_tokens"], default_max_tokens: int = DEFAULTS["default_max_tokens"],
               max_prompt_chars: int = DEFAULTS["max_prompt_chars"],
               queue_timeout_s: float = DEFAULTS["queue_timeout_s"],
               body_timeout_s: float = DEFAULTS["body_timeout_s"], fetch_timeout_s: float = DEFAULTS["fetch_timeout_s"],
               allow_private_image_hosts: bool = False, cors_origins: tuple[str, ...] | list[str] = (),
               prefix_cache_mb: float = DEFAULTS["prefix_cache_mb"], max_batch: int = 1,
               allowed_hosts: tuple[str, ...] | list[str] = (), body_budget_mb: float | None = None) -> FastAPI:
    """The FastAPI app serving ``pipeline`` (which must have a language model); ``max_batch`` > 1 decodes that
    many requests together (``batching.py``); ``allowed_hosts``: host names accepted besides loopback ones
    (``hosts.py``); ``body_budget_mb``: request bodies held at once (``intake.py``; default 4 x the largest)."""
    if not pipeline.has_language_model:
        raise ValueError(f"{pipeline.manifest.root}: bundle has no language model (exported with --no-decoder); "
                         "safeclip-serve needs one")
    if policy is not None:
        check_policy(policy)
    for name, v in (("max_body_bytes", max_body_bytes), ("max_pixels", max_pixels), ("max_tokens", max_tokens),
                    ("default_max_tokens", default_max_tokens), ("max_prompt_chars", max_prompt_chars)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if isinstance(prefix_cache_mb, bool) or not isinstance(prefix_cache_mb, (int, float)) or not prefix_cache_mb >= 0:
        raise ValueError(f"prefix_cache_mb must be a non-negative number, got {prefix_cache_mb!r}")
    if not isinstance(max_queue, int) or max_queue < 0:
        raise ValueError(f"max_queue must be a non-negative integer, got {max_queue!r}")
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key is empty")
    limits = dict(max_body_bytes=max_body_bytes, max_pixels=max_pixels, max_queue=max_queue, max_tokens=max_tokens,
                  default_max_tokens=default_max_tokens, max_prompt_chars=max_prompt_chars,
                  queue_timeout_s=float(queue_timeout_s), body_timeout_s=float(body_timeout_s),
                  fetch_timeout_s=float(fetch_timeout_s), prefix_cache_bytes=int(prefix_cache_mb * 2 ** 20),
                  body_budget_bytes=int(body_budget_mb * 2 ** 20) if body_budget_mb else 4 * max_body_bytes)
    srv = _Server(pipeline, api_key=api_key, policy=policy, allow_remote_images=allow_remote_images,
                  allow_private_image_hosts=allow_private_image_hosts, limits=limits, max_batch=max_batch)

    @asynccontextmanager
    async def lifespan(app):
        yield
        srv.executor.shutdown(wait=True, cancel_futures=True)
        srv.admission.close()

    app = FastAPI(title="safeclip-serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.safeclip = srv
    app.add_middleware(ReleaseAfter)                       # innermost: the request's memory budget, given back
    app.add_middleware(CORSAndOptions, origins=tuple(cors_origins))
    app.add_middleware(HostCheck, allowed_hosts=tuple(allowed_hosts), cors_origins=tuple(cors_origins))  # outermost

    @app.exception_handler(RequestError)
    async def _request_error(request, e: RequestError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return _error(e.status, e.message, e.code, e.param, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error(e.status_code, str(e.detail), code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return _error(400, "invalid request", "invalid_request")

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, f"internal error ({type(e).__name__})", "internal_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": srv.model_id, "max_queue": max_queue, "prefix_cache": srv.stats(),
                **srv.admission.health()}

    @app.get("/v1/models")
    async def models(request: Request):
        srv.check_auth(request)
        return {"object": "list", "data": [srv.models_json()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        srv.check_auth(request)
        if model_id not in srv.model_ids:
            raise RequestError(404, f"model '{model_id}' not found (this server serves '{srv.model_id}')",
                               "model_not_found", "model")
        return srv.models_json()

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": _CSP,
                                                             "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.api_route("/v1/completions", methods=["GET", "POST", "HEAD"], include_in_schema=False)
    async def legacy_completions():
        raise RequestError(404, "this server has no /v1/completions (the legacy text API): use POST "
                           "/v1/chat/completions (LlamaIndex OpenAILike: is_chat_model=True)", "not_found")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if srv.stopping:
            return _error(503, _STOPPING, "server_shutting_down", headers={"Retry-After": str(srv.stop_retry_after())})
        srv.check_auth(request)
        srv.check_content_type(request)
        req = await srv.intake.parsed(request, lambda body: parse_chat_request(     # MBs of JSON + base64: off
            parse_json_body(body), allow_remote_images=srv.allow_remote, max_prompt_chars=max_prompt_chars,
            max_tokens_limit=max_tokens))
        admit = request.scope.get("safeclip.admit")       # server.RequestLimit: a generation slot, body complete
        if admit is not None and (full := admit()) is not None:
            return _error(503, full, "too_many_connections", headers={"Retry-After": "1"})
        if req.model is not None and req.model not in srv.model_ids:
            raise RequestError(404, f"model '{req.model}' not found (this server serves '{srv.model_id}')",
                               "model_not_found", "model")
        images = [await srv.decode_image(src) for src in req.conversation.sources]
        try:                                           # the slot or the batch (admission.py), then gated
            job = await srv.admission.start(request.receive, lambda: srv.start_stream(images, req))
        except Busy as e:
            return _error(503, str(e), "server_shutting_down" if srv.stopping else "server_busy",
                          headers={"Retry-After": str(e.retry_after)})
        except Disconnected:
            return _error(400, "client disconnected", "client_disconnected")
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return _SSEResponse(_sse(srv, job, req, cid, created), job, media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await _complete(srv, job, request, cid, created, req)
        finally:
            job.close()

    return app


async def _complete(srv: _Server, job: Job, request: Request, cid: str, created: int, req: ChatRequest):
    while (await job.next_piece()) is not END:
        if await request.is_disconnected():
            return _error(400, "client disconnected", "client_disconnected")
        if srv.past_deadline():
            return _error(503, "the server shut down before the answer was complete; try again shortly",
                          "server_shutting_down", headers={"Retry-After": str(srv.stop_retry_after())})
    s = job.stream
    a = s.result
    srv.count(a)
    message = {"role": "assistant", "content": a.text}
    if a.action == "refused":
        message["refusal"] = a.text
    return {"id": cid, "object": "chat.completion", "created": created, "model": srv.model_id,
            "choices": [{"index": 0, "message": message, "finish_reason": _FINISH.get(a.finish_reason, "stop"),
                         "logprobs": None}],
            "usage": _usage(a), "safeclip": srv.gate_json(s, a, req.conversation)}


def _usage(a) -> dict:
    return {"prompt_tokens": a.prompt_tokens, "completion_tokens": len(a.token_ids),
            "total_tokens": a.prompt_tokens + len(a.token_ids),
            "prompt_tokens_details": {"cached_tokens": int(getattr(a, "cached_tokens", 0))}}


def _event(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _sse(srv: _Server, job: Job, req: ChatRequest, cid: str, created: int):
    """OpenAI chunk stream: role (+ verdict), content pieces, finish (+ verdict), [usage], [DONE]."""
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": srv.model_id}
    s = job.stream

    def chunk(delta: dict, finish: str | None = None, **extra) -> bytes:
        return _event({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                       **extra})

    try:
        yield chunk({"role": "assistant", "content": ""}, safeclip=srv.gate_json(s, conv=req.conversation))
        refused = s.action == "refused"
        while (piece := await job.next_piece()) is not END:
            yield chunk({"content": piece, **({"refusal": piece} if refused else {})})
            if srv.past_deadline():
                yield _event(error_body(503, "the server shut down before the answer was complete; try again "
                                        "shortly", "server_shutting_down"))
                yield b"data: [DONE]\n\n"
                return
        a = s.result
        srv.count(a)
        yield chunk({}, _FINISH.get(a.finish_reason, "stop"), safeclip=srv.gate_json(s, a, req.conversation))
        if req.include_usage:
            yield _event({**base, "choices": [], "usage": _usage(a)})
        yield b"data: [DONE]\n\n"
    except Exception as e:                           # after the 200 went out, an error can only be an event
        log.exception("generation failed mid-stream")
        yield _event(error_body(500, f"generation failed ({type(e).__name__})", "internal_error"))
        yield b"data: [DONE]\n\n"
    finally:
        job.close()
