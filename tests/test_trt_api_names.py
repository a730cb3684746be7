"""The stand-in for TensorRT and cuda-python offers only names the real bindings have.

The real bindings cannot be imported here (TensorRT's libraries come from NVIDIA's index or JetPack, not
PyPI), so ``scripts/trt_api_names.py`` read the names out of the PyPI wheels once: the TensorRT 10.3.0
(JetPack 6) and 11.4.0.106 bindings, cuda-python 12.6.2.post1 (JetPack 6's CUDA) and cuda-bindings 13.0.3
(CUDA 13, JetPack 7). The lists live in tests/data/api_names/ with their source and wheel hash.

* Every public class, method, property, method argument and enum member of the stand-in built for TensorRT
  10 and for TensorRT 11 is in that version's list, and every ``cuda*`` name of the cuda-python stand-in in
  both cuda lists. The backend and the builder run against the stand-in in the other tests, so what they
  use there exists in the real bindings (a flat name check: which class holds a name is not recorded).
* Every ``trt.<name>...`` chain the backend and builder spell, and every CUDA function they call by name,
  is in the lists (TensorRT-10-only names such as ``BuilderFlag.FP16`` only in 10.3's, and not in 11.4's).
"""
from __future__ import annotations

import ast
import enum
import inspect
import json
import re
from pathlib import Path

import pytest

from _fake_trt import FakeCudart, fake_tensorrt

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "api_names"
TRT = {"10.3.0.30": "tensorrt-cu12-bindings-10.3.0", "11.4.0.106": "tensorrt-cu12-bindings-11.4.0.106"}
CUDA = ["cuda-python-12.6.2.post1", "cuda-bindings-13.0.3"]
TRT10_ONLY = {"FP16"}                                  # BuilderFlag.FP16: removed in TensorRT 11
# the modules that talk to TensorRT and cuda-python
USERS = ["runtime/backends/trt.py", "runtime/backends/cuda.py", "runtime/backends/trt_build.py", "runtime/build.py"]


def names(list_name: str) -> set[str]:
    data = json.loads((DATA / f"{list_name}.json").read_text())
    assert data["generated_by"] == "scripts/trt_api_names.py" and data["names"], list_name
    return set(data["names"])


def public_api(obj, is_cuda: bool = False) -> set[str]:
    """Public names the stand-in offers on ``obj`` (a module or class), recursively, with method arguments."""
    out, seen = set(), set()

    def visit(o):
        if id(o) in seen:
            return
        seen.add(id(o))
        items = vars(o).items() if isinstance(o, (type, type(enum))) else []
        if isinstance(o, type) and issubclass(o, enum.Enum):
            out.update(o.__members__)
            return
        for k, v in items:
            if k.startswith("_") or k.startswith("fake_") or (is_cuda and not k.startswith("cuda")):
                continue
            out.add(k)
            if isinstance(v, type):
                visit(v)
            elif callable(v):
                out.update(p for p in list(inspect.signature(v).parameters)[1:] if p != "self")

    visit(obj)
    return out


@pytest.mark.parametrize("version", sorted(TRT))
def test_tensorrt_standin_offers_only_real_names(version):
    real = names(TRT[version])
    offered = public_api(fake_tensorrt(FakeCudart(), version)) - {"__version__"}
    assert {"IExecutionContext", "execute_async_v3", "set_optimization_profile_async", "Builder", "OnnxParser",
            "BuilderFlag", "STRONGLY_TYPED", "nptype", "stream_handle"} <= offered      # the walk sees the API
    assert sorted(offered - real) == [], f"not in the TensorRT {version} bindings ({TRT[version]}.json)"


def test_cuda_standin_offers_only_real_names():
    offered = public_api(FakeCudart, is_cuda=True)
    assert {"cudaMemcpyAsync", "cudaMemcpyDeviceToHost", "cudaStreamSynchronize", "count", "devPtr"} <= offered
    for lst in CUDA:
        assert sorted(offered - names(lst)) == [], f"not in {lst}.json"


def _sources():
    return {p: (ROOT / p).read_text() for p in USERS if (ROOT / p).is_file()}


def test_backend_and_builder_spell_only_real_names():
    trt10, trt11 = names(TRT["10.3.0.30"]), names(TRT["11.4.0.106"])
    chains, cuda_calls, props = set(), set(), set()
    for path, src in _sources().items():
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Attribute):
                parts, n = [], node
                while isinstance(n, ast.Attribute):
                    parts.append(n.attr)
                    n = n.value
                if isinstance(n, ast.Name) and n.id == "trt":
                    chains.add(tuple(reversed(parts)))
                if isinstance(node.value, ast.Name) and node.value.id == "prop":   # cudaGetDeviceProperties' result
                    props.add(node.attr)
                if node.attr.startswith("cuda") and isinstance(node.value, ast.Name) and node.value.id == "kinds":
                    cuda_calls.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and \
                    re.fullmatch(r"cuda[A-Z]\w+", node.value):
                cuda_calls.add(node.value)                              # call("cudaMalloc", ...)
    used = {p for c in chains for p in c} - {"__version__"}
    assert {"Runtime", "TensorIOMode", "NetworkDefinitionCreationFlag", "FP16"} <= used, sorted(used)
    assert sorted(used - trt10) == [], "not in the TensorRT 10.3 bindings"
    assert sorted(used - TRT10_ONLY - trt11) == [], "not in the TensorRT 11.4 bindings"
    assert TRT10_ONLY.isdisjoint(trt11), "TensorRT 11 has these after all: the builder's version gate is stale"
    assert {"cudaMalloc", "cudaMemcpyAsync", "cudaMemcpyHostToDevice", "cudaGetDeviceProperties"} <= cuda_calls
    assert props == {"name", "major", "minor", "multiProcessorCount", "totalGlobalMem"}, props
    for lst in CUDA:
        assert sorted((cuda_calls | props) - names(lst)) == [], f"not in {lst}.json"


def test_name_lists_tell_versions_apart():
    """The lists are specific enough to fail: names TensorRT removed are absent where they are gone."""
    t10, t11 = names(TRT["10.3.0.30"]), names(TRT["11.4.0.106"])
    assert "EXPLICIT_BATCH" in t10 and "EXPLICIT_BATCH" not in t11            # removed in 11
    assert "execute_async_v2" not in t10 | t11                                  # removed in 10
    assert "FP4" in t11 and "FP4" not in t10                                    # DataType.FP4 came in 10.8
    for name in (*TRT.values(), *CUDA):
        data = json.loads((DATA / f"{name}.json").read_text())
        dist, version = name.rsplit("-", 1)
        assert f"pip download --no-deps {dist}=={version}" in data["source"] and len(data["wheel_sha256"]) == 64
