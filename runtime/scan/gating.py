"""Gating a batch of scan items with a bundle's vision+gate graph (the graph only: no language model).

``gate_items`` gates a batch with the bundle's vision+gate graph: every readable image is preprocessed, the
batch goes through the graph in one run (its batch dimension is dynamic: ``VisionGate.gate_batch``), each row
of ``class_probs`` becoming a verdict by the rule every request's gate applies. Multi-view
(anyres) bundles are gated one image at a time through ``VisionGate.gate`` (their views aggregate per image);
a batch the graph refuses (a TensorRT profile smaller than the batch) is retried one image at a time. An
image that cannot be read or decoded gives an error result, never an exception.
"""
from __future__ import annotations

import hashlib

import numpy as np

from ..error_text import one_line
from ..gate import Verdict
from .sources import ItemReader


def gate_items(pipe, items: list[dict], reader: ItemReader) -> list[tuple[Verdict | None, str | None]]:
    """(verdict, None) or (None, error message) for each item, in order (see the module docstring). Each item
    gets ``sha256`` (of the bytes gated) and ``stat`` (its holder's identity when read), None when unread."""
    out: list = [None] * len(items)
    ready: list[tuple[int, np.ndarray]] = []
    for i, it in enumerate(items):
        it["sha256"] = it["stat"] = None
        try:
            image, it["stat"] = reader.read_bytes(it)
            it["sha256"] = hashlib.sha256(image).hexdigest()
            if pipe.vision.anyres is not None:
                v = pipe.vision.gate(image)
                out[i] = (_no_latency(v), None)
            else:
                ready.append((i, pipe.vision.views(image)[0]))                       # [1, 3, H, W]
        except Exception as e:               # one bad image never stops the scan
            out[i] = (None, one_line(e))
    if ready:
        for i, v in zip([i for i, _ in ready], _gate_batch(pipe, [pv for _, pv in ready])):
            out[i] = v
    return out


def _gate_batch(pipe, pvs: list[np.ndarray]) -> list:
    try:
        verdicts = pipe.vision.gate_batch(pvs)                   # one graph run over [B, 3, H, W]
    except Exception as e:
        if len(pvs) == 1:
            return [(None, f"vision graph failed ({one_line(e)})")]
        return [r for pv in pvs for r in _gate_batch(pipe, [pv])]
    return [(v, None) for v in verdicts]


def _no_latency(v: Verdict) -> Verdict:
    from dataclasses import replace
    return replace(v, latency_ms=None)
