"""Loading source checkpoints: a LLaVA model and the CLIP that provides the gate's projection and text tower.

``--model`` and ``--clip`` take a Hugging Face id or a local folder. Without network access and without a
local copy (in the HF cache or on disk) a :class:`CheckpointError` names the missing model on one line.
``demo`` (LLaVA-1.5 shaped) and ``demo-next`` (LLaVA-NeXT shaped) build the embedded tiny models into a
temporary folder and load them through this same code.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from safeclip.runtime.error_text import one_line

from .checkpoint_error import CheckpointError

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


@dataclass
class Sources:
    llava: object            # LlavaForConditionalGeneration (eval, fp32)
    clip: object             # CLIPModel (eval, fp32)
    llava_path: Path
    clip_path: Path
    model_id: str
    clip_id: str
    model_revision: str | None
    clip_revision: str | None
    vision_tower_id: str | None = None
    vision_tower_revision: str | None = None
    arch: object = None      # safeclip.export.architectures.ArchSpec
    weights: object = None   # where a meta-device ``llava``'s tensors are read (safeclip.export.weights)


def resolve_checkpoint(name: str, what: str) -> tuple[Path, str | None]:
    """A local folder or a snapshot of a hub id in the local cache; never downloads when offline."""
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CheckpointError(f"{what} '{name}': folder has no config.json")
        return p, None
    if p.exists():
        raise CheckpointError(f"{what} '{name}': not a checkpoint folder")
    if name.count("/") != 1 or name.startswith(("/", ".")):
        raise CheckpointError(f"{what} '{name}': no such folder, and not a Hugging Face id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - transformers depends on huggingface_hub
        raise CheckpointError(f"huggingface_hub is missing: {e}") from None
    try:
        path = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"],
                                 local_files_only=os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"))
    except Exception as e:
        try:
            path = snapshot_download(name, local_files_only=True)
        except Exception:
            kind = type(e).__name__
            raise CheckpointError(f"{what} '{name}' is not available locally and could not be downloaded "
                                  f"({kind}); copy it to a folder and pass the folder") from None
    rev = Path(path).name if Path(path).parent.name == "snapshots" else None
    return Path(path), rev


DEMOS = {"demo": "llava", "demo-next": "llava_next"}


def _arch_of(folder: Path, model: str):
    from .architectures import spec_for

    try:
        mt = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise CheckpointError(f"model '{model}': unreadable config.json") from None
    try:
        return spec_for(mt)
    except ValueError as e:
        raise CheckpointError(f"model '{model}': {e}") from None


def load_sources(model: str, clip: str | None, workdir: Path, vision_tower: str | None = None) -> Sources:
    """Load LLaVA and CLIP into memory (fp32): for tests' oracles and tiny models; the exporter streams
    instead (:func:`open_sources`). ``model == 'demo'`` builds the demo checkpoints into ``workdir`` first.
    ``vision_tower`` swaps LLaVA's tower for another CLIP vision checkpoint of the same shape."""
    import torch
    from transformers import CLIPModel

    llava_dir, model_rev, clip_dir, clip_rev, clip_name = _resolve_all(model, clip, workdir)
    arch = _arch_of(llava_dir, model)
    # CLIP first: the gate needs its text tower, visual_projection and logit scale, never its own vision
    # tower (the gate runs on LLaVA's tower), which is dropped before LLaVA is loaded to keep the peak low.
    try:
        clip_model = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32, attn_implementation="eager").eval()
    except Exception as e:
        raise CheckpointError(f"CLIP model '{clip_name}': cannot load "
                              f"({type(e).__name__}: {one_line(e)})") from None
    clip_model.vision_model = None
    try:
        llava = arch.model_cls().from_pretrained(llava_dir, dtype=torch.float32, attn_implementation="eager").eval()
    except Exception as e:
        raise CheckpointError(f"model '{model}': cannot load ({type(e).__name__}: {one_line(e)})") from None
    vt_id = vt_rev = None
    if vision_tower:
        vt_dir, vt_rev = resolve_checkpoint(vision_tower, "vision tower")
        swap_vision_tower(llava, vt_dir, vision_tower)
        vt_id = vision_tower
    vt = llava.model.vision_tower
    if clip_model.visual_projection.in_features != vt.config.hidden_size:
        raise CheckpointError(f"CLIP model '{clip_name}': visual_projection takes {clip_model.visual_projection.in_features} "
                              f"features but the LLaVA tower is {vt.config.hidden_size} wide")
    return Sources(llava=llava, clip=clip_model, llava_path=llava_dir, clip_path=clip_dir, model_id=model,
                   clip_id=clip_name, model_revision=model_rev, clip_revision=clip_rev,
                   vision_tower_id=vt_id, vision_tower_revision=vt_rev, arch=arch)


def _config(folder: Path, what: str, name: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise CheckpointError(f"{what} '{name}': cannot read config.json "
                              f"({type(e).__name__}: {one_line(e)})") from None


def _resolve_all(model: str, clip: str | None, workdir: Path):
    if model in DEMOS:                       # built offline, then loaded like any checkpoint folder
        from .architectures import ARCHITECTURES
        llava_dir, clip_dir = ARCHITECTURES[DEMOS[model]].tiny_test_model(workdir / model)
        model_rev = clip_rev = None
        clip_name = clip or model
        if clip not in (None, model):
            clip_dir, clip_rev = resolve_checkpoint(clip, "CLIP model")
    else:
        llava_dir, model_rev = resolve_checkpoint(model, "model")
        _arch_of(llava_dir, model)
        clip_name = clip or DEFAULT_CLIP
        clip_dir, clip_rev = resolve_checkpoint(clip_name, "CLIP model")
    return llava_dir, model_rev, clip_dir, clip_rev, clip_name


def open_sources(model: str, clip: str | None, workdir: Path, vision_tower: str | None = None) -> Sources:
    """The streaming exporter's sources: LLaVA as a meta-device skeleton whose tensors are read from its
    safetensors on demand (``Sources.weights``), and the few CLIP parts the gate needs (text tower,
    ``text_projection``, ``visual_projection``, ``logit_scale``) loaded for real; CLIP's vision tower never is.

    Checked before any export work: every parameter has a checkpoint tensor of the right shape (one line naming
    the file and tensor otherwise; see :class:`~safeclip.export.weights.WeightError`)."""
    from transformers import CLIPModel, CLIPVisionConfig, CLIPVisionModel, GenerationConfig

    from .weights import CheckpointWeights, SafetensorsCheckpoint, checkpoint_key_map, fqn_of_params, materialize, meta_model

    llava_dir, model_rev, clip_dir, clip_rev, clip_name = _resolve_all(model, clip, workdir)
    arch = _arch_of(llava_dir, model)
    config = _config(llava_dir, "model", model)
    llava = meta_model(arch.model_cls(), config)
    try:
        llava.generation_config = GenerationConfig.from_pretrained(llava_dir)
    except OSError:                          # no generation_config.json: the one derived from config.json
        pass
    ckpt = SafetensorsCheckpoint(llava_dir)
    weights = CheckpointWeights(ckpt, checkpoint_key_map(llava, ckpt, f"model '{model}'"))
    vt_id = vt_rev = None
    if vision_tower:
        vt_dir, vt_rev = resolve_checkpoint(vision_tower, "vision tower")
        vcfg = _config(vt_dir, "vision tower", vision_tower)
        vcfg = getattr(vcfg, "vision_config", vcfg)
        if not isinstance(vcfg, CLIPVisionConfig):
            raise CheckpointError(f"vision tower '{vision_tower}': not a CLIP vision checkpoint ({type(vcfg).__name__})")
        _check_tower_shape(llava.config.vision_config, vcfg, vision_tower)
        tower = meta_model(CLIPVisionModel, vcfg)             # its own config (eps, activation), LLaVA's shape
        tower_ckpt = SafetensorsCheckpoint(vt_dir)
        weights.add("model.vision_tower.", tower_ckpt, checkpoint_key_map(tower, tower_ckpt, f"vision tower '{vision_tower}'"))
        llava.model.vision_tower = tower
        vt_id = vision_tower
    clip_model = meta_model(CLIPModel, _config(clip_dir, "CLIP model", clip_name))
    clip_model.vision_model = None           # the gate runs on LLaVA's tower
    clip_ckpt = SafetensorsCheckpoint(clip_dir)
    materialize(clip_model, fqn_of_params(clip_model),
                CheckpointWeights(clip_ckpt, checkpoint_key_map(clip_model, clip_ckpt, f"CLIP model '{clip_name}'")))
    width = llava.config.vision_config.hidden_size
    if clip_model.visual_projection.in_features != width:
        raise CheckpointError(f"CLIP model '{clip_name}': visual_projection takes {clip_model.visual_projection.in_features} "
                              f"features but the LLaVA tower is {width} wide")
    return Sources(llava=llava, clip=clip_model, llava_path=llava_dir, clip_path=clip_dir, model_id=model,
                   clip_id=clip_name, model_revision=model_rev, clip_revision=clip_rev,
                   vision_tower_id=vt_id, vision_tower_revision=vt_rev, arch=arch, weights=weights)


def _check_tower_shape(old, new, name: str) -> None:
    diff = [f"{k} {getattr(new, k, None)} != {getattr(old, k, None)}" for k in _SHAPE_KEYS
            if getattr(new, k, None) != getattr(old, k, None)]
    if diff:
        raise CheckpointError(f"vision tower '{name}' does not fit this LLaVA: " + ", ".join(diff))


_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
               "patch_size", "num_channels")


def swap_vision_tower(llava, tower_dir: Path, name: str) -> None:
    """Replace LLaVA's vision tower by a ``CLIPVisionModel`` checkpoint of the same shape (e.g. Safe-CLIP's
    ``aimagelab/safeclip_vit-l_14_336``, a drop-in for LLaVA-1.5). A CLIPModel checkpoint works too (its
    vision half is taken). Every tower weight must come from the checkpoint: missing keys are an error."""
    import torch
    from transformers import CLIPVisionModel

    try:
        tower, info = CLIPVisionModel.from_pretrained(tower_dir, dtype=torch.float32, attn_implementation="eager",
                                                      output_loading_info=True)
    except Exception as e:
        raise CheckpointError(f"vision tower '{name}': cannot load as CLIPVisionModel "
                              f"({type(e).__name__}: {one_line(e)})") from None
    if info.get("missing_keys"):
        raise CheckpointError(f"vision tower '{name}': checkpoint lacks {len(info['missing_keys'])} tower weights "
                              f"(e.g. {sorted(info['missing_keys'])[0]})")
    _check_tower_shape(llava.config.vision_config, tower.config, name)
    llava.model.vision_tower = tower.eval()
