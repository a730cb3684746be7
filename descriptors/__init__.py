"""Toxic-descriptor sets: loading and validation (pure Python; used by the exporter and the tools).

Two file formats are accepted:

* the project's own format (``default.json``, ``extended.json`` here)::

    {"name": "default", "version": "1.0", "description": "...",
     "safe_classes": ["neutral"], "default_threshold": 0.6,
     "classes": {"neutral": ["..."], "gun": ["..."], ...},
     "refusals": {"gun": "..."}}                      # optional, one sentence per class

* the SafeCLIP reference format ``{class_name: [sentence, ...]}``, where ``neutral`` is the safe class.

Every problem is reported as a :class:`DescriptorError` whose message names the file and the problem on
one line. Classes may have unequal sentence counts (the gate aggregates per class correctly).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

__all__ = ["DescriptorError", "DescriptorSet", "load_descriptor_set", "builtin_names", "parse_descriptor_set"]

_KEYS = {"name", "version", "description", "safe_classes", "default_threshold", "classes", "refusals"}
_REQUIRED = {"name", "version", "safe_classes", "classes"}
DEFAULT_THRESHOLD = 0.6


class DescriptorError(ValueError):
    """A descriptor file is missing or invalid (message: '<file>: <problem>')."""


@dataclass(frozen=True)
class DescriptorSet:
    name: str
    version: str
    classes: tuple[str, ...]
    sentences: tuple[tuple[str, ...], ...]          # sentences[i] belong to classes[i]
    safe_classes: tuple[str, ...]
    default_threshold: float = DEFAULT_THRESHOLD
    description: str = ""
    refusals: dict[str, str] = field(default_factory=dict)
    source: str = ""                                  # where it was read from, for messages

    @property
    def flat_sentences(self) -> list[str]:
        return [s for group in self.sentences for s in group]

    @property
    def class_index(self) -> list[int]:
        """Class index of every sentence in :attr:`flat_sentences` order."""
        return [i for i, group in enumerate(self.sentences) for _ in group]

    def to_json(self) -> dict:
        """The project format (also what the manifest records for audit)."""
        out = {
            "name": self.name, "version": self.version, "description": self.description,
            "safe_classes": list(self.safe_classes), "default_threshold": self.default_threshold,
            "classes": {c: list(s) for c, s in zip(self.classes, self.sentences)},
        }
        if self.refusals:
            out["refusals"] = dict(self.refusals)
        return out

    @property
    def sha256(self) -> str:
        """Hash of what the gate depends on: classes, sentences (in order) and safe classes."""
        core = {"classes": {c: list(s) for c, s in zip(self.classes, self.sentences)},
                "safe_classes": sorted(self.safe_classes)}
        return hashlib.sha256(json.dumps(core, sort_keys=False, ensure_ascii=False).encode()).hexdigest()


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


def load_descriptor_set(spec: str | Path) -> DescriptorSet:
    """Load a built-in set by name (``default``, ``extended``) or a JSON file by path."""
    spec = str(spec)
    if spec in builtin_names() and not Path(spec).exists():
        text = resources.files(__name__).joinpath(spec + ".json").read_text(encoding="utf-8")
        return parse_descriptor_set(text, source=f"built-in set '{spec}'")
    path = Path(spec)
    if not path.is_file():
        raise DescriptorError(f"{spec}: no such descriptor file or built-in set "
                              f"(built-in: {', '.join(builtin_names())})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DescriptorError(f"{spec}: cannot read: {e}") from None
    return parse_descriptor_set(text, source=str(path), default_name=path.stem)


def parse_descriptor_set(text: str, source: str = "<string>", default_name: str = "custom") -> DescriptorSet:
    def fail(msg: str) -> DescriptorError:
        return DescriptorError(f"{source}: {msg}")

    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise fail(f"not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not data:
        raise fail("expected a JSON object")

    if "classes" in data or "safe_classes" in data:            # project format
        unknown = set(data) - _KEYS
        if unknown:
            raise fail(f"unknown keys {sorted(unknown)} (allowed: {sorted(_KEYS)})")
        missing = _REQUIRED - set(data)
        if missing:
            raise fail(f"missing keys {sorted(missing)}")
        name, version = data["name"], data["version"]
        if not isinstance(name, str) or not name.strip():
            raise fail("'name' must be a non-empty string")
        if not isinstance(version, (str, int, float)):
            raise fail("'version' must be a string")
        classes = data["classes"]
        safe = data["safe_classes"]
        description = data.get("description", "")
        threshold = data.get("default_threshold", DEFAULT_THRESHOLD)
        refusals = data.get("refusals", {})
        if not isinstance(description, str):
            raise fail("'description' must be a string")
    else:                                                        # reference format
        name, version, description = default_name, "reference", "SafeCLIP reference-format descriptors"
        classes, safe, threshold, refusals = data, ["neutral"], DEFAULT_THRESHOLD, {}
        if "neutral" not in classes:
            raise fail("reference-format file has no 'neutral' class (the safe class)")

    if not isinstance(classes, dict) or len(classes) < 2:
        raise fail("'classes' must map at least two class names to sentence lists")
    if not isinstance(safe, list) or not safe or not all(isinstance(s, str) for s in safe):
        raise fail("'safe_classes' must be a non-empty list of class names")
    for s in safe:
        if s not in classes:
            raise fail(f"safe class '{s}' is not among the classes")
    if len(set(safe)) == len(classes):
        raise fail("every class is safe: nothing could ever be flagged")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise fail(f"'default_threshold' must be a number in [0, 1], got {threshold!r}")
    if not isinstance(refusals, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                                  for k, v in refusals.items()):
        raise fail("'refusals' must map class names to non-empty sentences")
    for k in refusals:
        if k not in classes:
            raise fail(f"refusal for unknown class '{k}'")

    seen: dict[str, str] = {}
    names, groups = [], []
    for cls, sentences in classes.items():
        if not isinstance(cls, str) or not cls.strip():
            raise fail("class names must be non-empty strings")
        if not isinstance(sentences, list):
            raise fail(f"class '{cls}': expected a list of sentences")
        if not sentences:
            raise fail(f"class '{cls}' is empty")
        for s in sentences:
            if not isinstance(s, str):
                raise fail(f"class '{cls}': non-string sentence {s!r}")
            if not s.strip():
                raise fail(f"class '{cls}': empty sentence")
            key = " ".join(s.lower().split())
            if key in seen:
                raise fail(f"duplicate sentence {s!r} (classes '{seen[key]}' and '{cls}')")
            seen[key] = cls
        names.append(cls)
        groups.append(tuple(sentences))
    return DescriptorSet(name=str(name), version=str(version), classes=tuple(names), sentences=tuple(groups),
                         safe_classes=tuple(safe), default_threshold=float(threshold),
                         description=description, refusals=dict(refusals), source=source)
