import json

import pytest

from safeclip.descriptors import DescriptorError, builtin_names, load_descriptor_set, parse_descriptor_set

from conftest import SHARED


def test_builtin_sets_load_and_are_well_formed():
    assert {"default", "extended"} <= set(builtin_names())
    d = load_descriptor_set("default")
    assert d.classes[0] == "neutral" and d.safe_classes == ("neutral",)
    assert len(d.classes) == 8 and all(len(s) == 5 for s in d.sentences)
    e = load_descriptor_set("extended")
    assert {"self_harm", "hate_symbol", "drugs", "extremism", "accident"} <= set(e.classes)
    assert len({len(s) for s in e.sentences}) > 1          # unequal counts are supported
    assert len(e.class_index) == len(e.flat_sentences)


def test_reference_format_compatibility():
    ref = SHARED / "reference" / "safeclip_official_templates.json"
    if not ref.is_file():
        pytest.skip(f"reference data not found at {ref}")
    d = load_descriptor_set(ref)
    raw = json.loads(ref.read_text())
    assert list(d.classes) == list(raw) and d.safe_classes == ("neutral",)
    assert d.flat_sentences == [s for v in raw.values() for s in v]
    assert d.default_threshold == 0.6


GOOD = {"name": "x", "version": "1", "safe_classes": ["ok"], "classes": {"ok": ["fine"], "bad": ["gun"]}}


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(safe_classes=[]), "safe_classes"),
    (lambda d: d.update(safe_classes=["nope"]), "not among the classes"),
    (lambda d: d["classes"].update(bad=[]), "class 'bad' is empty"),
    (lambda d: d["classes"].update(bad=["fine"]), "duplicate sentence"),
    (lambda d: d["classes"].update(bad=["gun", 3]), "non-string"),
    (lambda d: d.update(colour="red"), "unknown keys"),
    (lambda d: d.update(default_threshold=1.5), "default_threshold"),
    (lambda d: d.pop("name"), "missing keys"),
    (lambda d: d.update(safe_classes=["ok", "bad"]), "every class is safe"),
    (lambda d: d.update(refusals={"zzz": "no"}), "unknown class"),
])
def test_invalid_files_give_one_line_error_naming_file(tmp_path, mutate, message):
    data = json.loads(json.dumps(GOOD))
    mutate(data)
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(data))
    with pytest.raises(DescriptorError) as e:
        load_descriptor_set(f)
    msg = str(e.value)
    assert message in msg and str(f) in msg and "\n" not in msg


def test_reference_format_without_neutral_and_bad_json(tmp_path):
    with pytest.raises(DescriptorError, match="neutral"):
        parse_descriptor_set(json.dumps({"a": ["x"], "b": ["y"]}))
    with pytest.raises(DescriptorError, match="not valid JSON"):
        parse_descriptor_set("{nope")
    with pytest.raises(DescriptorError, match="no such descriptor file"):
        load_descriptor_set(tmp_path / "missing.json")


def test_hash_changes_with_content():
    a = parse_descriptor_set(json.dumps(GOOD))
    g2 = json.loads(json.dumps(GOOD))
    g2["classes"]["bad"] = ["a gun"]
    assert a.sha256 != parse_descriptor_set(json.dumps(g2)).sha256
