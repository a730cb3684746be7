"""``scripts/bench.py --quick`` runs end to end and writes the JSON the docs and the lead rely on (slow: ~1 min)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxscript")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


@pytest.mark.slow
def test_bench_quick_writes_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.lstrip().startswith("| Measure | Result | Target | Met |")
    res = json.loads(out.read_text())
    for key in ("date", "command", "mode", "machine", "loadavg_start", "loadavg_end", "timings", "derived",
                "export", "checks", "fusions"):
        assert key in res, key
    assert res["mode"] == "quick"
    for key in ("cpu_model", "physical_cores", "copy_bandwidth_gbs", "gemm_peak_gflops"):
        assert key in res["machine"], key
    d = res["derived"]
    assert set(d) == {"gate", "vision", "e2e"}
    for key in ("head_onnxruntime_ms", "head_over_vision", "graph_overhead", "graph_a_a_control"):
        assert key in d["gate"], key
    for key in ("ort_over_eager", "ort_over_sdpa", "fraction_of_peak", "tuning", "flops"):
        assert key in d["vision"], key
    for key in ("ttft_gated_s", "ttft_ungated_s", "overhead", "verdict_ms", "gate_work_over_ttft", "a_a_control"):
        assert key in d["e2e"], key
    for key in ("seconds", "peak_rss_mb", "weight_bytes", "peak_multiple", "phases"):
        assert key in res["export"], key
    # every timed variant ran the requested rounds and took positive time
    rounds, paired = res["settings"]["rounds"], res["settings"]["paired_rounds"]
    assert (rounds, paired) == (2, 4)
    for name, t in res["timings"].items():
        in_pairs = name.startswith(("ttft", "ort_gated_p", "ort_ungated_p"))
        assert len(t["runs"]) == (paired if in_pairs else rounds), name
        assert min(t["runs"]) > 0, name
    # the compared graphs compute the same thing; the clean image passes the gate without extra tokens
    c = res["checks"]
    assert c["ort_vs_torch_features"] < 1e-4 and c["ort_vs_torch_probs"] < 1e-5
    assert c["ungated_vs_gated_features"] == 0.0 and c["ungated_outputs"] == ["image_features"]
    assert c["head_onnx_vs_numpy"] < 1e-5
    assert c["clean_image_flagged"] is False and c["prompt_tokens_gated"] == c["prompt_tokens_ungated"]
    assert np.isfinite(res["export"]["peak_multiple"]) and res["export"]["peak_multiple"] > 1.0
