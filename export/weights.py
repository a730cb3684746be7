"""Checkpoint weights without loading the model: safetensors read tensor by tensor, a meta-device skeleton.

Supported: safetensors checkpoints, one file (``model.safetensors``) or sharded with an index
(``model.safetensors.index.json``, as the published llava-hf checkpoints are); fp32, fp16 and bf16 tensors;
the llava-hf legacy names (``language_model.model.*``, ``multi_modal_projector.*``) and the transformers-5
names, mapped with transformers' own checkpoint conversion rules (``get_model_conversion_mapping``). Pickled
``*.bin`` checkpoints are refused (they cannot be read one tensor at a time, and loading them runs code).

Why not ``from_pretrained``: it materialises every weight (fp32 when asked, so 28 GB for a 7B model) and a
conversion to fp16 copies them again. Here the model is built on the meta device (no storage; only the few
non-persistent buffers, e.g. RoPE frequencies, are computed for real), and each tensor is read from its shard
with ``pread`` when it is needed: while the exporter writes it into a bundle, or while the parity reference runs
the one block it belongs to (:class:`Materialized`). Reads go through the page cache, not ``mmap``, so a shard
never counts against the process' resident memory.

Errors name the file (its full path: LLaVA, CLIP and a swapped tower may all call theirs ``model.safetensors``)
and the tensor on one line (:class:`WeightError`): a truncated or corrupt shard, a shard
named in the index that is missing, a tensor missing from the checkpoint, a tensor of unexpected shape.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .checkpoint_error import CheckpointError

__all__ = ["WeightError", "SafetensorsCheckpoint", "CheckpointWeights", "ModuleWeights", "meta_model",
           "checkpoint_key_map", "Materialized", "materialize", "fqn_of_params", "is_meta", "meta_twin"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_FLOAT_CODES = ("F64", "F32", "F16", "BF16")
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class WeightError(CheckpointError):
    """A checkpoint's weights are missing, truncated, corrupt or of unexpected shape."""


@dataclass(frozen=True)
class TensorRef:
    file: Path
    key: str
    dtype: str                      # safetensors dtype code, e.g. "F16"
    shape: tuple[int, ...]
    offset: int                     # absolute byte offset in the file
    length: int

    @property
    def nbytes(self) -> int:
        return self.length


def _read_header(path: Path) -> dict[str, TensorRef]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise WeightError(f"{path}: truncated or corrupt safetensors header (claims {n} bytes, file has {size})")
            meta = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError):
        raise WeightError(f"{path}: corrupt safetensors header (not JSON)") from None
    except OSError as e:
        raise WeightError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(meta, dict):
        raise WeightError(f"{path}: corrupt safetensors header")
    base = 8 + n
    refs = {}
    for key, info in meta.items():
        if key == "__metadata__":
            continue
        try:
            code, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise WeightError(f"{path}: corrupt header entry for tensor '{key}'") from None
        if code not in _ITEMSIZE:
            raise WeightError(f"{path}: tensor '{key}' has unsupported dtype {code}")
        count = 1
        for d in shape:
            count *= d
        if end - start != count * _ITEMSIZE[code] or start < 0:
            raise WeightError(f"{path}: tensor '{key}' has {end - start} bytes for shape {list(shape)} {code}")
        if base + end > size:
            raise WeightError(f"{path}: truncated: tensor '{key}' ends at byte {base + end}, file has {size}")
        refs[key] = TensorRef(path, key, code, shape, base + start, end - start)
    return refs


class SafetensorsCheckpoint:
    """The tensors of a checkpoint folder, indexed by name; each read with ``pread`` on demand."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise WeightError(f"{index}: corrupt index (no weight_map)") from None
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise WeightError(f"{index}: shard {missing[0]} named in the index is missing")
        elif (self.folder / SINGLE).is_file():
            weight_map, files = None, [SINGLE]
        else:
            pickled = sorted(p.name for p in self.folder.glob("*.bin"))
            hint = (f" (found {pickled[0]}: pickled checkpoints are not supported; convert it to safetensors)"
                    if pickled else "")
            raise WeightError(f"{self.folder}: no {SINGLE} or {INDEX}{hint}")
        self.refs: dict[str, TensorRef] = {}
        for name in files:
            self.refs.update(_read_header(self.folder / name))
        if weight_map is not None:
            for key, file in weight_map.items():
                ref = self.refs.get(key)
                if ref is None or ref.file.name != file:
                    raise WeightError(f"{self.folder / file}: tensor '{key}' named in the index is not in that shard")

    def __contains__(self, key: str) -> bool:
        return key in self.refs

    def keys(self):
        return self.refs.keys()

    @property
    def nbytes(self) -> int:
        return sum(r.length for r in self.refs.values())

    def read(self, key: str, dtype=None):
        """The tensor ``key`` as a torch tensor (a fresh copy), converted to ``dtype`` if given."""
        import numpy as np
        import torch

        ref = self.refs[key]
        buf = bytearray(ref.length)
        with open(ref.file, "rb") as f:
            got = f.readinto(memoryview(buf)) if f.seek(ref.offset) == ref.offset else 0
        if got != ref.length:
            raise WeightError(f"{ref.file}: truncated while reading tensor '{key}'")
        if ref.dtype == "BF16":     # numpy has no bfloat16: reinterpret the bytes in torch
            t = torch.frombuffer(buf, dtype=torch.int16).view(torch.bfloat16) if ref.length else torch.empty(0, dtype=torch.bfloat16)
        else:
            t = torch.from_numpy(np.frombuffer(buf, dtype=_ST_DTYPES[ref.dtype]))
        t = t.reshape(ref.shape)
        return t.to(dtype) if dtype is not None and t.dtype != dtype else t


def meta_model(cls, config):
    """``cls`` built from ``config`` on the meta device (fp32, eager attention): parameters have no storage.

    Buffers that checkpoints do not hold (RoPE ``inv_freq``, CLIP's ``position_ids``) are computed on the CPU
    by transformers' own ``_init_weights`` of the nearest enclosing pretrained model, as ``from_pretrained`` does.
    """
    import torch
    from transformers import PreTrainedModel

    with torch.device("meta"):
        model = cls._from_config(config, dtype=torch.float32, attn_implementation="eager")
    pretrained = [(n, m) for n, m in model.named_modules() if isinstance(m, PreTrainedModel)]
    for name, mod in model.named_modules():
        metas = [bn for bn, b in mod.named_buffers(recurse=False) if b.device.type == "meta"]
        if not metas:
            continue
        for bn in metas:
            mod._buffers[bn] = torch.empty_like(mod._buffers[bn], device="cpu")
        owner = max((p for p in pretrained if p[0] == "" or name.startswith(p[0] + ".")), key=lambda p: len(p[0]))[1]
        owner._init_weights(mod)
    return model.eval()


def checkpoint_key_map(model, ckpt: SafetensorsCheckpoint, what: str = "model") -> dict[str, str]:
    """{parameter FQN in ``model``: checkpoint key} for every parameter, with transformers' renaming rules.

    Tied parameters (e.g. an LM head tied to the embeddings) map to the key of the tensor they share. Raises
    :class:`WeightError` naming the first parameter the checkpoint lacks, or a tensor of the wrong shape.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta_sd = dict(model.state_dict())
    found: dict[str, str] = {}
    for key in ckpt.keys():
        new, conv = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_sd)
        if conv is not None:
            raise WeightError(f"{ckpt.folder}: tensor '{key}' needs transformers' weight conversion "
                              f"'{conv}', which the streaming exporter does not support")
        found.setdefault(new, key)
    by_id: dict[int, str] = {}
    out: dict[str, str] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        key = found.get(fqn) or (by_id.get(id(p)) and out[by_id[id(p)]])     # a tied parameter: its twin's
        if key is None:                  # `what` names the model as given; add the folder where it differs
            where = what if str(ckpt.folder) in what else f"{what} ({ckpt.folder})"
            guess = _name_in_checkpoint(fqn, found)
            also = f" (in this checkpoint's naming: '{guess}')" if guess and guess != fqn else ""
            raise WeightError(f"{where}: checkpoint has no tensor for '{fqn}'{also}")
        ref = ckpt.refs[key]
        if p.dtype.is_floating_point and ref.dtype not in _FLOAT_CODES:
            raise WeightError(f"{ref.file}: tensor '{key}' is stored as {ref.dtype}, the model expects a float tensor")
        if tuple(p.shape) != ref.shape:
            raise WeightError(f"{ref.file}: tensor '{key}' has shape {list(ref.shape)}, "
                              f"the model expects {list(p.shape)}")
        out[fqn] = key
        by_id.setdefault(id(p), fqn)
    return out


def _name_in_checkpoint(fqn: str, found: dict[str, str]) -> str | None:
    """The checkpoint-side name of a missing parameter, by the renaming its nearest found sibling got
    (e.g. ``model.language_model.X`` -> ``language_model.model.X`` in a legacy llava-hf checkpoint)."""
    def shared(a: str, b: str) -> int:
        n = 0
        for x, y in zip(a.split("."), b.split(".")):
            if x != y:
                break
            n += 1
        return n

    if not found:
        return None
    model_name, key = max(found.items(), key=lambda kv: shared(kv[0], fqn))
    a, b = model_name.split("."), key.split(".")
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    model_prefix, ckpt_prefix = ".".join(a[:len(a) - n]), ".".join(b[:len(b) - n])
    if not fqn.startswith(model_prefix):
        return None
    rest = fqn[len(model_prefix):].lstrip(".")
    return ".".join(x for x in (ckpt_prefix, rest) if x)


class CheckpointWeights:
    """Model parameter FQN -> tensor, read from checkpoints (``parts``: (FQN prefix, checkpoint, key map))."""

    def __init__(self, ckpt: SafetensorsCheckpoint, key_map: dict[str, str]):
        self.parts = [("", ckpt, key_map)]

    def add(self, prefix: str, ckpt: SafetensorsCheckpoint, key_map: dict[str, str]) -> None:
        """Parameters under ``prefix`` come from ``ckpt`` instead (e.g. a swapped vision tower)."""
        self.parts.insert(0, (prefix, ckpt, {prefix + k: v for k, v in key_map.items()}))

    def read(self, fqn: str, dtype=None):
        for prefix, ckpt, keys in self.parts:
            if fqn.startswith(prefix) and fqn in keys:
                return ckpt.read(keys[fqn], dtype)
        raise WeightError(f"no checkpoint tensor for '{fqn}'")

    def nbytes(self, prefix: str = "") -> int:
        """Bytes of the distinct checkpoint tensors under ``prefix``."""
        seen = {}
        for pre, ckpt, keys in self.parts:
            for fqn, key in keys.items():
                if fqn.startswith(prefix) and fqn not in seen:
                    seen[fqn] = ckpt.refs[key].length
        return sum(seen.values())


class ModuleWeights:
    """Model parameter FQN -> tensor, from a model held in memory (tiny models, tests)."""

    def __init__(self, model):
        self.tensors = {**dict(model.named_buffers()), **dict(model.named_parameters(remove_duplicate=False))}

    def read(self, fqn: str, dtype=None):
        t = self.tensors[fqn].detach()
        return t.to(dtype) if dtype is not None and t.dtype != dtype else t


def meta_twin(model):
    """A copy of an in-memory ``model`` whose parameters are on the meta device (no weight is copied; buffers
    are, they are small): what the exporter traces when the weights come from memory (:class:`ModuleWeights`)."""
    import copy

    import torch

    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def is_meta(model) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def fqn_of_params(model) -> dict[int, str]:
    """id(parameter) -> its FQN in ``model`` (the first name of a tied parameter)."""
    out: dict[int, str] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), fqn)
    return out


def materialize(module, fqn_of: dict[int, str], weights, dtype=None) -> None:
    """Give every meta parameter of ``module`` its real value for good (small parts: CLIP's text tower)."""
    import torch

    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.device.type == "meta":
                mod._parameters[name] = torch.nn.Parameter(weights.read(fqn_of[id(p)], dtype or torch.float32),
                                                           requires_grad=False)


class Materialized:
    """Forward hooks giving a meta-device module's blocks real fp32 weights only while each block runs.

    ``blocks`` are submodules (each decoder layer, the final norm, the LM head, ...): before a block's forward
    its meta parameters are read (``weights.read(fqn_of[id(p)])``), after it they go back to meta. So a
    reference forward of a 7B model holds one layer's weights at a time. ``progress(blocks run, blocks)`` is
    called after each block (a reference of several forward passes counts on past ``blocks``).
    """

    def __init__(self, blocks, fqn_of: dict[int, str], weights, progress=lambda done, total: None):
        self.blocks, self.fqn_of, self.weights = list(blocks), fqn_of, weights
        self.progress, self.runs = progress, 0
        self.handles: list = []
        self._saved: dict[int, list] = {}

    def _load(self, module, args):
        import torch

        saved = self._saved.setdefault(id(module), [])
        for mod in module.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None and p.device.type == "meta":
                    real = self.weights.read(self.fqn_of[id(p)], torch.float32)
                    mod._parameters[name] = torch.nn.Parameter(real, requires_grad=False)
                    saved.append((mod, name, p))

    def _free(self, module, args, output):
        for mod, name, p in self._saved.pop(id(module), []):
            mod._parameters[name] = p
        self.runs += 1
        self.progress(self.runs, len(self.blocks))

    def __enter__(self):
        for b in self.blocks:
            self.handles.append(b.register_forward_pre_hook(self._load))
            self.handles.append(b.register_forward_hook(self._free))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for lst in self._saved.values():
            for mod, name, p in lst:
                mod._parameters[name] = p
        self._saved.clear()
