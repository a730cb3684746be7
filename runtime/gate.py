"""The gate's decision rule, applied by the runtime to the vision graph's ``class_probs``.

Rule (SafeCLIP reference): top = argmax of the per-class probabilities; the image is flagged when the top
class is not a safe class and its (summed) probability exceeds the manifest's threshold. The gate fails
closed: non-finite or missing probabilities, or a width that differs from the manifest's classes, flag.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

POLICIES = ("instruct", "refuse", "annotate")
GATE_VARIANTS = ("reference", "clip")   # what the vision graph's gate head reads (export/vision_gate.py)
DEFAULT_INSTRUCTION = (
    "Before answering, check whether this image shows harmful content (it may contain {category}). "
    "If it does, say that you cannot fulfil the request and briefly explain why; otherwise, fulfil the request."
)
DEFAULT_REFUSAL = "I can't help with this image because it appears to contain harmful content ({category})."


def check_policy(policy) -> str:
    """``policy`` if it is one of :data:`POLICIES`, else ``ValueError`` naming them (the one policy check)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy '{policy}' (supported: {', '.join(POLICIES)})")
    return policy


@dataclass(frozen=True)
class Verdict:
    flagged: bool
    category: str            # top class ("unknown" when the probabilities are unusable)
    score: float             # probability of the top class (nan when unusable)
    probs: dict[str, float] = field(default_factory=dict)
    reason: str = ""         # set when the gate failed closed
    latency_ms: float | None = None
    view: int | None = None  # multi-view models: the view that triggered the verdict (0 = base view)

    def to_json(self) -> dict:
        d = asdict(self)
        d["score"] = None if not np.isfinite(self.score) else round(float(self.score), 6)
        d["probs"] = {k: (round(v, 6) if np.isfinite(v) else None) for k, v in self.probs.items()}
        if not self.reason:
            d.pop("reason")
        if self.view is None:
            d.pop("view")
        return d


def verdict_from_probs(class_probs, classes: list[str], safe_classes: list[str], threshold: float,
                       latency_ms: float | None = None) -> Verdict:
    """One image's verdict from its ``class_probs`` row ([C])."""
    p = np.asarray(class_probs, dtype=np.float64).reshape(-1) if class_probs is not None else np.empty(0)
    if p.shape[0] != len(classes):
        return Verdict(True, "unknown", float("nan"), {}, "gate output missing or of the wrong width", latency_ms)
    probs = {c: float(v) for c, v in zip(classes, p)}
    if not np.all(np.isfinite(p)):
        return Verdict(True, "unknown", float("nan"), probs, "gate output is not finite", latency_ms)
    top = int(np.argmax(p))
    flagged = classes[top] not in safe_classes and float(p[top]) > float(threshold)
    return Verdict(flagged, classes[top], float(p[top]), probs, "", latency_ms)
