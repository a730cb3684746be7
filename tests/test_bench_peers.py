"""The pieces of ``scripts/bench_peers.py`` (not CI'd as a whole: it builds multi-GB models and needs the peers).

Oracles: argument checks reject unknown models and bad counts; "x ours" is the median of per-round ratios (not
the ratio of medians) and refuses unpaired rounds; the group's reference is this project's fp32-lm_head model;
busy threads count only the threads that ran for half the wall time; per-thread CPU times are read from /proc
(a spinning thread of this process shows up); the lm_head error counts top-1 agreement per position; an
engine that is not installed gives its one skip line and the table carries it.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_peers  # noqa: E402
import peer_build  # noqa: E402
import peer_workers  # noqa: E402


def test_parse_args_defaults_and_checks(capsys):
    a = bench_peers.parse_args([])
    assert a.shape == "tinyllama-1.1b" and a.threads == 2 and a.prefill_len == 256 and a.models == list(peer_build.MODELS)
    q = bench_peers.parse_args(["--quick", "--models", "ours-int4, genai-int4-matched"])
    assert q.shape == "quick-32k" and q.models == ["ours-int4", "genai-int4-matched"] and q.rounds == 2
    with pytest.raises(SystemExit):
        bench_peers.parse_args(["--models", "ours-int4,vllm"])
    assert "unknown model(s) vllm" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_peers.parse_args(["--new-tokens", "1"])


def test_quick_block_size_divides_the_quick_shapes_widths():
    # --quick with the default block 128 stopped in the export: the toy shape's MLP width (704) is 11 x 64
    from bench_generate import SHAPES

    q = bench_peers.parse_args(["--quick"])
    shape = SHAPES[q.shape]
    assert shape["intermediate_size"] % q.block_size == 0 and shape["hidden_size"] % q.block_size == 0


def test_per_round_ratios_are_paired_medians():
    s = {"ours": [10.0, 20.0, 40.0], "peer": [15.0, 20.0, 20.0]}
    r = bench_peers.per_round_ratios(s, "ours")
    assert r["ours"] == 1.0 and r["peer"] == 1.0          # ratios 1.5, 1.0, 0.5; median of medians would be 0.9
    with pytest.raises(ValueError):
        bench_peers.per_round_ratios({"ours": [1.0, 2.0], "peer": [1.0]}, "ours")


def test_group_reference_is_ours_with_the_fp32_head():
    assert bench_peers.group_reference(["llama.cpp-q4_0", "ours-int4-qhead", "ours-int4"]) == "ours-int4"
    assert bench_peers.group_reference(["genai-int8", "ours-int8-qhead"]) == "ours-int8-qhead"
    assert bench_peers.group_reference(["ours-int4-q8head", "ours-int4", "genai-int4"]) == "ours-int4"
    assert bench_peers.group_reference(["genai-int8"]) is None
    assert {m.precision for m in peer_build.MODELS.values()} == set(bench_peers.PRECISIONS)
    assert set(peer_build.BUILDERS) == set(peer_build.ENGINE_MODULES) == set(peer_workers.ENGINES)


def test_busy_threads_counts_threads_on_cpu_half_the_time():
    before = {1: 0.0, 2: 5.0, 3: 1.0}
    after = {1: 0.9, 2: 5.95, 3: 1.2, 4: 0.6}           # thread 4 started during the request
    b = peer_workers.busy_threads(before, after, wall=1.0)
    assert b["busy"] == 3 and abs(b["cpus"] - 2.65) < 1e-9


def test_thread_cpu_times_see_a_spinning_thread():
    import os

    stop, tid = threading.Event(), []

    def spin():
        tid.append(threading.get_native_id())
        while not stop.is_set():
            pass

    t = threading.Thread(target=spin)
    before = peer_workers.thread_cpu_s(os.getpid())
    t.start()
    time.sleep(0.6)
    after = peer_workers.thread_cpu_s(os.getpid())            # read while the thread is alive
    stop.set()
    t.join()
    assert threading.get_native_id() in after and after[tid[0]] - before.get(tid[0], 0.0) > 0.02   # shared CPUs


def test_logits_error_top1_per_position():
    ref = np.array([[0.0, 1.0, 0.5], [2.0, 0.0, 0.0]])
    got = np.array([[0.0, 0.9, 1.0], [2.1, 0.0, 0.0]], np.float32)
    e = bench_peers.logits_error(got, ref)
    assert e["top1_agree"] == 0.5 and abs(e["max_abs"] - 0.5) < 1e-6 and e["positions"] == 2


def test_skip_line_and_table(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert not peer_build.installed("llama.cpp")
    line = peer_build.skip_line("llama.cpp")
    assert line.startswith("bench_peers: skipping llama.cpp: not installed") and "0.3.36" in line
    m = {"label": "x", "decode_tps_median": 30.0, "decode_x_ours": 1.0, "prefill_tps_median": 150.0,
         "prefill_x_ours": None, "decode_busy_threads": 2, "decode_cpus": 1.9, "prefill_busy_threads": 2,
         "prefill_cpus": 2.0, "greedy_tokens_equal_to_ours": 32, "tokens": [0] * 32, "peak_rss_bytes": 2e9,
         "disk_bytes": 7e8}
    res = {"groups": {"int4": {"models": {"ours-int4": m}}}, "skipped": [line], "shape": "quick-32k", "threads": 2,
           "rounds": 1, "new_tokens": 32, "prompt_len": 32, "prefill_len": 256, "date": "d",
           "loadavg_start": (1.0, 0, 0), "loadavg_end": (2.0, 0, 0), "versions": {},
           "machine": {"cpu": "c", "lscpu": {"isa": ["avx2"]}}, "lm_head_error": {}}
    md = bench_peers.markdown(res)
    assert "| int4 | x | 30.00 | 1.00x | 150 | - | 2 (1.90 CPUs) / 2 (2.00) | 32/32 | 2.00 | 0.700 |" in md
    assert line in md.splitlines()
