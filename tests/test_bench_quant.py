"""``scripts/bench_quant.py --quick`` end to end (slow tier: ~2 minutes; the full run is BENCHMARKS.md's).

Oracles: every export passed its parity gate (the script stops otherwise); the derived figures are consistent
with the raw ones (speed-up = median ratio, roofline fraction = median / (bandwidth / bytes per token), RSS
ratio); the quantised decoders are smaller on disk than fp32, int4 smaller than int8; the reconstruction
errors are ordered as the bit widths are.
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
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_quant.py"


def test_bench_quant_quick(tmp_path):
    out = tmp_path / "r.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--work", str(tmp_path / "w"), "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(out.read_text())
    v = r["variants"]
    assert set(v) == {"fp32", "int8", "int4"} and "| decode tokens/s (median) |" in run.stdout
    read = r["bandwidth"]["read_GBps"] * 1e9
    for w, x in v.items():
        assert x["decode_tps_median"] == statistics.median(x["decode_tps"]) and len(x["decode_tps"]) == 3
        assert abs(x["speedup_vs_fp32"] - x["decode_tps_median"] / v["fp32"]["decode_tps_median"]) < 1e-12
        assert abs(x["roofline_fraction"] - x["decode_tps_median"] * x["bytes_per_token"] / read) < 1e-9
        assert abs(x["export_rss_over_bundle"] - x["export_peak_rss_bytes"] / x["bundle_bytes"]) < 1e-12
    assert v["int4"]["decoder_bytes"] < v["int8"]["decoder_bytes"] < v["fp32"]["decoder_bytes"]
    assert v["int4"]["bytes_per_token"] < v["int8"]["bytes_per_token"] < v["fp32"]["bytes_per_token"]
    assert v["int8"]["weights_reconstruction"]["rel_frobenius_mean"] < \
        v["int4"]["weights_reconstruction"]["rel_frobenius_mean"]
    assert v["int4"]["scheme"]["bits"] == 4 and v["int8"]["scheme"]["bits"] == 8
