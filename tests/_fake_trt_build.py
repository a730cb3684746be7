"""The builder half of the TensorRT stand-in (``_fake_trt.py``): Builder, OnnxParser, IBuilderConfig, profiles and
timing caches, recording what the builder asked for in ``fake_*`` attributes. Split out to keep each file short;
the same name rules apply (``tests/test_trt_api_names.py``)."""
from __future__ import annotations

from _fake_trt import _PybindEnum


def builder_api(trt, version: str, major: int, build_fails: bool) -> None:
    """Builder, OnnxParser, IBuilderConfig, ... : records what the builder asked for (``fake_*`` attributes)."""
    trt.NetworkDefinitionCreationFlag = _PybindEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1})
    flags = {"TF32": 7, "REFIT": 3} | ({"FP16": 0, "INT8": 1} if major < 11 else {})   # 11 removed FP16/INT8
    trt.BuilderFlag = _PybindEnum("BuilderFlag", flags)
    trt.MemoryPoolType = _PybindEnum("MemoryPoolType", {"WORKSPACE": 0})

    class ITensor:
        def __init__(self, name, shape):
            self._name, self._shape = name, shape

        name = property(lambda self: self._name)
        shape = property(lambda self: self._shape)

    class INetworkDefinition:
        def __init__(self, flags):
            self.fake_flags, self.fake_inputs = flags, []

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

            m = onnx.load(model)
            for vi in m.graph.input:
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)
                self._network.fake_inputs.append(ITensor(vi.name, dims))
            self._errors = [ParserError(n.name, n.op_type, "unsupported operator") for n in m.graph.node
                            if n.op_type == "Multinomial"]
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
            Builder.fake_last = self

        def create_network(self, flags):
            self.fake_network = INetworkDefinition(flags)
            return self.fake_network

        def create_builder_config(self):
            self.fake_config = IBuilderConfig()
            return self.fake_config

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            if config.progress_monitor is not None:
                config.progress_monitor.phase_start("Building engine", None, 2)
            if build_fails:
                self._logger.log(trt.ILogger.Severity.ERROR, "out of workspace for layer mm")
                return None
            if config.fake_cache is not None and not config.fake_cache.fake_blob:
                config.fake_cache = ITimingCache(b"cache:" + version.encode())
            return bytearray(b"PLAN " + repr(sorted(config.fake_flags)).encode())

    for cls in (ITensor, INetworkDefinition, ParserError, OnnxParser, ITimingCache, IBuilderConfig,
                IOptimizationProfile, Builder):
        setattr(trt, cls.__name__, cls)
