"""Helpers of ``scripts/bench.py``: machine facts, random real-shape models, graph surgery, the table.

Kept apart so ``bench.py`` reads as the measurement plan. Models are built in code with random weights
(never downloaded): LLaVA-1.5 = CLIP ViT-L/14-336 vision tower + 2-layer GELU projector to the language
model's width; the gate's projection is CLIP ViT-L/14's ``visual_projection`` (1024 -> 768, no bias).
"""
from __future__ import annotations

import ctypes
import math
import os
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np


# ---------------------------------------------------------------------------------------------------------
# process memory
def rss_mb(key: str = "VmRSS") -> float:
    """``VmRSS``, ``VmHWM`` (peak), ``RssAnon`` or ``RssFile`` of this process in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise OSError(f"/proc/self/status has no {key}")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def trim() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so RSS reflects live memory."""
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------------------
# machine
def _cpuinfo() -> tuple[str, int]:
    model, cores = platform.processor() or "unknown", set()
    phys = core = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k, v = k.strip(), v.strip()
                if k == "model name":
                    model = v
                elif k == "physical id":
                    phys = v
                elif k == "core id":
                    core = v
                elif not k and core is not None:
                    cores.add((phys, core))
                    phys = core = None
        if core is not None:
            cores.add((phys, core))
    except OSError:
        pass
    return model, len(cores) or (os.cpu_count() or 1)


def machine_facts(copy_mb: int) -> dict:
    """CPU model, cores, memory, library versions and the copy bandwidth (bytes read + written per second)."""
    import onnxruntime
    import torch

    model, cores = _cpuinfo()
    mem = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) / 2**20
    n = copy_mb * 2**20 // 4
    src, dst = np.ones(n, np.float32), np.zeros(n, np.float32)
    best = math.inf
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return {"cpu_model": model, "physical_cores": cores, "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)), "mem_total_gib": round(mem or 0, 1),
            "copy_bandwidth_gbs": 2 * n * 4 / best / 1e9, "copy_mb": copy_mb,
            "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__}


# ---------------------------------------------------------------------------------------------------------
# models
def _vision_config(s: dict):
    from transformers import CLIPVisionConfig
    return CLIPVisionConfig(hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
                            num_attention_heads=s["heads"], image_size=s["image"], patch_size=s["patch"],
                            projection_dim=s["proj"], hidden_act="quick_gelu")


def llava_config(s: dict, vocab: int = 64, image_token_id: int = 4, pad_id: int = 3, bos_id: int = 1, eos_id: int = 2):
    from transformers import LlamaConfig, LlavaConfig
    text = LlamaConfig(vocab_size=vocab, hidden_size=s["lm_hidden"], intermediate_size=s["lm_inter"],
                       num_hidden_layers=s["lm_layers"], num_attention_heads=s["lm_heads"],
                       num_key_value_heads=s["lm_heads"], max_position_embeddings=s["context"], rms_norm_eps=1e-5,
                       bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=False)
    return LlavaConfig(vision_config=_vision_config(s), text_config=text, image_token_index=image_token_id,
                       projector_hidden_act="gelu", vision_feature_select_strategy="default", vision_feature_layer=-2,
                       image_seq_length=(s["image"] // s["patch"]) ** 2, pad_token_id=pad_id)


def vision_sources(s: dict, seed: int = 0):
    """A ``Sources``-like object holding only what the vision+gate export reads (no language model)."""
    import torch
    from transformers import CLIPVisionModel
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from safeclip.export.architectures import spec_for

    torch.manual_seed(seed)
    cfg = llava_config(s)
    with torch.no_grad():
        tower = CLIPVisionModel(cfg.vision_config).eval()
        projector = LlavaMultiModalProjector(cfg).eval()
        visual_projection = torch.nn.Linear(s["hidden"], s["proj"], bias=False)
    tower.set_attn_implementation("eager")                      # as load_sources loads it
    clip = SimpleNamespace(visual_projection=visual_projection, logit_scale=torch.tensor(math.log(100.0)))
    llava = torch.nn.Module()                   # the parts the vision export reads, at their usual paths
    llava.config, llava.model = cfg, torch.nn.Module()
    llava.model.vision_tower, llava.model.multi_modal_projector = tower, projector
    return SimpleNamespace(arch=spec_for("llava"), llava=llava, clip=clip, clip_path=None)


def build_checkpoints(s: dict, out: Path, image: Path, seed: int = 0):
    """Random LLaVA + CLIP checkpoint folders, and descriptor embeddings under which ``image`` is neutral.

    Returns (llava_dir, clip_dir, text_embeds [S, E]); the embeddings are also saved as ``text_embeds.npy``.
    The CLIP holds only what the gate reads (``visual_projection``, ``logit_scale``); its own towers are
    one-layer stubs because the descriptor embeddings are given.
    """
    import torch
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig,
                              LlavaForConditionalGeneration, PreTrainedTokenizerFast)

    from safeclip.descriptors import load_descriptor_set
    from safeclip.export.demo import CLIP_MEAN, CLIP_STD, LLAVA_CHAT_TEMPLATE, byte_level_tokenizer
    from safeclip.runtime.image import load_image, preprocess, preprocess_spec_from_config

    out = Path(out)
    llava_dir, clip_dir = out / "llava", out / "clip"
    tok = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], bos="<s>"),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, model_max_length=s["context"])
    tok.chat_template = LLAVA_CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = llava_config(s, vocab=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                       pad_id=tok.pad_token_id, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)
    with torch.no_grad():
        llava = LlavaForConditionalGeneration(cfg).eval()
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(llava.generation_config, k, getattr(tok, k))
    vstub = _vision_config(dict(s, layers=1, inter=16))
    tstub = CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, projection_dim=s["proj"], bos_token_id=0,
                           eos_token_id=1, pad_token_id=1)
    with torch.no_grad():
        clip = CLIPModel(CLIPConfig(text_config=tstub.to_dict(), vision_config=vstub.to_dict(),
                                    projection_dim=s["proj"])).eval()
        clip.logit_scale.fill_(math.log(100.0))
    proc = CLIPImageProcessor(size={"shortest_edge": s["image"]}, crop_size={"height": s["image"], "width": s["image"]},
                              resample=3, image_mean=CLIP_MEAN, image_std=CLIP_STD)

    # the gate embedding of the clean image (reference variant): neutral sentences point at it
    pv = preprocess(load_image(image), preprocess_spec_from_config(proc.to_dict()))      # [1, 3, S, S]
    with torch.no_grad():
        hs = llava.model.vision_tower(torch.from_numpy(pv), output_hidden_states=True).hidden_states
        e = clip.visual_projection(hs[cfg.vision_feature_layer][:, 0])[0].numpy()
    e /= np.linalg.norm(e)
    dset = load_descriptor_set("default")
    rng = np.random.default_rng(seed)
    rows = []
    for cls, group in zip(dset.classes, dset.sentences):
        for _ in group:
            v = e + 0.05 * rng.normal(size=e.shape) if cls in dset.safe_classes else rng.normal(size=e.shape)
            rows.append(v / np.linalg.norm(v))
    te = np.stack(rows).astype(np.float32)                                                # [S, E]

    llava.save_pretrained(llava_dir)
    tok.save_pretrained(llava_dir)
    proc.save_pretrained(llava_dir)
    clip.save_pretrained(clip_dir)
    proc.save_pretrained(clip_dir)
    np.save(out / "text_embeds.npy", te)
    return llava_dir, clip_dir, torch.from_numpy(te)


# ---------------------------------------------------------------------------------------------------------
# the gate head alone, and the graph without it
def gate_head_module(vg):
    """The head of a :class:`VisionGate`, sharing its weights: CLS [B, Dv] -> class_probs [B, C]."""
    import torch

    class GateHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.post_layernorm, self.visual_projection = vg.post_layernorm, vg.visual_projection
            self.register_buffer("text_embeds_t", vg.text_embeds_t)
            self.register_buffer("class_matrix", vg.class_matrix)
            self.logit_scale = vg.logit_scale

        def forward(self, cls):
            if self.post_layernorm is not None:
                cls = self.post_layernorm(cls)
            emb = self.visual_projection(cls)                                       # [B, E]
            emb = emb / emb.norm(dim=-1, keepdim=True)
            probs = torch.softmax(self.logit_scale * (emb @ self.text_embeds_t), dim=-1)   # [B, S]
            return probs @ self.class_matrix                                        # [B, C]

        def numpy_weights(self):
            if self.post_layernorm is not None:
                raise ValueError("numpy head: only the reference variant (no post-LayerNorm) is implemented")
            return {"w": self.visual_projection.weight, "te_t": self.text_embeds_t, "cm": self.class_matrix,
                    "scale": torch.tensor(self.logit_scale)}

    return GateHead()


def head_numpy(cls, w, te_t, cm, scale):
    """The gate head in numpy: CLS [B, Dv] -> class_probs [B, C]."""
    e = cls @ w.T
    e = e / np.linalg.norm(e, axis=-1, keepdims=True)
    z = scale * (e @ te_t)
    p = np.exp(z - z.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ cm


def strip_gate(src: Path, dst: Path) -> None:
    """Copy a vision+gate graph without its ``class_probs`` output and the nodes only that output needs."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from safeclip.runtime.graph_spec import VisionNames

    m = ir.load(str(src))
    outs = [v for v in m.graph.outputs if v.name != VisionNames.class_probs]
    if len(outs) == len(m.graph.outputs):
        raise ValueError(f"{src} has no '{VisionNames.class_probs}' output")
    m.graph.outputs.clear()
    m.graph.outputs.extend(outs)
    RemoveUnusedNodesPass()(m)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ir.save(m, str(dst), external_data=dst.name + ".data")


def vision_flops(s: dict, layers: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of the vision graph: patch conv, ``layers`` encoder layers, projector."""
    p = (s["image"] // s["patch"]) ** 2
    n, d, f, lm = p + 1, s["hidden"], s["inter"], s["lm_hidden"]
    layer = 2 * n * d * d * 4 + 2 * n * d * f * 2 + 2 * n * n * d * 2      # q,k,v,o + MLP + QK^T and AV
    return float(2 * p * 3 * s["patch"] ** 2 * d + layers * layer + 2 * p * (d * lm + lm * lm))


# ---------------------------------------------------------------------------------------------------------
def markdown_table(res: dict, targets: dict, pct) -> str:
    d, m, x = res["derived"], res["machine"], res["export"]
    g, v, e = d["gate"], d["vision"], d["e2e"]
    peak = m["gemm_peak_gflops"]

    def met(ok: bool) -> str:
        return "yes" if ok else "**no**"

    def met_paired(p: dict, target: float) -> str:
        if p["q75"] <= target:
            return "yes"
        if p["median"] <= target:
            return "yes by the median (the IQR is wider than the target)"
        return "not resolved (the IQR spans the target)" if p["q25"] <= target else "**no**"

    go, eo = g["graph_overhead"], e["overhead"]
    rows = [
        ("Gate head alone (ONNX Runtime, on a CLS vector) / vision+gate graph",
         f"{g['head_onnxruntime_ms']:.3f} ms / {g['vision_gate_s']:.3f} s = {pct(g['head_over_vision'], 4)}",
         f"<= {pct(targets['head_over_vision'], 1)}", met(g["head_over_vision"] <= targets["head_over_vision"])),
        ("Gate head alone (numpy)", f"{g['head_numpy_ms']:.3f} ms = {pct(g['head_numpy_over_vision'], 4)}", "", ""),
        ("Vision+gate graph vs the same graph without the head (paired per round: median, IQR)",
         f"{pct(go['median'])} (IQR {pct(go['q25'])} .. {pct(go['q75'])})", f"<= {pct(targets['graph_overhead'], 1)}",
         met_paired(go, targets["graph_overhead"])),
        ("  A/A control: the gated graph vs a second session of the same graph",
         f"{pct(g['graph_a_a_control']['median'])} (IQR {pct(g['graph_a_a_control']['q25'])} .. "
         f"{pct(g['graph_a_a_control']['q75'])})", "", ""),
        ("Vision encoder: ONNX Runtime vs PyTorch eager (eager attention: the exported module)",
         f"{v['ort_s']:.3f} s vs {v['torch_eager_s']:.3f} s = {v['ort_over_eager']:.2f}x",
         f">= {targets['ort_over_eager']}x", met(v["ort_over_eager"] >= targets["ort_over_eager"])),
        ("Vision encoder: ONNX Runtime vs PyTorch eager (SDPA attention)",
         f"{v['ort_s']:.3f} s vs {v['torch_sdpa_s']:.3f} s = {v['ort_over_sdpa']:.2f}x",
         f">= {targets['ort_over_eager']}x",
         met(v["ort_over_sdpa"] >= targets["ort_over_eager"])),
        ("Vision encoder: fraction of the measured fp32 GEMM peak (medians; paired per round)",
         f"{v['ort_gflops']:.0f} / {peak['median_of_best_library']:.0f} GFLOP/s = {pct(v['fraction_of_peak'], 1)}; "
         f"paired {pct(v['fraction_of_peak_paired'], 1)}", f">= {pct(targets['fraction_of_peak'], 0)}",
         met(min(v["fraction_of_peak"], v["fraction_of_peak_paired"]) >= targets["fraction_of_peak"])),
    ]
    for k, label in (("ort_threads_2", "intra_op_num_threads=2"), ("ort_no_spinning", "intra-op spinning off"),
                     ("ort_ort_fusions", "onnxscript ort_fusions (Attention, SkipLayerNorm)"),
                     ("ort_optimizer_clip", "onnxruntime.transformers optimize_model(clip)")):
        t = v["tuning"][k]
        p = t["vs_runtime_session"]
        rows.append((f"  ONNX Runtime variant: {label}",
                     f"{pct(p['median'])} time vs the runtime's session, paired per round (IQR {pct(p['q25'])} .. "
                     f"{pct(p['q75'])}): {pct(v['fraction_of_peak_paired'] / (1 + p['median']), 1)} of peak implied",
                     "", ""))
    rows += [
        (f"End to end, clean image: time to first token gated vs ungated (decoder: {e['lm_layers']} layer(s) of "
         "real width; paired per round: median, IQR)",
         f"{e['ttft_gated_s']:.3f} s vs {e['ttft_ungated_s']:.3f} s: {pct(eo['median'])} "
         f"(IQR {pct(eo['q25'])} .. {pct(eo['q75'])})", f"<= {pct(targets['ttft_overhead'], 1)}",
         met_paired(eo, targets["ttft_overhead"])),
        ("  A/A control: the gated Pipeline vs the same with a second session of the gated graph",
         f"{pct(e['a_a_control']['median'])} (IQR {pct(e['a_a_control']['q25'])} .. "
         f"{pct(e['a_a_control']['q75'])})", "", ""),
        ("End to end: the gate's own work per image (head in ONNX Runtime + verdict in Python) / TTFT",
         f"({g['head_onnxruntime_ms']:.3f} + {e['verdict_ms']:.3f}) ms / {e['ttft_gated_s']:.3f} s = "
         f"{pct(e['gate_work_over_ttft'], 4)}", f"<= {pct(targets['ttft_overhead'], 1)}",
         met(e["gate_work_over_ttft"] <= targets["ttft_overhead"])),
        ("Exporter: export_vision_gate (export + parity gate) wall time", f"{x['seconds']:.1f} s", "", ""),
        ("Exporter: peak RSS / weight bytes",
         f"{x['peak_rss_mb'] / 1024:.2f} GiB / {x['weight_bytes'] / 2**30:.2f} GiB = {x['peak_multiple']:.2f}x "
         f"(model loaded, before export: {x['rss_before_mb'] / 1024:.2f} GiB)", f"<= {targets['export_rss_multiple']}x",
         met(x["peak_multiple"] <= targets["export_rss_multiple"])),
    ]
    for name, p in x["phases"].items():
        if p["s"] < 0.05 and name != "verdict_checks":
            continue
        rows.append((f"  phase: {name}", f"{p['s']:.1f} s, peak {p['peak_rss_mb'] / 1024:.2f} GiB "
                     f"= {p['peak_rss_mb'] * 2**20 / x['weight_bytes']:.2f}x", "", ""))
    la0, la1 = res["loadavg_start"], res["loadavg_end"]
    lines = ["| Measure | Result | Target | Met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {dd} |" for a, b, c, dd in rows]
    lines += ["", f"Machine: {m['cpu_model']}, {m['physical_cores']} cores ({m['usable_cpus']} usable), "
              f"{m['mem_total_gib']} GiB; copy bandwidth {m['copy_bandwidth_gbs']:.1f} GB/s (read + write, best of 5); "
              f"fp32 GEMM ({res['shapes']['gemm']}^3) {peak['median_of_best_library']:.0f} GFLOP/s median "
              f"({peak['library']}), best single run {peak['best_single_run']:.0f}. Load average (1 min) "
              f"{la0[0]:.2f} at start, {la1[0]:.2f} at end.",
              f"Vision graph: {v['flops'] / 1e9:.1f} GFLOP ({v['encoder_layers_computed']} encoder layers computed). "
              f"{res['settings']['rounds']} timed rounds ({res['settings']['paired_rounds']} for the with/without-gate "
              f"pairs) after {res['settings']['warmup']} warm-up; {res['mode']} shapes; {res['date']}; "
              f"`{res['command']}`."]
    return "\n".join(lines)
