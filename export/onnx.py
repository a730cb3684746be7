"""The one place that calls ``torch.onnx.export``: dynamo exporter, opset 18, external weight data.

Opset 18 is what TensorRT 10.3 (JetPack 6) parses. The dynamo exporter writes weights to ``<file>.data``
beside the graph; bundles hash both files.
"""
from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path
from typing import Any

from safeclip.runtime.error_text import one_line

OPSET = 18


class ExportError(RuntimeError):
    """torch.onnx could not export a component."""


def _torch_export(module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                  dynamic_shapes: Any, optimize: bool):
    """``torch.onnx.export`` (dynamo, :data:`OPSET`) of ``module(*args)`` after removing ``path`` and its data
    file; returns the ONNX program, or raises :class:`ExportError` with torch's first line."""
    import torch

    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.no_grad():
                return torch.onnx.export(
                    module, args, dynamo=True, opset_version=OPSET, input_names=input_names,
                    output_names=output_names, dynamic_shapes=dynamic_shapes, optimize=optimize,
                    verbose=False, report=False)
        except Exception as e:  # torch raises many types here; keep the first line for the user
            raise ExportError(f"torch.onnx export of {path.name} failed: {one_line(e)}") from e


def onnx_from_module(module, args: tuple, path: str | Path, input_names: list[str], output_names: list[str],
                     dynamic_shapes: Any = None, optimize: bool = True) -> list[Path]:
    """Export ``module(*args)`` to ``path`` (+ ``path.data``); returns the files written."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    program = _torch_export(module, args, path, input_names, output_names, dynamic_shapes, optimize)
    program.save(str(path), external_data=True)
    del program
    _release_rewriter_state()
    files = [path]
    if data.exists():
        files.append(data)
    for f in files:
        os.chmod(f, 0o644)
    return files


def _release_rewriter_state() -> None:
    """Let the exported module's weights be freed once the caller drops the module.

    onnxscript's rewrite rules are module-level objects whose pattern matchers keep their last match
    (``SimplePatternMatcher._current_node``, ``_match`` and ``_graph``; onnxscript 0.7.2). Through it the IR
    graph stays reachable, and its initializers wrap the module's own parameters, so after an export the
    torch weights could never be freed and the parity check held two copies of every weight. Resetting the
    matchers' match state (what ``_init_match`` does before every match, and ``match`` sets ``_graph`` anew)
    drops that reference.
    """
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:          # another onnxscript layout: nothing known to release
        return
    for obj in gc.get_objects():
        if issubclass(type(obj), SimplePatternMatcher):      # isinstance() would poke deprecated proxies
            obj._init_match(0)
            obj._graph = None
    gc.collect()


ALIGN = 1 << 16            # external tensors of >= ALIGN_MIN bytes start on 64 KiB boundaries (ORT can mmap them)
ALIGN_MIN = 1 << 20


def onnx_from_meta_module(module, args: tuple, path: str | Path, input_names: list[str], output_names: list[str],
                          weights, dynamic_shapes: Any = None,
                          progress=lambda done, total, nbytes: None, graph_pass=None) -> list[Path]:
    """Export ``module(*args)`` traced on the meta device, then stream its weights into ``path.data``.

    ``module`` and ``args`` live on the meta device (no weight storage). ``weights(name)`` returns the real
    tensor of the initializer ``name`` (the module's parameter or buffer FQN) as a torch tensor in any float
    dtype; it is converted to the graph's dtype on the way, one tensor at a time, so the exporter never holds
    more than one weight. torch.onnx's optimizer cannot fold what has no value, so the one folding that
    matters here is done on the way: a weight used only through ``Transpose`` (``Linear`` -> ``MatMul``) is
    written transposed and the ``Transpose`` node removed, as the optimizer does with real weights (ONNX
    Runtime would otherwise fold it at load time into a heap copy of every weight). ``progress(done, total,
    bytes_written)`` is called after each tensor. Returns the files written.

    ``graph_pass(model, jobs) -> jobs`` (optional) rewrites the optimised graph before any weight is written,
    e.g. :class:`~safeclip.export.quant.QuantPass`. ``jobs`` maps initializer name -> (ir.Value, weight name,
    permutation or None); a pass may replace the weight name by a callable returning the tensor's final
    array (numpy, already in the value's dtype; 4-bit values as packed bytes), still produced one at a time.
    """
    import logging

    import torch

    path = Path(path)
    program = _torch_export(module, args, path, input_names, output_names, dynamic_shapes, optimize=False)
    model = program.model
    pending: dict[str, object] = {}                       # initializer name -> its ir.Value, weights to stream
    for name, value in model.graph.initializers.items():
        raw = getattr(value.const_value, "raw", None)
        if isinstance(raw, torch.Tensor) and raw.device.type == "meta":
            value.const_value = None
            pending[name] = value
    quiet = logging.getLogger("onnx_ir")
    level, quiet.level = quiet.level, logging.ERROR       # "Skipped deduplication of initializer ... no value"
    try:
        program.optimize()
    finally:
        quiet.setLevel(level)
    model = program.model
    jobs = _fold_transposes(model, {n for n in pending if n in model.graph.initializers})
    files = write_streamed(model, jobs, path, weights, progress, graph_pass)
    del program, model
    _release_rewriter_state()
    return files


def write_streamed(model, jobs: dict, path: str | Path, weights, progress=lambda done, total, nbytes: None,
                   graph_pass=None) -> list[Path]:
    """Write the ``onnx_ir`` ``model`` to ``path`` and its weights, one at a time, to ``path.data``.

    ``jobs`` maps initializer name -> (ir.Value, weight name or a callable returning the final array,
    permutation or None), as :func:`onnx_from_meta_module` describes; ``graph_pass(model, jobs) -> jobs`` runs
    first. A model built directly (``fused_decoder.py``) takes the same path as a traced one. Returns the files
    written."""
    import onnx
    import onnx_ir as ir

    path = Path(path)
    data = path.with_name(path.name + ".data")
    for p in (path, data):
        p.unlink(missing_ok=True)
    if graph_pass is not None:
        jobs = graph_pass(model, jobs)
    done, total, written = 0, len(jobs), 0
    with open(data, "wb") as f:
        for init_name, (value, source, perm) in jobs.items():
            if callable(source):                               # a graph pass's array (e.g. packed int4)
                t = _produced(path, init_name, value, source())
            else:
                t = streamed_weight(path.name, weights, value, source, perm)
            buf = t if isinstance(t, memoryview) else _bytes_of(t)
            nbytes = buf.nbytes
            if nbytes >= ALIGN_MIN and f.tell() % ALIGN:
                f.write(b"\0" * (ALIGN - f.tell() % ALIGN))
            offset = f.tell()
            f.write(buf)
            value.const_value = ir.ExternalTensor(data.name, offset, nbytes, value.dtype, shape=value.shape,
                                                  name=init_name, base_dir=str(path.parent))
            if init_name not in model.graph.initializers:
                model.graph.register_initializer(value)
            del t
            done, written = done + 1, written + nbytes
            progress(done, total, written)
    proto = ir.serde.serialize_model(model)
    onnx.save_model(proto, str(path))
    del proto
    files = [path] + ([data] if data.stat().st_size else [])
    if not data.stat().st_size:
        data.unlink()
    for p in files:
        os.chmod(p, 0o644)
    return files


def streamed_weight(graph_name: str, weights, value, source: str, perm):
    """The weight ``source`` as the initializer ``value`` holds it: read with ``weights(source)``, converted to
    the value's dtype, permuted by ``perm`` (a folded ``Transpose``), contiguous, its shape checked. Graph
    passes that write a weight in another form (e.g. split into column chunks) start from this."""
    t = weights(source)
    if t is None:
        raise ExportError(f"{graph_name}: no weight for initializer '{source}'")
    t = t.to(_TORCH_DTYPE[value.dtype])
    if perm is not None:
        t = t.permute(*perm)
    t = t.contiguous()
    if list(t.shape) != [int(d) for d in value.shape]:
        raise ExportError(f"{graph_name}: weight '{source}' has shape {list(t.shape)}, "
                          f"the graph expects {list(value.shape)}")
    return t


def _produced(path: Path, name: str, value, arr) -> memoryview:
    """The bytes of a graph pass's array for ``value``, checked against its shape (4-bit: packed pairs)."""
    import numpy as np
    import onnx_ir as ir

    arr = np.ascontiguousarray(arr)
    count = 1
    for d in value.shape:
        count *= int(d)
    packed4 = value.dtype in (ir.DataType.INT4, ir.DataType.UINT4)
    want = (count + 1) // 2 if packed4 else int(count * value.dtype.itemsize)
    if arr.nbytes != want or (not packed4 and arr.size != count):
        raise ExportError(f"{path.name}: tensor '{name}' has {arr.nbytes} bytes, the graph expects {want} "
                          f"for shape {list(value.shape)} {value.dtype.name}")
    return memoryview(arr.reshape(-1)).cast("B")


def _bytes_of(t) -> memoryview:
    import torch

    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy()).cast("B")


def _fold_transposes(model, weights: set[str]) -> dict[str, tuple]:
    """Remove ``Transpose`` nodes applied to streamed weights.

    Returns {initializer name: (its ir.Value, weight name, permutation or None)}; the folded values are
    registered as initializers once they have their data.
    """
    import onnx_ir as ir

    jobs: dict[str, tuple] = {}
    graph = model.graph
    for name in sorted(weights):
        value = graph.initializers[name]
        uses = list(value.uses())
        transposes = [u for u, _ in uses if u.op_type == "Transpose" and u.domain in ("", "ai.onnx")
                      and len(u.inputs) == 1]
        if uses and len(transposes) == len(uses):
            for i, node in enumerate(transposes):
                attr = node.attributes.get("perm")
                perm = tuple(attr.as_ints()) if attr is not None else tuple(reversed(range(len(value.shape))))
                out = node.outputs[0]
                new_name = name if i == 0 else f"{name}.t{i}"
                shape = ir.Shape([value.shape[p] for p in perm])
                folded = ir.Value(name=new_name, shape=shape, type=ir.TensorType(value.dtype))
                out.replace_all_uses_with(folded)
                graph.remove(node, safe=True)
                if i == 0:
                    graph.initializers.pop(name)
                jobs[new_name] = (folded, name, perm)
        else:
            jobs[name] = (value, name, None)
    return jobs


def _torch_dtypes():
    import onnx_ir as ir
    import torch
    return {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16,
            ir.DataType.DOUBLE: torch.float64, ir.DataType.INT64: torch.int64, ir.DataType.INT32: torch.int32,
            ir.DataType.BOOL: torch.bool, ir.DataType.INT8: torch.int8, ir.DataType.UINT8: torch.uint8}


class _LazyDtypes(dict):
    def __missing__(self, key):
        self.update(_torch_dtypes())
        return dict.__getitem__(self, key)


_TORCH_DTYPE = _LazyDtypes()


def _throttled(progress, every_s: float):
    """``say(message, final=False)`` passing ``message`` to ``progress`` at most every ``every_s`` seconds."""
    import time

    last = [time.monotonic()]

    def say(message: str, final: bool = False) -> None:
        now = time.monotonic()
        if final or now - last[0] >= every_s:
            last[0] = now
            progress(message)
    return say


def weight_progress(progress, what: str, every_s: float = 2.0):
    """A ``progress(done, total, bytes)`` callback for :func:`onnx_from_meta_module` that reports through
    ``progress(message)`` at most every ``every_s`` seconds, and once at the end."""
    say = _throttled(progress, every_s)
    return lambda done, total, nbytes: say(f"{what}: weights {done}/{total} tensors, {nbytes / 2**30:.2f} GiB "
                                           "written", final=done == total)


def block_progress(progress, what: str, every_s: float = 2.0):
    """A ``progress(done, total)`` callback for :class:`~safeclip.export.weights.Materialized`: the fp32
    reference's progress (a reference of several forward passes counts on past ``total``)."""
    say = _throttled(progress, every_s)
    return lambda done, total: say(f"{what}: reference pass {(done - 1) // total + 1}, "
                                   f"block {(done - 1) % total + 1}/{total}")
