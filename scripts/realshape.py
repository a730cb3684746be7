"""Random-weight LLaVA and CLIP checkpoints at real shapes, laid out like the published ones, in bounded memory.

What the exporter benchmark (``scripts/bench_export.py``) feeds ``safeclip-export`` instead of downloaded
checkpoints (none can be downloaded here). Supported shapes (``SHAPES``):

* ``tinyllava-1.5b``: TinyLlama-1.1B text model (hidden 2048, 22 layers, 32 heads / 4 KV heads, MLP 5632,
  context 2048) + CLIP ViT-L/14-336 tower (1024 wide, 24 layers, 16 heads, MLP 4096, 336 px, patch 14) +
  GELU projector 1024 -> 2048 -> 2048;
* ``llava-1.5-7b``: Llama-2-7B text model (4096, 32 layers, 32 heads / 32 KV heads, MLP 11008, context 4096)
  + the same tower + projector 1024 -> 4096 -> 4096;
* ``tiny``: the same layout at toy widths (seconds), for ``--quick`` and tests.

All: vocabulary 32064 (llava-1.5: 32000 Llama tokens, ``<image>`` = 32000, ``<pad>`` = 32001, rows padded to
32064), ``vision_feature_layer`` -2, select strategy ``default``, ``image_seq_length`` 576.

The LLaVA folder holds what llava-hf ships: ``config.json`` (``dtype`` and ``torch_dtype`` float16 or
bfloat16), safetensors shards ``model-0000i-of-0000n.safetensors`` of at most ``max_shard_bytes`` tensor
bytes each (default 5 GB, the published shard size; one shard is ``model.safetensors`` without an index, as
``save_pretrained`` writes it) with ``model.safetensors.index.json`` (``metadata.total_size`` +
``weight_map``), ``preprocessor_config.json`` (CLIP 336 as llava-1.5), ``processor_config.json``,
``generation_config.json``, ``chat_template.json`` (llava-1.5-7b-hf's, from ``tests/data/chat_templates``
where present) and the tokenizer: the real Llama-2 vocabulary where ``tests/data/vocab`` has llama.cpp's
``ggml-vocab-llama-spm.gguf`` and the ``gguf`` package is installed, else a Llama-style BPE built in code
(byte fallback, ``▁`` word marks, 32000 entries made of pseudo-words); the stamp records which.
Weight names: the llava-hf **legacy** names (``language_model.model.layers.N...``,
``language_model.lm_head.weight``, ``vision_tower.vision_model...``, ``multi_modal_projector...``) by
default, or with ``layout="transformers5"`` the names transformers 5 uses in memory
(``model.language_model...``, ``lm_head.weight``, ``model.vision_tower...`` without ``vision_model``,
``model.multi_modal_projector...``); transformers 5.24's ``conversion_mapping.py`` maps both onto the model.
The CLIP folder (what ``--clip`` takes) is a ``CLIPModel`` of openai/clip-vit-large-patch14-336's shape
(text tower 12 x 768, projection 768, ``logit_scale`` = ln 100) in one fp16 ``model.safetensors`` with a
CLIP-style byte-level BPE tokenizer (49408 entries, ``</w>`` word ends) made in code.

Memory: tensor names and shapes come from the model built on the ``meta`` device (no storage); each
tensor is generated in fp32 chunks of ``CHUNK_ELEMS`` (N(0, 0.02); norm weights 1, norm biases 0),
converted and written straight into the shard file (safetensors' format written directly: an 8-byte header
length, the JSON header, then the raw bytes), so the writer holds one chunk, never a tensor or a shard.
Each tensor's values depend only on (seed, its transformers-5 name, the chunk size), not on the layout or
the sharding.

    python scripts/realshape.py --shape llava-1.5-7b --out /work/bench_ckpt/llava-1.5-7b   # prints time, peak RSS
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realshape_tokenizers import (CHAT_TEMPLATE_JSON, CLIP_VOCAB, IMAGE_ID, PAD_ID, chat_template,  # noqa: E402
                                  clip_like_tokenizer, llava_tokenizer, tokenizer_source)

WRITER_VERSION = 1
STAMP = "realshape.json"                      # written last: a folder without it is incomplete
CHUNK_ELEMS = 8 << 20                         # fp32 elements generated at once (32 MiB)
DEFAULT_SHARD_BYTES = 5_000_000_000          # "5GB", as the published llava-hf shards
STD = 0.02
LAYOUTS = ("legacy", "transformers5")
DTYPES = {"float16": "F16", "bfloat16": "BF16"}
TEXT_VOCAB = 32064                             # embedding rows: 32002 tokens padded as llava-1.5
IMAGE, PATCH = 336, 14
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class Shape:
    text: dict                                 # LlamaConfig fields
    vision: dict                               # CLIPVisionConfig fields (LLaVA's tower = CLIP's vision tower)
    clip_text: dict = field(default_factory=lambda: dict(hidden_size=768, intermediate_size=3072,
                                                         num_hidden_layers=12, num_attention_heads=12))
    projection_dim: int = 768                  # CLIP's visual/text projection
    shard_bytes: int = DEFAULT_SHARD_BYTES     # default shard limit (tiny: small, so it has several shards)
    clip: str = "vit-l-14-336"                 # names the CLIP checkpoint: shapes sharing a tower share it


_VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=IMAGE, patch_size=PATCH, projection_dim=768)
SHAPES = {
    "tinyllava-1.5b": Shape(text=dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                                      num_key_value_heads=4, intermediate_size=5632, max_position_embeddings=2048),
                            vision=_VIT_L_336),
    "llava-1.5-7b": Shape(text=dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                    num_key_value_heads=32, intermediate_size=11008, max_position_embeddings=4096),
                          vision=_VIT_L_336),
    "tiny": Shape(text=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=160, max_position_embeddings=2048),
                  vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE, patch_size=PATCH, projection_dim=32),
                  clip_text=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4),
                  projection_dim=32, shard_bytes=2_000_000, clip="tiny"),
}


def shape_of(name: str) -> Shape:
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown shape '{name}' (supported: {', '.join(SHAPES)})") from None


# -- configs ------------------------------------------------------------------------------------------------
def llava_config(shape: Shape, dtype: str = "float16"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=TEXT_VOCAB, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                       pad_token_id=PAD_ID, tie_word_embeddings=False, dtype=dtype, **shape.text)
    vision = CLIPVisionConfig(hidden_act="quick_gelu", dtype=dtype, **shape.vision)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                      projector_hidden_act="gelu", vision_feature_select_strategy="default",
                      vision_feature_layer=-2, image_seq_length=(IMAGE // PATCH) ** 2, pad_token_id=PAD_ID,
                      tie_word_embeddings=False, dtype=dtype)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    return cfg


def clip_config(shape: Shape, dtype: str = "float16"):
    """openai/clip-vit-large-patch14-336's config at ``shape`` (text eos_token_id 2: its legacy argmax pooling)."""
    from transformers import CLIPConfig

    text = dict(vocab_size=CLIP_VOCAB, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0,
                eos_token_id=2, pad_token_id=1, projection_dim=shape.projection_dim, **shape.clip_text)
    vision = dict(hidden_act="quick_gelu", **{**shape.vision, "projection_dim": shape.projection_dim})
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=shape.projection_dim,
                     logit_scale_init_value=2.6592, dtype=dtype)
    cfg.architectures = ["CLIPModel"]
    return cfg


def _save_config(cfg, out: Path, dtype: str) -> None:
    """``config.json`` with both ``dtype`` (transformers 5) and ``torch_dtype`` (the published 4.x files)."""
    d = cfg.to_dict()
    for part in [d] + [v for v in d.values() if isinstance(v, dict) and "model_type" in v]:
        part["dtype"] = part["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


# -- tensor names, shapes, values ----------------------------------------------------------------------------
def _meta_state(model_cls, cfg) -> list[tuple[str, tuple[int, ...]]]:
    import torch

    with torch.device("meta"):
        model = model_cls(cfg)
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def legacy_name(name: str) -> str:
    """A transformers-5 LLaVA weight name -> its llava-hf (transformers 4) checkpoint name."""
    for new, old in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector.")):
        if name.startswith(new):
            return old + name[len(new):]
    raise ValueError(f"no legacy name for '{name}'")


def llava_tensors(shape: Shape, layout: str = "legacy") -> list[tuple[str, tuple[int, ...], str]]:
    """(checkpoint name, shape, transformers-5 name: what seeds its values) of every LLaVA weight, in the
    model's order."""
    from transformers import LlavaForConditionalGeneration

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}' (supported: {', '.join(LAYOUTS)})")
    specs = _meta_state(LlavaForConditionalGeneration, llava_config(shape))
    return [(k if layout == "transformers5" else legacy_name(k), s, k) for k, s in specs]


def clip_tensors(shape: Shape) -> list[tuple[str, tuple[int, ...], str]]:
    from transformers import CLIPModel

    return [(k, s, k) for k, s in _meta_state(CLIPModel, clip_config(shape))]


def _is_norm(name: str) -> bool:
    return any(k in name for k in ("norm", "layrnorm"))          # CLIP spells pre_layrnorm


def _fill(name: str, n: int, std: float = STD):
    """How tensor ``name`` of ``n`` elements is filled: ("const", value) or ("normal", std)."""
    if name.endswith("logit_scale"):
        return "const", math.log(100.0)                          # a trained CLIP's temperature
    if _is_norm(name):
        return "const", 1.0 if name.endswith("weight") else 0.0
    return "normal", std


def _chunks(name: str, n: int, dtype, seed: int, chunk: int = CHUNK_ELEMS):
    """The tensor's values as ``dtype`` numpy-viewable chunks; depends only on (seed, name)."""
    import torch

    kind, value = _fill(name, n)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    buf = torch.empty(min(n, chunk), dtype=torch.float32)
    for start in range(0, n, chunk):
        b = buf[:min(chunk, n - start)]
        b.fill_(value) if kind == "const" else b.normal_(0.0, value, generator=gen)
        yield b.to(dtype).view(torch.int16).numpy()              # fp16 / bf16 bits, 2 bytes per element


def plan_shards(specs, itemsize: int, max_shard_bytes: int) -> list[list[tuple]]:
    """Split ``(name, shape, ...)`` specs in order as ``save_pretrained`` does: a shard closes before the
    tensor that would overflow it; a tensor larger than the limit gets a shard of its own."""
    shards, cur, size = [], [], 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * itemsize
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(spec)
        size += nbytes
    if cur:
        shards.append(cur)
    return shards


def write_safetensors(path: Path, specs, dtype: str, seed: int, chunk: int = CHUNK_ELEMS) -> int:
    """Write one safetensors file tensor by tensor, chunk by chunk; returns its tensor bytes."""
    import torch

    tdtype = getattr(torch, dtype)
    header, offset = {}, 0
    for name, shp, _ in specs:
        nbytes = math.prod(shp) * 2
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shp), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)                                 # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, shp, key in specs:
            for part in _chunks(key, math.prod(shp), tdtype, seed, chunk):
                f.write(part.data)
    return offset


def write_weights(out: Path, specs, dtype: str, seed: int, max_shard_bytes: int | None,
                  chunk: int = CHUNK_ELEMS) -> dict:
    """Shards (+ index) or one ``model.safetensors``; returns {"shards": [...], "total_size": bytes}."""
    shards = plan_shards(specs, 2, max_shard_bytes or sys.maxsize)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total, weight_map = 0, {}
    for fname, part in zip(names, shards):
        total += write_safetensors(out / fname, part, dtype, seed, chunk)
        weight_map.update({spec[0]: fname for spec in part})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"shards": names, "total_size": total}


def _preprocessor_config() -> dict:
    """llava-hf/llava-1.5-7b-hf's ``preprocessor_config.json`` (CLIP 336)."""
    return {"crop_size": {"height": IMAGE, "width": IMAGE}, "do_center_crop": True, "do_convert_rgb": True,
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
            "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_STD, "processor_class": "LlavaProcessor",
            "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": IMAGE}}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# -- the folders ---------------------------------------------------------------------------------------------
def _atomic_folder(out: Path):
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or use cached_checkpoint()")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return out, tmp


def _seal(tmp: Path, out: Path, stamp: dict) -> dict:
    stamp["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    stamp["bytes"] = sum(stamp["files"].values())
    _write_json(tmp / STAMP, stamp)
    os.replace(tmp, out)
    return stamp


def write_llava_checkpoint(out: Path, shape: str = "tinyllava-1.5b", dtype: str = "float16",
                           layout: str = "legacy", max_shard_bytes: int | None = None,
                           seed: int = 0, chunk: int = CHUNK_ELEMS) -> dict:
    """Write a random LLaVA checkpoint folder ``out`` (atomically); returns its stamp (spec, files, bytes).
    ``max_shard_bytes``: tensor bytes per shard (default: the shape's, 5 GB for the real shapes)."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}' (supported: {', '.join(DTYPES)})")
    spec = llava_spec(shape, dtype, layout, max_shard_bytes, seed)
    specs = llava_tensors(shape_of(shape), layout)
    out, tmp = _atomic_folder(out)
    try:
        t0 = time.perf_counter()
        weights = write_weights(tmp, specs, dtype, seed, spec["max_shard_bytes"], chunk)
        _save_config(llava_config(shape_of(shape), dtype), tmp, dtype)
        _write_json(tmp / "generation_config.json", {"_from_model_config": True, "bos_token_id": 1,
                                                      "eos_token_id": 2, "pad_token_id": PAD_ID})
        _write_json(tmp / "preprocessor_config.json", _preprocessor_config())
        _write_json(tmp / "processor_config.json", {"image_token": "<image>", "num_additional_image_tokens": 1,
                                                    "patch_size": PATCH, "processor_class": "LlavaProcessor",
                                                    "vision_feature_select_strategy": "default"})
        _write_json(tmp / "chat_template.json", {"chat_template": chat_template()})
        llava_tokenizer(seed).save_pretrained(tmp)
        return _seal(tmp, out, {**spec, "tensors": len(specs), "total_size": weights["total_size"],
                                "shards": weights["shards"], "write_s": time.perf_counter() - t0})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_clip_checkpoint(out: Path, shape: str = "tinyllava-1.5b", dtype: str = "float16", seed: int = 0,
                          chunk: int = CHUNK_ELEMS) -> dict:
    """Write a random CLIPModel folder ``out`` (one ``model.safetensors``, tokenizer, image processor)."""
    from transformers import PreTrainedTokenizerFast

    spec = clip_spec(shape, dtype, seed)
    specs = clip_tensors(shape_of(shape))
    out, tmp = _atomic_folder(out)
    try:
        t0 = time.perf_counter()
        weights = write_weights(tmp, specs, dtype, seed, None, chunk)
        _save_config(clip_config(shape_of(shape), dtype), tmp, dtype)
        pre = {k: v for k, v in _preprocessor_config().items() if k != "processor_class"}
        _write_json(tmp / "preprocessor_config.json", pre)
        tok = PreTrainedTokenizerFast(tokenizer_object=clip_like_tokenizer(seed + 1), bos_token="<|startoftext|>",
                                      eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                      unk_token="<|endoftext|>", model_max_length=77)
        tok.save_pretrained(tmp)
        return _seal(tmp, out, {**spec, "tensors": len(specs), "total_size": weights["total_size"],
                                "shards": weights["shards"], "write_s": time.perf_counter() - t0})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def llava_spec(shape: str, dtype: str, layout: str, max_shard_bytes: int | None, seed: int) -> dict:
    """What identifies a written LLaVA checkpoint (compared with a folder's stamp before reuse)."""
    s = shape_of(shape)
    max_shard_bytes = s.shard_bytes if max_shard_bytes is None else int(max_shard_bytes)
    return {"kind": "llava", "writer_version": WRITER_VERSION, "shape": shape, "shape_fields": asdict(s),
            "dtype": dtype, "layout": layout, "max_shard_bytes": max_shard_bytes, "seed": seed,
            "tokenizer": tokenizer_source(), "chat_template": "published" if CHAT_TEMPLATE_JSON.is_file() else "demo"}


def clip_spec(shape: str, dtype: str, seed: int) -> dict:
    """What identifies a written CLIP checkpoint: its own fields only (tinyllava-1.5b and llava-1.5-7b share one)."""
    s = shape_of(shape)
    return {"kind": "clip", "writer_version": WRITER_VERSION, "clip": s.clip, "vision": s.vision,
            "text": s.clip_text, "projection_dim": s.projection_dim, "dtype": dtype, "seed": seed}


def read_stamp(folder: Path) -> dict | None:
    """The folder's stamp if every file it lists is there at its size, else None."""
    try:
        stamp = json.loads((Path(folder) / STAMP).read_text())
        ok = all((Path(folder) / n).stat().st_size == size for n, size in stamp["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return stamp if ok else None


def stamp_matches(folder: Path, spec: dict) -> bool:
    stamp = read_stamp(folder)
    return stamp is not None and all(stamp.get(k) == v for k, v in spec.items())


def params(shape: str, kind: str = "llava") -> int:
    specs = llava_tensors(shape_of(shape)) if kind == "llava" else clip_tensors(shape_of(shape))
    return sum(math.prod(spec[1]) for spec in specs)


def main(argv=None) -> int:
    """Write one checkpoint and report the writer's own wall time and peak RSS (VmHWM: unlike ``ru_maxrss`` it
    does not inherit the parent's high-water mark across exec)."""
    import argparse

    ap = argparse.ArgumentParser(description="write a random real-shape LLaVA or CLIP checkpoint")
    ap.add_argument("--shape", choices=list(SHAPES), default="tinyllava-1.5b")
    ap.add_argument("--kind", choices=["llava", "clip"], default="llava")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float16")
    ap.add_argument("--layout", choices=LAYOUTS, default="legacy")
    ap.add_argument("--shard-gb", type=float, default=None, help="tensor GB per shard (default: the shape's, "
                    f"{DEFAULT_SHARD_BYTES / 1e9:g} for the real shapes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.kind == "llava":
            shard = None if args.shard_gb is None else int(args.shard_gb * 1e9)
            stamp = write_llava_checkpoint(args.out, args.shape, args.dtype, args.layout, shard, args.seed)
        else:
            stamp = write_clip_checkpoint(args.out, args.shape, args.dtype, args.seed)
    except (ValueError, OSError) as e:
        print(f"realshape: error: {e}", file=sys.stderr)
        return 1
    from bench_lib import rss_mb
    peak = int(rss_mb("VmHWM") * 2**20)
    print(json.dumps({"out": str(args.out), "bytes": stamp["bytes"], "shards": stamp["shards"],
                      "wall_s": round(time.perf_counter() - t0, 2), "peak_rss_bytes": peak}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
