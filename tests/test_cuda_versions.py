"""cuda-python must match the CUDA driver (issue 22, 1.2): a CUDA 13 cuda-python (``pip install cuda-python``
today) cannot talk to JetPack 6's CUDA 12.6 driver. The runtime's backend choice and ``safeclip-build`` say in one
line what to install; the pyproject extras name the right release per JetPack."""
from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

from _fake_trt import FakeCudart, install_fakes
from safeclip.runtime.backends.cuda import CudaError, CudaRuntime, version_mismatch

ROOT = Path(__file__).resolve().parents[1]
JP6, CUDA13 = 12060, 13000


def test_version_rule():
    assert version_mismatch(JP6, JP6) is None and version_mismatch(13020, 13000) is None
    assert version_mismatch(13020, JP6) is None                      # a newer driver serves an older runtime
    assert version_mismatch(12020, JP6) is None                      # same major: minor-version compatibility
    why = version_mismatch(JP6, CUDA13)
    assert why == ("cuda-python links the CUDA 13.0 runtime but this machine's driver serves CUDA 12.6 at most: "
                   "pip install 'cuda-python>=12.6,<13' (safeclip-edge[jetpack6], JetPack 6.1/6.2)")
    assert "pip install 'cuda-python>=11,<12'" in version_mismatch(11080, JP6)
    assert version_mismatch(0, JP6).startswith("no CUDA driver found")


def test_device_facts_refuse_a_newer_major_runtime():
    with pytest.raises(CudaError, match=r"CUDA 13.0 runtime .* CUDA 12.6 at most: pip install 'cuda-python>=12.6,<13'"):
        CudaRuntime(FakeCudart(versions=(JP6, CUDA13))).device_facts()
    facts = CudaRuntime(FakeCudart(versions=(13020, CUDA13))).device_facts()
    assert facts["gpu_name"] == "Orin" and facts["compute_capability"] == "8.7"


def test_backend_choice_and_safeclip_build_say_what_to_install(monkeypatch, capsys, tmp_path):
    from safeclip.runtime.backends import trt_build
    from safeclip.runtime.backends.base import BackendError
    from safeclip.runtime.backends.pick import Probe, choose_backend

    install_fakes(monkeypatch, "10.3.0.30", versions=(JP6, CUDA13))
    with pytest.raises(trt_build.TensorRTUnavailable, match="pip install 'cuda-python>=12.6,<13'"):
        trt_build.device_key()
    m = {"target": "jetson", "graphs": {"decoder": {}}, "files": {"decoder.onnx": {}, "decoder.plan": {}},
         "build": {"plan": {"decoder": {}}, "engines": {"decoder": {"file": "decoder.plan", "gpu_name": "Orin",
                                                                    "tensorrt_version": "10.3.0.30",
                                                                    "compute_capability": "8.7"}}}}

    class OrtProbe(Probe):
        def ort_providers(self):
            return ["CPUExecutionProvider"]

    c = choose_backend(m, probe=OrtProbe())
    assert c.name == "onnxruntime-cpu" and "pip install 'cuda-python>=12.6,<13'" in c.notes[0]
    with pytest.raises(BackendError, match=r"^tensorrt backend unavailable: cuda-python links the CUDA 13.0"):
        choose_backend(m, "tensorrt", probe=OrtProbe())
    import safeclip.runtime.build as build_cli
    monkeypatch.setattr(build_cli, "load_manifest", lambda *a, **k: type("M", (), {
        "root": tmp_path, "signed_by": None, "data": {"files": {}, "build": {"plan": {"decoder": {}}}}})())
    monkeypatch.setattr(build_cli, "verify_files", lambda *a, **k: None)
    assert build_cli.main(["--bundle", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.fullmatch(r"safeclip-build: cuda-python links the CUDA 13\.0 runtime .*jetpack6.*", err)


def test_extras_name_cuda_python_per_jetpack():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["jetpack6"] == ["cuda-python>=12.6,<13"] and extras["jetpack7"] == ["cuda-python>=13,<14"]
    assert all(re.search(r"<\d", r) for r in extras["tensorrt"] if r.startswith("cuda-python")), extras["tensorrt"]
    readme = (ROOT / "README.md").read_text()
    assert "'cuda-python>=12'" not in readme
    assert "cuda-python>=12.6,<13" in readme and "cuda-python>=13,<14" in readme


def test_standin_device_properties_name_an_orin_module():
    """FakeCudart reports what runtime/devices.identify reads: SM count and total memory (AGX Orin 32GB here)."""
    from safeclip.runtime.devices import identify

    _, prop = FakeCudart(sm_count=14, total_bytes=int(30.6 * 2**30)).cudaGetDeviceProperties(0)
    assert [m.key for m in identify(prop.multiProcessorCount, prop.totalGlobalMem)] == ["agx-orin-32gb"]
