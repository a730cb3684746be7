"""safeclip-scan --ray on a local Ray runtime (2 CPUs, two half-CPU actors): the same rows as the per-image gate
and the local scan, a worker killed mid-job (restarted by Ray, its batch retried, no row lost or doubled), and
a job interrupted locally finished on Ray."""
import pytest

pytest.importorskip("ray", reason="the [ray] extra is not installed (pip install -e '.[ray]')")
import pyarrow.parquet as pq  # noqa: E402

from safeclip.runtime.scan import cli as scan_cli  # noqa: E402
from safeclip.runtime.scan import gating  # noqa: E402

from scan_data import build_sources, check_rows, interrupt_on_second_batch  # noqa: E402

RAY = ["--ray", "--workers", "2", "--cpus-per-worker", "0.5", "--batch-size", "3"]


@pytest.fixture(scope="module")
def oracle(controlled_bundle):
    from safeclip.runtime.pipeline import Pipeline
    return Pipeline.load(controlled_bundle, language_model=False)


def test_ray_scan_survives_a_dying_worker_and_matches_the_local_scan(ray_local, controlled_bundle, oracle,
                                                                    test_images, tmp_path, capsys):
    sources, truth, image_of = build_sources(tmp_path / "data", test_images, crash_key="crash_me.png")
    assert not ray_local.exists()
    out, local = tmp_path / "ray.parquet", tmp_path / "local.parquet"
    rc = scan_cli.main(["--bundle", str(controlled_bundle), *sources, "--output", str(out), *RAY])
    assert rc == 3, capsys.readouterr().err           # 3: finished, but the broken items could not be gated
    assert ray_local.exists(), "the test hook never killed a worker"         # a worker really died mid-job
    rows = pq.read_table(out).to_pylist()
    check_rows(rows, truth, image_of, oracle)                                 # every row once, crash_me.png too
    assert scan_cli.main(["--bundle", str(controlled_bundle), *sources, "--output", str(local)]) == 3
    by_id = {(r["source"], r["key"]): r for r in pq.read_table(local).to_pylist()}
    for r in rows:
        ref = by_id[(r["source"], r["key"])]
        assert (r["flagged"], r["category"], r["error"] is None) == (ref["flagged"], ref["category"],
                                                                     ref["error"] is None)
        if r["error"] is None:
            assert r["score"] == pytest.approx(ref["score"], abs=1e-6)
    assert [(r["source"], r["key"]) for r in rows] == list(by_id)             # both in listing order


def test_job_interrupted_locally_is_finished_on_ray(ray_local, controlled_bundle, oracle, test_images, tmp_path,
                                                   monkeypatch, capsys):
    sources, truth, image_of = build_sources(tmp_path / "data", test_images)
    out = tmp_path / "scan"
    base = ["--bundle", str(controlled_bundle), *sources, "--output", str(out), "--part-rows", "3"]
    real = interrupt_on_second_batch(monkeypatch, gating)
    assert scan_cli.main(base + ["--batch-size", "3"]) == 130
    monkeypatch.setattr(gating, "gate_items", real)
    first = {p.name for p in (tmp_path / "scan.partial").glob("part-*.parquet")}
    assert len(first) == 1 and not out.exists()
    assert scan_cli.main(base + RAY) == 3                  # the broken items among the sources
    assert f"3 of {len(truth)} items already written" in capsys.readouterr().err
    assert first <= {p.name for p in out.glob("part-*.parquet")}
    check_rows(pq.read_table(out).to_pylist(), truth, image_of, oracle)
