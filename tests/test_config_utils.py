"""config_utils: typed settings from YAML and overrides (bools, numbers, paths, unions, sections, required
fields, plain-YAML output) and their errors."""

from __future__ import annotations

import dataclasses

import pytest

from mossformer2.config_utils import ConfigError, from_dict


@dataclasses.dataclass
class _Flags:
    flag: bool = False


@pytest.mark.parametrize(("text", "value"), [("1", True), ("0", False), ("yes", True), ("no", False)])
def test_boolean_numerals_and_words_as_strings(text, value):
    assert from_dict(_Flags, {"flag": text}).flag is value


@dataclasses.dataclass
class _Numbers:
    count: int = 1
    rate: float = 0.5


def test_an_integer_field_takes_whole_floats_and_refuses_fractions():
    """3.0 is 3; 2.5 for an int field is an error, not silently 2."""
    assert from_dict(_Numbers, {"count": 3.0}).count == 3
    with pytest.raises(ConfigError, match=r"_Numbers.count: expected an integer, got 2.5"):
        from_dict(_Numbers, {"count": 2.5})


@pytest.mark.parametrize("field", ["count", "rate"])
def test_a_bool_is_not_a_number(field):
    """YAML's true/yes for a number field is a typo, not 1."""
    with pytest.raises(ConfigError, match=rf"_Numbers.{field}: expected"):
        from_dict(_Numbers, {field: True})


@dataclasses.dataclass
class _Paths:
    root: str = "."
    shape: tuple[int, ...] = (1, 2)


def test_a_path_object_is_taken_for_a_string_setting():
    from pathlib import Path

    assert from_dict(_Paths, {"root": Path("data") / "wsj0"}).root == str(Path("data") / "wsj0")


def test_a_tuple_setting_stays_a_tuple():
    """A YAML list for a ``tuple[...]`` field becomes a tuple (hashable, equal to the default's type)."""
    assert from_dict(_Paths, {"shape": [3, 4]}).shape == (3, 4)
    assert isinstance(from_dict(_Paths, {"shape": [3, 4]}).shape, tuple)


@dataclasses.dataclass
class _Outer:
    inner: _Numbers = dataclasses.field(default_factory=_Numbers)


def test_a_section_may_be_given_as_its_dataclass():
    """Python callers pass a built section (e.g. a MossFormer2Config for ``model``) instead of a mapping."""
    inner = _Numbers(count=7)
    assert from_dict(_Outer, {"inner": inner}).inner is inner


@dataclasses.dataclass
class _Required:
    name: str
    count: int = 1


def test_a_missing_required_setting_is_a_config_error():
    with pytest.raises(ConfigError, match=r"_Required: .*missing 1 required positional argument: 'name'"):
        from_dict(_Required, {"count": 2})


def test_to_dict_writes_plain_yaml_types(tmp_path):
    """Tuples as lists and paths as strings, so that save_yaml (yaml.safe_dump) can write any config."""
    from pathlib import Path

    from mossformer2.config_utils import load_yaml, save_yaml, to_dict

    cfg = _Paths(root=Path("data") / "wsj0", shape=(3, 4))  # (a path set after construction)
    assert to_dict(cfg) == {"root": str(Path("data") / "wsj0"), "shape": [3, 4]}
    save_yaml(cfg, tmp_path / "c.yaml")
    assert from_dict(_Paths, load_yaml(tmp_path / "c.yaml")) == _Paths(root=str(Path("data") / "wsj0"), shape=(3, 4))


@dataclasses.dataclass
class _Lists:
    names: str | list[str] | None = None
    section: str | _Numbers = "default"


def test_a_union_error_comes_from_the_member_of_the_values_shape():
    """A list for ``str | list[str]`` is wrong inside the list: the error names the item, not every member; a mapping
    for ``str | Section`` names the section's unknown key."""
    with pytest.raises(ConfigError, match=r"^_Lists\.names\[1\]: expected a string, got 3$"):
        from_dict(_Lists, {"names": ["a", 3]})
    with pytest.raises(ConfigError, match=r"^_Lists\.section: unknown key\(s\) \['cout'\]"):
        from_dict(_Lists, {"section": {"cout": 2}})


def test_an_empty_or_comment_only_yaml_file_is_an_empty_config(tmp_path):
    from mossformer2.config_utils import load_yaml

    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "comments.yaml").write_text("# all defaults\n")
    assert load_yaml(tmp_path / "empty.yaml") == {} and load_yaml(tmp_path / "comments.yaml") == {}


def test_an_override_value_may_hold_an_equals_sign():
    from mossformer2.config_utils import apply_overrides

    assert apply_overrides({}, ["data.train=/corpora/mix=2spk/tr"]) == {"data": {"train": "/corpora/mix=2spk/tr"}}


def test_shared_only_applies_inside_nested_sections():
    from mossformer2.config_utils import setting_changes

    old = {"data": {"batch_size": 4, "gone": 1}}
    new = {"data": {"batch_size": 8, "added": True}}
    assert setting_changes(old, new, shared_only=True) == [("data.batch_size", 4, 8)]
