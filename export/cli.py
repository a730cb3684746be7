"""``safeclip-export``: a LLaVA checkpoint -> a bundle under ``engines/<name>``.

    safeclip-export                                   # the built-in demo model, offline
    safeclip-export --model llava-hf/llava-1.5-7b-hf --clip openai/clip-vit-large-patch14
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from safeclip.runtime.gate import GATE_VARIANTS, POLICIES
from safeclip.runtime.error_text import EXIT_INTERRUPTED, EXIT_USAGE, fail, one_line
from safeclip.runtime.devices import MODULES
from safeclip.runtime.gate import VIEW_MODES

from .quant import HEAD_BITS, LM_HEAD_DEFAULT
from .targets import TARGETS

PROG = "safeclip-export"


def _quiet_libraries() -> None:
    """Keep library chatter (progress bars, fallback warnings, exporter logs) off the user's terminal."""
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore")
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch._export", "torch.export",
                 "torch._dynamo", "onnxscript", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="safeclip-export", description=__doc__.replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("source")
    src.add_argument("--model", default="demo", help="LLaVA or LLaVA-NeXT checkpoint: Hugging Face id, local folder, "
                                                    "'demo' (default) or 'demo-next' (built-in tiny models)")
    src.add_argument("--clip", default=None, help="CLIP checkpoint providing visual_projection and the text tower "
                                                 "(default: openai/clip-vit-large-patch14; the demo brings its own)")
    src.add_argument("--vision-tower", default=None, help="replace LLaVA's vision tower by this CLIPVisionModel "
                                                         "checkpoint of the same shape (e.g. a Safe-CLIP tower)")
    gate = p.add_argument_group("gate")
    gate.add_argument("--descriptors", default="default", help="built-in set name (default, extended) or a JSON file")
    gate.add_argument("--gate", choices=GATE_VARIANTS, default="reference",
                      help="reference: penultimate-layer CLS as the paper; clip: canonical CLIP image embedding")
    gate.add_argument("--threshold", type=float, default=None, help="flag threshold on the top class's probability "
                                                                    "(default: the descriptor set's)")
    gate.add_argument("--views", choices=VIEW_MODES, default="any",
                      help="LLaVA-NeXT: how the verdicts of the base view and the tiles combine (default: any)")
    gate.add_argument("--policy", choices=POLICIES, default="instruct",
                      help="what a flagged image does to generation: the bundle's default (safeclip-run --policy, "
                           "safeclip-serve --policy and the Python API override it; the server's clients cannot)")
    out = p.add_argument_group("output")
    out.add_argument("--target", choices=list(TARGETS), default="cpu",
                     help="deployment preset: cpu (fp32, ONNX Runtime), jetson (fp16, engines built on the device "
                          "with safeclip-build), datacenter (fp16, engines built now when TensorRT is present)")
    out.add_argument("--out", type=Path, default=None, help="bundle folder (default: engines/<name>)")
    out.add_argument("--no-decoder", action="store_true", help="export the vision+gate graph only")
    out.add_argument("--sign-key", type=Path, default=None, metavar="KEY.pem",
                     help="sign the bundle with this Ed25519 private key (openssl genpkey -algorithm ed25519); "
                          "devices that trust its public key (SAFECLIP_TRUSTED_KEYS, --trusted-key) refuse anything "
                          "else")
    out.add_argument("--max-batch", type=int, default=None, help="jetson/datacenter: the most sequences one batched "
                     "decode step takes in the TensorRT engine (its decode profile; default: jetson 4, "
                     "datacenter 16; 1 = none); safeclip-serve --max-batch runs at most this")
    w = p.add_argument_group("weights (language model; the vision tower keeps the target's precision)")
    w.add_argument("--weights", default=None, metavar="{fp32,fp16,int8,int4}",
                   help="decoder weights: the target's float precision (default; cpu: fp32, jetson/datacenter: "
                        "fp16), or int8/int4 weight-only block quantisation of its linear layers")
    w.add_argument("--block-size", type=int, default=None, help="int8/int4: weights per scale along the input "
                   "dimension, 32, 64 or 128 (default: 128, or the largest that divides every layer); "
                   "int8 is ONNX Runtime only (TensorRT targets: int4)")
    w.add_argument("--zero-point", action="store_true", help="int8/int4: asymmetric blocks with zero points "
                   "(ONNX Runtime targets only; default: symmetric)")
    w.add_argument("--quant-method", default="rtn", help="rtn: round to nearest (the only method here; awq and "
                   "gptq are refused, see README)")
    w.add_argument("--quantize-lm-head", action=argparse.BooleanOptionalAction, default=None,
                   help="int8/int4: quantise lm_head too (at the body's bit width unless --lm-head-bits says), or "
                   "not (default on ONNX Runtime targets: " + ", ".join(
                       f"int{b} body: " + (f"int{h} head" if h else "float head") for b, h in LM_HEAD_DEFAULT.items())
                   + ", as measured in BENCHMARKS.md; the embedding table is never quantised)")
    w.add_argument("--lm-head-bits", type=int, choices=HEAD_BITS, default=None,
                   help="int8/int4, ONNX Runtime targets: the quantised lm_head's own bit width (e.g. 8 under an "
                   "int4 body, as llama.cpp keeps its output layer at 6 bits); implies --quantize-lm-head")
    plan = p.add_argument_group("planning")
    plan.add_argument("--dry-run", action="store_true", help="export nothing: print the memory needed (weights, KV "
                      "cache, activations) against every Jetson Orin module, for --model (a known name, a folder, "
                      "or config.json) or, without --model, for the whole LLaVA family")
    plan.add_argument("--context", type=int, default=None, help="with --dry-run only: context length to plan for "
                      "(default: the target's, at most the model's); an export keeps the model's context, and "
                      "safeclip-run/-serve --context cap the KV cache on the device")
    dev = p.add_argument_group("device (jetson/datacenter targets)")
    dev.add_argument("--device", default=None, metavar="{" + ",".join(MODULES) + "}",
                     help="the Jetson Orin module the bundle is for: a bundle that cannot run there, or whose "
                          "engines cannot be built there, is refused before any export work (export/device_memory.py)")
    return p


def _memory_model(args) -> str:
    """What the memory accounting reads for --model: a table name, or a folder holding config.json."""
    from .memory import MODEL_IDS, MODELS

    model = args.model
    if model in ("demo", "demo-next"):
        import tempfile
        from .architectures import ARCHITECTURES
        from .checkpoint import DEMOS
        return str(ARCHITECTURES[DEMOS[model]].tiny_test_model(Path(tempfile.mkdtemp()))[0])
    if model not in MODELS and model not in MODEL_IDS:
        from .checkpoint import resolve_checkpoint
        return str(resolve_checkpoint(model, "model")[0])
    return model


def check_device_fits(args):
    """--device: the one-line refusal (DeviceFitError) before any long work; the accounting when it fits."""
    from .device_memory import check_device
    from .targets import target

    tgt = target(args.target)
    if tgt.build_engines == "never":
        raise ValueError(f"--device names a Jetson module: it goes with --target jetson or datacenter, not "
                         f"{args.target}")
    return check_device(_memory_model(args), tgt, args.weights, args.device)


def dry_run(args) -> int:
    from .memory import dry_run_table, family_table
    from .targets import target

    tgt = target(args.target)
    precision = "fp32" if tgt.precision == "float32" else "fp16"
    context = args.context or tgt.context
    if context < 1:
        raise ValueError("--context must be at least 1")
    trt = tgt.build_engines != "never"
    if args.model == "demo" and "--model" not in (sys.argv[1:] if args.argv is None else args.argv):
        print(family_table(context, precision))
        if trt:
            from .device_memory import trt_family_table
            print(f"TensorRT ({tgt.name}): runs and builds per module\n\n" + trt_family_table(tgt))
        return 0
    model = _memory_model(args)
    if args.context is None:                     # the target's context, at most the model's
        from .memory import model_config, text_config
        t = text_config(model_config(model)[1])
        context = min(context, int(t["max_position_embeddings"]))
    weights = args.weights if args.weights in ("int8", "int4") else None
    print(dry_run_table(model, context, precision, weights, offer_int8=not trt))
    if trt:
        from .device_memory import device_table
        print(device_table(model, tgt, weights))
    if args.device:
        acc = check_device_fits(args)
        print(f"{args.device}: fits ({acc.runtime_bytes / 2**30:.2f} GiB to run)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.context is not None and not args.dry_run:      # refused, not dropped: an export has no such knob
        return fail(PROG, "--context only plans (with --dry-run); an export keeps the model's context: cap the KV "
                          "cache on the device with safeclip-run/safeclip-serve --context", EXIT_USAGE)
    _quiet_libraries()
    if args.dry_run:
        try:
            return dry_run(args)
        except Exception as e:
            return fail(PROG, e)
    if args.device:                          # refuse a plan the module cannot hold before any long work
        try:
            check_device_fits(args)
        except Exception as e:
            return fail(PROG, e)
    t0 = time.perf_counter()

    def progress(step: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {step} ...", file=sys.stderr, flush=True)

    try:
        from .bundle import ExportOptions, export_bundle
        report = export_bundle(ExportOptions(model=args.model, clip=args.clip, vision_tower=args.vision_tower, descriptors=args.descriptors,
                                             gate=args.gate, threshold=args.threshold, policy=args.policy, views=args.views,
                                             target=args.target, out=args.out, with_decoder=not args.no_decoder,
                                             weights=args.weights, block_size=args.block_size,
                                             max_batch=args.max_batch,
                                             symmetric=not args.zero_point, quant_method=args.quant_method,
                                             quantize_lm_head=args.quantize_lm_head, lm_head_bits=args.lm_head_bits,
                                             sign_key=args.sign_key),
                               progress=progress)
    except KeyboardInterrupt:
        return fail(PROG, "interrupted; nothing was written", EXIT_INTERRUPTED, label=None)
    except ImportError as e:
        return fail(PROG, f"{one_line(e)} (install the exporter: pip install 'safeclip-edge[export]')", EXIT_USAGE,
                    label=None)
    except Exception as e:  # the library raises typed, one-line errors; show them without a traceback
        return fail(PROG, e)
    for r in report.parity:
        print(f"parity  {r}", file=sys.stderr)
    if args.target == "datacenter":          # build TensorRT engines at once where TensorRT and a GPU are here
        try:
            from safeclip.runtime.build import maybe_build_engines
            outcome = maybe_build_engines(report.bundle, progress, sign_key=args.sign_key)
            print(f"engines {outcome.message}", file=sys.stderr)
        except Exception as e:
            return fail(PROG, f"engine build failed (the ONNX bundle is complete): {one_line(e)}")
    print(f"bundle  {report.bundle}  ({report.seconds:.1f}s, peak RSS {report.peak_rss_mb:.0f} MiB)", file=sys.stderr)
    print(report.bundle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
