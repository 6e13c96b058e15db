"""Typed YAML sections: a frozen dataclass declares the keys, their types, rules and docs.

Every YAML this platform reads (experiment specs, the ``sweep:`` and ``study:`` sections, eval
configs) is declared as dataclasses and read by this one engine, so all of them validate alike at
load time: unknown keys, wrong types and bad ranges fail before any work starts, in one line of
the form ``<file>: <dotted.key>: <problem>``. The same declarations drive the dotted ``a.b=v``
overrides and the ``--help`` text of every pipeline (key, type, default, one-line doc).

Declaring a section::

    @dataclass(frozen=True, kw_only=True)
    class TrainConfig:
        steps: int | None = setting(None, rule=AT_LEAST_1, doc="optimizer steps")

A field's doc is ``setting(doc=...)``, else the comment at the end of its line (so classes that
are not ours, such as ``aunet.config.AUNetConfig``, document themselves). A section may define a
static ``normalize(raw) -> dict`` that rewrites shorthand forms before validation, and
``__post_init__`` checks across fields that raise ``SpecError("<field>: <problem>")``.

Length: reading, overrides and help stay in one module (about 500 lines, over the usual 400)
because the help must describe exactly what the reader accepts: both walk the same fields and
metadata.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import functools
import inspect
import io
import json
import math
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class SpecError(ValueError):
    """An invalid spec or config: ``str()`` is ``<source>: <message>``, the message starting with
    the dotted key. ``source`` is the file (or ``command line``, ``spec 'name'``) it came from."""

    def __init__(self, message: str, source: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.source = source

    def __str__(self) -> str:
        return f"{self.source}: {self.message}" if self.source else self.message

    def __reduce__(self) -> tuple[Any, ...]:  # Ray ships errors between processes
        return (SpecError, (self.message, self.source))

    def with_source(self, source: str) -> SpecError:
        """This error as seen from ``source``: the inner source, if any, moves into the message."""
        if self.source == source:
            return self
        return SpecError(str(self), source)


@contextlib.contextmanager
def attributed_to(source: str) -> Iterator[None]:
    """Every ``SpecError`` raised inside names ``source``: the one place errors get their file."""
    try:
        yield
    except SpecError as e:
        raise e.with_source(source) from None


def suggest(name: str, valid: Sequence[str]) -> str:
    """``"; did you mean 'lr'?"`` for a near miss among ``valid``, else ``""``."""
    close = difflib.get_close_matches(name, [str(v) for v in valid], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_key(key: str, name: str, valid: Sequence[str]) -> SpecError:
    """The error for a key that a section does not declare, naming the valid ones."""
    return SpecError(f"{key}: unknown key (valid: {', '.join(valid)}){suggest(name, valid)}")


# ---------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rule:
    """A value check: ``text`` follows the type in messages (``int >= 1``); ``expect``, when set,
    replaces the whole expectation (``'law' or a positive float``)."""

    check: Callable[[Any], bool]
    text: str
    expect: str | None = None


NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
POSITIVE = Rule(lambda v: v > 0, "> 0")
NONNEG = Rule(lambda v: v >= 0, ">= 0")
AT_LEAST_1 = Rule(lambda v: v >= 1, ">= 1")
NONEMPTY = Rule(lambda v: len(v) > 0, "(non-empty)")
NAME = Rule(lambda v: bool(NAME_PATTERN.match(v)), "of [A-Za-z0-9._-]")


def at_least(low: float) -> Rule:
    """``>= low``, for bounds other than the common ones above."""
    return Rule(lambda v: v >= low, f">= {low:g}")


def choice(options: Sequence[str]) -> Rule:
    """One of ``options``; the message lists them."""
    options = tuple(options)
    return Rule(lambda v: v in options, f"in ({', '.join(options)})")


# Metadata of a field that is computed after building, not read from YAML (e.g. parsed dims).
DERIVED = {"derived": True}


def setting(
    default: Any = MISSING,
    *,
    factory: Callable[[], Any] | Any = MISSING,
    rule: Rule | None = None,
    doc: str = "",
    build: Callable[[Any, str], Any] | None = None,
    partial: type | None = None,
    skip: Sequence[str] = (),
) -> Any:
    """A dataclass field with the engine's metadata.

    ``build(raw, key)`` replaces the engine for a value it cannot read by type (the model, whose
    own ``from_dict`` validates it); ``skip`` names fields of that class that are not YAML keys.
    ``partial=Cls`` keeps a ``dict`` field a mapping of only the keys given, each checked against
    ``Cls``: for settings whose defaults are decided where they are used.
    """
    meta = {"rule": rule, "doc": doc, "build": build, "partial": partial, "skip": tuple(skip)}
    return dataclasses.field(default=default, default_factory=factory, metadata=meta)


def keys(cls: type) -> tuple[str, ...]:
    """The YAML keys of a section, in declaration order."""
    return tuple(f.name for f in _yaml_fields(cls))


def _yaml_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("derived")]


# ---------------------------------------------------------------------------------- reading
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")  # YAML 1.1 reads 1e-3 as a str


def describe(tp: Any) -> str:
    """An annotation in the words of the messages: ``list of 2 float``, ``int or null``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args if a is not type(None))
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return f"list of {describe(args[0])}"
    if origin is tuple:
        return f"list of {len(args)} {describe(args[0])}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str, want: str = "") -> Any:
    """Check ``value`` against the annotation ``tp``; ints become floats, lists become tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = SpecError(f"{key}: expected {want or describe(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own message, which may name a nested key
            return coerce(value, options[0], key, want)
        for option in options:
            with contextlib.suppress(SpecError):
                return coerce(value, option, key)
        raise bad
    if origin is Literal:
        if value not in args or isinstance(value, bool):
            raise bad
        return value
    if dataclasses.is_dataclass(tp):
        return build(typing.cast(type, tp), value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp in (int, float):
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value) or (tp is int and value != int(value)):
            raise bad
        return tp(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin in (list, tuple):
        variable = origin is list or (len(args) == 2 and args[1] is Ellipsis)
        if not isinstance(value, (list, tuple)) or (not variable and len(value) != len(args)):
            raise bad
        items = args[:1] * len(value) if variable else args
        out = [coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, items))]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        return {str(k): coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"{key}: unsupported annotation {tp!r}")  # a bug in a declaration, not input


def build(cls: type, raw: Any, key: str = "") -> Any:
    """Construct a section dataclass from a YAML mapping; every error names the dotted key."""
    prefix = f"{key}." if key else ""
    if not isinstance(raw, Mapping):
        raise SpecError(f"{key}: expected a mapping, got {raw!r}")
    if hasattr(cls, "normalize"):
        raw = cls.normalize(raw)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in _yaml_fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise unknown_key(f"{prefix}{unknown[0]}", str(unknown[0]), list(fields))
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:
                raise SpecError(f"{prefix}{name}: required key missing")
            continue
        kwargs[name] = _field_value(f, hints[name], raw[name], f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except SpecError as e:  # cross-field checks in __post_init__ name a field of this section
        raise SpecError(f"{prefix}{e.message}") from None


def _field_value(f: dataclasses.Field, tp: Any, raw: Any, key: str) -> Any:
    meta = f.metadata
    if meta.get("build") is not None:
        return meta["build"](raw, key)
    rule: Rule | None = meta.get("rule")
    want = ""
    if rule is not None:
        want = rule.expect or f"{describe(tp)} {rule.text}"
    value = coerce(raw, tp, key, want)
    if value is not None and rule is not None and not rule.check(value):
        raise SpecError(f"{key}: expected {want}, got {value!r}")
    if meta.get("partial") is not None and value is not None:
        built = build(meta["partial"], value, key)
        return {k: getattr(built, k) for k in value}
    return value


def plain(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists: what yaml.safe_dump and JSON accept. An object that
    knows its own plain form (``to_dict``) gives it."""
    if hasattr(obj, "to_dict") and not isinstance(obj, type):
        return plain(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ---------------------------------------------------------------------------------- overrides
def parse_overrides(items: Sequence[str]) -> list[tuple[str, Any]]:
    """``["a.b=v", ...]`` -> ``[("a.b", yaml value), ...]``: values are read as YAML."""
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"override {item!r}: expected dotted.key=value")
        try:
            out.append((key.strip(), yaml.safe_load(text)))
        except yaml.YAMLError as e:
            raise SpecError(f"{key.strip()}: override value {text!r} is not YAML: {e}") from None
    return out


def set_dotted(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set ``a.b.c`` in a YAML-shaped dict; numeric parts index lists: ``data.sources.0.weight``."""
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        index: str | int = part
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            index = int(part)
        elif not isinstance(node, dict):
            what = f"a list of {len(node)}" if isinstance(node, list) else type(node).__name__
            parent = ".".join(parts[:i])
            raise SpecError(f"{key}: cannot set override: {parent} is {what}", where)
        if i == len(parts) - 1:
            node[index] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}  # absent or null section: create it
            node = node[index]


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], source: str) -> None:
    """Set ``a.b=v`` overrides into a raw mapping; errors name ``source``."""
    with attributed_to(source):
        for key, value in parse_overrides(overrides):
            set_dotted(raw, key, value, source)


def split_overrides(
    overrides: Sequence[str], section: str
) -> tuple[list[tuple[str, Any]], list[str]]:
    """Overrides of an extra top-level ``section`` (key without the prefix, parsed value) and
    the rest, left as ``a.b=v`` strings for ``load_spec``/``with_overrides``."""
    own, rest = [], []
    for item in overrides:
        key, _, text = item.partition("=")
        if key.startswith(section + "."):
            own.append((key[len(section) + 1 :], yaml.safe_load(text)))
        else:
            rest.append(item)
    return own, rest


# ---------------------------------------------------------------------------------- files
def duplicate_key(node: yaml.Node, key: str = "", done: set[int] | None = None) -> SpecError | None:
    """The first key given twice in one mapping of a composed YAML tree, else None.

    YAML loaders keep the last of two equal keys; a spec with ``lr`` twice would silently train
    with the second. Merged keys (``<<: *base``) may be overridden: only explicit keys count.
    An anchor is checked once (``done``), which also ends a recursive alias.
    """
    done = set() if done is None else done
    if id(node) in done:
        return None
    done.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for k, v in node.value:
            if k.tag == "tag:yaml.org,2002:merge":
                continue
            name = str(k.value) if isinstance(k, yaml.ScalarNode) else str(k.start_mark)
            dotted, line = f"{key}.{name}" if key else name, k.start_mark.line + 1
            if name in seen:
                return SpecError(
                    f"{dotted}: duplicate key (line {line}, first on line {seen[name]})"
                )
            seen[name] = line
            found = duplicate_key(v, dotted, done)
            if found is not None:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = duplicate_key(item, f"{key}[{i}]", done)
            if found is not None:
                return found
    return None


def load_yaml_unique(text: str, source: str) -> Any:
    """``yaml.safe_load`` that rejects a key given twice in a mapping, naming key and line."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        dup = duplicate_key(node)
        if dup is not None:
            raise dup.with_source(source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file (safe_load only, no duplicate keys); errors name
    the file."""
    source = str(path)
    try:
        raw = load_yaml_unique(Path(path).read_text(encoding="utf-8"), source)
    except OSError as e:
        raise SpecError(f"cannot read: {e.strerror or e}", source) from None
    except yaml.YAMLError as e:
        raise SpecError(f"invalid YAML: {e}", source) from None
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else type(raw).__name__
        raise SpecError(f"expected a mapping at the top level, got {got}", source)
    return raw


def read_with_section(
    path: str | Path, section: str, overrides: Sequence[str] = ()
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """A spec YAML with an extra top-level ``section`` mapping (``sweep:``, ``study:``) ->
    (the spec part, the section with its ``<section>.a.b=v`` overrides set, the spec overrides)."""
    source = str(path)
    raw = read_yaml_mapping(path)
    if not isinstance(raw.get(section), dict):
        raise SpecError(f"{section}: required mapping missing", source)
    part = {section: raw.pop(section)}  # keys keep their prefix: errors name ``section.a.b``
    own, rest = split_overrides(overrides, section)
    for key, value in own:
        set_dotted(part, f"{section}.{key}", value, source)
    return raw, part[section], rest


# ---------------------------------------------------------------------------------- CLI
USAGE = "usage: <spec.yaml> [key=value ...] [--set key=value ...]"
HELP_FLAGS = ("-h", "--help")


def wants_help(argv: Sequence[str]) -> bool:
    """``-h``/``--help`` anywhere before a ``--set`` value: print help, start nothing."""
    args = list(argv)
    return any(a in HELP_FLAGS and (i == 0 or args[i - 1] != "--set") for i, a in enumerate(args))


def parse_cli(argv: Sequence[str]) -> tuple[str, list[str]]:
    """``<spec.yaml> [a.b=v ...] [--set a.b=v ...]`` -> (spec path, ["a.b=v", ...])."""
    spec_path, overrides, i = None, [], 0
    argv = list(argv)
    where = "command line"
    while i < len(argv):
        arg = argv[i]
        if arg == "--set":
            if i + 1 >= len(argv):
                raise SpecError("--set needs a dotted.key=value argument", where)
            overrides.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--set="):
            overrides.append(arg[len("--set=") :])
        elif arg.startswith("-"):
            raise SpecError(f"unknown option {arg!r} ({USAGE})", where)
        elif "=" in arg:
            overrides.append(arg)
        elif spec_path is None:
            spec_path = arg
        else:
            raise SpecError(f"a second spec file {arg!r} (first: {spec_path!r})", where)
        i += 1
    if spec_path is None:
        raise SpecError(f"no spec file ({USAGE})", where)
    for item in overrides:
        parse_overrides([item])  # fail here, before any work, on a malformed override
    return spec_path, overrides


# ---------------------------------------------------------------------------------- help
@functools.cache
def _comment_docs(cls: type) -> dict[str, str]:
    """``name: T = x  # doc`` -> {name: doc}, read from the class source (empty without one)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    docs = {}
    (node,) = ast.parse(source).body
    for item in getattr(node, "body", []):
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            end = item.end_lineno or item.lineno
            found = [comments[n] for n in range(item.lineno, end + 1) if n in comments]
            if found:
                docs[item.target.id] = found[-1]
    return docs


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not MISSING:
        value = f.default
    elif f.default_factory is not MISSING:
        value = f.default_factory()
    else:
        return "required"
    return json.dumps(plain(value), ensure_ascii=False)


def help_rows(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, doc) of every key of a section and its subsections."""
    hints = typing.get_type_hints(cls)
    comments = _comment_docs(cls)
    rows = []
    for f in _yaml_fields(cls):
        key, tp, meta = f"{prefix}{f.name}", hints[f.name], f.metadata
        doc = meta.get("doc") or comments.get(f.name, "")
        inner = _without_none(tp)
        origin, args = typing.get_origin(inner), typing.get_args(inner)
        if meta.get("partial") is not None:
            rows.append((key, "mapping", "{}", doc))
            rows += help_rows(meta["partial"], f"{key}.")
        elif dataclasses.is_dataclass(inner):
            if _nullable(tp):  # an optional section: null is a value of its own
                rows.append((key, "mapping, or null", _default_text(f), doc))
            sub = help_rows(typing.cast(type, inner), f"{key}.")
            rows += [r for r in sub if r[0][len(key) + 1 :] not in meta.get("skip", ())]
        elif origin in (list, dict) and dataclasses.is_dataclass(args[-1]):
            item = "N" if origin is list else "<name>"
            rows.append((key, _type_text(tp, meta.get("rule")), _default_text(f), doc))
            rows += help_rows(args[-1], f"{key}.{item}.")
        else:
            rows.append((key, _type_text(tp, meta.get("rule")), _default_text(f), doc))
    return rows


def _without_none(tp: Any) -> Any:
    if _nullable(tp):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def _type_text(tp: Any, rule: Rule | None) -> str:
    text = describe(tp)
    if rule is not None:
        text = rule.expect or f"{text} {rule.text}"
    return f"{text}, or null" if _nullable(tp) else text


def _nullable(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def help_text(cls: type, prefix: str = "", title: str = "") -> str:
    """The keys of a section as an aligned table: dotted key, type, default, doc."""
    rows = help_rows(cls, prefix)
    widths = [min(max(len(r[i]) for r in rows), cap) for i, cap in ((0, 36), (1, 30), (2, 14))]
    lines = [title] if title else []
    for key, tp, default, doc in rows:
        cells = [key.ljust(widths[0]), tp.ljust(widths[1]), default.ljust(widths[2]), doc]
        lines.append(("  " + "  ".join(cells)).rstrip())
    return "\n".join(lines)


def cli_help(doc: str, flags: Sequence[tuple[str, str]] = (), sections: Sequence[str] = ()) -> str:
    """``--help`` of a pipeline: its module docstring (the usage), its flags, its YAML keys."""
    parts = [textwrap.dedent(doc).strip()]
    if flags:
        width = max(len(f) for f, _ in flags)
        parts.append("flags:\n" + "\n".join(f"  {f.ljust(width)}  {d}" for f, d in flags))
    parts += [s for s in sections if s]
    return "\n\n".join(parts) + "\n"
