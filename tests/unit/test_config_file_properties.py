"""Property: any document in a pool, policy or profiles file is a valid configuration or
a one-line ConfigError (a ValueError for the profiles), never another exception.

Documents start from the packaged files, then have parts replaced by random values, or
their YAML text cut and spliced with YAML's own punctuation, tags and anchors.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.perf.roofline import DEFAULT_PROFILES_PATH, load_catalog
from router.errors import ConfigError
from router.scheduling.registry import DEFAULT_POLICY_PATH, load_policy
from router.settings import default_pool_path, load_pool

BOUNDED = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# A message is one line, and short whatever the file held.
LONGEST_MESSAGE = 4000


def _packaged(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _small_catalogue() -> dict[str, Any]:
    """One model, one GPU and one SRAM profile of the packaged catalogue, its texts
    short: each example reads the whole document, and the full one takes 0.15 s."""
    full = _packaged(DEFAULT_PROFILES_PATH)
    model = "llama-3.1-8b"
    profiles = {name: full["profiles"][name] for name in ("h100", "groq-lpu")}
    for profile in profiles.values():
        pipeline = profile.get("pipeline")
        if pipeline is None:
            continue
        for key in ("vendor_deployments", "published_tokens_per_s"):
            pipeline[key] = {m: v for m, v in pipeline[key].items() if m == model}
        profile["sources"] = {
            path: source
            for path, source in profile["sources"].items()
            if not path.startswith("pipeline.") or path.count(".") == 1 or path.endswith(model)
        }
    for profile in profiles.values():
        # Short texts: the reader is pure Python and scans every character.
        profile["sources"] = dict.fromkeys(profile["sources"], "datasheet")
        profile["price_basis"] = profile["display_name"] = "text"
    return {"models": {model: full["models"][model]}, "profiles": profiles}


KEYS = st.sampled_from(
    [
        "backends", "id", "kind", "address", "role", "model", "profile", "time_scale",
        "chips", "options", "handoff", "default_model", "profiles", "slo", "ttft_ms",
        "tpot_ms", "decider", "name", "scorers", "weight", "picker", "admission", "slack",
        "filters", "models", "peak_flops", "sources", "pipeline", "kind", "<<",
    ]
) | st.text(max_size=6)  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.sampled_from(["prefill", "decode", "both", "mock", "h100", "127.0.0.1:0", "default"])
    | st.text(max_size=12)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)
# What YAML text is made of where it goes wrong.
SPLICES = st.sampled_from(
    [
        "[", "]", "{", "}", ":", ": ", ",", "- ", "\n", "\n  ", "\t", "'", '"', "#", "|", ">",
        "&a ", "*a", "*b", "!!python/object:os.system ", "!!binary ", "!!timestamp ",
        "!!float ", "!!int ", "!!map ", "!!set ", "? ", "<<: ", ".inf", ".nan", "-.inf",
        "2001-13-45", "9" * 5000, "[" * 300, "{a: " * 100, "%YAML 1.1\n", "---\n", "...\n",
        "\x00", "\ud7ff", "\ufeff", "~",
    ]
)  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn, value: Any, depth: int = 0) -> Any:
    """``value`` with one part replaced, dropped or added somewhere inside it."""
    if depth > 6 or not isinstance(value, dict | list) or not value or draw(st.integers(0, 4)) == 0:
        return draw(VALUES)
    if isinstance(value, list):
        index = draw(st.integers(0, len(value) - 1))
        items = list(value)
        items[index] = draw(mutated(value[index], depth + 1))
        return items
    mapping = dict(value)
    key = draw(st.sampled_from(sorted(mapping, key=str)))
    action = draw(st.integers(0, 5))
    if action == 0:
        del mapping[key]
    elif action == 1:
        mapping[draw(KEYS)] = draw(VALUES)
    else:
        mapping[key] = draw(mutated(mapping[key], depth + 1))
    return mapping


@st.composite
def yaml_texts(draw: st.DrawFn, base: Any) -> str:
    """The YAML of a mutated ``base``, its text then perhaps spliced."""
    document = draw(mutated(base)) if draw(st.booleans()) else base
    text = yaml.dump(document, Dumper=yaml.CSafeDumper, sort_keys=False, allow_unicode=True)
    for _ in range(draw(st.integers(0, 3))):
        start = draw(st.integers(0, len(text)))
        end = draw(st.integers(start, min(len(text), start + 40)))
        text = text[:start] + draw(SPLICES) + text[end:]
    return text


def _holds(
    tmp_path_factory: pytest.TempPathFactory,
    text: str,
    load: Callable[[Path], object],
    errors: type[Exception],
) -> None:
    path = tmp_path_factory.mktemp("reader") / "file.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load(path)
    except errors as error:
        message = str(error)
        assert "\n" not in message, message
        assert message.strip(), "an empty message"
        assert len(message) < LONGEST_MESSAGE, message[:200]
        assert "pydantic.dev" not in message


@BOUNDED
@given(text=yaml_texts(_packaged(default_pool_path())))
def test_a_pool_file_is_a_pool_or_one_line(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    _holds(tmp_path_factory, text, load_pool, ConfigError)


@BOUNDED
@given(text=yaml_texts(_packaged(DEFAULT_POLICY_PATH)))
def test_a_policy_file_is_a_policy_or_one_line(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    _holds(tmp_path_factory, text, load_policy, ConfigError)


@BOUNDED
@given(text=yaml_texts(_small_catalogue()))
def test_a_profiles_file_is_a_catalogue_or_one_line(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    _holds(tmp_path_factory, text, load_catalog, ValueError)


def test_the_small_catalogue_is_itself_valid(tmp_path: Path) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(yaml.safe_dump(_small_catalogue()))
    catalogue = load_catalog(path)
    assert set(catalogue.profiles) == {"h100", "groq-lpu"}
