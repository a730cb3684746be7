"""Tensor sizes of an ONNX graph at given input shapes, for the TensorRT stand-in (``_fake_trt*.py``).

Two questions real TensorRT answers from a network at an optimization profile's max shapes, and the stand-in
must answer the same way to fail where a device would:

* :func:`tensor_volumes`: the element count of every tensor (network inputs, intermediates, outputs).
  TensorRT refuses a network where any tensor's volume reaches 2^31 at a profile's max shapes (``NvInfer.h``,
  release/10.3 and release/11.x: "the volume of the tensor must be less than 2^31 elements").
* :func:`activation_bytes`: the stand-in's model of an engine's *context memory* for one profile
  (``ICudaEngine.get_device_memory_size_for_profile``; what ``create_execution_context`` allocates under the
  default ``ExecutionContextAllocationStrategy.STATIC``, the maximum over all profiles). TensorRT's allocator
  reuses the memory of tensors that are dead, so its context memory is about the most activation bytes alive at
  one time. The model: walk the nodes in graph (topological) order; a tensor is alive from the node that makes
  it to its last reader; count intermediates only (network inputs and outputs live in memory the caller binds,
  weights are in the engine; ``Constant`` outputs are folded into weights, as TensorRT's constant folding does).
  The peak of the live sum over the walk is the answer. Real TensorRT fuses elementwise chains (fewer live
  tensors) and adds tactic scratch (more): the model is an estimate of the same order, and what matters for the
  tests is that it grows with the profile exactly as TensorRT's does (the [B, H, S, P+S] attention scores
  dominate a long prefill).

Shapes come from ONNX Runtime's symbolic shape inference (``onnxruntime.tools.symbolic_shape_infer``) run on
the graph loaded *without* its external data: initializers stored outside the file become network inputs of
their declared shape for the inference (their values never decide a shape in the graphs we export), so a 7B
decoder is sized without reading its weights.
"""
from __future__ import annotations

from pathlib import Path

LIMIT = 1 << 31                                   # NvInfer.h: a tensor's volume must be < 2^31 elements


def _itembits(elem_type: int) -> int:
    import onnx
    from onnx import helper

    if elem_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return 4
    return helper.tensor_dtype_to_np_dtype(elem_type).itemsize * 8


def _inferred(onnx_path, input_shapes: dict):
    """(model with every tensor's shape inferred at ``input_shapes``, names of the external-data initializers)."""
    import onnx
    from onnx import helper
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(onnx_path), load_external_data=False)
    g = model.graph
    ext = [t for t in g.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inputs = {vi.name for vi in g.input} - {t.name for t in g.initializer}
    if set(input_shapes) - inputs:
        raise ValueError(f"{Path(onnx_path).name}: shapes given for {sorted(set(input_shapes) - inputs)}, "
                         f"which are not network inputs {sorted(inputs)}")
    for vi in g.input:
        if vi.name not in inputs:
            continue
        dims = vi.type.tensor_type.shape.dim
        shape = input_shapes.get(vi.name)
        if shape is None:
            if any(not d.HasField("dim_value") for d in dims):
                raise ValueError(f"{Path(onnx_path).name}: no shape given for dynamic input '{vi.name}'")
            continue
        if len(shape) != len(dims) or any(d.HasField("dim_value") and d.dim_value != s for d, s in zip(dims, shape)):
            raise ValueError(f"{Path(onnx_path).name}: shape {tuple(shape)} does not fit input '{vi.name}'")
        for d, s in zip(dims, shape):
            d.ClearField("dim_param")
            d.dim_value = int(s)
    ext_names = {t.name for t in ext}
    keep = [t for t in g.initializer if t.name not in ext_names]
    del g.initializer[:]
    g.initializer.extend(keep)
    g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in ext)
    try:
        return SymbolicShapeInference.infer_shapes(model, auto_merge=False), ext_names
    except Exception:       # ORT's symbolic inference stops on some graphs (the vision tower's MatMul after a Where)
        from onnx import shape_inference
        return shape_inference.infer_shapes(model, strict_mode=True, data_prop=True), ext_names


def _typed_shapes(model) -> dict[str, tuple[int, tuple[int, ...]]]:
    """{tensor: (ONNX element type, dims)} for every typed tensor the inference left in ``model``."""
    g = model.graph
    out = {}
    for vi in (*g.input, *g.value_info, *g.output):
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim)
        if any(isinstance(d, str) or d < 0 for d in dims):
            raise ValueError(f"shape inference left '{vi.name}' with unknown dims {dims}")
        out[vi.name] = (tt.elem_type, dims)
    return out


def _volume(dims) -> int:
    v = 1
    for d in dims:
        v *= int(d)
    return v


def tensor_volumes(onnx_path, input_shapes: dict) -> dict[str, int]:
    """{tensor: elements} for every network input, intermediate and output tensor of the graph at
    ``input_shapes`` ({input name: shape}; static inputs may be left out). Weights are not included."""
    model, ext = _inferred(onnx_path, input_shapes)
    weights = ext | {t.name for t in model.graph.initializer}
    return {n: _volume(dims) for n, (_, dims) in _typed_shapes(model).items() if n not in weights}


def max_shapes(profile: dict) -> dict[str, tuple[int, ...]]:
    """A profile's max shapes: ``{name: {"min", "opt", "max"}}`` -> ``{name: max}``."""
    return {n: tuple(int(v) for v in p["max"]) for n, p in profile.items()}


def activation_bytes(onnx_path, profile: dict) -> int:
    """The stand-in's context memory for one optimization profile, in bytes: the largest sum of intermediate
    tensors alive at once at the profile's max shapes (the model in the module docstring)."""
    model, ext = _inferred(onnx_path, max_shapes(profile))
    g = model.graph
    typed = _typed_shapes(model)
    bound = {vi.name for vi in (*g.input, *g.output)} | ext | {t.name for t in g.initializer}
    folded = {o for n in g.node if n.op_type == "Constant" for o in n.output}
    last_use = {}
    for i, node in enumerate(g.node):
        for name in node.input:
            last_use[name] = i

    def size(name):
        et, dims = typed[name]
        return -(-_volume(dims) * _itembits(et) // 8)

    live, peak = {}, 0
    for i, node in enumerate(g.node):
        for name in node.output:
            if name and name not in bound and name not in folded and name in typed:
                live[name] = size(name)
        peak = max(peak, sum(live.values()))
        for name in [n for n in live if last_use.get(n, i) <= i]:   # dead after this node (unread: dead now)
            del live[name]
    return peak


def weights_bytes(onnx_path) -> int:
    """Bytes of every initializer (inline or external) and Constant tensor, read from the graph's headers only:
    what an engine built from the graph holds as weights."""
    import onnx

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    tensors = list(g.initializer) + [a.t for n in g.node if n.op_type == "Constant" for a in n.attribute
                                     if a.name == "value"]
    return sum(-(-_volume(t.dims) * _itembits(t.data_type) // 8) for t in tensors)
