"""The TensorRT/CUDA stand-in behaves like a GPU where the backend could get it wrong, and the backend's error
paths run on TensorRT's real ``False``/``None`` returns.

Part one checks the stand-in itself (tests/_fake_trt.py): stream-ordered copies and executions, garbage in
fresh memory, page-locked host memory for asynchronous copies, overlapping bindings refused. Part two runs
the TensorRT backend (safeclip.runtime.backends.trt) against it: the decoder reads its logits only after the
stream is synchronised, each call's uploads are ordered before its execution on one stream, and every
refusal TensorRT can answer with becomes a one-line ``BackendError`` naming the plan.
"""
from __future__ import annotations


import numpy as np
import pytest

from _fake_trt import GARBAGE, FakeCudart, install_fakes, write_plan
from safeclip.runtime.backends.cuda import CudaRuntime
from safeclip.runtime.backends.ort import BackendError
from safeclip.runtime.backends.trt import TrtDecoder, TrtVisionSession
from safeclip.runtime.graph_spec import KVSpec
from safeclip.runtime.backends.ort import OrtDecoder
from safeclip.runtime.manifest import load_manifest


@pytest.fixture
def fakes(monkeypatch):
    """Fake tensorrt + cuda-python installed in sys.modules (as a JetPack 6 Orin would have them)."""
    return install_fakes(monkeypatch, "10.3.0.30")


# -- the stand-in: what a GPU does -----------------------------------------------------------------------

def test_copies_take_effect_in_stream_order_and_only_after_the_sync():
    rt = CudaRuntime(FakeCudart())
    x, y = rt.host_array(64, np.float32), rt.host_array(64, np.float32)
    assert (x.view(np.uint8) == GARBAGE).all()                      # fresh memory is not zeroed
    x[:] = np.arange(64)
    s, d = rt.stream(), rt.malloc(x.nbytes)
    rt.h2d(d, x, x.nbytes, s)
    x[:] = -1                                                        # the host writes before the copy ran
    rt.d2h(y, d, y.nbytes, s)
    assert (y.view(np.uint8) == GARBAGE).all(), "a device-to-host copy was visible before the stream sync"
    rt.sync(s)
    assert (y == -1).all(), "the upload read the host buffer before the stream ran it"
    other = rt.stream()                                             # work on another stream is not ordered
    x[:] = 7
    rt.h2d(d, x, x.nbytes, other)
    rt.d2h(y, d, y.nbytes, s)
    rt.sync(s)
    assert (y == -1).all(), "a copy on another stream took effect without that stream's sync"
    rt.sync(other)
    rt.d2h(y, d, y.nbytes, s)
    rt.sync(s)
    assert (y == 7).all()
    rt.h2d(d, x, x.nbytes, s)
    rt.release()                                                     # cudaFree finishes queued work first
    assert rt.rt.blocks == {} and not any(st.pending for st in rt.rt.streams)


def test_async_copies_need_page_locked_host_memory_and_live_streams():
    rt = CudaRuntime(FakeCudart())
    s, d = rt.stream(), rt.malloc(256)
    with pytest.raises(AssertionError, match="not inside one page-locked host \\(cudaMallocHost\\) allocation"):
        rt.h2d(d, np.zeros(64, np.float32), 256, s)                  # pageable numpy memory
    with pytest.raises(AssertionError, match="not inside one device \\(cudaMalloc\\) allocation"):
        rt.d2h(rt.host_array(128, np.float32), d, 512, s)           # past the end of the device block
    rt.destroy_stream(s)
    with pytest.raises(BackendError, match="CUDA cudaMemcpyAsync failed: invalid resource handle"):
        rt.d2d(d, d, 0, s)
    rt.release()


def small_plan(tmp_path, elem=None, dims=("B", 4)):
    """y = x + 1 on [B, 4] (float32, or the ONNX element type ``elem``), as a fake plan with one profile."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    t = elem or TensorProto.FLOAT
    one = numpy_helper.from_array(np.ones((1,), np.float32), "one")
    g = helper.make_graph([helper.make_node("Add", ["x", "one"], ["y"])] if elem is None else
                          [helper.make_node("Identity", ["x"], ["y"])], "small",
                          [helper.make_tensor_value_info("x", t, list(dims))],
                          [helper.make_tensor_value_info("y", t, list(dims))], [one] if elem is None else [])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "small.onnx")
    prof = [{"x": {"min": [1, 4], "opt": [2, 4], "max": [4, 4]}}]
    return write_plan(tmp_path / "small.onnx", tmp_path / "small.plan", prof)


def test_execute_refuses_overlapping_bindings_and_returns_false_for_missing_ones(fakes, tmp_path):
    trt, rt = fakes
    cuda = CudaRuntime(rt)
    ctx = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
        small_plan(tmp_path).read_bytes()).create_execution_context()
    s = cuda.stream()
    a = cuda.malloc(1024)
    assert ctx.set_input_shape("x", (2, 4)) and not ctx.set_input_shape("y", (2, 4))   # y is an output
    assert not ctx.set_input_shape("x", (5, 4))                      # outside the profile: False, not raised
    assert not ctx.set_tensor_address("x", a + 8)                    # not 256-byte aligned
    assert ctx.set_tensor_address("x", a) and not ctx.execute_async_v3(int(s))    # y has no address
    assert ctx.set_tensor_address("y", a)                            # x's own buffer: in place
    with pytest.raises(AssertionError, match="output 'y' .* overlaps 'x'.*the kernels would overwrite what they read"):
        ctx.execute_async_v3(int(s))
    assert ctx.set_tensor_address("y", a + 256) and ctx.execute_async_v3(int(s))
    assert ctx.set_optimization_profile_async(0, int(s))
    with pytest.raises(RuntimeError, match="Error in set optimization profile async"):   # raised, not False
        ctx.set_optimization_profile_async(1, int(s))                # (pyCore.cpp, TensorRT 10.3 to 11.1)
    assert not ctx.execute_async_v3(int(s))                          # the switch forgot x's shape
    cuda.release()


# -- the backend's error paths on TensorRT's refusals ---------------------------------------------------------

@pytest.fixture(scope="module")
def decoder_plan(tmp_path_factory, demo_bundle_traced):
    from safeclip.export.bundle import build_plan
    from safeclip.export.targets import TARGETS
    m = load_manifest(demo_bundle_traced)
    plan = build_plan(TARGETS["jetson"], m.graphs, m.model)
    d = tmp_path_factory.mktemp("standin_plans")
    return m, write_plan(demo_bundle_traced / "decoder.onnx", d / "decoder.plan", plan["decoder"]["profiles"])


@pytest.mark.parametrize("fault, step, message", [
    ("create_execution_context", "load", "could not create an execution context for decoder.plan"),
    ("set_optimization_profile_async", "decode", "TensorRT refused to switch decoder.plan to profile 1"),
    ("set_input_shape", "prefill", "TensorRT rejected shape \\[1, 3, 64\\] for 'inputs_embeds' in profile 0"),
    ("set_tensor_address", "prefill", "TensorRT rejected the address for 'inputs_embeds'"),
    ("execute_async_v3", "prefill", "TensorRT execution of decoder.plan failed"),
])
def test_decoder_turns_tensorrt_refusals_into_backend_errors(fakes, decoder_plan, fault, step, message):
    trt, rt = fakes
    m, plan = decoder_plan
    kv = KVSpec.from_manifest(m.graphs["decoder"]["kv"])
    if step == "load":
        trt.fake_faults.add(fault)
        with pytest.raises(BackendError, match=message):
            TrtDecoder(plan, kv, capacity=16)
        return
    dec = TrtDecoder(plan, kv, capacity=16)
    x = np.zeros((3, dec.hidden_size), np.float32)
    if step == "decode":
        dec.prefill(x)
    trt.fake_faults.add(fault)
    with pytest.raises(BackendError, match=message):
        dec.prefill(x) if step == "prefill" else dec.decode_one_token(x[0])
    dec.close()
    assert rt.blocks == {}


def test_unloadable_plans_and_types_numpy_lacks_are_refused(fakes, tmp_path):
    from onnx import TensorProto
    (tmp_path / "junk.plan").write_bytes(b"\x00\x01 not a plan")
    with pytest.raises(BackendError, match="TensorRT could not deserialize junk.plan .*rebuild it on this device"):
        TrtVisionSession(tmp_path / "junk.plan")
    with pytest.raises(BackendError, match="TensorRT type DataType.BF16 has no numpy equivalent"):
        TrtVisionSession(small_plan(tmp_path, elem=TensorProto.BFLOAT16))
    s = TrtVisionSession(small_plan(tmp_path))                      # the same graph in float32 runs
    y = s.run({"x": np.arange(8, dtype=np.float32).reshape(2, 4)})["y"]
    assert (y == np.arange(1, 9).reshape(2, 4)).all(), f"x + 1 came back as {y.ravel()[:4]}..."
    s.close()


# -- the backend keeps to stream order -----------------------------------------------------------------------

def test_decoder_results_are_stream_ordered(fakes, decoder_plan):
    """Every logits vector TrtDecoder returns is what OrtDecoder computes, with the stand-in holding each copy
    and execution until the stream is synchronised: a missing sync, or an upload on a stream the execution
    does not wait for, returns stale or garbage logits here as on a GPU."""
    trt, rt = fakes
    m, plan = decoder_plan
    kv = KVSpec.from_manifest(m.graphs["decoder"]["kv"])
    table = np.load(m.path(m.data["embeddings"]["file"]))
    ref, dec = OrtDecoder(m.path("decoder.onnx"), kv, capacity=16), TrtDecoder(plan, kv, capacity=16)
    prompt = table[[3, 1, 4, 1, 5]]
    a, b = ref.prefill(prompt), dec.prefill(prompt).copy()
    assert np.allclose(a, b, atol=1e-5), f"prefill logits differ from OrtDecoder by {np.abs(a - b).max():.3g}"
    for step in range(4):
        tok = int(np.argmax(a))
        a, b = ref.decode_one_token(table[tok]), dec.decode_one_token(table[tok]).copy()
        assert np.allclose(a, b, atol=1e-5), \
            f"decode step {step + 1}: logits differ from OrtDecoder by {np.abs(a - b).max():.3g}"
    assert not any(s.pending for s in rt.streams), "work left queued on a stream after a call returned"
    dec.close()


def test_named_dimensions_must_agree_at_execution(fakes, tmp_path):
    """NvInfer.h ``ITensor::setDimensionName``: "Dimensions with the same non-empty name must be equal at runtime"
    (onnx-tensorrt names them by the ONNX ``dim_param``): two inputs sharing "batch" with different values fail."""
    import onnx
    from onnx import TensorProto, helper

    trt, rt = fakes
    cuda = CudaRuntime(rt)
    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "two",
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in "ab"],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "two.onnx")
    prof = [{n: {"min": [1, 4], "opt": [2, 4], "max": [4, 4]} for n in "ab"}]
    plan = write_plan(tmp_path / "two.onnx", tmp_path / "two.plan", prof)
    ctx = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes()) \
        .create_execution_context()
    s, buf = cuda.stream(), cuda.malloc(3 * 256)
    for i, n in enumerate("aby"):
        assert ctx.set_tensor_address(n, buf + 256 * i)
    assert ctx.set_input_shape("a", (2, 4)) and ctx.set_input_shape("b", (3, 4))    # each inside the profile
    assert not ctx.execute_async_v3(int(s))                                          # but "batch" disagrees
    assert ctx.set_input_shape("b", (2, 4)) and ctx.execute_async_v3(int(s))
    cuda.sync(s)
    cuda.release()


def test_device_memory_counts_weights_and_context_memory_by_strategy(fakes, tmp_path):
    """An engine's weights and its context's activation memory live in device memory (on a Jetson, the shared
    DRAM): deserializing past the limit returns None, and each allocation strategy holds what TensorRT's does."""
    trt, rt = fakes
    S = trt.ExecutionContextAllocationStrategy
    assert (int(S.STATIC), int(S.ON_PROFILE_CHANGE), int(S.USER_MANAGED)) == (0, 1, 2)   # NvInferRuntime.h
    prof = [{"x": {"min": [1, 4], "opt": [1, 4], "max": [1, 4]}}, {"x": {"min": [1, 4], "opt": [4, 4], "max": [4, 4]}}]
    small_plan(tmp_path)
    plan = write_plan(tmp_path / "small.onnx", tmp_path / "mem.plan", prof, activation_bytes=[1000, 5000],
                      weights_bytes=1 << 20)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    rt.limit = (1 << 20) - 1
    assert runtime.deserialize_cuda_engine(plan.read_bytes()) is None          # the weights do not fit
    rt.limit = None
    eng = runtime.deserialize_cuda_engine(plan.read_bytes())
    assert sum(rt.reserved.values()) == 1 << 20
    assert (eng.get_device_memory_size_for_profile_v2(0), eng.device_memory_size_v2) == (1000, 5000)
    static = eng.create_execution_context()                                     # the default: the maximum, always
    assert sum(rt.reserved.values()) == (1 << 20) + 5000
    del static
    ctx = eng.create_execution_context(S.ON_PROFILE_CHANGE)
    assert sum(rt.reserved.values()) == (1 << 20) + 1000
    s = rt.cudaStreamCreate()[1]
    ctx.set_optimization_profile_async(1, int(s))
    assert sum(rt.reserved.values()) == (1 << 20) + 5000
    ctx.set_optimization_profile_async(0, int(s))
    assert sum(rt.reserved.values()) == (1 << 20) + 1000
    rt.limit = rt.used() + 3000                                                  # profile 1 no longer fits
    with pytest.raises(RuntimeError, match="Error in set optimization profile async"):
        ctx.set_optimization_profile_async(1, int(s))
    rt.limit = None
    del ctx
    user = eng.create_execution_context(S.USER_MANAGED)
    assert sum(rt.reserved.values()) == 1 << 20 and user.update_device_memory_size_for_shapes() == 1000
