"""Exports that survive kill -9 (issue 23 §2): the bundle at --out is replaced without a moment where none exists,
a killed export's leftovers are cleaned by the next export (only ours, only dead ones), and a second export to
the same --out refuses with one line while the first runs. Kills are real SIGKILLs of a subprocess at a chosen
point (``SAFECLIP_EXPORT_TEST_KILL_AT``, export/swap.py)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safeclip.export.swap import OutputSlot, exchange
from safeclip.runtime.manifest import MANIFEST, load_manifest

from conftest import copy_bundle

_SWAP = """
import sys
from pathlib import Path
from safeclip.export.swap import OutputSlot
out, use_exchange = Path(sys.argv[1]), sys.argv[2] == "1"
slot = OutputSlot.acquire(out)
tmp = slot.new_tmp()
(tmp / "manifest.json").write_text('{"v": "new"}')
slot.put_in_place(tmp, use_exchange=use_exchange)
slot.release()
"""


def _fake_bundle(path: Path, v: str) -> Path:
    path.mkdir()
    (path / MANIFEST).write_text(json.dumps({"v": v}))
    (path / "weights.bin").write_bytes(b"x" * 4096)
    return path


def _version(out: Path):
    return json.loads((out / MANIFEST).read_text())["v"] if (out / MANIFEST).is_file() else None


def _supports_exchange(tmp_path) -> bool:
    a, b = tmp_path / "probe_a", tmp_path / "probe_b"
    a.mkdir()
    b.mkdir()
    try:
        return exchange(a, b)
    finally:
        a.rmdir()
        b.rmdir()


@pytest.mark.parametrize("use_exchange, point, after_kill", [
    (True, "tmp", "old"), (True, "swap", "old"), (True, "swapped", "new"),
    (False, "swap", "old"), (False, "renamed", None), (False, "swapped", "new")])
def test_kill_during_the_swap_never_loses_the_bundle(tmp_path, use_exchange, point, after_kill):
    if use_exchange and not _supports_exchange(tmp_path):
        pytest.skip("this system or file system has no atomic exchange (renameat2 / renamex_np)")
    out = _fake_bundle(tmp_path / "x", "old")
    r = subprocess.run([sys.executable, "-c", _SWAP, str(out), "1" if use_exchange else "0"], timeout=60,
                       env={**os.environ, "SAFECLIP_EXPORT_TEST_KILL_AT": point}, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    # the exchange leaves a complete bundle at every point; only the two-rename fallback has a window
    assert _version(out) == after_kill
    assert any(p.name.startswith((".x.tmp-", ".x.old-")) for p in tmp_path.iterdir())
    slot = OutputSlot.acquire(out)                 # the next export: recovers, then cleans
    assert _version(out) == (after_kill or "old") and slot.recovered
    slot.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    assert (out / "weights.bin").is_file() == (_version(out) == "old")        # whole, never a mix of the two


def test_swap_without_a_kill_replaces_and_leaves_nothing(tmp_path):
    out = _fake_bundle(tmp_path / "x", "old")
    for use_exchange in (True, False):
        r = subprocess.run([sys.executable, "-c", _SWAP, str(out), "1" if use_exchange else "0"], timeout=60,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        assert _version(out) == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["x"]
        (out / MANIFEST).write_text('{"v": "old"}')


def test_leftover_folders_that_are_not_ours_are_never_touched(tmp_path):
    out = _fake_bundle(tmp_path / "x", "old")
    foreign = tmp_path / ".x.tmp-mine"           # the shape of ours, but no journal names it
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    (tmp_path / ".x.lock").write_text(json.dumps({"pid": 1, "tmp": "../elsewhere", "old": "/etc"}))
    slot = OutputSlot.acquire(out)
    slot.release()
    assert (foreign / "keep.txt").read_text() == "mine" and _version(out) == "old"


def _wait_stopped(pid: int, timeout: float = 90.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.1)
    raise AssertionError("the first export never reached its test stop point")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see the stopped export")
def test_second_export_refuses_and_next_export_cleans_a_killed_ones_leftovers(vision_bundle, tmp_path):
    pytest.importorskip("torch")
    from safeclip.export.bundle import ExportOptions, export_bundle

    out = copy_bundle(vision_bundle, tmp_path / "b")
    before = (out / MANIFEST).read_bytes()
    cmd = [sys.executable, "-m", "safeclip.export.cli", "--no-decoder", "--out", str(out)]
    first = subprocess.Popen(cmd, env={**os.environ, "SAFECLIP_EXPORT_TEST_STOP_AT": "tmp"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_stopped(first.pid)                    # holds the lock, its .b.tmp-* folder made
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert lines == [f"safeclip-export: error: {out}: another export (pid {first.pid}) is writing this bundle "
                         "now; wait for it to finish or choose another --out"]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".b.tmp-")]
    assert len(left) == 1 and (out / MANIFEST).read_bytes() == before       # the bundle untouched
    notes = []
    export_bundle(ExportOptions(out=out, with_decoder=False), progress=notes.append)
    assert any(f"removed {left[0]}" in n for n in notes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    load_manifest(out, full_verify=True)
