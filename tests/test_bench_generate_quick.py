"""``scripts/bench_generate.py --quick`` runs end to end and writes the JSON the BENCHMARKS.md section uses.

Oracles: the JSON has every key the report reads; the derived figures are consistent with the raw ones
(speedup, roofline fractions, peak RSS ratio); both sides generated the same greedy tokens (same weights);
the memory subprocess never imported torch.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_generate.py"
TOP_KEYS = {"date", "command", "machine", "loadavg_start", "loadavg_end", "model", "settings", "export",
            "runtime", "transformers", "decode_speedup", "ttft_speedup", "greedy_tokens_agree", "copy_GBps",
            "read_GBps", "weight_bytes_per_token", "decoder_data_bytes", "embed_table_bytes",
            "roofline_copy_tokens_per_s", "roofline_copy_fraction", "roofline_read_tokens_per_s",
            "roofline_read_fraction", "kv_arena_bytes", "kv_update_costs", "rss", "peak_rss_over_weights",
            "peak_rss_full_kv_over_weights", "targets"}
SIDE_KEYS = {"decode_tokens_per_s", "ttft_s", "samples_decode_tokens_per_s", "samples_ttft_s"}
RSS_KEYS = {"variant", "vmhwm_bytes", "after_load_vmrss_bytes", "kv_arena_bytes", "decode_tokens_per_s",
            "torch_imported", "load_s"}


@pytest.mark.slow
def test_quick_run_writes_consistent_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out),
                           "--work-dir", str(tmp_path / "work")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| decode tokens/s |" in proc.stdout
    r = json.loads(out.read_text())
    assert TOP_KEYS <= r.keys()
    assert SIDE_KEYS <= r["runtime"].keys() and SIDE_KEYS <= r["transformers"].keys()
    s = r["settings"]
    assert len(r["runtime"]["samples_decode_tokens_per_s"]) == s["repeats"]
    assert r["greedy_tokens_agree"] == s["new_tokens"]
    assert r["machine"]["torch_threads"] == r["machine"]["ort_intra_op_threads"] == s["threads"]
    tps = r["runtime"]["decode_tokens_per_s"]
    assert r["decode_speedup"] == pytest.approx(tps / r["transformers"]["decode_tokens_per_s"])
    assert r["roofline_copy_tokens_per_s"] == pytest.approx(r["copy_GBps"] * 1e9 / r["weight_bytes_per_token"])
    assert r["roofline_copy_fraction"] == pytest.approx(tps / r["roofline_copy_tokens_per_s"])
    # weights read per token: decoder.onnx.data's tensors (the file may pad them) + small inline constants
    assert 0.9 * r["decoder_data_bytes"] <= r["weight_bytes_per_token"] <= r["decoder_data_bytes"] + (1 << 20)
    assert {v["variant"] for v in r["rss"]} == set(s["rss_variants"])
    for v in r["rss"]:
        assert RSS_KEYS <= v.keys() and not v["torch_imported"]
        assert v["vmhwm_bytes"] >= v["after_load_vmrss_bytes"] > 0
    default = next(v for v in r["rss"] if v["variant"] == "default")
    weights = r["decoder_data_bytes"] + r["embed_table_bytes"]
    assert r["peak_rss_over_weights"] == pytest.approx(default["vmhwm_bytes"] / weights)
    assert r["peak_rss_full_kv_over_weights"] == pytest.approx((default["vmhwm_bytes"] + r["kv_arena_bytes"]) / weights)
