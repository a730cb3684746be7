"""``scripts/bench_grammar.py --mask-only`` runs end to end (no export) and writes the JSON BENCHMARKS.md reads;
``--quick`` (slow tier) exports the toy decoder as the cpu target does (the fused graph, KV form "shared") and
decodes with it, one sequence and batched.

Oracles: one mask row per vocabulary present (the bench's own byte-level one when no test vocabulary is), each
with positive timings and the answer's token count; the driven answer completed the grammar (the script asserts
it) and the Markdown table names every row.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llguidance")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_grammar.py"


def test_mask_only_run_writes_its_table(tmp_path):
    out = tmp_path / "g.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--mask-only", "--out", str(out)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["mask"] and "decode" not in r
    for m in r["mask"]:
        assert m["vocab_size"] >= 32000 and m["tokens"] > 10 and m["compile_ms"] > 0
        assert 0 < m["mask_us"]["median"] <= m["mask_us"]["max"] and m["apply_us"]["mean"] > 0
        assert f"| {m['vocab']} ({m['vocab_size']}) |" in run.stdout


@pytest.mark.slow
def test_quick_run_decodes_with_the_cpu_targets_decoder(tmp_path):
    # the decode half opened every bundle as KV form "new" (OrtDecoder), so it stopped on the fused graph
    out = tmp_path / "g.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--work", str(tmp_path / "w"), "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    d = json.loads(out.read_text())["decode"]
    assert d["rounds"] and d["median"] and d["sample_constrained_text"]
