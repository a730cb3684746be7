"""safeclip-scan for a fine-tuning pipeline (issue 23 §4): a resumed scan gates again what changed and drops what
is gone, ``--safe-out`` never lists an image whose current content was not gated, FIFO sources are refused
without hanging, and an unwritable ``--safe-out`` is one line and exit 1."""
import hashlib
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.importorskip("pyarrow", reason="Parquet output needs pyarrow (the [ray] extra installs it)")
import pyarrow.parquet as pq  # noqa: E402

from safeclip.runtime.scan import cli as scan_cli  # noqa: E402
from safeclip.runtime.scan import gating  # noqa: E402

from scan_data import _noisy, interrupt_on_second_batch  # noqa: E402


def _folder(root, test_images, n=3):
    """a_clean_*.png (blue: safe) listed before z_gun_*.png (red: flagged 'gun')."""
    rng = np.random.default_rng(7)
    root.mkdir()
    for i in range(n):
        (root / f"a_clean_{i}.png").write_bytes(_noisy(test_images / "blue.jpg", rng))
        (root / f"z_gun_{i}.png").write_bytes(_noisy(test_images / "red.png", rng))
    return root


def _swap_content_keep_mtime(victim, donor):
    """The attack: overwrite ``victim`` in place with ``donor``'s bytes and put its mtime back (same inode)."""
    st = os.stat(victim)
    with open(victim, "r+b") as f:
        f.truncate(0)
        f.write(donor.read_bytes())
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_resumed_scan_regates_changed_files_and_drops_gone_ones(controlled_bundle, test_images, tmp_path,
                                                                monkeypatch, capsys):
    imgs = _folder(tmp_path / "imgs", test_images)
    out, safe = tmp_path / "scan.parquet", tmp_path / "safe.txt"
    argv = ["--bundle", str(controlled_bundle), str(imgs), "--output", str(out), "--batch-size", "2",
            "--part-rows", "2", "--safe-out", str(safe)]
    real = interrupt_on_second_batch(monkeypatch, gating)
    assert scan_cli.main(argv) == 130                       # a_clean_0 and a_clean_1 gated (safe) and written
    capsys.readouterr()
    _swap_content_keep_mtime(imgs / "a_clean_0.png", imgs / "z_gun_0.png")   # now a flagged image
    (imgs / "a_clean_1.png").unlink()                                         # gone
    gated = []

    def counting(pipe, items, reader):
        gated.extend(it["key"] for it in items)
        return real(pipe, items, reader)

    monkeypatch.setattr(gating, "gate_items", counting)
    assert scan_cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "1 rows of items no longer listed dropped; 1 items changed" in err
    assert "a_clean_0.png" in gated                          # the changed file was gated again
    rows = {r["key"]: r for r in pq.read_table(out).to_pylist()}
    assert sorted(rows) == sorted(p.name for p in imgs.iterdir())            # 5 rows for 5 files
    assert rows["a_clean_0.png"]["flagged"] is True and rows["a_clean_0.png"]["category"] == "gun"
    listed = safe.read_text().splitlines()
    assert listed == [str(imgs / "a_clean_2.png")]
    safe_pq = tmp_path / "safe.parquet"                     # the Parquet subset names the bytes gated
    assert scan_cli.main(argv[:-1] + [str(safe_pq)]) == 0
    got = pq.read_table(safe_pq).to_pylist()
    assert [(r["key"], r["sha256"]) for r in got] == [
        ("a_clean_2.png", hashlib.sha256((imgs / "a_clean_2.png").read_bytes()).hexdigest())]


def test_safe_out_leaves_out_images_changed_after_the_scan(controlled_bundle, test_images, tmp_path, capsys):
    imgs = _folder(tmp_path / "imgs", test_images, n=2)
    out, safe = tmp_path / "scan.parquet", tmp_path / "safe.txt"
    base = ["--bundle", str(controlled_bundle), str(imgs), "--output", str(out)]
    assert scan_cli.main(base) == 0
    _swap_content_keep_mtime(imgs / "a_clean_0.png", imgs / "z_gun_0.png")
    os.unlink(imgs / "a_clean_1.png")
    shutil.copy(imgs / "z_gun_1.png", imgs / "a_clean_1.png")    # same name, new file (new inode), flagged
    capsys.readouterr()
    assert scan_cli.main(base + ["--safe-out", str(safe)]) == 0
    err = capsys.readouterr().err
    assert "complete already" in err and "2 images gated safe have changed or are gone since" in err
    assert safe.read_text() == ""
    # without --output too: an image rewritten in place after gating is never listed
    assert scan_cli.main(["--bundle", str(controlled_bundle), str(imgs / "z_gun_0.png"), "--safe-out", str(safe)]) == 0
    assert safe.read_text() == ""


@pytest.mark.parametrize("name", ["list.txt", "shard.parquet", "shard.tar"])
def test_fifo_sources_are_refused_without_hanging(controlled_bundle, tmp_path, capsys, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    # Unblock a reader that opened the FIFO (the old behaviour: it hangs until a writer comes and goes).
    stop = threading.Event()

    def writer():                        # opening the write end succeeds only while a reader holds the FIFO
        while not stop.wait(2):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:              # ENXIO: nobody has it open for reading
                pass

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    rc = scan_cli.main(["--bundle", str(controlled_bundle), str(fifo), "--output", str(tmp_path / "o.parquet")])
    stop.set()
    err = capsys.readouterr().err
    assert rc == 2 and "not a regular file" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("safeclip-scan: error")]) == 1


def test_safe_out_in_a_read_only_folder_is_one_line(controlled_bundle, test_images, tmp_path):
    imgs = _folder(tmp_path / "imgs", test_images, n=1)
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    cmd = [sys.executable, "-c", "import sys; from safeclip.runtime.scan import cli; sys.exit(cli.main(sys.argv[1:]))",
           "--bundle", str(controlled_bundle), str(imgs), "--safe-out", str(ro / "safe.txt")]
    if os.geteuid() == 0:                # root ignores permission bits: drop the capabilities that bypass them
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: a read-only folder cannot be made")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("safeclip-scan: error: --safe-out") and "cannot write" in lines[0]
    assert r.stdout == ""               # refused before any image was gated
