"""The builder half of the TensorRT stand-in (``_fake_trt.py``): Builder, OnnxParser, IBuilderConfig, profiles and
timing caches, recording what the builder asked for in ``fake_*`` attributes. Split out to keep each file short;
the same name rules apply (``tests/test_trt_api_names.py``). What real TensorRT would refuse, this refuses the
same way (each rule with its source):

* **The parser's operator rules.** ``parse_from_file`` returns False with one ``ParserError`` per problem
  ``export/trt_check.py`` finds for this TensorRT version (the onnx-tensorrt ``docs/operators.md`` lists and the
  Changelog/importer rules kept in ``export/trt_ops.json``: unsupported operators, opset range, build-time
  constant inputs, DequantizeLinear's zero point zero/absent, INT4 block rules, ...). One copy of the rules.
* **The parser owns the weights.** onnx-tensorrt keeps every initializer it imports in its ``WeightsContext``
  until the parser is destroyed, and the network only points at them (TensorRT Python API docs for
  ``OnnxParser``: the parser "must be kept alive" while the network is used). A build after the parser was
  garbage-collected raises AssertionError here (on a GPU: a use-after-free).
* **Tensor volume.** ``NvInfer.h`` (release/10.3 and release/11.x): "The volume of the tensor must be less than
  2^31 elements". Every tensor of the network is sized at each profile's max shapes
  (``_fake_trt_shapes.tensor_volumes``); one at or past the limit makes ``build_serialized_network`` log an
  error and return None, as TensorRT does for a failed build.
* **Build memory.** On a Jetson the CPU and GPU share DRAM, so what the build holds at its peak is the sum of
  (a) the parser's host copy of the weights, (b) the engine's weights on the device, (c) the larger of the
  timing phase's context memory (the largest profile's, ``_fake_trt_shapes.activation_bytes``) plus the
  WORKSPACE pool limit when one is set, and the serialized plan (the weights again, unless the plan is
  weight-stripped: ``BuilderFlag.STRIP_PLAN`` with ``REFIT`` or ``REFIT_IDENTICAL``). Past the stand-in
  cudart's ``limit_bytes`` (less what it already holds) the build logs "Error Code 2: OutOfMemory" and returns
  None. ``Builder.fake_peak_bytes`` records the peak of the last build. A ``MemoryPoolType.TACTIC_DRAM`` limit
  bounds what TensorRT itself allocates (all but the parser's copy; NvInfer.h: on embedded devices the pool
  "includes all host memory required by TensorRT to build the network"); the stand-in applies no default
  (real TensorRT: 75% of totalGlobalMem on embedded devices).
* **A plan the runtime loads.** The serialized plan is the JSON of ``_fake_trt.write_plan`` (``onnx``,
  ``profiles``, ``perturb``) plus ``activation_bytes`` (per profile), ``weights_bytes``, ``stripped``, the
  builder ``flags`` and ``tensorrt_version``, so build -> serialize -> deserialize -> run works end to end.
* **Enum values** are the real ones per version (``NvInfer.h`` release/10.3 and release/11.x): ``BuilderFlag``
  numbering changed in 11 (FP16/INT8 removed, STRIP_PLAN 19 -> 18), ``STRONGLY_TYPED`` is 1 in 10.3 and 0 in 11.
"""
from __future__ import annotations

import json
import weakref
from pathlib import Path

from _fake_trt import _PybindEnum
from _fake_trt_shapes import LIMIT, activation_bytes, tensor_volumes, weights_bytes

# NvInfer.h `enum class BuilderFlag` (only the flags the stand-in offers).
BUILDER_FLAGS = {10: {"FP16": 0, "INT8": 1, "REFIT": 4, "TF32": 6, "STRIP_PLAN": 19, "REFIT_IDENTICAL": 20},
                 11: {"REFIT": 4, "TF32": 6, "STRIP_PLAN": 18, "REFIT_IDENTICAL": 19}}
STRONGLY_TYPED = {10: 1, 11: 0}                  # NvInfer.h `enum class NetworkDefinitionCreationFlag`


def builder_api(trt, version: str, major: int, build_fails: bool, cudart=None) -> None:
    """Builder, OnnxParser, IBuilderConfig, ... : records what the builder asked for (``fake_*`` attributes)."""
    gen = 11 if major >= 11 else 10
    trt.NetworkDefinitionCreationFlag = _PybindEnum("NetworkDefinitionCreationFlag",
                                                    {"STRONGLY_TYPED": STRONGLY_TYPED[gen]})
    trt.BuilderFlag = _PybindEnum("BuilderFlag", BUILDER_FLAGS[gen])
    trt.MemoryPoolType = _PybindEnum("MemoryPoolType", {"WORKSPACE": 0, "TACTIC_DRAM": 4})
    target = ".".join(version.split(".")[:2])          # the parser rules of this TensorRT version

    class ITensor:
        def __init__(self, name, shape):
            self._name, self._shape = name, shape

        name = property(lambda self: self._name)
        shape = property(lambda self: self._shape)

    class INetworkDefinition:
        def __init__(self, flags):
            self.fake_flags, self.fake_inputs = flags, []
            self.fake_onnx, self.fake_owner = None, None         # the parsed file; weakref to the parser

        num_inputs = property(lambda self: len(self.fake_inputs))

        def get_input(self, index):
            return self.fake_inputs[index]

        def get_flag(self, flag):
            return bool(self.fake_flags & (1 << int(flag)))

    class ParserError:
        def __init__(self, node, op, desc):
            self._n, self._o, self._d = node, op, desc

        desc, node_name, node_operator = (lambda self: self._d), (lambda self: self._n), (lambda self: self._o)

    class OnnxParser:
        def __init__(self, network, logger):
            self._network, self._errors = network, []

        def parse_from_file(self, model):
            import onnx

            from safeclip.export.trt_check import check_onnx_for_tensorrt

            m = onnx.load(model, load_external_data=False)
            inits = {t.name for t in m.graph.initializer}
            for vi in m.graph.input:
                if vi.name in inits:
                    continue
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)
                self._network.fake_inputs.append(ITensor(vi.name, dims))
            self._errors = [ParserError(i.node, i.op_type, i.problem) for i in check_onnx_for_tensorrt(model, target)]
            self._network.fake_onnx = str(Path(model).resolve())
            self._network.fake_owner = weakref.ref(self)          # the weights live as long as the parser
            return not self._errors

        num_errors = property(lambda self: len(self._errors))

        def get_error(self, index):
            return self._errors[index]

    class ITimingCache:
        def __init__(self, blob):
            self.fake_blob = bytes(blob)

        def serialize(self):
            return bytearray(self.fake_blob + b"+")             # one more timing entry per build

    class IBuilderConfig:
        def __init__(self):
            self.fake_flags, self.fake_pools, self.fake_profiles, self.fake_cache = set(), {}, [], None
            self.fake_loaded, self._monitor = None, None

        progress_monitor = property(lambda self: self._monitor, lambda self, m: setattr(self, "_monitor", m))

        def set_flag(self, flag):
            self.fake_flags.add(flag.name)

        def get_flag(self, flag):
            return flag.name in self.fake_flags

        def set_memory_pool_limit(self, pool, pool_size):
            self.fake_pools[pool.name] = pool_size

        def add_optimization_profile(self, profile):
            self.fake_profiles.append(profile.fake_shapes)
            return len(self.fake_profiles) - 1

        def create_timing_cache(self, serialized_timing_cache):
            return ITimingCache(serialized_timing_cache)

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache.fake_blob and not cache.fake_blob.startswith(b"cache:" + version.encode()):
                return False                                     # recorded elsewhere: TensorRT refuses it
            self.fake_cache, self.fake_loaded = cache, cache.fake_blob
            return True

        def get_timing_cache(self):
            return self.fake_cache

    class IOptimizationProfile:
        def __init__(self):
            self.fake_shapes = {}

        def set_shape(self, input, min, opt, max):  # noqa: A002 (TensorRT's argument names)
            self.fake_shapes[input] = (tuple(min), tuple(opt), tuple(max))

    class Builder:
        fake_last = None

        def __init__(self, logger):
            self._logger = logger
            self.fake_peak_bytes = 0
            Builder.fake_last = self

        def create_network(self, flags):
            self.fake_network = INetworkDefinition(flags)
            return self.fake_network

        def create_builder_config(self):
            self.fake_config = IBuilderConfig()
            return self.fake_config

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def _error(self, msg):
            self._logger.log(trt.ILogger.Severity.ERROR, msg)

        def build_serialized_network(self, network, config):
            if config.progress_monitor is not None:
                config.progress_monitor.phase_start("Building engine", None, 2)
            if build_fails:
                self._error("out of workspace for layer mm")
                return None
            if network.fake_owner is None or network.fake_owner() is None:
                raise AssertionError("build_serialized_network after the OnnxParser was destroyed: the network's "
                                     "weights were freed with it (on a GPU: a use-after-free)")
            profiles = [{n: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for n, s in p.items()}
                        for p in config.fake_profiles]
            acts = []
            for k, prof in enumerate(profiles or [{}]):
                vol = tensor_volumes(network.fake_onnx, {n: tuple(s["max"]) for n, s in prof.items()})
                big = [(n, v) for n, v in vol.items() if v >= LIMIT]
                if big:
                    n, v = max(big, key=lambda x: x[1])
                    self._error(f"Error Code 4: API Usage Error (tensor '{n}' has volume {v} at profile {k}'s max "
                                f"shapes; the volume of a tensor must be less than 2^31 elements)")
                    return None
                acts.append(activation_bytes(network.fake_onnx, prof))
            w = weights_bytes(network.fake_onnx)
            flags = set(config.fake_flags)
            stripped = "STRIP_PLAN" in flags and bool({"REFIT", "REFIT_IDENTICAL"} & flags)
            workspace = int(config.fake_pools.get("WORKSPACE", 0))
            own = w + max(max(acts) + workspace, 0 if stripped else w)      # what TensorRT itself allocates
            peak = w + own                                                 # + the parser's copy
            self.fake_peak_bytes = peak
            budget = config.fake_pools.get("TACTIC_DRAM")
            if budget is not None and own > budget:
                self._error(f"Error Code 2: OutOfMemory (the build needs {own} bytes, more than the TACTIC_DRAM "
                            f"pool's {budget})")
                return None
            if cudart is not None and getattr(cudart, "limit", None) is not None:
                held = cudart.used()                                    # allocations and TensorRT's reservations
                cudart.peak = max(cudart.peak, held + peak)
                if held + peak > cudart.limit:
                    self._error(f"Error Code 2: OutOfMemory (Requested size was {peak} bytes; {cudart.limit - held} "
                                "bytes free)")
                    return None
            if config.fake_cache is not None and not config.fake_cache.fake_blob:
                config.fake_cache = ITimingCache(b"cache:" + version.encode())
            spec = {"onnx": network.fake_onnx, "profiles": profiles, "perturb": {}, "activation_bytes": acts,
                    "weights_bytes": w, "stripped": stripped, "flags": sorted(flags), "tensorrt_version": version}
            return bytearray(json.dumps(spec).encode())

    for cls in (ITensor, INetworkDefinition, ParserError, OnnxParser, ITimingCache, IBuilderConfig,
                IOptimizationProfile, Builder):
        setattr(trt, cls.__name__, cls)
