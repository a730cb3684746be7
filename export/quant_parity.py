"""The parity gate of a weight-quantised decoder, and its quantisation error, measured separately.

Two comparisons, each on the decoder's own parity cases (a prefill, then a decode step on its cache), run on
the graph with every ``MatMulNBits`` computing in its reference precision (``accuracy_level`` removed, in a
temporary copy of the graph file sharing the data file; a TensorRT-target graph, which has none, as written):

1. **gate** (tight): vs the PyTorch model run with the *same* dequantised weights. Tolerance: the float
   decoder's (``runtime/tolerances.py``), because both sides multiply the same float weights; this checks
   packing, layout and wiring.
2. **quantisation error** (reported, not gated): vs the *unquantised* model on the unquantised model's inputs,
   next to the weights' own reconstruction error (relative Frobenius norm ``||W - deq(q(W))|| / ||W||``, mean
   and worst over the quantised layers).

The graph as served (``accuracy_level`` 4 on the CPU: ONNX Runtime rounds activations to int8 inside the
kernels) is not run here: measuring it needs a session that prepacks the weights, a second copy of them on
the heap, which would break the exporter's memory bound. ``scripts/bench_quant.py`` measures it (logits of the
served int8/int4 graphs against the served fp32 graph).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from safeclip.runtime.tolerances import export_tolerance

from .parity import compare, run_onnx
from .quant import DequantizedWeights, QuantScheme, linear_fqns, pick_block_size, resolve_lm_head

__all__ = ["bind", "check", "exact_compute_copy", "reconstruction"]


def bind(scheme: QuantScheme, language_model, lm_head, fqn_of: dict[int, str], weights):
    """(the scheme with its block size fixed for this model, a :class:`DequantizedWeights` reader)."""
    fqns = linear_fqns(language_model, lm_head, fqn_of, scheme)
    scheme = resolve_lm_head(scheme, fqns, lm_head, fqn_of)
    params = {fqn_of[id(p)]: tuple(p.shape) for p in [*language_model.parameters(), *lm_head.parameters()]}
    scheme = pick_block_size(scheme, {f: params[f] for f in fqns})
    return scheme, RecordingWeights(weights, scheme, fqns)


class RecordingWeights(DequantizedWeights):
    """:class:`DequantizedWeights` that also records each layer's reconstruction error as it is read."""

    def __init__(self, base, scheme, fqns):
        super().__init__(base, scheme, fqns)
        self.errors: dict[str, tuple[float, float]] = {}     # fqn -> (relative Frobenius, max abs)

    def read(self, fqn: str, dtype=None):
        import torch

        t = super().read(fqn, torch.float32)
        if fqn in self.fqns and fqn not in self.errors:
            w = self.base.read(fqn, torch.float32)
            d = (w - t).double()
            self.errors[fqn] = (float(d.norm() / max(float(w.double().norm()), 1e-30)), float(d.abs().max()))
        return t.to(dtype) if dtype is not None else t


def reconstruction(weights: RecordingWeights) -> dict:
    rel = [e[0] for e in weights.errors.values()]
    return {"layers": len(rel), "rel_frobenius_mean": float(np.mean(rel)) if rel else 0.0,
            "rel_frobenius_max": float(np.max(rel)) if rel else 0.0,
            "max_abs": float(max((e[1] for e in weights.errors.values()), default=0.0))}


def exact_compute_copy(onnx_path: Path) -> Path | None:
    """A copy of the graph file with ``accuracy_level`` dropped from every MatMulNBits (None: nothing to drop)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    changed = False
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            keep = [a for a in node.attribute if a.name != "accuracy_level"]
            if len(keep) != len(node.attribute):
                del node.attribute[:]
                node.attribute.extend(keep)
                changed = True
    if not changed:
        return None
    copy = onnx_path.with_name(f".{onnx_path.stem}.reference.onnx")
    onnx.save_model(model, str(copy))
    return copy


def _run_cases(path: Path, cases, names: tuple[list[str], list[str]], dtype: str, run=None):
    import torch

    tdtype = torch.float16 if dtype == "float16" else torch.float32
    in_names, out_names = names
    run = run or run_onnx
    for name, args, reference in cases:
        feeds = {n: (a.to(tdtype) if a.dtype.is_floating_point else a).numpy() for n, a in zip(in_names, args)}
        refs = {n: r.detach().float().numpy() for n, r in zip(out_names, reference)}
        yield name, refs, run(path, feeds, out_names)


def check(onnx_path: Path, cases, base_cases, names: tuple[list[str], list[str]], dtype: str,
          scheme: QuantScheme, weights: RecordingWeights, run=None) -> tuple[list, dict]:
    """The gate (raises :class:`~safeclip.export.parity.ParityError`), then the quantisation error report.

    ``cases``: (name, inputs, reference outputs) of the dequantised model; ``base_cases``: of the unquantised
    one; ``names``: the graph's (input names, output names); ``run(path, feeds, outputs)`` runs the graph (default
    ``parity.run_onnx``; the fused graph's cuts its KV buffers to the new rows). Returns (ParityResults, report)."""
    tag = f"decoder[{dtype}, int{scheme.bits}]"
    results, error = [], {}
    copy = exact_compute_copy(Path(onnx_path))
    path = copy or Path(onnx_path)
    try:
        for name, refs, got in _run_cases(path, cases, names, dtype, run):
            tol = {n: export_tolerance("decoder", dtype, n).of(r) for n, r in refs.items()}
            results.append(compare(f"{tag} {name}", refs, got, tol))
        logits = names[1][0]
        for name, refs, got in _run_cases(path, base_cases, names, dtype, run):
            ref, out = refs[logits].astype(np.float64), got[logits].astype(np.float64)
            scale = max(float(np.abs(ref).max()), 1e-30)
            error[name] = {"logits_max_abs": float(np.abs(ref - out).max()),
                           "logits_max_rel": float(np.abs(ref - out).max() / scale),
                           "top1_agree": bool(np.array_equal(ref.argmax(-1), out.argmax(-1)))}
    finally:
        if copy is not None:
            copy.unlink(missing_ok=True)
    report = {"vs_unquantised": error, "weights": reconstruction(weights),
              "checked": "exact-compute graph" if copy is not None else "graph as written",
              "gate": [{"component": r.component, "max_abs_err": r.max_abs_err, "atol": r.atol} for r in results]}
    return results, report
