"""``scripts/bench_export.py``: the measuring machinery (fast) and ``--quick`` end to end (slow).

Oracles: a child that allocates a known amount shows at least that in ``ru_maxrss`` and the peak lands in
the stage whose progress line preceded the allocation; a child past ``rss_limit`` is killed; a case that
does not fit the disk is refused before anything is written; the quick run's JSON agrees with itself
(ratio = peak / bundle, bundle = the files the exporter wrote) and a second run reuses the checkpoints.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import bench_export  # noqa: E402

MB = 1 << 20
CHILD = textwrap.dedent("""
    import sys, time
    print("[   0.0s] loading checkpoints ...", file=sys.stderr, flush=True)
    time.sleep(0.6)
    print("[   0.6s] exporting vision + gate graph ...", file=sys.stderr, flush=True)
    time.sleep(0.4)                      # the reader thread stamps the line before the allocation, even under load
    block = b"x" * ({mb} << 20)          # touched pages: resident
    time.sleep({hold})
    del block
    print("[   1.2s] writing tokenizer, preprocessing and manifest ...", file=sys.stderr, flush=True)
    time.sleep(0.6)
    print("done")
""")


def _child(tmp_path, mb: int, hold: float = 0.8, **kw) -> dict:
    cmd = [sys.executable, "-c", CHILD.format(mb=mb, hold=hold)]
    return bench_export.measure_child(cmd, {}, tmp_path / "child.log", sample_s=0.05, **kw)


def test_parse_case():
    c = bench_export.parse_case("tinyllava-1.5b/jetson/bf16/transformers5")
    assert (c.shape, c.target, c.dtype, c.layout) == ("tinyllava-1.5b", "jetson", "bf16", "transformers5")
    assert bench_export.parse_case("llava-1.5-7b/cpu").name == "llava-1.5-7b/cpu/fp16"
    for bad, msg in (("tiny", "expected"), ("huge/cpu", "unknown shape"), ("tiny/tpu", "unknown target"),
                     ("tiny/cpu/fp8", "unknown dtype"), ("tiny/cpu/fp16/hub", "unknown layout")):
        with pytest.raises(ValueError, match=msg):
            bench_export.parse_case(bad)


def test_measure_child_peak_rss_and_stage(tmp_path):
    ballast = b"y" * (500 * MB)          # this process is big: the child's ru_maxrss must not inherit it
    run = _child(tmp_path, mb=300)
    del ballast
    assert run["exit_code"] == 0 and run["killed"] is None
    assert 300 * MB <= run["ru_maxrss_bytes"] < 400 * MB
    assert run["inherited_floor_bytes"] < 30 * MB            # not this (torch-holding) process's RSS
    assert [t for _, tag, t in run["lines"] if tag == "out"] == ["done"]
    stages, peak = bench_export.stages_of(run)
    assert [s["name"] for s in stages][1:] == ["loading checkpoints", "exporting vision + gate graph",
                                               "writing tokenizer, preprocessing and manifest"]
    assert peak["stage"] == "exporting vision + gate graph" and peak["certain"]
    assert stages[2]["max_rss_bytes"] >= 300 * MB > stages[1]["max_rss_bytes"]
    assert "exporting vision" in Path(run["log"]).read_text()


def test_measure_child_kills_past_the_limit(tmp_path):
    run = _child(tmp_path, mb=400, hold=5.0, rss_limit=150 * MB)
    assert run["exit_code"] == -9 and "over the limit" in run["killed"]
    assert run["wall_s"] < 4.0


def test_stage_unknown_when_the_peak_came_after_the_last_sample():
    run = {"lines": [(0.1, "err", "[   0.0s] loading checkpoints ...")], "wall_s": 1.0, "ru_maxrss_bytes": 900 * MB,
           "samples": [{"t": 0.2, "VmHWM": 100 * MB, "VmRSS": 100 * MB}]}
    _, peak = bench_export.stages_of(run)
    assert peak["stage"] == "after the last sample (loading checkpoints)" and not peak["certain"]


def test_case_refused_when_the_disk_is_too_small(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_export.shutil, "disk_usage", lambda p: SimpleNamespace(free=10 ** 9))
    args = SimpleNamespace(work=tmp_path, write_only=False, sample_s=0.2, keep=False, rss_limit_gb=None)
    r = bench_export.run_case(bench_export.parse_case("tinyllava-1.5b/cpu"), args, {}, {"command": ["false"]})
    assert r["status"] == "refused" and "GB free" in r["error"]
    d = r["disk"]
    assert d["need_bytes"] == d["checkpoints_bytes"] + d["bundle_estimate_bytes"] > d["free_bytes"]
    assert d["bundle_estimate_bytes"] > 4 * 1.4e9                 # fp32 bundle of 1.41 B parameters
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    out, work = tmp_path / "bench.json", tmp_path / "work"
    cmd = [sys.executable, str(SCRIPTS / "bench_export.py"), "--quick", "--work", str(work), "--json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.lstrip().startswith("| case | source checkpoint | status |")
    res = json.loads(out.read_text())
    for key in ("date", "command", "machine", "exporter", "loadavg_start", "loadavg_end", "settings", "cases"):
        assert key in res, key
    assert [c["case"] for c in res["cases"]] == ["tiny/jetson/fp16", "tiny/cpu/fp16", "tiny/jetson/bf16/transformers5"]
    for c in res["cases"]:
        assert c["status"] == "ok" and c["exit_code"] == 0, c.get("error")
        assert c["bundle_bytes"] > c["checkpoint"]["bytes"] / 4 and c["source_bytes"] == c["checkpoint"]["bytes"]
        assert c["peak_over_bundle"] == pytest.approx(c["peak_rss_bytes"] / c["bundle_bytes"])
        assert c["target_met"] == (c["peak_over_bundle"] <= res["target_ratio"])
        # /proc's RSS counters are per-thread approximations: ru_maxrss may read a few pages lower
        assert c["peak_rss_bytes"] >= 0.99 * c["sampled"]["VmRSS"] > 0 and c["wall_s"] > 0
        assert c["sampled"]["out_bytes"] >= c["bundle_bytes"] * 0.5          # seen on disk while it ran
        names = [s["name"] for s in c["stages"]]
        assert len(names) >= 3 and c["peak_stage"]["stage"] in names
        assert not (work / "out" / c["case"].replace("/", "-")).exists()       # deleted without --keep
        assert "write" in c["checkpoint"] or c["case"] == "tiny/cpu/fp16"        # the first fp16 case wrote it
    # a second run reuses the checkpoints
    p = subprocess.run(cmd[:-4] + ["--cases", "tiny/cpu", "--work", str(work), "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    again = json.loads(out.read_text())["cases"][0]
    assert again["checkpoint"]["cached"] and "write" not in again["checkpoint"] and again["clip"]["cached"]
