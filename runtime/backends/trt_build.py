"""ONNX -> TensorRT plan, built on the device: plain build steps in the Polygraphy style (``safeclip-build``).

Torch-free runtime code (numpy is not even needed): it runs where the engines will run, with TensorRT and
cuda-python, and shares the backend's TensorRT import (``trt.py``), CUDA calls (``cuda.py``), device-fact
names (``trt_plan.py``) and the bundle's atomic writer (``manifest.py``).

Supported: the TensorRT 10 Python API (JetPack 6.1/6.2 ships 10.3, JetPack 7.2 ships 10.16) and TensorRT 11
(11.4 on Jetson from JetPack 7.2.2). Names used here were checked against the ``tensorrt`` 10.3.0 and
11.4.0.106 Python bindings.

Precision (``precision=``):

* ``"strongly_typed"``: every layer runs in the type the ONNX graph gives it, so a half-precision engine
  comes from a half-precision graph. TensorRT 10 needs ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``;
  TensorRT 11 is always strongly typed (the flag is kept there but ignored).
* ``"fp16"``: TensorRT 10 only: a weakly typed network plus ``BuilderFlag.FP16`` lets TensorRT pick
  half-precision kernels for an fp32 graph. TensorRT 11 removed ``BuilderFlag.FP16`` (and ``INT8``; both
  absent from the 11.4 bindings), so this raises there.

Several optimization profiles may be given (a decoder gets two: prefill and decode), each
``{input_name: {"min": shape, "opt": shape, "max": shape}}``. A timing cache file is loaded when present
and saved after the build. Engines only run with the TensorRT version and GPU that built them, so a
build records :func:`device_key`, and :func:`plan_cache_key` names a cached plan by everything that shapes it.

Memory (issue 22, 1.4; figures per Orin module in ``export/device_memory.py``). A build holds, at its peak, the
ONNX parser's host copy of every initializer (onnx-tensorrt's ``WeightsContext`` owns the weights it imports until
the parser is destroyed, and the network only points at them, so the parser must live until the build is done),
the engine's weights on the device, and at the end the serialized plan (the weights once more): about 3 x the
weights for an fp16 7B decoder. What this module does about it:

* ``parse_from_file`` (not ``parse`` of the file's bytes, which would hold the serialized model too);
* the parser, network and builder are released as soon as ``build_serialized_network`` returns, before the plan
  is written: only the plan is alive while it goes to disk;
* ``tactic_dram_bytes`` sets ``MemoryPoolType.TACTIC_DRAM``, the build's own memory budget. NvInfer.h (10.3 and
  11.x): "On embedded devices, where host and device memory are unified, this includes all host memory required
  by TensorRT to build the network ... This defaults to 75% of totalGlobalMem ... when
  cudaGetDeviceProperties.embedded is true": on an 8 GB module that is about 5.5 GiB, which a build that would fit
  the free memory can exceed; ``safeclip-build`` leaves the default unless told;
* before building, :func:`build_memory_note` says what the build will hold against the memory free now.

Not used: weight-stripped plans (``BuilderFlag.STRIP_PLAN`` + ``REFIT_IDENTICAL``, 10.0+) would drop the plan's
copy of the weights (and the bundle's second copy on disk), but the runtime would then have to refit every engine
from the bundle's ONNX weights (``OnnxParserRefitter``) before use, which ``trt.py`` does not do; weight streaming
(``WEIGHT_STREAMING``) moves weights between host and device memory, which are the same DRAM on a Jetson.

``tensorrt`` and ``cuda-python`` are imported lazily; without them the functions raise
``TensorRTUnavailable`` (``trt.py``) with an install hint.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..manifest import atomic_write_bytes
from .cuda import CudaError, CudaRuntime
from .trt import TensorRTUnavailable, import_tensorrt, this_device
from .trt_plan import DEVICE_FIELDS

PRECISIONS = ("strongly_typed", "fp16")

__all__ = ["EngineBuildError", "ProfileError", "TensorRTUnavailable", "PRECISIONS", "validate_profiles",
           "profiles_for", "check_profiles_cover_network", "network_from_onnx_path", "engine_bytes_from_network",
           "save_engine", "engine_from_onnx", "device_key", "plan_cache_key", "import_tensorrt", "tensorrt_major",
           "graph_weight_bytes", "build_memory_note"]


class EngineBuildError(RuntimeError):
    """TensorRT could not parse a graph or build an engine."""


class ProfileError(ValueError):
    """An optimization-profile description is malformed or does not fit the network."""


def tensorrt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


# -- profiles ------------------------------------------------------------------------------------------

def validate_profiles(profiles: Mapping | Sequence[Mapping]) -> list[dict[str, dict[str, tuple[int, ...]]]]:
    """Normalise one profile or a list of them (none for a graph without dynamic inputs); raise
    :class:`ProfileError` naming the first fault.

    Each shape is a sequence of non-negative ints, min <= opt <= max per dimension, the three of one input
    have the same rank, and every profile names the same inputs.
    """
    plist = [profiles] if isinstance(profiles, Mapping) else list(profiles)
    out, names = [], None
    for k, prof in enumerate(plist):
        if not isinstance(prof, Mapping) or not prof:
            raise ProfileError(f"profile {k}: expected {{input: {{'min', 'opt', 'max'}}}}, got {prof!r}")
        norm = {}
        for name, spec in prof.items():
            where = f"profile {k}, input '{name}'"
            if not isinstance(spec, Mapping) or set(spec) != {"min", "opt", "max"}:
                raise ProfileError(f"{where}: needs exactly the keys min, opt, max")
            shapes = {}
            for key in ("min", "opt", "max"):
                s = spec[key]
                if isinstance(s, (str, bytes)) or not isinstance(s, Sequence) or not all(
                        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s):
                    raise ProfileError(f"{where}: {key} must be a sequence of non-negative ints, got {s!r}")
                shapes[key] = tuple(int(d) for d in s)
            if not len(shapes["min"]) == len(shapes["opt"]) == len(shapes["max"]):
                raise ProfileError(f"{where}: min, opt and max have different ranks")
            if not all(a <= b <= c for a, b, c in zip(shapes["min"], shapes["opt"], shapes["max"])):
                raise ProfileError(f"{where}: needs min <= opt <= max in every dimension, got {shapes}")
            norm[str(name)] = shapes
        if names is not None and set(norm) != names:
            raise ProfileError(f"profile {k} names inputs {sorted(norm)}, profile 0 names {sorted(names)}")
        names = set(norm)
        out.append(norm)
    return out


def profiles_for(builder, profiles: Mapping | Sequence[Mapping]) -> list:
    """One ``IOptimizationProfile`` per profile description."""
    result = []
    for prof in validate_profiles(profiles):
        p = builder.create_optimization_profile()
        for name, s in prof.items():
            p.set_shape(name, s["min"], s["opt"], s["max"])
        result.append(p)
    return result


def check_profiles_cover_network(network, profiles: Sequence[Mapping]) -> None:
    """Every dynamic network input is in every profile, with its rank and fixed dimensions."""
    inputs = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        inputs[t.name] = tuple(t.shape)
    dynamic = sorted(n for n, dims in inputs.items() if any(d < 0 for d in dims))
    if dynamic and not profiles:
        raise ProfileError(f"the network has dynamic inputs {dynamic}: give at least one optimization profile")
    for k, prof in enumerate(profiles):
        unknown = sorted(set(prof) - set(inputs))
        if unknown:
            raise ProfileError(f"profile {k} names {unknown}, which are not network inputs {sorted(inputs)}")
        for name, dims in inputs.items():
            if name not in prof:
                if any(d < 0 for d in dims):
                    raise ProfileError(f"profile {k} lacks the dynamic input '{name}' {dims}")
                continue
            for key, shape in prof[name].items():
                if len(shape) != len(dims) or any(d >= 0 and d != s for d, s in zip(dims, shape)):
                    raise ProfileError(f"profile {k}: {key} shape {shape} of '{name}' does not fit its dims {dims}")


# -- logging and progress -----------------------------------------------------------------------------

def make_logger(trt, echo_severity: str = "WARNING"):
    """A TensorRT logger that keeps error messages (for exceptions) and echoes to stderr up to a level."""
    limit = int(getattr(trt.ILogger.Severity, echo_severity))
    error = int(trt.ILogger.Severity.ERROR)

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if int(severity) <= error:
                self.errors.append(str(msg))
            if int(severity) <= limit:
                print(f"[TensorRT] {msg}", file=sys.stderr)

    return _Logger()


def _progress_monitor(trt, report: Callable[[str], None]):
    class _Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                report(f"{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True          # False would cancel the build

        def phase_finish(self, phase_name):
            pass

    return _Progress()


# -- build steps ---------------------------------------------------------------------------------------

def _parser_error(err) -> str:
    desc = err.desc() if hasattr(err, "desc") else str(err)
    node = err.node_name() if hasattr(err, "node_name") else ""
    op = err.node_operator() if hasattr(err, "node_operator") else ""
    return f"{node} ({op}): {desc}" if node or op else str(desc)


def network_from_onnx_path(builder, path: str | Path, strongly_typed: bool, logger, trt=None):
    """Parse ``path`` (external weights beside it) into a new network; returns ``(network, parser)``.

    Keep the parser alive until the engine is built: it owns the imported weights.
    """
    trt = trt or import_tensorrt()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {path}")
    flags = 0
    if strongly_typed and tensorrt_major(trt) < 11:   # TensorRT 11 is always strongly typed (flag ignored there)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)] or ["no parser error recorded"]
        raise EngineBuildError(f"TensorRT could not parse {path.name}: " + "; ".join(errors))
    return network, parser


def _set_precision(trt, network, config, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; supported: {', '.join(PRECISIONS)}")
    if tensorrt_major(trt) >= 11:
        if precision != "strongly_typed":
            raise EngineBuildError(f"TensorRT {trt.__version__} has no BuilderFlag.FP16 (removed in TensorRT 11): "
                                   "export a float16 graph and build with precision='strongly_typed'")
        return
    strongly = bool(network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    if precision == "strongly_typed":
        if not strongly:
            raise EngineBuildError("precision 'strongly_typed' needs a network created with STRONGLY_TYPED")
        return
    if strongly:
        raise EngineBuildError("BuilderFlag.FP16 needs a weakly typed network; create it with strongly_typed=False")
    config.set_flag(trt.BuilderFlag.FP16)


def engine_bytes_from_network(builder, network, *, profiles: Mapping | Sequence[Mapping] = (),
                              precision: str = "strongly_typed", workspace_bytes: int | None = None,
                              timing_cache: str | Path | None = None, logger=None,
                              progress: Callable[[str], None] | None = None, trt=None,
                              tactic_dram_bytes: int | None = None):
    """Build a serialized engine; returns it as a bytes-like object (TensorRT's ``IHostMemory``, not copied:
    a 7B decoder's plan is many GB on a board whose CPU and GPU share memory).

    The timing cache file, when given, is read if present and written back after the build.
    """
    trt = trt or import_tensorrt()
    config = builder.create_builder_config()
    _set_precision(trt, network, config, precision)
    if workspace_bytes is not None:
        if int(workspace_bytes) <= 0:
            raise ValueError(f"workspace_bytes must be positive, got {workspace_bytes}")
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if tactic_dram_bytes is not None:                 # the build's own memory budget (module docstring)
        if int(tactic_dram_bytes) <= 0:
            raise ValueError(f"tactic_dram_bytes must be positive, got {tactic_dram_bytes}")
        config.set_memory_pool_limit(trt.MemoryPoolType.TACTIC_DRAM, int(tactic_dram_bytes))
    plist = validate_profiles(profiles)
    check_profiles_cover_network(network, plist)
    for p in profiles_for(builder, plist):
        config.add_optimization_profile(p)
    cache_path = Path(timing_cache) if timing_cache else None
    if cache_path is not None:
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            # recorded on another GPU or TensorRT version: start afresh rather than mixing timings
            print(f"[safeclip] timing cache {cache_path} does not match this device; starting a new one",
                  file=sys.stderr)
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    monitor = _progress_monitor(trt, progress) if progress else None
    if monitor is not None:
        config.progress_monitor = monitor
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        errors = "; ".join(getattr(logger, "errors", [])[-5:]) or "see the TensorRT log above"
        raise EngineBuildError(f"TensorRT failed to build the engine: {errors}")
    if cache_path is not None:
        atomic_write_bytes(cache_path, config.get_timing_cache().serialize())
    return plan


def save_engine(data, path: str | Path) -> Path:
    """Write a plan (bytes or ``IHostMemory``) atomically: temporary file in the same folder, then rename."""
    path = Path(path)
    if memoryview(data).nbytes == 0:
        raise EngineBuildError(f"refusing to write an empty engine to {path}")
    atomic_write_bytes(path, data)
    return path


def engine_from_onnx(onnx_path: str | Path, plan_path: str | Path, profiles: Mapping | Sequence[Mapping],
                     precision: str = "strongly_typed", workspace_bytes: int | None = None,
                     timing_cache: str | Path | None = None, progress: Callable[[str], None] | None = None,
                     device: Mapping[str, Any] | None = None, tactic_dram_bytes: int | None = None) -> dict[str, Any]:
    """Parse, build and save; returns the plan record for the manifest (device facts, profiles, precision).

    ``device`` defaults to :func:`device_key` (needs cuda-python).
    """
    plist = validate_profiles(profiles)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; supported: {', '.join(PRECISIONS)}")
    trt = import_tensorrt()
    device = dict(device) if device is not None else device_key()
    logger = make_logger(trt)
    try:
        builder = trt.Builder(logger)
    except Exception as e:  # pybind raises TypeError when the factory returns null (no GPU / driver)
        errors = "; ".join(logger.errors[-3:]) or str(e)
        raise TensorRTUnavailable(f"TensorRT could not create a builder (is a CUDA GPU usable?): {errors}") from e
    if progress is not None:
        progress(build_memory_note(onnx_path, workspace_bytes))
    network, parser = network_from_onnx_path(builder, onnx_path, precision == "strongly_typed", logger, trt)
    data = engine_bytes_from_network(builder, network, profiles=plist, precision=precision,
                                     workspace_bytes=workspace_bytes, timing_cache=timing_cache, logger=logger,
                                     progress=progress, trt=trt, tactic_dram_bytes=tactic_dram_bytes)
    del parser, network, builder   # the parser's copy of the weights goes before the plan is written
    save_engine(data, plan_path)
    return {"file": Path(plan_path).name, "bytes": memoryview(data).nbytes,
            "sha256": hashlib.sha256(memoryview(data)).hexdigest(),
            "precision": precision, "workspace_bytes": workspace_bytes,
            "profiles": [{n: {k: list(v) for k, v in s.items()} for n, s in p.items()} for p in plist],
            **_device_fields(device)}


def graph_weight_bytes(onnx_path: str | Path) -> int:
    """Bytes of an ONNX graph with its external data (``<name>.data`` beside it, as the exporter writes it): the
    weights the parser will copy, read from file sizes (the runtime has no ``onnx`` package)."""
    p = Path(onnx_path)
    data = p.parent / (p.name + ".data")
    return p.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def build_memory_note(onnx_path: str | Path, workspace_bytes: int | None = None, cuda: CudaRuntime | None = None) -> str:
    """One line: what building ``onnx_path`` holds at its peak (parser copy + engine weights + plan, plus the
    workspace) against the memory free now (``cudaMemGetInfo``; on a Jetson the shared DRAM, page cache not
    counted as free, so the line informs rather than refuses)."""
    w = graph_weight_bytes(onnx_path)
    need = 3 * w + int(workspace_bytes or 0)
    line = f"{Path(onnx_path).name}: the build holds about {need / 2**30:.1f} GiB at its peak (3 x {w / 2**30:.2f} GiB " \
           "of weights: parser copy, engine, plan" + (" + workspace" if workspace_bytes else "") + ")"
    try:
        free, _ = (cuda or CudaRuntime()).mem_info()
    except CudaError:
        return line
    return line + f"; {free / 2**30:.1f} GiB free now" + ("" if free >= need else ": add swap if the build fails")


# -- device identity -----------------------------------------------------------------------------------

def device_key(device_index: int = 0) -> dict[str, str]:
    """``{tensorrt_version, gpu_name, compute_capability}`` of this machine, as the backend reads it
    (``trt.this_device``); a CUDA failure (no driver, no such device) is :class:`TensorRTUnavailable`."""
    trt = import_tensorrt()
    try:
        return this_device(trt, CudaRuntime(), device_index)
    except CudaError as e:
        raise TensorRTUnavailable(str(e)) from e


def _device_fields(device: Mapping[str, Any]) -> dict[str, str]:
    missing = [k for k in DEVICE_FIELDS if not device.get(k)]
    if missing:
        raise ValueError(f"device facts lack {missing}; expected the keys of device_key()")
    return {k: str(device[k]) for k in DEVICE_FIELDS}


def plan_cache_key(onnx_sha256: str, device: Mapping[str, Any], precision: str,
                   profiles: Mapping | Sequence[Mapping], workspace_bytes: int | None = None) -> str:
    """Hex digest naming a plan: the graph, TensorRT version, GPU and every build setting that shapes it."""
    facts = {"onnx_sha256": onnx_sha256, "precision": precision, "workspace_bytes": workspace_bytes,
             "profiles": [{n: {k: list(v) for k, v in s.items()} for n, s in p.items()}
                          for p in validate_profiles(profiles)],
             **_device_fields(device)}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()

