"""Issue 23 §1: nobody turns the gate off quietly.

Each attack is reproduced as a hostile user who can write the bundle folder would run it, with the project's own
re-sealing function (``write_manifest``) where the attack needs a consistent manifest: gate sanity, the known-answer
self-test, signatures with trusted keys, files outside the bundle, the verification cache, non-regular manifests.
"""
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import copy_bundle
from safeclip.runtime.manifest import MANIFEST, BundleError, load_manifest, sha256_file, verify_files, write_manifest
from safeclip.runtime.pipeline import Pipeline

onnx = pytest.importorskip("onnx")
ed25519 = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ed25519")
from cryptography.hazmat.primitives import serialization  # noqa: E402

BIN = Path(sys.executable).parent


def _reseal(bundle, mutate, **kw):
    d = json.loads((bundle / MANIFEST).read_text())
    mutate(d)
    return write_manifest(bundle, d, **kw)


def _keypair(folder: Path, name: str) -> tuple[Path, Path]:
    key = ed25519.Ed25519PrivateKey.generate()
    priv, pub = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


@pytest.fixture
def keys(tmp_path, monkeypatch):
    monkeypatch.delenv("SAFECLIP_TRUSTED_KEYS", raising=False)
    d = tmp_path / "keys"
    d.mkdir()
    return {"publisher": _keypair(d, "publisher"), "other": _keypair(d, "other"), "device": _keypair(d, "device")}


def _always_safe(bundle: Path) -> None:
    """Replace the gate graph by one whose class_probs is always [1, 0, ...] (the safe class), features kept;
    re-hash the file and re-seal, as an attacker with write access would."""
    path = bundle / "vision_gate.onnx"
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    n = len(json.loads((bundle / MANIFEST).read_text())["gate"]["classes"])
    for node in g.node:
        node.output[:] = ["class_probs_real" if o == "class_probs" else o for o in node.output]
    onehot = onnx.helper.make_tensor("onehot_safe", onnx.TensorProto.FLOAT, [n], [1.0] + [0.0] * (n - 1))
    zero = onnx.helper.make_tensor("zero_f", onnx.TensorProto.FLOAT, [], [0.0])
    g.initializer.extend([onehot, zero])
    g.node.extend([onnx.helper.make_node("Mul", ["class_probs_real", "zero_f"], ["class_probs_zeroed"]),
                   onnx.helper.make_node("Add", ["class_probs_zeroed", "onehot_safe"], ["class_probs"])])
    onnx.save(model, str(path))

    def fix(d):
        d["files"]["vision_gate.onnx"] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    _reseal(bundle, fix)


# -- sanity at load, signed or not -----------------------------------------------------------------------------
@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["gate"].update(threshold=1.0), r"threshold must be a number in \[0, 1\), got 1.0"),
    (lambda d: d["gate"].update(threshold=1.5), r"threshold must be a number in \[0, 1\)"),
    (lambda d: d["gate"].update(safe_classes=list(d["gate"]["classes"])), "safe_classes covers every class"),
    (lambda d: d["gate"].update(classes=d["gate"]["classes"][:-1] + ["neutral"]), "names a class twice"),
    (lambda d: d["tokenizer"].update(file="../outside.json"), "tokenizer.file '../outside.json' leaves the bundle"),
    (lambda d: d["tokenizer"].update(file="/etc/passwd"), "leaves the bundle"),
    (lambda d: d["files"].pop("tokenizer.json"), "tokenizer.file 'tokenizer.json' is not hashed in files"),
    (lambda d: d["graphs"]["vision_gate"].update(image_newline="newline.npy"), "image_newline 'newline.npy' is not hashed"),
    (lambda d: d.update(embeddings={"file": "embed.npy"}), "embeddings.file 'embed.npy' is not hashed in files"),
    (lambda d: d["build"]["engines"].update(vision_gate={"file": "x.plan"}), "engines.vision_gate.file 'x.plan' is not hashed"),
])
def test_resealed_gate_that_cannot_fire_or_files_not_hashed_are_refused(vision_bundle, tmp_path, mutate, message):
    b = copy_bundle(vision_bundle, tmp_path / "b")
    _reseal(b, mutate)
    with pytest.raises(BundleError, match=message) as e:
        Pipeline.load(b)
    assert "\n" not in str(e.value)


def test_listed_file_that_is_a_link_out_of_the_bundle_is_refused(vision_bundle, tmp_path):
    b = copy_bundle(vision_bundle, tmp_path / "b")
    outside = tmp_path / "elsewhere.json"
    shutil.move(b / "tokenizer.json", outside)
    (b / "tokenizer.json").symlink_to(outside)                   # same bytes, same hash: but not in the bundle
    with pytest.raises(BundleError, match="'tokenizer.json' is a link leading out of the bundle"):
        load_manifest(b, full_verify=True)


# -- the gate's known-answer self-test ---------------------------------------------------------------------------
def test_gate_graph_replaced_by_always_safe_is_refused_by_the_self_test(vision_bundle, tmp_path):
    b = copy_bundle(vision_bundle, tmp_path / "b")
    _always_safe(b)
    from safeclip.runtime.backends.ort import make_session
    probs = make_session(b / "vision_gate.onnx").run({"pixel_values": np.ones((1, 3, 336, 336), np.float32)})
    assert probs["class_probs"][0, 0] == 1.0                     # the attack works on the graph itself
    load_manifest(b, full_verify=True)                           # hashes and integrity are all consistent
    with pytest.raises(BundleError, match="gate self-test failed: class_probs differs .* swapped or corrupted") as e:
        Pipeline.load(b)
    assert "\n" not in str(e.value)


def test_self_test_is_recorded_and_required(vision_bundle, tmp_path):
    rec = load_manifest(vision_bundle).gate["self_test"]
    assert rec["probes"] == "v1" and rec["size"] == 336 and len(rec["class_probs"]) == 2
    assert all(abs(sum(p) - 1) < 1e-4 for p in rec["class_probs"]) and len(rec["feature_samples"][0]) == 16
    b = copy_bundle(vision_bundle, tmp_path / "b")
    _reseal(b, lambda d: d["gate"].pop("self_test"))
    with pytest.raises(BundleError, match="records no gate self-test"):
        Pipeline.load(b)
    _reseal(b, lambda d: d["gate"].update(self_test={**rec, "class_probs": [[0.0] * 8] * 2}))
    with pytest.raises(BundleError, match="gate self-test failed: class_probs"):
        Pipeline.load(b)


def test_self_test_runs_on_the_serving_backend(vision_bundle, tmp_path, monkeypatch):
    """TensorRT (the stand-in) serves the gate: an engine within the build tolerance passes, a swapped one fails."""
    from _fake_trt import install_fakes, write_plan
    from safeclip.runtime.backends.pick import open_vision
    from safeclip.runtime.selftest import check_session
    from test_trt_backend import ORIN, jetson_profiles

    install_fakes(monkeypatch, "10.3.0.30")
    b = copy_bundle(vision_bundle, tmp_path / "b")
    m = load_manifest(b)
    prof = jetson_profiles(m)["vision_gate"]["profiles"]
    for drift, ok in ((1e-3, True), (0.3, False)):
        plan = b / "vision_gate.plan"
        write_plan(b / "vision_gate.onnx", plan, prof, perturb={"class_probs": drift, "image_features": 0.0})

        def add(d):
            d["files"]["vision_gate.plan"] = {"sha256": sha256_file(plan), "size": plan.stat().st_size}
            d["build"]["engines"] = {"vision_gate": {"file": "vision_gate.plan", **ORIN}}
        _reseal(b, add)
        m = load_manifest(b)
        vs = open_vision(m, "tensorrt")
        if ok:
            check_session(m, vs)
        else:
            with pytest.raises(BundleError, match="gate self-test failed: class_probs differs .* by 0.3"):
                check_session(m, vs)


# -- signed bundles ----------------------------------------------------------------------------------------
def test_signed_bundle_and_trusted_keys(vision_bundle, tmp_path, keys, monkeypatch):
    (priv, pub), (opriv, opub) = keys["publisher"], keys["other"]
    b = copy_bundle(vision_bundle, tmp_path / "b")
    # without trusted keys an unsigned bundle loads; with them it is refused
    Pipeline.load(b)
    with pytest.raises(BundleError, match="bundle is not signed, and trusted keys are set") as e:
        Pipeline.load(b, trusted_keys=[pub])
    assert "\n" not in str(e.value)
    signed = _reseal(b, lambda d: None, sign_key=priv)
    assert signed["signature"]["algorithm"] == "ed25519"
    assert Pipeline.load(b, trusted_keys=[pub]).manifest.signed_by == signed["signature"]["key_id"]
    monkeypatch.setenv("SAFECLIP_TRUSTED_KEYS", str(pub))               # the environment, a file
    Pipeline.load(b)
    folder = tmp_path / "trusted"
    folder.mkdir()
    shutil.copy(opub, folder / "a.pem")
    shutil.copy(pub, folder / "b.pem")
    monkeypatch.setenv("SAFECLIP_TRUSTED_KEYS", str(folder))            # a folder of .pem
    Pipeline.load(b)
    monkeypatch.setenv("SAFECLIP_TRUSTED_KEYS", str(opub))
    with pytest.raises(BundleError, match="signed by key .* which is not among the trusted keys"):
        Pipeline.load(b)
    monkeypatch.delenv("SAFECLIP_TRUSTED_KEYS")
    # a signed manifest edited and re-sealed by hand (signature kept) does not verify
    d = json.loads((b / MANIFEST).read_text())
    d["gate"]["threshold"] = 0.99
    d.pop("integrity")
    from safeclip.runtime.manifest import integrity_of
    d["integrity"] = integrity_of(d)
    (b / MANIFEST).write_text(json.dumps(d))
    with pytest.raises(BundleError, match="signature by key .* does not verify"):
        load_manifest(b, trusted_keys=[pub])
    # re-signed with another key: refused too
    _reseal(b, lambda d: None, sign_key=opriv)
    with pytest.raises(BundleError, match="not among the trusted keys"):
        load_manifest(b, trusted_keys=[pub])


def test_full_attack_with_rerecorded_self_test_is_stopped_only_by_the_signature(vision_bundle, tmp_path, keys):
    """Swap the gate graph AND re-record its probe answers: only a signature can tell (the documented limit)."""
    from safeclip.export.bundle import gate_self_test

    priv, pub = keys["publisher"]
    b = copy_bundle(vision_bundle, tmp_path / "b")
    _reseal(b, lambda d: None, sign_key=priv)
    _always_safe(b)
    _reseal(b, lambda d: d["gate"].update(self_test=gate_self_test(b, d["graphs"]["vision_gate"])))
    _png(tmp_path / "x.png")
    assert Pipeline.load(b).gate(tmp_path / "x.png").probs["neutral"] == 1.0      # unsigned: the swap loads
    with pytest.raises(BundleError, match="bundle is not signed, and trusted keys are set"):
        Pipeline.load(b, trusted_keys=[pub])


def _png(path: Path) -> bool:
    from PIL import Image
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(path)
    return True


def test_bad_trust_settings_fail_closed(vision_bundle, tmp_path, keys, monkeypatch):
    priv, pub = keys["publisher"]
    empty = tmp_path / "empty"
    empty.mkdir()
    for setting, message in ((tmp_path / "missing.pem", "does not exist"), (empty, "holds no .pem file"),
                             (priv, "not a PEM public key"), (vision_bundle / "tokenizer.json", "not a PEM public key")):
        monkeypatch.setenv("SAFECLIP_TRUSTED_KEYS", str(setting))
        with pytest.raises(BundleError, match=message):
            load_manifest(vision_bundle)


def test_keys_made_with_the_documented_openssl_commands(vision_bundle, tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    key, pub = tmp_path / "publisher.pem", tmp_path / "publisher.pub.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(pub)], check=True)
    b = copy_bundle(vision_bundle, tmp_path / "b")
    _reseal(b, lambda d: None, sign_key=key)
    load_manifest(b, trusted_keys=pub)


@pytest.mark.parametrize("cli", ["run", "scan", "calibrate", "build", "serve"])
def test_every_command_takes_trusted_key(vision_bundle, tmp_path, keys, cli):
    """--trusted-key on each command: the unsigned bundle is refused with one line, exit 1 or 2."""
    pub = keys["publisher"][1]
    img = tmp_path / "x.png"
    _png(img)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\n{img},safe\n")
    argv = {"run": ["safeclip-run", "--bundle", str(vision_bundle), "--image", str(img), "--prompt", "hi"],
            "scan": ["safeclip-scan", "--bundle", str(vision_bundle), str(img)],
            "calibrate": ["safeclip-calibrate", "--bundle", str(vision_bundle), "--labels", str(labels),
                          "--max-fpr", "0.5"],
            "build": ["safeclip-build", "--bundle", str(vision_bundle)],
            "serve": ["safeclip-serve", "--bundle", str(vision_bundle), "--port", "0"]}[cli]
    env = {k: v for k, v in os.environ.items() if k != "SAFECLIP_TRUSTED_KEYS"}
    p = subprocess.run([str(BIN / argv[0]), *argv[1:], "--trusted-key", str(pub)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode in (1, 2), p.stderr
    err = p.stderr.strip()
    assert "bundle is not signed, and trusted keys are set" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1, err


def test_export_sign_key_signs_the_bundle(tmp_path, keys, cache_dir):
    pytest.importorskip("torch")
    from safeclip.export.bundle import ExportOptions, export_bundle

    priv, pub = keys["publisher"]
    out = export_bundle(ExportOptions(model="demo", out=tmp_path / "signed", with_decoder=False,
                                      sign_key=priv)).bundle
    Pipeline.load(out, trusted_keys=[pub])
    with pytest.raises(BundleError, match="not among the trusted keys"):
        Pipeline.load(out, trusted_keys=[keys["other"][1]])


def test_build_keeps_the_chain_of_trust_with_a_device_key(vision_bundle, tmp_path, keys):
    """safeclip-build verifies the publisher's signature, adds engines, re-signs with the device key."""
    from safeclip.runtime.build import BuildError, build_engines
    from test_trt_backend import ORIN, fake_builder, jetson_profiles

    (priv, pub), (dpriv, dpub) = keys["publisher"], keys["device"]
    b = copy_bundle(vision_bundle, tmp_path / "b")
    m = load_manifest(b)
    _reseal(b, lambda d: d.update(target="jetson", build={**d["build"], "plan": jetson_profiles(m), "engines": {}}),
            sign_key=priv)
    publisher_id = load_manifest(b, trusted_keys=[pub]).signed_by
    kw = dict(build_engine=fake_builder([]), device=ORIN, parity=False)
    with pytest.raises(BuildError, match="the bundle is signed .* give --sign-key"):
        build_engines(b, **kw)
    with pytest.raises(BundleError, match="not among the trusted keys"):     # a bundle the device does not trust
        build_engines(b, sign_key=dpriv, trusted_keys=[keys["other"][1]], **kw)
    build_engines(b, sign_key=dpriv, trusted_keys=[pub], **kw)
    m = load_manifest(b, trusted_keys=[pub, dpub], full_verify=True)
    assert "vision_gate.plan" in m.files and m.data["build"]["signed_from"] == publisher_id
    with pytest.raises(BundleError, match="not among the trusted keys"):    # the publisher alone: re-signed
        load_manifest(b, trusted_keys=[pub])


# -- the verification cache ------------------------------------------------------------------------------------
def _flip_in_place(f: Path) -> None:
    st = f.stat()
    with open(f, "r+b") as fh:
        fh.seek(st.st_size // 2)
        byte = fh.read(1)
        fh.seek(st.st_size // 2)
        fh.write(bytes([byte[0] ^ 0x01]))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))                   # mtime restored, size unchanged


def test_cache_does_not_vouch_for_an_in_place_edit_with_mtime_restored(vision_bundle, tmp_path, monkeypatch):
    from safeclip.runtime import manifest as mf
    monkeypatch.setattr(mf, "CACHE_MIN_BYTES", 1)
    monkeypatch.setenv("SAFECLIP_CACHE_DIR", str(tmp_path / "cache"))
    b = copy_bundle(vision_bundle, tmp_path / "b")
    files = load_manifest(b, verify=False).files
    verify_files(b, files)
    assert all(verify_files(b, files).values())                         # warm: every file from the cache
    _flip_in_place(b / "vision_gate.onnx.data")
    with pytest.raises(BundleError, match="sha256 of 'vision_gate.onnx.data' does not match"):
        verify_files(b, files)


def test_forged_cache_entries_are_not_trusted(vision_bundle, tmp_path, monkeypatch):
    from safeclip.runtime import manifest as mf
    from safeclip.runtime.verify_cache import VerifyCache
    monkeypatch.setattr(mf, "CACHE_MIN_BYTES", 1)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SAFECLIP_CACHE_DIR", str(cache))
    b = copy_bundle(vision_bundle, tmp_path / "b")
    files = load_manifest(b, verify=False).files
    verify_files(b, files)
    f = b / "vision_gate.onnx.data"
    _flip_in_place(f)
    # the attacker writes an entry for the edited file's identity, copying a genuine entry's value (digest + MAC)
    entries = json.loads((cache / "verified.json").read_text())
    genuine = next(v for k, v in entries.items() if k.startswith(os.path.realpath(f) + "|"))
    entries[VerifyCache.key(f, f.stat())] = genuine
    (cache / "verified.json").write_text(json.dumps(entries))
    with pytest.raises(BundleError, match="sha256 of 'vision_gate.onnx.data' does not match"):
        verify_files(b, files)
    # a cache secret others can read is not used at all: every file is hashed
    os.chmod(cache / "verify.key", 0o644)
    b2 = copy_bundle(vision_bundle, tmp_path / "b2")
    verify_files(b2, files)
    assert not any(verify_files(b2, files).values())


# -- manifests that are not regular files, hostile JSON, unreadable files -----------------------------------------
def _load_in_thread(bundle, timeout=20.0):
    """Pipeline.load in a thread: returns the exception it raised, or 'hung' (the thread is left blocked)."""
    box = {}

    def go():
        try:
            Pipeline.load(bundle)
            box["result"] = "loaded"
        except BaseException as e:             # noqa: BLE001 -- what it raised is the result
            box["result"] = e
    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    return box.get("result", "hung")


def test_manifest_fifo_is_refused_without_blocking(vision_bundle, tmp_path):
    b = copy_bundle(vision_bundle, tmp_path / "b")
    (b / MANIFEST).unlink()
    os.mkfifo(b / MANIFEST)
    r = _load_in_thread(b)
    if r == "hung":                            # unblock the stuck reader so the test process can end
        fd = os.open(b / MANIFEST, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    assert isinstance(r, BundleError) and "'manifest.json' is not a regular file" in str(r), r


def test_manifest_symlink_out_of_the_bundle_is_refused(vision_bundle, tmp_path):
    b = copy_bundle(vision_bundle, tmp_path / "b")
    outside = tmp_path / "manifest-elsewhere.json"
    shutil.move(b / MANIFEST, outside)
    (b / MANIFEST).symlink_to(outside)
    with pytest.raises(BundleError, match="'manifest.json' is a link leading out of the bundle"):
        Pipeline.load(b)
    (b / MANIFEST).unlink()
    (b / MANIFEST).symlink_to("/dev/zero")
    with pytest.raises(BundleError, match="leading out of the bundle"):
        Pipeline.load(b)


@pytest.mark.parametrize("cli", ["run", "scan", "serve"])
def test_commands_refuse_a_fifo_manifest_with_one_line(vision_bundle, tmp_path, cli):
    b = copy_bundle(vision_bundle, tmp_path / "b")
    (b / MANIFEST).unlink()
    os.mkfifo(b / MANIFEST)
    img = tmp_path / "x.png"
    _png(img)
    argv = {"run": ["safeclip-run", "--bundle", str(b), "--prompt", "hi"],
            "scan": ["safeclip-scan", "--bundle", str(b), str(img)],
            "serve": ["safeclip-serve", "--bundle", str(b), "--port", "0"]}[cli]
    p = subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60)
    err = p.stderr.strip()
    assert p.returncode in (1, 2) and "not a regular file" in err and len(err.splitlines()) == 1, err


def test_deeply_nested_manifest_is_a_one_line_bundle_error(vision_bundle, tmp_path):
    b = copy_bundle(vision_bundle, tmp_path / "b")
    (b / MANIFEST).write_text("[" * 200000 + "]" * 200000)
    with pytest.raises(BundleError, match="unreadable manifest") as e:
        Pipeline.load(b)
    assert "\n" not in str(e.value)


def test_permission_and_recursion_errors_from_load_are_bundle_errors(vision_bundle, tmp_path, monkeypatch):
    """As root here, chmod cannot deny a read: the OS's PermissionError is injected where loading opens files."""
    import safeclip.runtime.manifest as mf
    b = copy_bundle(vision_bundle, tmp_path / "b")
    real_open = os.open

    def denied(path, *a, **k):
        if str(path).endswith("vision_gate.onnx.data"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)
    monkeypatch.setattr(mf.os, "open", denied)
    with pytest.raises(BundleError, match="cannot open 'vision_gate.onnx.data' \\(Permission denied\\)"):
        Pipeline.load(b, full_verify=True)
    monkeypatch.setattr(mf.os, "open", real_open)

    def deep(*a, **k):
        raise RecursionError("maximum recursion depth exceeded")
    monkeypatch.setattr("safeclip.runtime.backends.pick.choose_backend", deep)
    with pytest.raises(BundleError, match="cannot load bundle \\(RecursionError"):
        Pipeline.load(b)


def test_calibrating_a_signed_bundle_needs_a_key_and_re_signs(vision_bundle, tmp_path, keys, capsys, monkeypatch):
    """A new threshold rewrites the manifest: refused without --sign-key, re-signed with it. (What threshold is
    chosen is tests/test_scan.py's and test_metrics.py's business: here the choice is fixed.)"""
    from safeclip.runtime import calibrate

    (priv, pub), (opriv, opub) = keys["publisher"], keys["other"]
    b = copy_bundle(vision_bundle, tmp_path / "b")
    _reseal(b, lambda d: None, sign_key=priv)
    img = tmp_path / "x.png"
    _png(img)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\n{img},safe\n")
    choice = {"threshold": 0.42, "n_safe": 1, "n_toxic": 1, "dsr": 1.0, "fpr": 0.0, "fpr_upper95": 0.9,
              "bound_confident": False}
    monkeypatch.setattr(calibrate, "_calibrated", lambda pipe, labels, max_fpr: (choice, {"dsr": 0.0, "fpr": 0.0}))
    argv = ["--bundle", str(b), "--labels", str(labels), "--max-fpr", "1", "--trusted-key", str(pub)]
    assert calibrate.main(argv) == 2
    err = capsys.readouterr().err
    assert "the bundle is signed and a new threshold rewrites its manifest: give --sign-key" in err
    assert load_manifest(b, trusted_keys=[pub]).gate["threshold"] == 0.6                 # unchanged
    assert calibrate.main(argv + ["--sign-key", str(opriv)]) == 0
    m = load_manifest(b, trusted_keys=[pub, opub], full_verify=True)
    assert m.gate["threshold"] == 0.42 and m.gate["history"][-1]["new_threshold"] == 0.42
    with pytest.raises(BundleError, match="not among the trusted keys"):
        load_manifest(b, trusted_keys=[pub])                               # re-signed by the calibrating key
    # a calibration that would never flag is not written (the bundle would not load)
    choice["threshold"] = 1.0
    assert calibrate.main(argv[:-2] + ["--trusted-key", str(opub), "--sign-key", str(opriv)]) == 2
    assert "the gate would never flag; nothing written" in capsys.readouterr().err
    assert load_manifest(b, trusted_keys=[opub]).gate["threshold"] == 0.42


def test_ray_scan_workers_get_the_trusted_keys_themselves(vision_bundle, tmp_path, keys):
    """Ray actors may run where the PEM paths do not exist: the driver reads the keys and hands them over."""
    from safeclip.runtime.scan.ray_workers import GateWorker
    from safeclip.runtime.signing import trusted_keys

    priv, pub = keys["publisher"]
    tk = trusted_keys([pub])
    import pickle
    tk = pickle.loads(pickle.dumps(tk))                                 # what Ray ships to an actor
    with pytest.raises(BundleError, match="bundle is not signed, and trusted keys are set"):
        GateWorker(str(vision_bundle), trusted_keys=tk)
    b = copy_bundle(vision_bundle, tmp_path / "b")
    _reseal(b, lambda d: None, sign_key=priv)
    pub.unlink()                                                        # the key file is gone: the keys travel
    assert GateWorker(str(b), trusted_keys=tk).pipe.manifest.signed_by == next(iter(tk.keys))
