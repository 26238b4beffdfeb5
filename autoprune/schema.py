"""The one place user-facing values are checked: a declared schema on every config field.

Config dataclasses (``autoprune.config``) and the saved-model record (``prune.py``) declare each
field with :func:`checked` and a :class:`Spec` (type, range, choices, the CLI flag that sets
it, its help and how a typed value is read): ``autoprune.flags`` builds the command line from
these, so adding a setting is adding one field. :func:`validate` runs in their ``__post_init__``, so the CLI, the Python API, policy
JSON and model files all pass the same checks before any work starts, and a bad value is
named with what is allowed: ``--batch-size must be an integer >= 1, got 0``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import AutopruneError


@dataclass(frozen=True)
class Spec:
    """What one field accepts."""

    kind: str  # "integer", "number", "boolean", "text", "choice", "mapping", "sequence", "nested", "any"
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is excluded
    high_open: bool = False
    choices: tuple = ()
    optional: bool = False  # None is allowed (it means: the default behaviour)
    flag: str | None = None  # how the user sets it on the command line
    item: Spec | None = None  # mapping values / sequence items
    nested: type | None = None  # the dataclass a "nested" field holds (a dict is converted)
    extra: Callable[[Any], str | None] | None = None  # a further check: returns what is wrong, or None
    allow_empty: bool = False  # a sequence may be empty
    help: str = ""  # the flag's help; argparse's %(default)s names the field's default
    parse: Callable[[Any, str], Any] | None = None  # (typed value, flag) -> field value, for flags read as text
    repeat: bool = False  # the flag may be given several times; ``parse`` then reads the list
    metavar: str | None = None
    aliases: tuple[str, ...] = ()  # further names of the flag
    most: float | None = None  # a limit beyond the value's meaning (rounds, epochs, threads), said apart

    def describe(self) -> str:
        """Allowed values, as a phrase: 'an integer >= 1', 'one of: sum, mean, max'."""
        base = {
            "integer": "an integer",
            "number": "a number",
            "boolean": "true or false",
            "text": "a string",
            "mapping": "a mapping",
            "sequence": "a list",
            "nested": "a mapping",
            "any": "a value",
        }.get(self.kind, "")
        if self.kind == "choice":
            base = "one of: " + ", ".join(map(str, self.choices))
        rng = _range_text(self.low, self.high, self.low_open, self.high_open)
        if rng:
            base += f" {rng}"
        if self.item is not None and self.kind in ("mapping", "sequence"):
            base += f", each {self.item.describe()}" if self.kind == "sequence" else f" to {self.item.describe()}"
        if self.most is not None:
            base += f", at most {_number(self.most)}"
        if self.optional:
            base += " (or null for the default)" if self.kind == "boolean" else " (or unset)"
        return base

    def check(self, value: Any, label: str) -> Any:
        """``value`` if it fits, converted where lossless (a dict to its dataclass, an int to
        a float); else an :class:`AutopruneError` naming ``label``, the value and what fits."""
        if value is None:
            if self.optional:
                return None
            raise AutopruneError(f"{label} must be {self.describe()}, got nothing (null)")
        ok = True
        if self.kind == "integer":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.kind == "number":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)
            value = float(value) if ok else value
        elif self.kind == "boolean":
            ok = isinstance(value, bool)
        elif self.kind == "text":
            ok = isinstance(value, str) and value != ""
            if ok and len(value) > MAX_TEXT:
                raise AutopruneError(f"{label} must be at most {MAX_TEXT} characters, got {len(value)}: {_show(value)}")
        elif self.kind == "choice":
            ok = any(type(value) is type(c) and value == c for c in self.choices)  # 1 is not True, "8" not 8
        elif self.kind == "mapping":
            ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
        elif self.kind == "sequence":
            ok = isinstance(value, (list, tuple)) and (len(value) > 0 or self.allow_empty)
        elif self.kind == "nested":
            if isinstance(value, dict):
                return from_dict(self.nested, value, label)
            ok = isinstance(value, self.nested)
        if not ok:
            raise AutopruneError(f"{label} must be {self.describe()}, got {_show(value)}")
        if self.kind in ("integer", "number") and not _in_range(value, self):
            raise AutopruneError(f"{label} must be {self.describe()}, got {_show(value)}")
        if self.kind == "integer" and not INT64[0] <= value <= INT64[1]:  # whatever a field declares
            raise AutopruneError(f"{label} must be {self.describe()} within 64 bits, got {_show(value)}")
        if self.item is not None and self.kind == "mapping":
            value = {k: self.item.check(v, f"{label}[{k!r}]") for k, v in value.items()}
        if self.item is not None and self.kind == "sequence":
            value = type(value)(self.item.check(v, f"{label}[{i}]") for i, v in enumerate(value))
        if self.extra is not None and (problem := self.extra(value)):
            raise AutopruneError(f"{label} {problem}, got {_show(value)}")
        return value


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def _number(x: float) -> str:
    """A bound as written: whole numbers in full (4294967295, not 4.29497e+09)."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _in_range(value: float, spec: Spec) -> bool:
    if spec.low is not None and (value <= spec.low if spec.low_open else value < spec.low):
        return False
    if spec.most is not None and value > spec.most:
        return False
    return not (spec.high is not None and (value >= spec.high if spec.high_open else value > spec.high))


def _finite(value: float) -> bool:
    """Finite, and (for an integer) within a float's range."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------ declaring fields

# Every integer and number a user can set declares its upper bound where it is declared: its
# ``high`` where the value's meaning ends there (a fraction), else its ``most``, a limit said
# apart ("an integer >= 1, at most 1000"). tests/test_bounds.py holds each config, method,
# criterion and agent setting to that; these are the common limits.
INT64 = (-(2**63), 2**63 - 1)
MAX_SEED = 2**32 - 1  # what numpy's, Python's and torch's generators all take
MAX_EPOCHS = 100_000
MAX_BATCH = 65_536
MAX_THREADS = 1_024
MAX_STEPS = 1_000  # pruning rounds and steps, iterations of an iterative criterion
MAX_TEXT = 4_096  # any text: a name, a path, a glob


def integer(low: int | None = None, high: int | None = None, **kw) -> Spec:
    return Spec("integer", low, high, **kw)


def number(low: float | None = None, high: float | None = None, **kw) -> Spec:
    return Spec("number", low, high, **kw)


def unit_interval(**kw) -> Spec:
    """A share of the dense cost in (0, 1]."""
    return Spec("number", 0.0, 1.0, low_open=True, **kw)


def boolean(**kw) -> Spec:
    return Spec("boolean", **kw)


def text(**kw) -> Spec:
    return Spec("text", **kw)


def choice(options, **kw) -> Spec:
    return Spec("choice", choices=tuple(options), **kw)


def mapping(item: Spec | None = None, **kw) -> Spec:
    return Spec("mapping", item=item, **kw)


def sequence(item: Spec, **kw) -> Spec:
    return Spec("sequence", item=item, **kw)


def nested(cls: type, **kw) -> Spec:
    return Spec("nested", nested=cls, **kw)


def checked(spec: Spec, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field carrying its :class:`Spec` (``x: int = checked(integer(1), 5)``)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"spec": spec})


def key_values(items: list[str], flag: str) -> dict[str, Any]:
    """KEY=VALUE strings -> a dict; values are read as JSON (numbers, true/false) or kept as text."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AutopruneError(f"{flag} {item!r} must look like KEY=VALUE, e.g. probes=20")
        try:
            out[key] = parse_json(value, f"{flag} {key}")
        except AutopruneError:
            out[key] = value  # text; whoever reads the option checks it
    return out


# ------------------------------------------------------------------ documents

MAX_DOCUMENT_BYTES = 1 << 20  # a policy, a search's state, a trial's record: far below this
MAX_DEPTH = 32  # nesting of JSON objects and arrays


def parse_json(text: str, where: str) -> Any:
    """Strict JSON (no NaN or Infinity, numbers of at most 4300 digits, at most ``MAX_DEPTH``
    levels), or an :class:`AutopruneError` naming ``where`` and what is wrong."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON (numbers must be finite)")

    try:
        data = json.loads(text, parse_constant=refuse)
    except json.JSONDecodeError as exc:
        raise AutopruneError(f"{where} is not valid JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:  # too many digits, NaN, nesting past the stack
        problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]
        raise AutopruneError(f"{where} is not valid JSON: {problem}") from None
    if _depth(data) > MAX_DEPTH:
        raise AutopruneError(f"{where} is nested more than {MAX_DEPTH} levels deep")
    return data


def _depth(data: Any, level: int = 0) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(data, dict):
        return max((_depth(v, level + 1) for v in data.values()), default=level + 1)
    if isinstance(data, list):
        return max((_depth(v, level + 1) for v in data), default=level + 1)
    return level


def read_json(raw: bytes, where: str) -> Any:
    """A JSON document given as bytes: at most ``MAX_DOCUMENT_BYTES``, UTF-8, then
    :func:`parse_json`."""
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise AutopruneError(f"{where} is {len(raw)} bytes; at most {MAX_DOCUMENT_BYTES} are read")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AutopruneError(f"{where} is not UTF-8 text (byte {exc.start})") from None
    return parse_json(text, where)


def comma_list(value: str, flag: str) -> list[str]:
    """``conv,linear`` -> ``["conv", "linear"]``."""
    return value.split(",")


# ------------------------------------------------------------------ checking


def validate(obj: Any, where: str, flags_first: bool = True) -> None:
    """Check (and normalise in place) every declared field of the dataclass ``obj``. A field
    is named by its flag (``--batch-size``) when it has one and ``flags_first``, else as
    ``where field 'name'`` with the flag beside it (policy JSON is written by hand too)."""
    for f in dataclasses.fields(obj):
        spec = f.metadata.get("spec")
        if spec is None:
            continue
        if spec.flag and flags_first:
            label = spec.flag
        else:
            label = f"{where} field {f.name!r}" + (f" ({spec.flag})" if spec.flag else "")
        object.__setattr__(obj, f.name, spec.check(getattr(obj, f.name), label))


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build the dataclass ``cls`` from plain data (JSON, a model file's record): unknown
    keys and wrong types are errors naming ``where``."""
    if not isinstance(data, dict):
        raise AutopruneError(f"{where} must be a mapping, got {_show(data)}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in set(data) - set(allowed))
    if unknown:
        raise AutopruneError(f"{where} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data
    ]
    if required:
        raise AutopruneError(f"{where} lacks key(s) {', '.join(required)}")
    return cls(**data)


def flat_fields(obj: Any, prefix: str = "") -> dict[str, tuple[Any, str | None]]:
    """Every leaf field of a (nested) config: ``{"budget.fraction": (0.5, None), "epochs":
    (3, "--epochs"), ...}``, with the flag that sets it."""
    out: dict[str, tuple[Any, str | None]] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flat_fields(value, key + "."))
        else:
            spec = f.metadata.get("spec")
            out[key] = (value, spec.flag if spec else None)
    return out
