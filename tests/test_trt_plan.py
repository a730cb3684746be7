"""Runtime-side TensorRT plan logic: version/GPU refusal, profile choice, KV buffer sizing (no GPU needed)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from safeclip.runtime.backends.ort import BackendError
from safeclip.runtime.backends.trt_plan import (
    PlanMismatchError, ProfileSelectionError, check_plan_compatible, select_profile)

ORIN = {"tensorrt_version": "10.3.0.30", "compute_capability": "8.7", "gpu_name": "Orin", "sm_count": "16",
        "memory_class_gib": "64"}                               # an AGX Orin 64GB


def plan(**over):
    return {"file": "decoder.plan", **ORIN, **over}


def test_same_device_passes():
    check_plan_compatible(plan(), dict(ORIN))
    check_plan_compatible(plan(gpu_name=" Orin "), ORIN)        # surrounding whitespace is not a difference


@pytest.mark.parametrize("key,value,label", [
    ("tensorrt_version", "10.3.0.26", "TensorRT 10.3.0.26 (plan) vs 10.3.0.30"),   # build number differs
    ("tensorrt_version", "10.16.0.72", "TensorRT 10.16.0.72 (plan)"),
    ("compute_capability", "9.0", "compute capability 9.0 (plan) vs 8.7"),
    ("gpu_name", "NVIDIA H100 80GB HBM3", "GPU NVIDIA H100 80GB HBM3 (plan) vs Orin"),
    # every Orin module's GPU is "Orin" 8.7: an Orin NX 16GB plan (8 SMs) on an AGX Orin 64GB (16 SMs)
    ("sm_count", "8", "SMs 8 (plan) vs 16"),
    ("memory_class_gib", "16", "memory class (GiB) 16 (plan) vs 64"),
])
def test_mismatch_refused_with_rebuild_command(key, value, label):
    with pytest.raises(PlanMismatchError) as e:
        check_plan_compatible(plan(**{key: value}), ORIN, bundle="engines/llava")
    msg = str(e.value)
    assert label in msg and "safeclip-build --bundle engines/llava" in msg and "\n" not in msg
    assert msg.startswith("decoder.plan was built for another setup")
    assert isinstance(e.value, BackendError)


def test_every_difference_is_listed_and_missing_facts_refused():
    other = {"tensorrt_version": "11.4.0.106", "compute_capability": "10.0", "gpu_name": "B200", "sm_count": "148",
             "memory_class_gib": "256"}
    with pytest.raises(PlanMismatchError) as e:
        check_plan_compatible(plan(**other), ORIN)
    assert str(e.value).count(" (plan) vs ") == 5
    with pytest.raises(PlanMismatchError, match="does not record sm_count, memory_class_gib"):
        check_plan_compatible({k: v for k, v in plan().items() if k not in ("sm_count", "memory_class_gib")}, ORIN)
    with pytest.raises(PlanMismatchError, match="does not record gpu_name.*safeclip-build --bundle DIR"):
        check_plan_compatible({k: v for k, v in plan().items() if k != "gpu_name"}, ORIN)
    with pytest.raises(ValueError, match="device facts lack 'gpu_name'"):
        check_plan_compatible(plan(), {k: v for k, v in ORIN.items() if k != "gpu_name"})


# two decoder profiles over input_ids [batch, seq] and the cache length, as the exporter writes them
PREFILL = {"input_ids": {"min": [1, 1], "opt": [1, 512], "max": [1, 2048]},
           "past_len": {"min": [1], "opt": [1], "max": [1]}}
DECODE = {"input_ids": {"min": [1, 1], "opt": [1, 1], "max": [1, 1]},
          "past_len": {"min": [1], "opt": [1], "max": [1]}}


def test_select_profile_prefers_nearest_opt():
    profiles = [PREFILL, DECODE]
    assert select_profile(profiles, {"input_ids": (1, 1), "past_len": (1,)}) == 1     # decode step
    assert select_profile(profiles, {"input_ids": (1, 300), "past_len": (1,)}) == 0   # prompt
    assert select_profile(profiles[::-1], {"input_ids": (1, 1), "past_len": (1,)}) == 0
    # a profile identical to another ties: the lower index wins
    assert select_profile([DECODE, DECODE], {"input_ids": [1, 1], "past_len": [1]}) == 0


def test_select_profile_errors():
    with pytest.raises(ProfileSelectionError, match=r"no optimization profile covers input_ids \[1, 4096\]"):
        select_profile([PREFILL, DECODE], {"input_ids": (1, 4096), "past_len": (1,)})
    with pytest.raises(ProfileSelectionError):
        select_profile([PREFILL], {"input_ids": (1, 5, 1), "past_len": (1,)})          # wrong rank
    with pytest.raises(ValueError, match="shapes for \\['past_len'\\]"):
        select_profile([PREFILL], {"input_ids": (1, 5)})
    with pytest.raises(ValueError, match="not in profile 0"):
        select_profile([PREFILL], {"input_ids": (1, 5), "past_len": (1,), "pixel_values": (1, 3, 336, 336)})
    with pytest.raises(ProfileSelectionError, match="no optimization profiles"):
        select_profile([], {"input_ids": (1, 5)})


def test_module_imports_no_tensorrt_torch_or_exporter():
    banned = ("tensorrt", "torch", "transformers", "onnx", "safeclip.export", "cuda")
    code = ("import sys; import safeclip.runtime.backends.trt_plan; "
            f"bad = [m for m in {banned!r} if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
