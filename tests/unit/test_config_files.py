"""The one reader of the files a person writes: bounded, one line per problem."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends import config_files
from backends.config_files import (
    MAX_DEPTH,
    DocumentError,
    load_json,
    load_yaml,
    problems,
    read_text_file,
)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 2000 + "]" * 2000,
        "{a: " * 2000 + "1" + "}" * 2000,
        "".join("  " * depth + "a:\n" for depth in range(2000)),
        "- " * 2000 + "x",
    ],
    ids=["flow lists", "flow mappings", "block mappings", "block lists"],
)
def test_yaml_nested_2000_deep_is_refused_in_one_line(text: str) -> None:
    with pytest.raises(DocumentError, match=r"^is nested too deeply \(more than 64 levels\)$"):
        load_yaml(text)


def test_deep_flow_nesting_is_refused_before_yaml_scans_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_parse(text: str) -> None:
        raise AssertionError("the YAML parser was reached")

    monkeypatch.setattr(config_files, "_BoundedLoader", no_parse)
    for text in ("a: " + "[" * 600, "{b: " * 70, "x: [[" + "{c: [" * 40):
        with pytest.raises(DocumentError, match="nested too deeply"):
            load_yaml(text)


@pytest.mark.parametrize(
    "text",
    [
        'a: "' + "[" * 100 + '"',
        "a: '" + "{" * 100 + "'",
        "a: 'it''s " + "[" * 100 + "'",
        'a: "a \\" ' + "[" * 100 + '"',
        "a: 1  # " + "[" * 100,
    ],
    ids=["double-quoted", "single-quoted", "escaped single quote", "escaped double quote",
         "comment"],
)  # fmt: skip
def test_brackets_in_quotes_and_comments_are_no_nesting(text: str) -> None:
    value = load_yaml(text)["a"]
    assert value == 1 if "#" in text else value.count(text[-2]) == 100


def test_yaml_nested_to_the_limit_still_loads() -> None:
    value = load_yaml("[" * (MAX_DEPTH - 1) + "1" + "]" * (MAX_DEPTH - 1))
    for _ in range(MAX_DEPTH - 1):
        assert isinstance(value, list)
        value = value[0]
    assert value == 1


def test_aliases_that_expand_beyond_the_limit_are_refused() -> None:
    # Nine levels of ten aliases each: a kilobyte that expands to a billion values.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{n}: &a{n} [{', '.join([f'*a{n - 1}'] * 10)}]" for n in range(1, 10)]
    with pytest.raises(DocumentError, match="expands to more than 100000 values"):
        load_yaml("\n".join(lines))


def test_aliases_within_the_limit_load_as_shared_values() -> None:
    assert load_yaml("a: &slo {ttft_ms: 1}\nb: *slo\n") == {
        "a": {"ttft_ms": 1},
        "b": {"ttft_ms": 1},
    }


def test_an_alias_inside_its_own_anchor_is_refused() -> None:
    with pytest.raises(DocumentError, match="alias \\*a refers to a value that holds it"):
        load_yaml("a: &a [1, *a]")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [", r"^is not valid YAML: line 1, column 5: .*expected"),
        ("a: !!python/object:os.system x", "tag '!!python/object:os.system' is not allowed"),
        ("when: !!timestamp soon", "tag '!!timestamp' is not allowed"),
        ("when: 2001-13-45", "holds a value YAML cannot read: month must be in 1..12"),
        ("n: " + "9" * 5000, "holds a value YAML cannot read: Exceeds the limit"),
        ("a: *nowhere", "found undefined alias"),
    ],
)
def test_unreadable_yaml_is_one_line(text: str, message: str) -> None:
    with pytest.raises(DocumentError, match=message) as raised:
        load_yaml(text)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000, "is nested too deeply"),
        ('{"a": NaN}', r"NaN is not a number"),
        ('{"a": -Infinity}', r"-Infinity is not a number"),
        ("{", "is not valid JSON"),
    ],
)
def test_unreadable_json_is_one_line(text: str, message: str) -> None:
    with pytest.raises(DocumentError, match=message):
        load_json(text)


def test_files_too_large_or_not_utf8_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config_files, "MAX_FILE_BYTES", 2**20)
    path = tmp_path / "pool.yaml"
    path.write_bytes(b"a" * (2**20 + 1))
    with pytest.raises(DocumentError, match=f"cannot read pool file {path}: larger than 1 MiB"):
        read_text_file(path, "pool")
    path.write_bytes(b"backends: \xbc")
    with pytest.raises(DocumentError, match="not UTF-8 text \\(byte 0xbc at offset 10\\)"):
        read_text_file(path, "pool")


class _Item(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str
    port: int = Field(ge=0, le=65535)
    name: str


class _Document(BaseModel):
    items: tuple[_Item, ...] = Field(min_length=1)
    either: int | list[int] = 0


def _problems_of(raw: object) -> str:
    with pytest.raises(ValidationError) as raised:
        _Document.model_validate(raw)
    return problems(raised.value, _Document)


def test_a_failed_item_is_not_followed_by_its_list_being_too_short() -> None:
    said = _problems_of({"items": [{"address": "x", "port": 99999, "name": "n"}]})
    assert said == "items[0].port: must be <= 65535, got 99999"


def test_a_union_reports_its_first_alternative_only() -> None:
    said = _problems_of({"items": [{"address": "a", "port": 1, "name": "n"}], "either": "x"})
    assert said == "either: expected a whole number, got 'x'"


def test_missing_fields_of_one_mapping_are_one_problem_and_extras_are_named() -> None:
    said = _problems_of({"items": [{"colour": "red"}]})
    assert said == (
        "items[0]: missing fields 'address', 'port', 'name'; items[0]: unknown field 'colour'"
    )


def test_echoed_values_are_cut_and_no_link_is_added() -> None:
    said = _problems_of({"items": [{"address": "a", "port": "x" * 10_000, "name": "n"}]})
    assert said.startswith("items[0].port: expected a whole number, got 'xxxxx")
    assert len(said) < 150
    assert "pydantic.dev" not in said
    assert "\n" not in said


def test_past_ten_problems_the_rest_are_counted() -> None:
    said = _problems_of({"items": [{"address": "a", "port": -1, "name": "n"}] * 25})
    assert said.count("must be >= 0") == 10
    assert said.endswith("; and 15 more")
