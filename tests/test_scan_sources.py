"""safeclip-scan --output (local): every kind of source, Parquet rows equal to the per-image gate, error rows,
the safe subset, an interrupted job resumed without a row twice, and --labels on a finished output."""
import csv
import json

import pytest

pytest.importorskip("pyarrow", reason="Parquet output needs pyarrow (the [ray] extra installs it)")
import pyarrow.parquet as pq  # noqa: E402

from safeclip.runtime.scan import cli as scan_cli  # noqa: E402
from safeclip.runtime.scan import gating, sources as scan_sources  # noqa: E402

from scan_data import build_sources, check_rows  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory, test_images):
    return build_sources(tmp_path_factory.mktemp("scan_sources"), test_images)


@pytest.fixture(scope="module")
def oracle(controlled_bundle):
    from safeclip.runtime.pipeline import Pipeline
    return Pipeline.load(controlled_bundle, language_model=False)


def test_every_source_kind_to_parquet_with_error_rows_and_safe_subset(controlled_bundle, data, oracle, tmp_path,
                                                                      capsys):
    sources, truth, image_of = data
    out, safe_txt, safe_pq = tmp_path / "scan.parquet", tmp_path / "safe.txt", tmp_path / "safe.parquet"
    rc = scan_cli.main(["--bundle", str(controlled_bundle), *sources, "--output", str(out), "--batch-size", "3",
                        "--safe-out", str(safe_txt)])
    cap = capsys.readouterr()
    assert rc == 3 and cap.out == ""               # error rows: exit 3 (README); --output keeps stdout quiet
    assert not out.with_name(out.name + ".partial").exists()
    rows = pq.read_table(out).to_pylist()
    check_rows(rows, truth, image_of, oracle)
    assert [(r["source"], r["key"]) for r in rows] == [(i["source"], i["key"]) for i in scan_sources.list_items(sources)]
    n_err = sum(t == "error" for t in truth.values())
    n_gun = sum(t == "gun" for t in truth.values())
    assert f"{len(truth)} items: {len(truth) - n_err} gated ({n_gun} flagged), {n_err} failed" in cap.err
    safe = [r for r in rows if r["flagged"] is False]
    assert safe_txt.read_text().splitlines() == [scan_sources.display_name(r) for r in safe]
    assert any("#" in line for line in safe_txt.read_text().splitlines())        # shard members as shard#key
    # the same output again: complete already, nothing gated; the safe subset as Parquet from its rows
    assert scan_cli.main(["--bundle", str(controlled_bundle), *sources, "--output", str(out),
                          "--safe-out", str(safe_pq)]) == 3
    assert "complete already" in capsys.readouterr().err
    assert pq.read_table(safe_pq).column("key").to_pylist() == [r["key"] for r in safe]
    # a finished output of another threshold is not taken for this job's
    assert scan_cli.main(["--bundle", str(controlled_bundle), *sources, "--output", str(out),
                          "--threshold", "0.99"]) == 2
    assert "rows of another job (differs in: threshold)" in capsys.readouterr().err


def test_stdout_json_lines_cover_shards_too(controlled_bundle, data, capsys):
    sources, truth, _ = data
    assert scan_cli.main(["--bundle", str(controlled_bundle), *sources[2:]]) == 3       # with error items
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(recs) == sum(k[0] in sources[2:] for k in truth)
    assert {r["path"].rsplit("#", 1)[-1] for r in recs if "error" in r} == {"bad", "s2"}


def test_interrupted_job_resumes_and_writes_each_image_once(controlled_bundle, data, oracle, tmp_path,
                                                           monkeypatch, capsys):
    sources, truth, image_of = data
    out = tmp_path / "scan"                        # a folder of parts this time
    argv = ["--bundle", str(controlled_bundle), *sources, "--output", str(out), "--batch-size", "2",
            "--part-rows", "2"]
    real, calls = gating.gate_items, []

    def dies_on_third(pipe, items, reader):
        calls.append(len(items))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(pipe, items, reader)

    monkeypatch.setattr(gating, "gate_items", dies_on_third)
    assert scan_cli.main(argv) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    partial = tmp_path / "scan.partial"
    assert not out.exists() and len(list(partial.glob("part-*.parquet"))) == 2
    first = {p.name for p in partial.glob("part-*.parquet")}

    # another threshold would mix verdicts of two jobs: refused, the partial output untouched
    assert scan_cli.main(argv + ["--threshold", "0.9"]) == 2
    assert "another job" in capsys.readouterr().err

    gated = []

    def counting(pipe, items, reader):
        gated.extend(items)
        return real(pipe, items, reader)

    monkeypatch.setattr(gating, "gate_items", counting)
    assert scan_cli.main(argv) == 3                 # finished; the error items make it 3
    assert f"4 of {len(truth)} items already written" in capsys.readouterr().err
    assert len(gated) == len(truth) - 4 and len({(i["source"], i["key"]) for i in gated}) == len(gated)
    assert out.is_dir() and (out / "_SUCCESS").exists() and not partial.exists()
    assert first <= {p.name for p in out.glob("part-*.parquet")}                 # the first run's rows kept
    check_rows(pq.read_table(out).to_pylist(), truth, image_of, oracle)


def test_labels_on_a_finished_output(controlled_bundle, data, tmp_path, capsys):
    sources, truth, _ = data
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for (src, key), t in truth.items():
            if src == sources[0] and t != "error":
                w.writerow([f"{src}/{key}", "gun" if t == "gun" else "safe"])
    out, report = tmp_path / "s.parquet", tmp_path / "r.json"
    base = ["--bundle", str(controlled_bundle), sources[0], "--output", str(out)]
    assert scan_cli.main(base) == 3                 # the folder holds a broken image
    capsys.readouterr()
    assert scan_cli.main(base + ["--labels", str(labels), "--report", str(report)]) == 3
    err = capsys.readouterr().err
    assert "complete already" in err and "DSR 100.0%" in err and "FPR 0.0%" in err
    m = json.loads(report.read_text())["metrics"]
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (4, 0, 0, 4)


def test_bad_sources_and_options_are_one_line_errors(controlled_bundle, tmp_path, capsys):
    import pyarrow as pa
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "nocol.parquet")
    (tmp_path / "x.tar").write_bytes(b"not a tar at all" * 100)
    b = str(controlled_bundle)
    cases = [[str(tmp_path / "nocol.parquet"), "--output", str(tmp_path / "o1.parquet")],
             [str(tmp_path / "x.tar"), "--output", str(tmp_path / "o2.parquet")],
             [str(tmp_path / "nolist.txt")],
             [str(tmp_path), "--ray"],
             [str(tmp_path), "--batch-size", "0"]]
    for args in cases:
        assert scan_cli.main(["--bundle", b, *args]) == 2, args
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("safeclip-scan: error")]
    assert len(lines) == len(cases) and "Traceback" not in err
    assert "no image column" in err and "WebDataset" in err and "--ray needs --output" in err


def test_url_items_are_fetched_only_from_allowed_hosts(controlled_bundle, oracle, test_images, tmp_path, capsys):
    """A file list of http URLs (a loopback server here): private and loopback hosts are refused unless
    --allow-private-image-hosts (the server's flag; the old --allow-private-hosts still works and warns), as
    the server's remote images are; then the verdict is the file's own."""
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    handler = lambda *a, **k: SimpleHTTPRequestHandler(*a, directory=str(test_images), **k)  # noqa: E731
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}"
        lst = tmp_path / "urls.txt"
        lst.write_text(f"{base}/red.png\n{base}/blue.jpg\n{base}/missing.png\n")
        argv = ["--bundle", str(controlled_bundle), str(lst)]
        assert scan_cli.main(argv) == 3                                    # every URL refused: none gated
        recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert len(recs) == 3 and all("error" in r for r in recs)
        assert scan_cli.main(argv + ["--allow-private-image-hosts"]) == 3   # fetched this time; missing.png fails
        recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [("error" in r) for r in recs] == [False, False, True] and recs[0]["flagged"]
        assert scan_cli.main(argv + ["--allow-private-hosts", "--output", str(tmp_path / "u.parquet")]) == 3
        assert "--allow-private-hosts is deprecated: use --allow-private-image-hosts" in capsys.readouterr().err
        rows = {r["key"].rsplit("/", 1)[-1]: r for r in pq.read_table(tmp_path / "u.parquet").to_pylist()}
    finally:
        httpd.shutdown()
    for name in ("red.png", "blue.jpg"):
        v = oracle.gate(test_images / name)
        assert (rows[name]["flagged"], rows[name]["category"]) == (v.flagged, v.category)
        assert rows[name]["score"] == pytest.approx(v.score, abs=1e-6) and rows[name]["path"].startswith(base)
    assert rows["missing.png"]["error"] and rows["red.png"]["flagged"] and not rows["blue.jpg"]["flagged"]
