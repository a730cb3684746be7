"""What a TensorRT bundle needs per Jetson Orin module (export/device_memory.py, runtime/devices.py) and the
exporter's --device refusal (issue 22, section 4)."""
from __future__ import annotations

import dataclasses

import pytest

from safeclip.export.device_memory import (DeviceFitError, call_context_bytes, check_device, device_table,
                                           trt_family_table, trt_memory)
from safeclip.export.memory import MODELS
from safeclip.export.targets import TARGETS, Target
from safeclip.runtime.devices import GiB, MODULES, identify, module

JETSON = TARGETS["jetson"]


def test_modules_and_identification():
    assert [m.key for m in MODULES.values()] == ["agx-orin-64gb", "agx-orin-32gb", "orin-nx-16gb", "orin-nx-8gb",
                                                 "orin-nano-8gb", "orin-nano-4gb"]
    assert module("Orin NX 16GB") is MODULES["orin-nx-16gb"] and module("orin-nano-4gb").sm_count == 4
    with pytest.raises(ValueError, match="unknown --device 'orin-tx2' \\(supported: agx-orin-64gb, "):
        module("orin-tx2")
    assert MODULES["agx-orin-32gb"].usable_bytes == 30 * GiB
    keys = lambda sm, gib: [m.key for m in identify(sm, int(gib * GiB))]      # noqa: E731
    assert keys(16, 61.4) == ["agx-orin-64gb"] and keys(14, 30.6) == ["agx-orin-32gb"]
    assert keys(8, 15.3) == ["orin-nx-16gb"] and keys(4, 3.3) == ["orin-nano-4gb"]
    assert keys(8, 7.4) == ["orin-nx-8gb", "orin-nano-8gb"]      # same GPU and DRAM: one budget, one plan
    assert keys(132, 79.2) == [] and keys(16, 70) == []           # an H100; more memory than any Orin


def test_llava_7b_fp16_by_hand():
    """llava-1.5-7b on jetson at 4096 tokens: prompts are prefilled in chunks of 512, so the largest call is an
    extension of 512 tokens on a past of 4096."""
    a = trt_memory("llava-1.5-7b", JETSON)
    t = MODELS["llava-1.5-7b"]["text_config"]
    # scores 32 heads x 512 x 4608 at 8 + 2 bytes; keys and values 2 x 4608 x 32 x 128 x 2; states
    # 512 x (4 x 4096 + 2 x 11008) x 2; logits 4 x 32064
    ctx = 32 * 512 * 4608 * 10 + 2 * 4608 * 32 * 128 * 2 + 512 * (4 * 4096 + 2 * 11008) * 2 + 4 * 32064
    assert call_context_bytes(t, 1, 512, 4096, 2) == ctx == a.decoder_context_bytes
    assert a.decoder_context_profile == "extend (B=1, S=512, past=4096)" and a.kv_bytes == 2 * GiB
    w = a.graph_weights["decoder"]
    assert w == 2 * (6_738_939_904 - 32064 * 4096)                   # the language model less its host table
    assert a.build_peak_bytes == 2 * w + max(ctx + 2 * GiB, w) and a.build_device_bytes == w + ctx + 2 * GiB
    assert a.build_trt_bytes == w + max(ctx + 2 * GiB, w)
    assert a.runtime_bytes == a.weight_bytes + a.kv_bytes + a.vision_context_bytes + ctx
    with pytest.raises(ValueError, match="--weights int8 is not offered for TensorRT targets"):
        trt_memory("llava-1.5-7b", JETSON, "int8")


def test_context_memory_follows_the_targets_profiles():
    """Computed from Target.decoder_profiles' output: without chunking (a 4096-token prefill profile) the prefill
    is the largest call, about 4.8x the chunked target's largest."""
    chunked = trt_memory("llava-1.5-7b", JETSON)
    whole = trt_memory("llava-1.5-7b", dataclasses.replace(JETSON, prefill_chunk=4096))
    t = MODELS["llava-1.5-7b"]["text_config"]
    assert whole.decoder_context_profile == "prefill (B=1, S=4096, past=0)"
    assert whole.decoder_context_bytes == call_context_bytes(t, 1, 4096, 0, 2) > 4 * chunked.decoder_context_bytes


def test_context_model_bounds_the_standins_liveness_walk(demo_decoder_parts):
    """On the demo decoder (fp32), every profile of the jetson target: the accounting is at least what the
    TensorRT stand-in's liveness walk of the real graph finds, and within 3x of it."""
    from _fake_trt_shapes import activation_bytes

    m, kv, table = demo_decoder_parts
    text = {"num_attention_heads": table.shape[1] // kv.head_dim, "hidden_size": table.shape[1],
            "num_key_value_heads": kv.num_kv_heads, "head_dim": kv.head_dim, "intermediate_size": 160,
            "vocab_size": table.shape[0]}
    small = dataclasses.replace(JETSON, context=256, precision="float32")
    for prof in small.decoder_profiles(table.shape[1], kv.num_layers, kv.num_kv_heads, kv.head_dim, 256, kv=kv):
        B, S, _ = prof["inputs_embeds"]["max"]
        P = prof[kv.past_key.format(i=0)]["max"][2]
        walked, counted = activation_bytes(m.path("decoder.onnx"), prof), call_context_bytes(text, B, S, P, 4)
        assert walked <= counted <= 3 * walked, (B, S, P, walked, counted)


def test_tables_and_refusals():
    table = device_table("llava-1.5-7b", JETSON)
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[3:-1]] for ln in table.splitlines()
            if ln.startswith("| ") and ln.split("|")[1].strip() in [m.name for m in MODULES.values()]}
    assert rows["AGX Orin 64GB"] == ["yes", "yes"] and rows["Orin Nano 4GB"] == ["no", "no"]
    assert rows["AGX Orin 32GB"][0].startswith("yes (build: ") and rows["Orin NX 16GB"][0] == "no"
    fam = trt_family_table(JETSON)
    assert all(f"| {n} | {w} |" in fam for n in ("llava-1.5-7b", "llava-1.5-13b", "llava-v1.6-mistral-7b")
               for w in ("fp16", "int4"))
    with pytest.raises(DeviceFitError, match=r"^llava-1.5-13b \(fp16 weights, 4096 tokens\) needs \d\d\.\d\d GiB to "
                                             r"run, Orin NX 16GB has 14.00 GiB usable: use --weights int4"):
        check_device("llava-1.5-13b", JETSON, None, "orin-nx-16gb")
    assert check_device("llava-1.5-7b", JETSON, "int4", "agx-orin-32gb").weights == "int4"


def test_export_refuses_a_module_it_cannot_fit_before_any_work(tmp_path, capsys, monkeypatch):
    from safeclip.export import bundle, cli

    monkeypatch.setattr(bundle, "export_bundle", lambda *a, **k: pytest.fail("export started"))
    out = tmp_path / "b"
    argv = ["--model", "llava-hf/llava-1.5-13b-hf", "--target", "jetson", "--device", "orin-nx-16gb", "--out", str(out)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("safeclip-export: error: llava-1.5-13b (fp16 weights, 4096 tokens)")
    assert not out.exists()
    assert cli.main(["--model", "llava-hf/llava-1.5-7b-hf", "--device", "orin-nx-16gb"]) == 1
    assert "goes with --target jetson or datacenter, not cpu" in capsys.readouterr().err
    assert cli.main(["--dry-run", "--model", "llava-hf/llava-1.5-7b-hf", "--target", "jetson", "--weights", "int4",
                     "--device", "agx-orin-32gb"]) == 0
    out_text = capsys.readouterr().out
    assert "agx-orin-32gb: fits" in out_text and "int8 fits" not in out_text and "int4 fits" in out_text


def test_readme_table_is_the_accounting():
    """README's TensorRT memory table is `safeclip-export --dry-run --target jetson`'s TensorRT part, unedited."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = trt_family_table(JETSON)
    assert table.strip() in readme, "README's table is stale: paste `safeclip-export --dry-run --target jetson`"
    assert "TACTIC_DRAM" in device_table("llava-1.5-7b", JETSON).split("| AGX Orin 32GB |")[1].splitlines()[0]


def test_a_profile_past_tensorrts_volume_limit_is_refused_on_every_module(monkeypatch):
    """A decoder profile whose attention scores reach 2^31 elements (llava-v1.6-mistral-7b prefilling 8192 tokens
    at once, as datacenter planned before chunked prefill) builds nowhere: TensorRT refuses the tensor (NvInfer.h),
    so every module reads 'no (2^31)' and --device refuses in one line. The targets' own profiles stay below."""
    dc = TARGETS["datacenter"]
    assert trt_memory("llava-v1.6-mistral-7b", dc, "int4").largest_scores < 1 << 31
    real = Target.decoder_profiles

    def unchunked(self, hidden, *a, **kw):
        out = real(self, hidden, *a, **kw)
        for name in ("inputs_embeds", "position_ids", "attention_mask"):
            out[0][name]["max"][1] = 8192
        return out

    monkeypatch.setattr(Target, "decoder_profiles", unchunked)
    a = trt_memory("llava-v1.6-mistral-7b", dc, "int4")
    assert a.largest_scores == 32 * 8192 * 8192 == 1 << 31 and a.largest_scores_profile.startswith("prefill")
    with pytest.raises(DeviceFitError, match=r"attention scores have 2147483648 elements; TensorRT refuses tensors "
                                             r"of 2\^31 or more"):
        check_device("llava-v1.6-mistral-7b", dc, "int4", "agx-orin-64gb")
    row = next(ln for ln in trt_family_table(dc).splitlines() if ln.startswith("| llava-v1.6-mistral-7b | int4 |"))
    assert row.count("no (2^31)") == len(MODULES)
