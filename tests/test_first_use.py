"""What a first-time user meets (issue 27), through the commands as they run them: every option takes effect or
is refused with one line, long scans show progress, summaries count right, and the commands' help agrees.

The bundle is the controlled demo (red.png is flagged 'gun', blue.jpg is clean); the kiosk page's part of the
issue is in tests/test_kiosk.py.
"""
from __future__ import annotations

import csv
import io
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from PIL import Image

from safeclip.runtime import calibrate, progress
from safeclip.runtime import run as run_cli
from safeclip.runtime.scan import cli as scan_cli
from safeclip.runtime.backends.pick import BACKEND_CHOICES


def _one_error_line(err: str, prog: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith(f"{prog}: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- safeclip-run: no option silently dropped -------------------------------------------------------------
@pytest.mark.parametrize("extra, needle", [
    (["--stream", "--json"], "--stream and --json cannot be combined"),
    (["--policy", "refuse", "--instruction", "Be careful about {category}."], "--policy refuse would not use it"),
    (["--policy", "annotate", "--instruction", "x"], "--policy annotate would not use it"),
    (["--top-k", "5"], "--top-k only applies when sampling: add --temperature > 0"),
    (["--top-p", "0.9", "--seed", "3"], "--top-p, --seed only apply when sampling"),
])
def test_run_refuses_options_it_would_ignore(controlled_bundle, test_images, capsys, extra, needle):
    rc = run_cli.main(["--bundle", str(controlled_bundle), "--image", str(test_images / "red.png"),
                       "--prompt", "What?", "--max-new-tokens", "2", *extra])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and needle in _one_error_line(err, "safeclip-run")


def test_run_refuses_an_instruction_the_bundles_own_policy_would_not_use(controlled_bundle, test_images, tmp_path,
                                                                          capsys):
    import shutil

    from safeclip.runtime.manifest import load_manifest, write_manifest
    b = shutil.copytree(controlled_bundle, tmp_path / "refusing")
    data = dict(load_manifest(b).data)
    data["gate"] = {**data["gate"], "policy": "refuse"}
    write_manifest(b, data)
    argv = ["--bundle", str(b), "--image", str(test_images / "red.png"), "--prompt", "What?", "--instruction", "x"]
    assert run_cli.main(argv) == 2
    assert "this bundle's policy is refuse (add --policy instruct)" in _one_error_line(capsys.readouterr().err,
                                                                                        "safeclip-run")
    assert run_cli.main(argv + ["--policy", "instruct", "--max-new-tokens", "2"]) == 0       # then it is used
    assert "[gate: flagged gun (" in capsys.readouterr().err


def test_run_sampling_options_with_temperature_are_taken(controlled_bundle, capsys):
    argv = ["--bundle", str(controlled_bundle), "--prompt", "Hi", "--max-new-tokens", "6", "--temperature", "1.5",
            "--top-k", "50", "--seed", "7", "--json"]
    import json
    assert run_cli.main(argv) == 0 and run_cli.main(argv) == 0
    a, b = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert a["text"] == b["text"] and a["completion_tokens"] == b["completion_tokens"]   # the seed takes effect


def test_run_context_beyond_the_model_and_a_manifest_path_are_refused_clearly(controlled_bundle, capsys):
    assert run_cli.main(["--bundle", str(controlled_bundle), "--prompt", "Hi", "--context", "999999"]) == 1
    line = _one_error_line(capsys.readouterr().err, "safeclip-run")
    assert "context 999999 is more than the model's context length 2048" in line
    manifest = controlled_bundle / "manifest.json"
    assert run_cli.main(["--bundle", str(manifest), "--prompt", "Hi"]) == 1
    line = _one_error_line(capsys.readouterr().err, "safeclip-run")
    assert "is a file, not a bundle folder" in line and f"({controlled_bundle})" in line
    assert "no such bundle folder" not in line


def test_run_prints_the_verdict_for_a_clean_image_too(controlled_bundle, test_images, capsys):
    for image, want in (("blue.jpg", "[gate: not flagged (top class "), ("red.png", "[gate: flagged gun (")):
        for mode in ([], ["--stream"]):
            assert run_cli.main(["--bundle", str(controlled_bundle), "--image", str(test_images / image),
                                 "--prompt", "What?", "--max-new-tokens", "2", *mode]) == 0
            assert want in capsys.readouterr().err, (image, mode)


# -- help that agrees with the program ---------------------------------------------------------------------
def _parsers():
    from safeclip.runtime.serve.cli import serve_parser
    return {"safeclip-run": run_cli.run_parser(), "safeclip-scan": scan_cli.scan_parser(),
            "safeclip-calibrate": calibrate.calibrate_parser(), "safeclip-serve": serve_parser()}


_REQUIRED = {"safeclip-run": ["--prompt", "p"], "safeclip-scan": ["x"], "safeclip-serve": []}


def test_every_option_has_help_and_backend_is_one_list():
    for prog, p in _parsers().items():
        for a in p._actions:
            if a.option_strings and a.help != "==SUPPRESS==" and "-h" not in a.option_strings:
                assert a.help and a.help.strip(), f"{prog} {a.option_strings[0]} has no help"
        if prog != "safeclip-calibrate":
            backend = p._option_string_actions["--backend"]
            assert tuple(backend.choices) == BACKEND_CHOICES, prog
            assert "tensorrt" in backend.help and "onnxruntime-cpu" in backend.help, prog
            assert p.parse_args(["--bundle", "b", *_REQUIRED[prog], "--backend", "tensorrt"]).backend == "tensorrt"


@pytest.mark.parametrize("prog", ["safeclip-run", "safeclip-scan", "safeclip-serve"])
def test_an_unknown_backend_lists_the_same_choices(prog, capsys):
    with pytest.raises(SystemExit) as e:
        _parsers()[prog].parse_args(["--bundle", "b", *_REQUIRED[prog], "--backend", "foo"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"choose from {', '.join(BACKEND_CHOICES)}" in err.replace("'", ""), err


def test_one_name_for_the_private_hosts_flag(capsys):
    from safeclip.runtime.serve.cli import serve_parser
    scan = scan_cli.scan_parser()
    assert "--allow-private-image-hosts" in scan._option_string_actions
    assert "--allow-private-image-hosts" in serve_parser()._option_string_actions
    assert "--allow-private-hosts" not in scan.format_help()                     # the old name is not offered
    assert scan.parse_args(["--bundle", "b", "x", "--allow-private-image-hosts"]).allow_private_hosts is True
    assert capsys.readouterr().err == ""
    assert scan.parse_args(["--bundle", "b", "x", "--allow-private-hosts"]).allow_private_hosts is True
    assert "--allow-private-hosts is deprecated: use --allow-private-image-hosts" in capsys.readouterr().err
    assert scan.parse_args(["--bundle", "b", "x"]).allow_private_hosts is False


# -- safeclip-scan: progress, counts, exit status ----------------------------------------------------------
@pytest.fixture(scope="module")
def labelled(tmp_path_factory, test_images):
    """8 noisy red (toxic: gun) and 8 noisy blue (safe) pictures, labelled, plus one broken one."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(5)
    rows = []
    for kind, src in (("gun", "red.png"), ("safe", "blue.jpg")):
        base = np.asarray(Image.open(test_images / src).convert("RGB"), dtype=np.int16)
        for i in range(8):
            Image.fromarray(np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)).save(
                root / f"{kind}_{i}.png")
            rows.append((f"{kind}_{i}.png", kind))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    for name, extra in (("labels.csv", []), ("labels-broken.csv", [("broken.png", "safe")])):
        with open(root / name, "w", newline="") as f:
            csv.writer(f).writerows([("path", "label"), *rows, *extra])
    return root


def test_scan_prints_plain_progress_lines_when_stderr_is_not_a_terminal(controlled_bundle, labelled, capsys,
                                                                        monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)                      # a line at every batch
    rc = scan_cli.main(["--bundle", str(controlled_bundle), str(labelled), "--batch-size", "4"])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if "images (" in l]
    assert rc == 3                                                             # broken.png could not be gated
    assert lines[0].startswith("safeclip-scan: 4/17 images (24%)") and "images/s" in lines[0], err
    assert len(lines) == 4 and "16/17 images (94%), 1 failed" in lines[-1], err     # the last batch: the summary
    assert "\r" not in err                                                    # no bar in a log
    assert "gated 16 of 17 items in" in err and "; 1 failed" in err
    assert "17 items: 16 gated (8 flagged), 1 failed" in err


def test_progress_is_a_tqdm_bar_on_a_terminal_and_quiet_between_plain_lines():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    from tqdm import tqdm

    tty = Tty()
    p = progress.Progress(10, "safeclip-scan", stream=tty)
    assert isinstance(p.bar, tqdm)
    p.add(4)
    p.add(6, failed=2)
    assert p.bar.n == 10 and "failed=2" in p.bar.postfix
    p.close()
    assert p.bar is None and "safeclip-scan:" in tty.getvalue() and "image/s" in tty.getvalue()
    assert "\r" in tty.getvalue()
    out, tty = io.StringIO(), Tty()              # result lines while a bar is up: whole lines on stdout
    p = progress.Progress(3, "safeclip-scan", stream=tty)
    for i in range(3):
        p.write(f'{{"n": {i}}}', file=out)
        p.add(1)
    p.close()
    assert out.getvalue() == '{"n": 0}\n{"n": 1}\n{"n": 2}\n' and "{" not in tty.getvalue()
    clock = iter([0.0, 1.0, 11.0, 12.0]).__next__                          # made at 0; adds at 1, 11 and 12 s
    log = io.StringIO()
    p = progress.Progress(30, "safeclip-scan", stream=log, clock=clock)
    for _ in range(3):
        p.add(10)
    assert log.getvalue() == "safeclip-scan: 20/30 images (67%), 1.8 images/s, about 6 s left\n"


def test_scan_summary_counts_failures_apart_and_exit_status(controlled_bundle, labelled, tmp_path, capsys):
    rc = scan_cli.main(["--bundle", str(controlled_bundle), str(tmp_path / "missing.png")])
    err = capsys.readouterr().err
    assert rc == 3 and "gated 0 of 1 item in" in err and "1 item: 0 gated (0 flagged), 1 failed" in err, err
    assert "1 images" not in err
    rc = scan_cli.main(["--bundle", str(controlled_bundle), *(str(labelled / f"gun_{i}.png") for i in range(3))])
    err = capsys.readouterr().err
    assert rc == 0 and "gated 3 of 3 items in" in err and "3 items: 3 gated (3 flagged), 0 failed" in err, err


# -- safeclip-calibrate ------------------------------------------------------------------------------------
def test_calibrate_skips_a_broken_image_naming_it_once(controlled_bundle, labelled, capsys):
    rc = calibrate.main(["--bundle", str(controlled_bundle), "--labels", str(labelled / "labels-broken.csv"),
                             "--max-fpr", "0.125", "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0 and "dry run: nothing written" in out, err
    skipped = [l for l in err.splitlines() if l.startswith("safeclip-calibrate: skipped ")]
    assert len(skipped) == 2 and "skipped 1 of 17 labelled images" in skipped[1], err
    assert skipped[0].count("broken.png") == 1 and "Traceback" not in err, skipped[0]
    assert "8 toxic / 8 safe labelled images" in out


def test_calibrate_refuses_a_compare_bundle_of_the_same_variant_and_a_bad_max_fpr(controlled_bundle, labelled,
                                                                                  capsys):
    base = ["--bundle", str(controlled_bundle), "--labels", str(labelled / "labels.csv"), "--dry-run"]
    assert calibrate.main(base + ["--max-fpr", "0.125", "--compare", str(controlled_bundle)]) == 2
    line = _one_error_line(capsys.readouterr().err, "safeclip-calibrate")
    assert "gate variant is 'reference', the same as --bundle's" in line
    assert calibrate.main(base + ["--max-fpr", "0"]) == 2
    line = _one_error_line(capsys.readouterr().err, "safeclip-calibrate")
    assert "--max-fpr must be in (0, 1]" in line and "max_fpr" not in line.replace("--max-fpr", "")


# -- every command: Ctrl-C is one line and 130, never a traceback (error_text.fail) --------------------------
@pytest.mark.parametrize("main, argv, line", [
    (run_cli.main, ["--bundle", "B", "--prompt", "Hi"], "safeclip-run: interrupted"),
    (calibrate.main, ["--bundle", "B", "--labels", "L.csv", "--max-fpr", "0.1"],
     "safeclip-calibrate: interrupted; nothing was written"),
], ids=["run", "calibrate"])
def test_commands_answer_ctrl_c_with_one_line(main, argv, line, monkeypatch, capsys):
    from safeclip.runtime.pipeline import Pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Pipeline, "load", interrupted)
    assert main(argv) == 130
    assert capsys.readouterr().err == line + "\n"


# -- safeclip-export: --context without --dry-run ----------------------------------------------------------
def test_export_refuses_context_without_dry_run(tmp_path, capsys):
    pytest.importorskip("torch")
    from safeclip.export import cli as export_cli
    rc = export_cli.main(["--context", "512", "--out", str(tmp_path / "b"), "--no-decoder"])
    line = _one_error_line(capsys.readouterr().err, "safeclip-export")
    assert rc == 2 and "--context only plans (with --dry-run)" in line and not (tmp_path / "b").exists()


# -- safeclip-serve: one log stream, one format ------------------------------------------------------------
def test_serve_logs_start_up_and_access_lines_on_stderr_in_one_format(controlled_bundle):
    pytest.importorskip("uvicorn")
    import signal

    p = subprocess.Popen([sys.executable, "-m", "safeclip.runtime.serve.cli", "--bundle", str(controlled_bundle),
                          "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = p.stderr.readline()
        url = first.split(" on ")[1].split("/ ")[0]
        with urllib.request.urlopen(url + "/health", timeout=30) as r:
            assert r.status == 200
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    lines = [first.rstrip("\n"), *err.splitlines()]
    assert out == "", out                                                  # nothing on stdout
    assert all(l.startswith("safeclip-serve: ") for l in lines), lines
    assert lines[0].startswith("safeclip-serve: serving ")
    assert any('"GET /health HTTP/1.1" 200' in l for l in lines), lines  # the access line, same stream and prefix
    assert not any("INFO:" in l for l in lines), lines
