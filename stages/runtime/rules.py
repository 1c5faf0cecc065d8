"""Every numeric config key's valid range, declared beside its dataclass's fields.

Each config dataclass carries `RULES: ClassVar[dict[str, Rule]]`, one entry per numeric field (a
range, or `UNCONSTRAINED` where any value is meaningful: a seed, a signed penalty). `check_tree`
walks a config (the typed object or Hydra's composed DictConfig: both answer `getattr`) against
those tables and names the first key out of range by its full dotted path; `every_key` lists the
numeric keys of the tree with their rules, for the key-walking test and the README's generated
table (`make config-keys`). A `null` value passes: whether a key may be null is its type's business.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from stages.runtime.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is out of range
    high_open: bool = False
    unconstrained: bool = False  # any finite value is valid (an explicit mark, never a default)
    choices: tuple[float, ...] = ()  # a set of valid values instead of a range

    def describe(self) -> str:
        if self.unconstrained:
            return "any"
        if self.choices:
            return "one of " + ", ".join(map(_n, self.choices))
        if self.low is not None and self.high is not None:
            return f"{'(' if self.low_open else '['}{_n(self.low)}, {_n(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_n(self.low)}"
        return f"{'<' if self.high_open else '<='} {_n(self.high)}"

    def violation(self, value: Any) -> str | None:
        """None when `value` is valid, else what is wrong with it."""
        if value is None or isinstance(value, bool):
            return None
        if not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if self.unconstrained:
            return None
        if self.choices:
            return None if value in self.choices else f"must be {self.describe()}, got {value}"
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            inside = "in " if self.low is not None and self.high is not None else ""
            return f"must be {inside}{self.describe()}, got {value}"
        return None


def _n(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Rule:
    return Rule(low, high, low_open, high_open)


def at_least(low: float) -> Rule:
    return Rule(low)


def one_of(*choices: float) -> Rule:
    return Rule(choices=choices)


def above(low: float) -> Rule:
    return Rule(low, low_open=True)


UNIT = between(0, 1)  # probabilities, shares, fractions, discount and GAE factors
OPEN_UNIT = between(0, 1, low_open=True, high_open=True)  # a fraction that must leave something on both sides
POSITIVE = above(0)  # learning rates, temperatures, clip ranges, timeouts, coefficients that divide
NONNEGATIVE = at_least(0)  # weights and penalties where 0 turns a term off
COUNT = at_least(1)  # counts and sizes
OFF_OR_COUNT = at_least(0)  # counts where 0 turns the feature off (checkpoint_every, watch_every)
UNCONSTRAINED = Rule(unconstrained=True)  # seeds and signed offsets


def check_fields(config: Any, prefix: str) -> None:
    """`check_tree` for one config dataclass on its own (a stage's config built in a test or a REPL): its
    numeric keys in their declared ranges, named under `prefix` (`stage.ppo.`). The one home of a range
    stays the `RULES` table; a `__post_init__` calls this, then checks what spans fields."""
    check_tree(type(config), config, prefix)


def check_tree(schema: type, node: Any, prefix: str = "") -> None:
    """Raise `ConfigError` at the first numeric key of `node` outside its declared rule."""
    for key, value, rule in _values(schema, node, prefix):
        problem = rule.violation(value) if rule is not None else None
        if problem is not None:
            raise ConfigError(f"{key}: {problem}")


def every_key(schema: type, prefix: str = "") -> Iterator[tuple[str, type, str, Rule | None]]:
    """(dotted key, dataclass, field name, rule or None) for every numeric field under `schema`,
    nested dataclasses and lists of them included (a list's items as `key[]`)."""
    hints = typing.get_type_hints(schema)
    rules = getattr(schema, "RULES", {})
    for f in dataclasses.fields(schema):
        kind, key = hints[f.name], f"{prefix}{f.name}"
        nested = _dataclass_of(kind)
        if nested is not None:
            yield from every_key(nested, f"{key}{'[]' if _is_list(kind) else ''}.")
        elif _is_numeric(kind):
            yield key, schema, f.name, rules.get(f.name)


def _values(schema: type, node: Any, prefix: str) -> Iterator[tuple[str, Any, Rule | None]]:
    if node is None:
        return
    hints = typing.get_type_hints(schema)
    rules = getattr(schema, "RULES", {})
    for f in dataclasses.fields(schema):
        kind, key = hints[f.name], f"{prefix}{f.name}"
        value = getattr(node, f.name, None)
        nested = _dataclass_of(kind)
        if nested is not None:
            items = list(value or []) if _is_list(kind) else [value]
            for i, item in enumerate(items):
                yield from _values(nested, item, f"{key}[{i}]." if _is_list(kind) else f"{key}.")
        elif _is_numeric(kind) and not _is_list(kind):
            yield key, value, rules.get(f.name)


def _members(kind: Any) -> list:
    """The types a field's annotation allows, `None` left out."""
    union = isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union
    return [a for a in typing.get_args(kind) if a is not type(None)] if union else [kind]


def _inner(kind: Any) -> list:
    """`_members`, each list type as its item type."""
    return [typing.get_args(a)[0] if typing.get_origin(a) is list else a for a in _members(kind)]


def _is_list(kind: Any) -> bool:
    return any(typing.get_origin(a) is list for a in _members(kind))


def _dataclass_of(kind: Any) -> type | None:
    return next((a for a in _inner(kind) if dataclasses.is_dataclass(a)), None)


def _is_numeric(kind: Any) -> bool:
    return any(a in (int, float) for a in _inner(kind))


def markdown(schema: type) -> str:
    """The configuration reference (`make config-keys` writes it): every key of `schema`, one table per
    config dataclass, with its default, its valid values (numeric keys: the rule) and the comment beside
    its field in the source."""
    sections = []
    for prefix, cls in _sections(schema, ""):
        comments = field_comments(cls)
        rules = getattr(cls, "RULES", {})
        hints = typing.get_type_hints(cls)
        rows = [f"## `{prefix.rstrip('.') or 'top level'}`", "", f"`{cls.__module__}.{cls.__name__}`", "",
                "| key | default | valid values | what it is |", "|---|---|---|---|"]  # fmt: skip
        for f in dataclasses.fields(cls):
            if _dataclass_of(hints[f.name]) is not None:
                continue  # its own section
            valid = (rules[f.name].describe() if f.name in rules else "NO RULE") if _is_numeric(hints[f.name]) else ""
            rows.append(f"| `{prefix}{f.name}` | `{_default(f)}` | {valid} | {_cell(comments.get(f.name, ''))} |")
        sections.append("\n".join(rows))
    return "\n\n".join(sections) + "\n"


def _sections(schema: type, prefix: str) -> Iterator[tuple[str, type]]:
    """(dotted prefix, dataclass) for `schema` and every dataclass nested in it, depth first."""
    hints = typing.get_type_hints(schema)
    yield prefix, schema
    for f in dataclasses.fields(schema):
        nested = _dataclass_of(hints[f.name])
        if nested is not None:
            yield from _sections(nested, f"{prefix}{f.name}{'[]' if _is_list(hints[f.name]) else ''}.")


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in `cls`'s source: the comment lines just above it and the one after it."""
    import inspect

    comments: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        name = stripped.split(":", 1)[0]
        if ":" in stripped and name.isidentifier() and not stripped.startswith(("def ", "return", "@")):
            after = stripped.split("  # ", 1)[1] if "  # " in stripped else ""
            comments[name] = " ".join([*above, after]).strip()
        above = []
    return comments
