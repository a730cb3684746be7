"""Which backend runs a bundle here: ``tensorrt``, then ``onnxruntime-cuda``, then ``onnxruntime-cpu``.

* ``tensorrt``: the bundle's manifest has a TensorRT build plan, every planned graph has an engine record
  whose file is hashed in the manifest, TensorRT and cuda-python import, a GPU answers, and every plan was
  built by this TensorRT version on this GPU (``check_plan_compatible``).
* ``onnxruntime-cuda``: onnxruntime lists ``CUDAExecutionProvider`` (onnxruntime-gpu).
* ``onnxruntime-cpu``: always, when onnxruntime imports.
* ``onnxruntime-tensorrt`` (ORT's TensorRT execution provider) is not offered: it would build its engines
  without the bundle's optimization profiles or an engine cache, so it rebuilds them whenever the KV
  length grows. Asking for it raises :class:`BackendError` naming ``tensorrt`` and ``onnxruntime-cuda``.

:func:`open_vision` and :func:`open_decoder` open a bundle's graphs with the chosen backend (what
``Pipeline.load`` needs). ``auto`` walks that order and records in :attr:`BackendChoice.notes` why a faster backend was passed over
(e.g. a plan built on another GPU, with the rebuild command); an explicit request that cannot be honoured
raises :class:`BackendError` with the reason. Nothing here imports TensorRT unless the tensorrt backend is
considered.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..manifest import Manifest
from ..graph_spec import KV_SHARED
from .base import BackendError
from .trt_plan import PlanMismatchError, check_plan_compatible

BACKENDS = ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")
# What every command's --backend takes (safeclip-run, -scan, -serve): one list, so their help and their
# refusals agree. The short aliases below stay for the Python API only.
BACKEND_CHOICES = ("auto", *BACKENDS)
BACKEND_HELP = ("auto (default: the first of tensorrt, onnxruntime-cuda, onnxruntime-cpu that can run here), "
                "or one of them")
ORT_DEVICE = {"onnxruntime-cuda": "cuda", "onnxruntime-cpu": "cpu"}
_ALIASES = {"auto": "auto", "tensorrt": "tensorrt", "trt": "tensorrt", "onnxruntime-cuda": "onnxruntime-cuda",
            "onnxruntime-gpu": "onnxruntime-cuda", "cuda": "onnxruntime-cuda", "onnxruntime-cpu": "onnxruntime-cpu",
            "onnxruntime": "onnxruntime-cpu", "cpu": "onnxruntime-cpu"}
_DROPPED = {"onnxruntime-tensorrt": "onnxruntime-tensorrt is not supported (ONNX Runtime's TensorRT provider would "
            "rebuild its engines whenever the KV length grows): use tensorrt, with engines from safeclip-build, "
            "or onnxruntime-cuda"}

__all__ = ["BACKENDS", "BACKEND_CHOICES", "BACKEND_HELP", "ORT_DEVICE", "BackendChoice", "Probe", "choose_backend", "open_vision", "open_decoder", "slot_decoder"]


class Probe:
    """What this machine offers; tests replace it."""

    def tensorrt_device(self) -> dict[str, str]:
        from .trt import this_device          # imports TensorRT and cuda-python (lazily, with install hints)
        return this_device()

    def ort_providers(self) -> list[str]:
        try:
            import onnxruntime as ort
        except ImportError:
            return []
        return list(ort.get_available_providers())


@dataclass(frozen=True)
class BackendChoice:
    name: str                                     # tensorrt | onnxruntime-cuda | onnxruntime-cpu
    notes: tuple[str, ...] = field(default_factory=tuple)   # why faster backends were passed over


def _tensorrt_refusal(m: Manifest, root: str, probe: Probe) -> str | None:
    """Why the tensorrt backend cannot run this bundle here, or None if it can."""
    plan, engines = m.build_plan, m.engines
    if not plan:
        return f"bundle target '{m.target}' has no TensorRT build plan (export with --target jetson or datacenter)"
    missing = [g for g in plan if g in m.graphs and g not in engines]
    if missing:
        return f"no TensorRT engines for {', '.join(missing)}; build them on this device: safeclip-build --bundle {root}"
    unhashed = [r.get("file") for g, r in engines.items() if g in plan and r.get("file") not in m.files]
    if unhashed:
        return f"engine files {unhashed} are not hashed in the manifest; rebuild: safeclip-build --bundle {root}"
    try:
        device = probe.tensorrt_device()
    except BackendError as e:
        return str(e)
    for g in plan:
        if g in engines:
            try:
                check_plan_compatible(engines[g], device, bundle=root)
            except PlanMismatchError as e:
                return str(e)
    return None


def choose_backend(manifest, requested: str = "auto", probe: Probe | None = None) -> BackendChoice:
    """The backend to run ``manifest`` (a ``Manifest`` or its dict) with; raises :class:`BackendError` when an
    explicit request cannot be honoured. ``auto``: tensorrt (plans built here), then onnxruntime-cuda
    (CUDAExecutionProvider present), then onnxruntime-cpu."""
    if str(requested).lower() in _DROPPED:
        raise BackendError(_DROPPED[str(requested).lower()])
    want = _ALIASES.get(str(requested).lower())
    if want is None:
        raise BackendError(f"unknown backend '{requested}' (supported: {', '.join(BACKEND_CHOICES)})")
    root = str(getattr(manifest, "root", "DIR"))
    m = manifest if isinstance(manifest, Manifest) else Manifest(Path(root), dict(manifest))
    probe = probe or Probe()
    notes: list[str] = []
    if want in ("auto", "tensorrt"):
        why = _tensorrt_refusal(m, root, probe)
        if why is None:
            return BackendChoice("tensorrt")
        if want == "tensorrt":
            raise BackendError(f"tensorrt backend unavailable: {why}")
        notes.append(f"tensorrt: {why}")
    providers = probe.ort_providers()
    if not providers:
        raise BackendError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)")
    if want == "onnxruntime-cuda" and "CUDAExecutionProvider" not in providers:
        raise BackendError(f"onnxruntime-cuda backend unavailable: onnxruntime has no CUDAExecutionProvider (have: "
                           f"{', '.join(providers)}); install onnxruntime-gpu (on Jetson, the build for your JetPack)")
    kv = ((m.data.get("graphs") or {}).get("decoder") or {}).get("kv") or {}
    shared = isinstance(kv, dict) and kv.get("form") == KV_SHARED
    if want == "onnxruntime-cuda" and shared:
        raise BackendError("onnxruntime-cuda backend unavailable: this bundle's decoder is the cpu target's fused "
                           "graph (KV form 'shared'), untested on the CUDA provider; use onnxruntime-cpu or export "
                           "for --target jetson / datacenter")
    if want in ("onnxruntime-cuda", "onnxruntime-cpu"):
        return BackendChoice(want)
    if shared:
        notes.append("onnxruntime-cuda: the decoder is the cpu target's fused graph (KV form 'shared', CPU only)")
    elif "CUDAExecutionProvider" in providers:
        return BackendChoice("onnxruntime-cuda", tuple(notes))
    else:
        notes.append("onnxruntime-cuda: onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    return BackendChoice("onnxruntime-cpu", tuple(notes))


def open_vision(manifest, backend: str, threads: int | None = None):
    """The vision+gate session of a verified ``Manifest`` for ``backend`` (the name of a :func:`choose_backend` choice):
    a ``TrtVisionSession`` or an ``OrtSession``, both ``run(feeds) -> {name: array}``."""
    if backend == "tensorrt":
        from .trt import TrtVisionSession
        return TrtVisionSession.from_manifest(manifest)
    from .ort import make_session
    if backend not in ORT_DEVICE:
        raise BackendError(f"unknown backend '{backend}' (supported: {', '.join(BACKENDS)})")
    return make_session(manifest.path(manifest.vision.file), device=ORT_DEVICE[backend],
                        threads=threads)


def open_decoder(manifest, backend: str, *, context: int | None = None, threads: int | None = None,
                 session_options=None):
    """The decoder of a verified ``Manifest`` for ``backend``; ``context`` caps the KV cache (default: the
    model's context length; for tensorrt also what the engine's profiles cover). ``threads`` (default
    ``SAFECLIP_THREADS``) sizes ONNX Runtime's thread pool, as for the vision session."""
    model_ctx = manifest.model_facts.context_length
    cap = None if context is None else min(int(context), model_ctx)
    if backend == "tensorrt":
        from .trt import TrtDecoder
        return TrtDecoder.from_manifest(manifest, capacity=cap)
    from .ort import OrtDecoder
    if backend not in ORT_DEVICE:
        raise BackendError(f"unknown backend '{backend}' (supported: {', '.join(BACKENDS)})")
    device = "cpu" if backend == "onnxruntime-cpu" else "cuda"          # KV arenas live where the provider runs
    if manifest.decoder.kv_form == KV_SHARED:                           # the cpu target's fused graph
        from .ort_shared import SharedKVDecoder
        return SharedKVDecoder.from_manifest(manifest.root, manifest.decoder, capacity=cap or model_ctx,
                                             context_length=model_ctx, session_options=session_options,
                                             threads=threads, device=device)
    return OrtDecoder.from_manifest(manifest.root, manifest.decoder, capacity=cap or model_ctx,
                                    context_length=model_ctx, session_options=session_options, threads=threads,
                                    device=device)


def slot_decoder(dec, slots: int, capacity: int | None = None):
    """The batched decoder (``slots.py``) for a pipeline's one-sequence decoder ``dec``, sharing its weights: a
    ``SlotDecoder`` on an ``OrtDecoder``'s session (CPU or CUDA), a ``TrtSlotDecoder`` on a ``TrtDecoder``'s
    plan and context (TensorRT imported only then)."""
    from .ort import OrtDecoder
    from .ort_shared import SharedKVDecoder, SharedSlotDecoder
    from .slots import SlotDecoder

    if isinstance(dec, SharedKVDecoder):
        return SharedSlotDecoder.sharing(dec, slots, capacity)
    if isinstance(dec, OrtDecoder):
        return SlotDecoder.sharing(dec, slots, capacity)
    from .trt import TrtDecoder, TrtSlotDecoder

    if isinstance(dec, TrtDecoder):
        return TrtSlotDecoder.sharing(dec, slots, capacity)
    raise TypeError(f"no batched decoder for {type(dec).__name__}")
