"""Reading the files a person writes (pool, policy, profiles, cluster, traces).

Every problem is one line a person can act on: a parse error says where, a document
nested deeper than :data:`MAX_DEPTH` or expanding (through YAML aliases) to more than
:data:`MAX_NODES` values is refused before anything walks it, and a pydantic
``ValidationError`` becomes one ``path: problem`` per field, joined with "; ", without
pydantic's documentation links, its echo of the whole input, or the follow-on errors
of a field that already failed.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from backends.errors import ECHO_LIMIT, shown

# No configuration of ours is nested beyond a handful of levels; PyYAML and json recurse
# once per level and would die of a RecursionError long before a real limit.
MAX_DEPTH = 64
# Values a document may expand to, aliases counted as often as they are used: a few
# kilobytes of nested aliases otherwise expand to billions of values to validate.
MAX_NODES = 100_000
# A configuration file is kilobytes; reading stops here (``--pool /dev/zero`` would not).
MAX_FILE_BYTES = 16 * 1024 * 1024
# Problems a message lists at most; the rest are counted.
MAX_PROBLEMS = 10


class DocumentError(ValueError):
    """A file that cannot be read as a document; the message is one line."""


def read_yaml_file(path: Path, what: str) -> Any:
    """The YAML document in the ``what`` file ``path``; DocumentError names the file."""
    text = read_text_file(path, what)
    try:
        return load_yaml(text)
    except DocumentError as error:
        raise DocumentError(f"{what} file {path} {error}") from None


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of the ``what`` file ``path``, at most MAX_FILE_BYTES of it."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise DocumentError(f"cannot read {what} file {path}: {reason}") from None
    if len(data) > MAX_FILE_BYTES:
        raise DocumentError(
            f"cannot read {what} file {path}: larger than {MAX_FILE_BYTES // 2**20} MiB"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DocumentError(
            f"cannot read {what} file {path}: not UTF-8 text "
            f"(byte 0x{data[error.start]:02x} at offset {error.start})"
        ) from None


def load_yaml(text: str) -> Any:
    """The YAML document in ``text`` (safe tags only); DocumentError says what is wrong."""
    if _flow_depth_exceeds(text, MAX_DEPTH):
        raise DocumentError(f"is nested too deeply (more than {MAX_DEPTH} levels)")
    loader = None
    try:
        loader = _BoundedLoader(text)  # its reader already refuses control characters
        return loader.get_single_data()
    except yaml.MarkedYAMLError as error:
        raise DocumentError(f"is not valid YAML: {_yaml_problem(error)}") from None
    except yaml.YAMLError as error:
        raise DocumentError(f"is not valid YAML: {_one_line(str(error))}") from None
    except (ValueError, OverflowError) as error:
        # A scalar of a safe tag that its constructor refuses: a timestamp with month
        # 13, an integer of more digits than Python converts.
        if isinstance(error, DocumentError):
            raise
        raise DocumentError(f"holds a value YAML cannot read: {_one_line(str(error))}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _flow_depth_exceeds(text: str, limit: int) -> bool:
    """Whether ``[`` and ``{`` outside quotes and comments nest deeper than ``limit``.

    PyYAML's scanner looks up to 1,024 characters ahead at each flow collection that may
    be a key, so deeply nested ``[[[...`` takes it time quadratic in the depth before the
    loader's own depth check is reached; this pass refuses such text in one linear
    scan. A quote in a plain scalar (``it's``) may hide brackets from it; the loader's
    check still sees those."""
    if text.count("[") + text.count("{") <= limit:
        return False  # every file a person writes: no scan needed
    depth = 0
    quote = ""
    previous = "\n"
    index, length = 0, len(text)
    while index < length:
        char = text[index]
        if quote:
            if char == "\\" and quote == '"':
                index += 1
            elif char == quote:
                if quote == "'" and text.startswith("''", index):
                    index += 1  # an escaped single quote
                else:
                    quote = ""
        elif char == "#" and previous in " \t\n":
            newline = text.find("\n", index)
            index = length if newline < 0 else newline
            previous = "\n"
            continue
        elif char in "'\"" and previous in " \t\n[{,:-":
            quote = char
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth = max(0, depth - 1)
        previous = char
        index += 1
    return False


def load_json(text: str) -> Any:
    """The JSON document in ``text``; DocumentError says what is wrong. NaN and infinities,
    which Python's json reads, are refused: no file of ours means them."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        raise DocumentError(f"is not valid JSON ({error.msg})") from None
    except RecursionError:
        raise DocumentError(f"is nested too deeply (more than {MAX_DEPTH} levels)") from None


def _refuse_constant(name: str) -> Any:
    raise DocumentError(f"is not valid JSON ({name} is not a number)")


# Explicit tags whose constructors take any node of their kind: SafeLoader's others
# (!!timestamp, !!bool, !!int on a word) fail with whatever Python error they meet.
_ALLOWED_TAGS = frozenset(
    {None, "!", *(f"tag:yaml.org,2002:{kind}" for kind in ("str", "seq", "map", "null"))}
)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts depth and expanded size while composing, before any
    constructor recurses; an alias counts as many values as its anchor expands to."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        self._sizes: dict[int, int] = {}  # id(node) -> values it expands to, once composed

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self._peek()
            anchored = self.anchors.get(event.anchor)
            if anchored is not None:
                size = self._sizes.get(id(anchored))
                if size is None:  # its own anchor, still being composed
                    raise DocumentError(
                        f"is not valid YAML: line {event.start_mark.line + 1}: "
                        f"alias *{shown(event.anchor)[1:-1]} refers to a value that holds it"
                    )
                self._count(size)
            return super().compose_node(parent, index)
        event = self._peek()
        tag = getattr(event, "tag", None)
        if tag not in _ALLOWED_TAGS:
            mark = event.start_mark
            written = str(tag).replace("tag:yaml.org,2002:", "!!")
            raise DocumentError(
                f"is not valid YAML: line {mark.line + 1}: tag {shown(written)} is not allowed "
                "(a configuration needs none)"
            )
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise DocumentError(f"is nested too deeply (more than {MAX_DEPTH} levels)")
        before = self._nodes
        self._count(1)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node is not None:
            self._sizes[id(node)] = self._nodes - before
        return node

    def _peek(self) -> Any:
        return self.peek_event()  # type: ignore[no-untyped-call]  # PyYAML's stubs leave it untyped

    def _count(self, values: int) -> None:
        self._nodes += values
        if self._nodes > MAX_NODES:
            raise DocumentError(f"expands to more than {MAX_NODES} values (through aliases)")


def _yaml_problem(error: yaml.MarkedYAMLError) -> str:
    mark = error.problem_mark or error.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = " ".join(part for part in (error.context, error.problem) if part)
    return _one_line(f"{where}{what or 'cannot be parsed'}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------ validation errors

# Pydantic's wording for a wrong type, said as the files' readers expect.
_EXPECTED = {
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
    "finite_number": "expected a finite number",
}
# Pydantic's bounds, said as a rule: "must be > 0".
_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}
# How pydantic names the alternatives of a union in an error's location.
_UNION_MEMBER = re.compile(
    r"(int|float|str|bool|bytes|none|decimal|date|datetime|time|timedelta|path|"
    r"(list|tuple|dict|set|frozenset|literal|function-\w+|is-instance|constrained-\w+|"
    r"lax-\w+|json-or-python|nullable|union|tagged-union)\[.*\])"
)


def problems(error: ValidationError, model: type[BaseModel] | None = None) -> str:
    """The problems of ``error``, one ``path: problem`` each, joined with "; ".

    A field is reported once: a union's alternatives after the first are dropped, and so
    is a container's own error (a list too short) when one of its items failed; the
    missing fields of one mapping are one problem; past MAX_PROBLEMS the rest are counted.
    ``model``, when given, names the model classes pydantic may put in a location for a
    union of models."""
    members = _model_names(model) if model is not None else frozenset()
    issues = [(_field_path(issue["loc"], members), issue) for issue in error.errors()]
    said: list[str] = []
    missing: dict[tuple[int | str, ...], list[str]] = {}
    for loc, issue in _first_per_field(issues):
        if issue["type"] == "missing" and loc:
            if loc[:-1] not in missing:
                missing[loc[:-1]] = []
                said.append("")  # filled in below, where the first one was
            missing[loc[:-1]].append(shown(loc[-1]))
        else:
            said.append(problem(issue, loc))
    fields = iter(missing.items())
    for index, text in enumerate(said):
        if not text:
            parent, names = next(fields)
            plural = "s" if len(names) > 1 else ""
            said[index] = f"{location(parent)}: missing field{plural} {', '.join(names)}"
    if len(said) > MAX_PROBLEMS:
        said[MAX_PROBLEMS:] = [f"and {len(said) - MAX_PROBLEMS} more"]
    return "; ".join(said)


def problem(issue: ErrorDetails, loc: Sequence[int | str] | None = None) -> str:
    """One pydantic error as ``path: problem``; ``loc`` overrides the issue's own."""
    loc = tuple(issue["loc"] if loc is None else loc)
    kind = issue["type"]
    context = issue.get("ctx", {})
    if kind == "missing" and loc:
        return f"{location(loc[:-1])}: missing field {shown(loc[-1])}"
    if kind == "extra_forbidden" and loc:
        return f"{location(loc[:-1])}: unknown field {shown(loc[-1])}"
    if kind in ("value_error", "assertion_error"):
        # Our validators say what they want in their own words (and name their paths).
        reason = str(context.get("error", issue["msg"]))
        return f"{location(loc)}: {reason}" if loc else reason
    if kind in ("too_short", "too_long"):
        least = kind == "too_short"
        count = context.get("min_length" if least else "max_length")
        items = "item" if count == 1 else "items"
        return f"{location(loc)}: expected at {'least' if least else 'most'} {count} {items}"
    if kind in _BOUNDS:
        key, sign = _BOUNDS[kind]
        bound = context.get(key)
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)  # 0, not 0.0: as the reader would write it
        expected = f"must be {sign} {bound}"
    elif kind in ("enum", "literal_error"):
        expected = f"expected {context.get('expected')}"
    else:
        expected = _EXPECTED.get(kind, issue["msg"])
    return f"{location(loc)}: {expected}, got {_value(issue.get('input'))}"


def _value(value: object) -> str:
    """A value a file held, as a message quotes it: strings quoted, others as written."""
    if isinstance(value, str):
        return shown(value)
    text = repr(value)
    return text if len(text) <= ECHO_LIMIT else text[:ECHO_LIMIT] + "..."


def location(loc: Iterable[int | str]) -> str:
    """A location as a reader writes it: ``backends[2].address``; ``(top)`` for the root."""
    text = ""
    for part in loc:
        if part == "[key]":  # a mapping key's own problem is reported at the key
            continue
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = str(part)
            name = name if len(name) <= ECHO_LIMIT else name[:ECHO_LIMIT] + "..."
            text += f".{name}" if text else name
    return text or "(top)"


def _field_path(loc: Sequence[int | str], members: frozenset[str]) -> tuple[int | str, ...]:
    return tuple(
        part
        for part in loc
        if not (isinstance(part, str) and (_UNION_MEMBER.fullmatch(part) or part in members))
    )


def _first_per_field(
    issues: list[tuple[tuple[int | str, ...], ErrorDetails]],
) -> Iterator[tuple[tuple[int | str, ...], ErrorDetails]]:
    containers = {loc[:end] for loc, _ in issues for end in range(1, len(loc))}
    seen: set[tuple[int | str, ...]] = set()
    for loc, issue in issues:
        if loc in seen or loc in containers:
            # Another alternative of a union, already reported here; or the follow-on
            # error of a container (a list too short) one of whose items failed.
            continue
        seen.add(loc)
        yield loc, issue


def _model_names(model: type[BaseModel]) -> frozenset[str]:
    names: set[str] = set()
    pending: list[Any] = [model]
    while pending:
        kind = pending.pop()
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            if kind.__name__ in names:
                continue
            names.add(kind.__name__)
            pending.extend(field.annotation for field in kind.model_fields.values())
        else:
            pending.extend(getattr(kind, "__args__", ()))
    return frozenset(names)


def host_port(address: str) -> str:
    """``address`` if it is ``host:port`` (an IPv6 host in brackets, port 0..65535);
    ValueError saying what is wrong otherwise."""
    host, sep, port = address.rpartition(":")
    problem = None
    if not sep or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        problem = "the port after the last ':' must be 0..65535"
    elif not host:
        problem = "no host before the ':'"
    elif host.startswith("["):
        inside = host[1:-1] if host.endswith("]") else ""
        try:
            ipaddress.IPv6Address(inside)
        except ValueError:
            problem = "not an IPv6 address in the brackets"
    elif ":" in host:
        problem = "an IPv6 host goes in brackets, as in [::1]:50051"
    elif not re.fullmatch(r"[A-Za-z0-9._-]+", host):
        problem = "not a host name or IPv4 address"
    if problem is not None:
        raise ValueError(f"address must be host:port ({problem}), got {shown(address)}")
    return address
