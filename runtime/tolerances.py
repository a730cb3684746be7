"""Every parity tolerance of the project, in one table (standard library only, so exporter and builder share it).

Two gates compare outputs and stop the build when they differ by more than these:

* ``safeclip-export``: an exported ONNX graph run by ONNX Runtime vs the fp32 PyTorch module
  (``export/bundle.py`` for the vision+gate graph, ``export/decoder.py`` for the decoder). An fp16 graph is
  measured against the fp32 reference, i.e. against what the user would have got.
* ``safeclip-build``: a TensorRT engine vs ONNX Runtime on the same graph (``runtime/build.py``); fp32
  engines may use TF32, hence the looser fp32 figure.

A :class:`Tolerance` is absolute, or relative to the reference's magnitude with a floor of 1
(``atol * max(1, max|reference|)``), which keeps one figure meaningful for logits of any scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Tolerance", "EXPORT", "ENGINE", "export_tolerance", "engine_tolerance"]


@dataclass(frozen=True)
class Tolerance:
    atol: float
    scaled: bool = False          # True: times max(1, max|reference|)

    def of(self, reference: Any = None) -> float:
        """The absolute bound for ``reference`` (any array-like; only read when ``scaled``)."""
        if not self.scaled:
            return self.atol
        import numpy as np

        ref = np.asarray(reference, dtype=np.float64)
        return self.atol * max(1.0, float(np.abs(ref).max()) if ref.size else 0.0)


EXPORT: dict[str, dict[str, dict[str, Tolerance]]] = {    # graph -> graph precision -> output role ("*": all)
    "vision_gate": {
        "float32": {"image_features": Tolerance(1e-4), "class_probs": Tolerance(1e-5)},
        # fp16 graphs keep LayerNorms and the gate head in fp32
        "float16": {"image_features": Tolerance(2e-2, scaled=True), "class_probs": Tolerance(1e-3)},
    },
    "decoder": {
        "float32": {"*": Tolerance(1e-4, scaled=True)},
        "float16": {"*": Tolerance(2e-2, scaled=True)},
    },
}
# A weight-quantised (int8/int4) decoder, export/quant_parity.py: the gate is the graph with every MatMulNBits
# computing in float (its accuracy_level dropped, in a temporary copy) against PyTorch run with the same
# dequantised weights, held to the "decoder" figures above: both sides multiply the same float weights, so
# only float rounding separates them, and any packing, layout or wiring mistake is far outside them (measured:
# logits 3e-6 on the demo, 8e-6 at TinyLlama-1.1B shape, against bounds of 2e-3 and 4e-4). The graph as
# served (ONNX Runtime's CPU kernels at accuracy_level 4 round each block of activations to int8 before the
# integer dot product) is not gated: that rounding is the kernel's, not the graph's, and on random-weight
# models it compounds through the layers (TinyLlama-1.1B shape, int8: 0.18 on logits of magnitude 4, against
# the exact graph's 8e-6), so no bound would be both safe and meaningful. scripts/bench_quant.py reports it;
# scripts/eval_quant.py measures its effect on quality with real weights.
ENGINE: dict[str, Tolerance] = {                          # graph precision -> tolerance, every output
    "float32": Tolerance(1e-2, scaled=True),
    "float16": Tolerance(5e-2, scaled=True),
}


def export_tolerance(graph: str, precision: str, role: str = "*") -> Tolerance:
    """The export gate's tolerance for output ``role`` of ``graph`` exported in ``precision``."""
    try:
        table = EXPORT[graph][precision]
    except KeyError:
        raise ValueError(f"no export tolerance for {graph} in {precision} "
                         f"(known: {', '.join(f'{g}/{p}' for g in EXPORT for p in EXPORT[g])})") from None
    if role in table:
        return table[role]
    if "*" in table:
        return table["*"]
    raise ValueError(f"no export tolerance for output '{role}' of {graph} (known: {', '.join(table)})")


def engine_tolerance(precision: str) -> Tolerance:
    """The build gate's tolerance for an engine of a graph in ``precision`` (unknown precisions: the fp16 one)."""
    return ENGINE.get(precision, ENGINE["float16"])
