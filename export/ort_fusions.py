"""Graph rewrites for ONNX Runtime targets (``--target cpu``), applied to the traced decoder before its weights
are streamed: RMSNorm fused (:func:`fuse_rms_norm`) and wide float weights split into column chunks so that
loading a session does not hold one of them twice (:func:`split_wide_weights`).

torch.onnx writes Llama's RMSNorm (``w * x * rsqrt(mean(x^2) + eps)``) as seven nodes:
``Pow(x, 2) -> ReduceMean(axes=[-1], keepdims) -> Add(eps) -> Sqrt -> Reciprocal -> Mul(x, .) -> Mul(w, .)``.
ONNX Runtime's own ``SimplifiedLayerNormFusion`` looks for ``Sqrt -> Div`` and does not match the
``Reciprocal -> Mul`` form, so every decode step runs 7 x (2 x layers + 1) small kernels (315 at
TinyLlama's 22 layers). :func:`fuse_rms_norm` replaces each match by the one node that fusion would have
produced, ``SimplifiedLayerNormalization(x, w, axis=-1, epsilon, stash_type=1)`` (an ONNX Runtime operator
registered in the default domain; CPU and CUDA kernels), which computes the same expression in fp32.

Measured at TinyLlama-1.1B shape (int4 decoder, 2 threads; BENCHMARKS.md): profiled node time per decode
step 35.8 -> 31.4 ms; fp32 logits move by 5e-6. The exporter's parity gate runs on the fused graph.

Only for ONNX Runtime: TensorRT's ONNX parser does not know the operator, so TensorRT targets keep the
standard form (``trt_check`` would refuse it).
"""
from __future__ import annotations

import math

import numpy as np

from .quant import replace_output

__all__ = ["fuse_rms_norm", "RMS_NORM_OP", "split_wide_weights", "SPLIT_MAX_BYTES"]

RMS_NORM_OP = "SimplifiedLayerNormalization"


def _const(value) -> np.ndarray | None:
    """The constant array behind ``value`` (an initializer with a value, or a ``Constant`` node's output)."""
    if value is None:
        return None
    if value.const_value is not None:
        try:
            return np.asarray(value.const_value.numpy())
        except Exception:                                    # an external tensor not written yet: not a constant here
            return None
    p = value.producer()
    if p is not None and p.op_type == "Constant" and p.domain == "":
        attr = p.attributes.get("value")
        return None if attr is None else np.asarray(attr.value.numpy())
    return None


def _only_use(value, op_type: str):
    """The single node that consumes ``value`` if it is an ``op_type`` of the default domain, else None."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0][0]
    return node if node.op_type == op_type and node.domain == "" else None


def _other(node, value):
    """The input of the two-input ``node`` that is not ``value`` (None if both or neither are)."""
    a, b = node.inputs
    if a is value and b is not value:
        return b
    if b is value and a is not value:
        return a
    return None


def _match(pow_node):
    """``(x, w, eps, nodes, y)`` for one RMSNorm starting at ``pow_node``, or None."""
    if len(pow_node.inputs) != 2:
        return None
    x, e = pow_node.inputs
    ev = _const(e)
    if ev is None or ev.size != 1 or float(ev.reshape(())) != 2.0:
        return None
    rm = _only_use(pow_node.outputs[0], "ReduceMean")
    if rm is None or int(getattr(rm.attributes.get("keepdims"), "value", 1)) != 1:
        return None
    axes = _const(rm.inputs[1]) if len(rm.inputs) > 1 else None
    if axes is None:
        a = rm.attributes.get("axes")
        axes = None if a is None else np.asarray(a.value)
    rank = len(x.shape) if x.shape is not None else None
    if axes is None or axes.size != 1 or not (int(axes.reshape(())) == -1 or
                                              (rank is not None and int(axes.reshape(())) == rank - 1)):
        return None
    add = _only_use(rm.outputs[0], "Add")
    if add is None:
        return None
    epsv = _const(_other(add, rm.outputs[0]))
    if epsv is None or epsv.size != 1:
        return None
    sq = _only_use(add.outputs[0], "Sqrt")
    rc = None if sq is None else _only_use(sq.outputs[0], "Reciprocal")
    m1 = None if rc is None else _only_use(rc.outputs[0], "Mul")
    if m1 is None or _other(m1, rc.outputs[0]) is not x:
        return None
    m2 = _only_use(m1.outputs[0], "Mul")
    if m2 is None:
        return None
    w = _other(m2, m1.outputs[0])
    if w is None or w.shape is None or len(w.shape) != 1 or not w.is_initializer():
        return None
    if x.shape is not None and x.shape[-1] != w.shape[0]:
        return None
    return x, w, float(epsv.reshape(())), [pow_node, rm, add, sq, rc, m1, m2], m2.outputs[0]


def fuse_rms_norm(model) -> int:
    """Replace every RMSNorm of ``model`` (an ``onnx_ir`` model) by ``SimplifiedLayerNormalization``; returns
    how many. Constants left without a use (the exponent, eps, axes) are dropped from the initializers."""
    import onnx_ir as ir

    graph = model.graph
    found = [m for m in (_match(n) for n in list(graph) if n.op_type == "Pow" and n.domain == "") if m]
    dropped = set()
    for x, w, eps, nodes, _ in found:
        new = ir.Node("", RMS_NORM_OP, [x, w],
                      [ir.AttrInt64("axis", -1), ir.AttrFloat32("epsilon", eps), ir.AttrInt64("stash_type", 1)],
                      name=f"{nodes[-1].name or 'rms_norm'}_fused")
        graph.insert_before(nodes[0], new)
        dropped.update(v for node in nodes for v in node.inputs if v is not None and v.is_initializer())
        replace_output(graph, nodes[-1], new.outputs[0])
        for node in reversed(nodes[:-1]):
            graph.remove(node, safe=True)
    for v in dropped:
        if v.const_value is not None and not list(v.uses()) and v not in graph.outputs and v.name in graph.initializers:
            del graph.initializers[v.name]
    return len(found)


SPLIT_MAX_BYTES = 64 << 20     # no float MatMul weight of a cpu decoder is one initializer larger than this
SPLIT_ALIGN = 64               # chunk boundaries on multiples of 64 columns


def split_wide_weights(model, jobs: dict, read, max_bytes: int = SPLIT_MAX_BYTES,
                       graph_name: str = "decoder.onnx") -> tuple[dict, dict]:
    """Split every streamed float ``MatMul`` weight [K, N] larger than ``max_bytes`` into column chunks of at
    most that size (as wide as fits, on multiples of 64 columns; the last one narrower):
    ``MatMul(x, W)`` becomes ``Concat(MatMul(x, W_0), MatMul(x, W_1), ..., axis=-1)``.

    Why: ONNX Runtime memory-maps each external initializer, prepacks it into heap memory (MLAS's packed
    GEMM layout), and only then releases the mapping, one initializer at a time, so loading a session peaks
    at its steady memory plus the largest prepacked initializer. In a cpu decoder that is the fp32 ``lm_head``
    (TinyLlama: 262 MB, a quarter of the int4 bundle; llava-1.5-7b: 4096 x 32064 x 4 bytes = 525 MB). Measured with ONNX Runtime 1.32
    on a [2048, 32000] fp32 MatMul (2 threads): load peak 555 MB with one initializer, 368 MB with four
    chunks, 336 MB with eight, steady 305 MB in all three; per-call time 13.1-14.1 ms in all three and the
    outputs bit-identical (each output column is computed from the same column of W either way).

    ``jobs`` is :func:`~safeclip.export.onnx.onnx_from_meta_module`'s (init name -> (value, weight name,
    permutation)); weights already given to a graph pass (a callable source, e.g. a quantised layer) are left
    alone. ``read`` is the export's weight reader; each chunk is cut from the weight read once, when the first
    chunk is written, and the weight is dropped after the last (one weight in memory at a time).
    Returns the new jobs (chunks in the place of the weight they replace) and {weight name: chunk count}."""
    import onnx_ir as ir

    from .onnx import streamed_weight

    graph, out, split = model.graph, {}, {}
    for init_name, (value, source, perm) in jobs.items():
        uses = list(value.uses())
        size = int(value.dtype.itemsize) if value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16) else 0
        nbytes = size * math.prod(int(d) for d in value.shape) if value.shape else 0   # onnx_ir's itemsize: float
        if (callable(source) or nbytes <= max_bytes or len(value.shape) != 2 or not uses
                or any(u.op_type != "MatMul" or u.domain != "" or i != 1 for u, i in uses)):
            out[init_name] = (value, source, perm)
            continue
        k, n = (int(d) for d in value.shape)
        width = max(SPLIT_ALIGN, max_bytes // (k * size) // SPLIT_ALIGN * SPLIT_ALIGN)
        bounds = list(range(0, n, width)) + [n]
        if len(bounds) <= 2:                                   # one chunk: nothing to split
            out[init_name] = (value, source, perm)
            continue
        parts = [ir.Value(name=f"{init_name}.cols{a}-{b}", shape=ir.Shape([k, b - a]), type=ir.TensorType(value.dtype))
                 for a, b in zip(bounds, bounds[1:])]
        for node, _ in uses:
            x = node.inputs[0]
            mms = [ir.Node("", "MatMul", [x, w], name=f"{node.name}_cols{i}") for i, w in enumerate(parts)]
            cat = ir.Node("", "Concat", [m.outputs[0] for m in mms], [ir.AttrInt64("axis", -1)],
                          name=f"{node.name}_concat")
            graph.insert_before(node, [*mms, cat])
            y = node.outputs[0]
            for m in mms:
                m.outputs[0].type = y.type
            replace_output(graph, node, cat.outputs[0])
        memo: dict = {}

        def producer(i, a, b, value=value, source=source, perm=perm, memo=memo, last=len(parts) - 1):
            def produce():
                if "w" not in memo:
                    memo["w"] = streamed_weight(graph_name, read, value, source, perm)
                arr = memo["w"][:, a:b].contiguous().numpy()
                if i == last:
                    memo.clear()
                return arr
            return produce

        for i, (w, a, b) in enumerate(zip(parts, bounds, bounds[1:])):
            out[w.name] = (w, producer(i, a, b), None)
        if init_name in graph.initializers:
            del graph.initializers[init_name]
        split[source] = len(parts)
    return out, split
