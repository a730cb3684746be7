"""Builds the models ``scripts/bench_peers.py`` times: one random-weight checkpoint, every engine's form of it.

* ``checkpoint``: the random-weight LLaVA of ``scripts/bench_quant.py`` (its ``write_checkpoint``: the language
  model at ``--shape``, seed ``SEED``, fp16 safetensors) and, from the same tensors, a plain ``LlamaForCausalLM``
  folder (``model.*`` / ``lm_head.weight``, ``config.json``, the Llama-2 tokenizer that llama.cpp ships as
  ``models/ggml-vocab-llama-spm.gguf``, converted by transformers): what llama.cpp's and onnxruntime-genai's
  converters read.
* ``ours``: this project's cpu bundles, exported the project's way (``bench_quant.export_one``: streaming
  ``export_decoder`` with the cpu target's fusions and quantisation scheme, parity gate included), one
  subprocess each.
* ``llama.cpp``: ``convert_hf_to_gguf.py`` from the llama-cpp-python sdist (its vendored llama.cpp, with its
  ``gguf-py``) to an F32 GGUF, then ``llama_cpp.llama_model_quantize`` to Q8_0 / Q4_0 (2 threads); Q4_0 once
  with llama.cpp's default output layer (Q6_K) and once with ``output_tensor_type`` F32.
* ``genai``: ``python -m onnxruntime_genai.models.builder -e cpu`` with its defaults and with settings matched
  to ours (``block_size=128``, ``nodes_to_exclude=/lm_head/MatMul``: fp32 lm_head); its ``genai_config.json``
  then gets ``intra_op_num_threads`` = ``--threads``.

Every step is cached in ``--work`` (a folder is complete once its ``.done`` stamp exists) and skipped with one
line where its engine is not installed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
LLAMA_CPP_PYTHON = "0.3.36"                       # the version issue 26 measured
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
SDIST_MEMBERS = ("convert_hf_to_gguf.py", "gguf-py", "conversion", "models/ggml-vocab-llama-spm.gguf")


@dataclass(frozen=True)
class Model:
    """One timed model: ``engine`` (ours | llama.cpp | genai), the precision group it is timed in, how it is
    built (``build``: engine-specific settings) and a label for the table."""
    name: str
    engine: str
    precision: str                    # fp32 | int8 | int4: models are alternated within their group
    label: str
    build: tuple = ()


MODELS = {m.name: m for m in (
    Model("ours-fp32", "ours", "fp32", "this project fp32", (("weights", "fp32"),)),
    Model("ours-int8", "ours", "int8", "this project int8 (block 128, fp32 lm_head)", (("weights", "int8"),)),
    Model("ours-int8-qhead", "ours", "int8", "this project int8, --quantize-lm-head (int8 lm_head)",
          (("weights", "int8"), ("lm_head", True))),
    Model("ours-int4", "ours", "int4", "this project int4 (block 128, fp32 lm_head)", (("weights", "int4"),)),
    Model("ours-int4-qhead", "ours", "int4", "this project int4, --quantize-lm-head (int4 lm_head)",
          (("weights", "int4"), ("lm_head", True))),
    Model("ours-int4-q8head", "ours", "int4", "this project int4, --lm-head-bits 8 (int8 lm_head)",
          (("weights", "int4"), ("lm_head_bits", 8))),
    Model("llama.cpp-f32", "llama.cpp", "fp32", "llama.cpp F32", (("ftype", "F32"),)),
    Model("llama.cpp-q8_0", "llama.cpp", "int8", "llama.cpp Q8_0", (("ftype", "Q8_0"),)),
    Model("llama.cpp-q4_0", "llama.cpp", "int4", "llama.cpp Q4_0 (default: lm_head Q6_K)", (("ftype", "Q4_0"),)),
    Model("llama.cpp-q4_0-f32head", "llama.cpp", "int4", "llama.cpp Q4_0, lm_head F32",
          (("ftype", "Q4_0"), ("output", "F32"))),
    Model("genai-fp32", "genai", "fp32", "ORT GenAI fp32", (("precision", "fp32"),)),
    Model("genai-int8", "genai", "int8", "ORT GenAI int8 default (block 32, int8 lm_head)", (("precision", "int8"),)),
    Model("genai-int8-matched", "genai", "int8", "ORT GenAI int8 matched (our block size, fp32 lm_head)",
          (("precision", "int8"), ("matched", True))),
    Model("genai-int4", "genai", "int4", "ORT GenAI int4 default (block 32, int4 lm_head)", (("precision", "int4"),)),
    Model("genai-int4-matched", "genai", "int4", "ORT GenAI int4 matched (our block size, fp32 lm_head)",
          (("precision", "int4"), ("matched", True))),
)}
ENGINE_MODULES = {"ours": "onnxruntime", "llama.cpp": "llama_cpp", "genai": "onnxruntime_genai"}
INSTALL_HINTS = {"llama.cpp": f"pip install llama-cpp-python=={LLAMA_CPP_PYTHON} (compiles llama.cpp: tens of "
                              "minutes on 2 cores; build the wheel once with `pip wheel` and install from it)",
                 "genai": "pip install onnxruntime-genai"}


def installed(engine: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(ENGINE_MODULES[engine]) is not None


def skip_line(engine: str) -> str:
    return f"bench_peers: skipping {engine}: not installed ({INSTALL_HINTS.get(engine, '')})"


def _done(folder: Path) -> bool:
    return (folder / ".done").exists()


def _mark(folder: Path, info: dict | None = None) -> None:
    (folder / ".done").write_text(json.dumps(info or {}))


def _run(cmd: list[str], **kw) -> None:
    print("bench_peers: $ " + " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


# -- the checkpoint ---------------------------------------------------------------------------------------------
def sdist_tree(work: Path, sdist: Path | None) -> Path:
    """The vendored llama.cpp files of llama-cpp-python's sdist (converter, gguf-py, Llama-2 vocabulary)."""
    dest = work / SDIST / "vendor" / "llama.cpp"
    if all((dest / m).exists() for m in SDIST_MEMBERS):
        return dest
    if sdist is None:
        sdist = work / f"{SDIST}.tar.gz"
        if not sdist.exists():
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", work])
    prefix = f"{SDIST}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if any(m.name == prefix + s or m.name.startswith(prefix + s + "/") for s in SDIST_MEMBERS)]
        tar.extractall(work, members=members, filter="data")
    return dest


def llama_folder(llava_ckpt: Path, out: Path, shape: dict, vocab_gguf: Path) -> None:
    """A plain Llama checkpoint with the language-model tensors of ``llava_ckpt`` (fp16, same bytes)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    renames = (("model.language_model.", "model."), ("language_model.model.", "model."),
               ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."))
    tensors = {}
    for f in sorted(llava_ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                new = next((n + k[len(p):] for p, n in renames if k.startswith(p)), None)
                if new is not None:
                    tensors[new] = st.get_tensor(k)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    cfg = LlamaConfig(**shape, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                      dtype="float16")
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(tmp)
    tok = AutoTokenizer.from_pretrained(vocab_gguf.parent, gguf_file=vocab_gguf.name)
    if len(tok) != shape["vocab_size"]:
        raise ValueError(f"{vocab_gguf.name} has {len(tok)} tokens, the model {shape['vocab_size']}")
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    _mark(out)


def checkpoint(work: Path, shape_name: str, tree: Path) -> tuple[Path, Path]:
    """(LLaVA checkpoint for our exporter, plain Llama folder for the peers), built once."""
    from bench_generate import SHAPES

    llava, llama = work / f"ckpt-{shape_name}", work / f"llama-{shape_name}"
    if not _done(llava):
        _run([sys.executable, HERE / "bench_quant.py", "--_checkpoint", llava, "--shape", shape_name])
        _mark(llava)
    if not _done(llama):
        llama_folder(llava, llama, SHAPES[shape_name], tree / "models" / "ggml-vocab-llama-spm.gguf")
    return llava, llama


# -- the engines' forms -----------------------------------------------------------------------------------------
def build_ours(m: Model, out: Path, *, llava: Path, block_size: int, **_) -> None:
    b = dict(m.build)
    _run([sys.executable, HERE / "bench_quant.py", "--_export", out, "--ckpt", llava, "--weights", b["weights"],
          "--block-size", block_size] + (["--lm-head"] if b.get("lm_head") else [])
         + (["--lm-head-bits", b["lm_head_bits"]] if b.get("lm_head_bits") else []))
    _mark(out)


def gguf_f32(llama: Path, tree: Path) -> Path:
    """The Llama folder as an F32 GGUF (llama.cpp's converter; needs torch and its gguf-py, not llama_cpp)."""
    f32 = llama.parent / f"{llama.name}-f32.gguf"
    if not f32.exists():
        tmp = f32.with_suffix(".tmp")
        _run([sys.executable, tree / "convert_hf_to_gguf.py", llama, "--outfile", tmp, "--outtype", "f32"])
        tmp.rename(f32)
    return f32


def build_gguf(m: Model, out: Path, *, llama: Path, tree: Path, threads: int, **_) -> None:
    import ctypes

    import llama_cpp

    out.mkdir(parents=True, exist_ok=True)
    f32 = gguf_f32(llama, tree)
    b = dict(m.build)
    target = out / "model.gguf"
    if b["ftype"] == "F32":
        os.link(f32, target)                                 # the same file, not a second 4 GB copy
    else:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{b['ftype']}")
        params.nthread = threads
        if "output" in b:
            params.output_tensor_type = getattr(llama_cpp, f"GGML_TYPE_{b['output']}")
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(target).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize to {b['ftype']} failed with {rc}")
    _mark(out)


def build_genai(m: Model, out: Path, *, llama: Path, threads: int, block_size: int, **_) -> None:
    b = dict(m.build)
    extra = [f"block_size={block_size}", "nodes_to_exclude=/lm_head/MatMul"] if b.get("matched") else []
    cache = out.with_name(out.name + ".cache")
    _run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", llama, "-o", out, "-p", b["precision"],
          "-e", "cpu", "-c", cache] + (["--extra_options", *extra] if extra else []))
    shutil.rmtree(cache, ignore_errors=True)
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    so.update({"intra_op_num_threads": threads, "inter_op_num_threads": 1})
    cfg_path.write_text(json.dumps(cfg, indent=1))
    _mark(out)


BUILDERS = {"ours": build_ours, "llama.cpp": build_gguf, "genai": build_genai}


def ensure(models: list[Model], work: Path, shape_name: str, block_size: int, threads: int,
           sdist: Path | None) -> dict[str, Path]:
    """Build every model of ``models`` whose engine is installed; returns {name: folder}."""
    work.mkdir(parents=True, exist_ok=True)
    tree = sdist_tree(work, sdist)
    llava, llama = checkpoint(work, shape_name, tree)
    folders = {}
    for m in models:
        if not installed(m.engine):
            continue
        out = work / f"{shape_name}-{m.name}"
        if not _done(out):
            shutil.rmtree(out, ignore_errors=True)
            BUILDERS[m.engine](m, out, llava=llava, llama=llama, tree=tree, block_size=block_size,
                               threads=threads)
        folders[m.name] = out
    return folders
