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

OPSET = 18


class ExportError(RuntimeError):
    """torch.onnx could not export a component."""


def onnx_from_module(module, args: tuple, path: str | Path, input_names: list[str], output_names: list[str],
                     dynamic_shapes: Any = None, optimize: bool = True) -> list[Path]:
    """Export ``module(*args)`` to ``path`` (+ ``path.data``); returns the files written."""
    import torch

    path = Path(path)
    data = path.with_name(path.name + ".data")
    for p in (path, data):
        p.unlink(missing_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.no_grad():
                program = torch.onnx.export(
                    module, args, dynamo=True, opset_version=OPSET, input_names=input_names,
                    output_names=output_names, dynamic_shapes=dynamic_shapes, optimize=optimize,
                    verbose=False, report=False)
        except Exception as e:  # torch raises many types here; keep the first line for the user
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"torch.onnx export of {path.name} failed: {first}") from e
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
