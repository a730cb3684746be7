"""``scripts/bench_ttft.py --quick`` end to end (slow tier: ~1 minute; the full run is BENCHMARKS.md's).

Oracles: both exports passed the parity gate (the script stops otherwise); both decoder graphs give the same
verdict and the same greedy tokens (same weights: the fused graph is the traced one's arithmetic); the answer's
TTFT is the sum of its parts; the reported speed-ups are the medians of the per-round ratios; the traced
bundle's decoder is KV form "new", the fused one's "shared".
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_ttft.py"


def test_bench_ttft_quick(tmp_path):
    out, work = tmp_path / "r.json", tmp_path / "w"
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--work", str(work), "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(out.read_text())["results"]["int4"]
    tr, fu = r["traced"], r["fused"]
    assert fu["tokens_equal"] == "4/4" and fu["same_verdict"] and tr["prompt_tokens"] == fu["prompt_tokens"] > 576
    for x in (tr, fu):
        for rd in x["rounds"]:
            assert abs(rd["ttft_ms"] - (rd["preprocess_ms"] + rd["vision_gate_ms"] + rd["prefill_ms"])) < 0.05
    assert fu["speedup_ttft_ms"] == statistics.median(t["ttft_ms"] / u["ttft_ms"]
                                                      for t, u in zip(tr["rounds"], fu["rounds"]))
    forms = {f: json.loads((work / f"tiny-int4-{f}" / "manifest.json").read_text())["graphs"]["decoder"]["kv"]["form"]
             for f in ("traced", "fused")}
    assert forms == {"traced": "new", "fused": "shared"}
    assert "| int4 | fused |" in run.stdout
