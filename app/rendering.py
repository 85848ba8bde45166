"""Templates rendered in a Jinja2 sandbox, with bounded output, values and time.

A template's text reaches users, so it must never reach Python: the environment is
`ImmutableSandboxedEnvironment`, and templates are also refused up front when they name
an attribute or item starting with "_" (the way out of every sandbox escape). Parameters
must all be given: `StrictUndefined` turns a missing one into an error at ingest, not a
blank in someone's inbox. `email_html` is rendered with autoescaping on, so a parameter
holding `<script>` arrives as text; plain-text parts are rendered without it.

A template must not make the API do unbounded work or store unbounded text either
(`{{ 'x' * 10**7 }}`, `{{ 10**10**10 }}`, loops nested a million deep). So:

- each part's output is capped (`MAX_CHARS`), counted as it is produced;
- nothing built inside the sandbox may be larger than the cap of the part being rendered:
  `*`, `+`, `%` and `**` are intercepted, `~` and `range()` are checked, and so are the
  filters and `str` methods that take a width, a count or a separator, and every place a
  list or dict is turned into text;
- one notification's rendering (every locale and part) gets `TEMPLATE_RENDER_SECONDS` of
  wall time, checked at every loop iteration and every call (macros and recursion included).

Each check runs before the work it bounds. A template that breaks a limit raises
`RenderError`; `check_limits` finds the templates that break one before any parameter is
given, so PUT /templates can refuse them.
"""

from __future__ import annotations

import math
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from functools import lru_cache, wraps
from itertools import islice
from types import BuiltinMethodType, MethodType
from typing import Any

from jinja2 import (
    ChainableUndefined,
    StrictUndefined,
    TemplateError,
    TemplateSyntaxError,
    UndefinedError,
    nodes,
    pass_context,
    pass_eval_context,
)
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Namespace, generate_lorem_ipsum
from jinja2.visitor import NodeTransformer

PARTS = ("title", "body", "email_subject", "email_html")
HTML_PARTS = frozenset({"email_html"})

# Title and body as for a notification sent without a template (NotificationIn in
# app/schemas.py); an email subject is a title; an HTML email carries markup besides its
# text, so it gets five times the body's room.
MAX_CHARS = {"title": 1_000, "body": 20_000, "email_subject": 1_000, "email_html": 100_000}
MAX_RANGE = 1_000  # Jinja2's sandbox allows 100,000; nested loops multiply it
MAX_INT_BITS = 1_024  # past what a float holds: no number worth showing a user is larger
RENDER_SECONDS = 0.05  # the default of TEMPLATE_RENDER_SECONDS
# Nodes nested in one template. Ordinary ones nest under 20; Jinja2's compiler slows with
# about the cube of the depth (300 filters in a row take it 15 s, then Python refuses).
MAX_DEPTH = 64


class RenderError(ValueError):
    """A template that cannot be rendered with the given parameters; `field` names why."""

    def __init__(self, field: str, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.timed_out = timed_out


class _Limit(Exception):
    """A limit broken inside the sandbox. Not a TemplateError, so no handler takes it for
    an ordinary template mistake."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class _Budget:
    """What the rendering under way may still do: its deadline and the current part's cap."""

    __slots__ = ("cap", "deadline", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.cap = max(MAX_CHARS.values())

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Limit(f"rendering took longer than {self.seconds * 1000:g} ms", timed_out=True)

    def fits(self, size: float, what: str) -> None:
        if size > self.cap:
            raise _Limit(f"{what} would be over {self.cap:,} characters")


# Outside a rendering (Jinja2 folds constants when it compiles), the largest cap and no
# deadline: compiling is bounded by the source's length.
_UNBOUNDED = _Budget(math.inf)
_budget: ContextVar[_Budget] = ContextVar("template_budget", default=_UNBOUNDED)


def _size(value: Any, limit: int) -> int:
    """About how many characters `str(value)` has; counting stops once past `limit`."""
    if isinstance(value, str):
        return len(value)
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item) + 4  # quotes and a separator
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += 2
            stack.extend(item)
        elif isinstance(item, dict):
            total += 2
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, Namespace):  # its repr shows every attribute
            total += 13
            stack.append(item._Namespace__attrs)
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 2
        else:  # floats, None, Undefined, loop and macro objects: short reprs
            total += 8
    return total


def _check_int(value: int) -> None:
    if value.bit_length() > MAX_INT_BITS:
        raise _Limit(f"a number would be over {MAX_INT_BITS:,} bits")


def _is_int(value: Any) -> bool:
    return isinstance(value, int)


_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.)", re.S)


def _width(digits: str | None) -> int:
    # int() of thousands of digits is refused by Python itself; a width that long is over
    # every cap anyway.
    if not digits:
        return 0
    return int(digits) if len(digits) < 10 else 10**10


@lru_cache(maxsize=256)
def _printf_specs(fmt: str) -> tuple[int, int, bool]:
    """How many fields `fmt` has, their widths and precisions added up, and whether one
    takes its width from the arguments (`*`)."""
    specs = [m for m in _PRINTF.finditer(fmt) if m.group(3) != "%"]
    widths = sum(_width(m.group(1)) + _width(m.group(2)) for m in specs if "*" not in m.group())
    return len(specs), widths, any("*" in (m.group(1) or "", m.group(2) or "") for m in specs)


def _check_printf(budget: _Budget, fmt: str, args: Any) -> None:
    """`fmt % args` (and the `format` filter) may build what it prints, and no more."""
    fields, widths, starred = _printf_specs(fmt)
    if not fields:
        return
    if starred:
        raise _Limit("'*' widths are not supported in templates")
    if isinstance(args, Mapping):
        values = list(args.values())
    elif isinstance(args, tuple):
        values = list(args)
    else:
        values = [args]
    largest = max((_size(v, budget.cap) for v in values), default=0)
    budget.fits(len(fmt) + widths + fields * largest, "a formatted string")


def _check_format(budget: _Budget, fmt: str, args: tuple, kwargs: dict, mapping: bool) -> None:
    """`fmt.format(...)` / `fmt.format_map(...)`: every field at its widest and largest."""
    fields = widths = 0
    for _, name, spec, _ in string.Formatter().parse(fmt):
        if name is None:
            continue
        fields += 1
        if spec and "{" in spec:
            raise _Limit("nested fields in a format spec are not supported in templates")
        widths += sum(_width(d) for d in re.findall(r"\d+", spec or ""))
    if not fields:
        return
    if mapping:
        values = list(args[0].values()) if args and isinstance(args[0], Mapping) else []
    else:
        values = [*args, *kwargs.values()]
    largest = max((_size(v, budget.cap) for v in values), default=0)
    budget.fits(len(fmt) + widths + fields * largest, "a formatted string")


def _check_str_method(budget: _Budget, s: str, name: str, args: tuple, kwargs: dict) -> tuple:
    """Methods of str whose result grows with an argument. Returns the args to call with."""
    if name in ("center", "ljust", "rjust", "zfill"):
        if args and _is_int(args[0]):
            budget.fits(args[0], f"{name}()")
    elif name == "expandtabs":
        tabsize = args[0] if args else kwargs.get("tabsize", 8)
        if _is_int(tabsize):
            budget.fits(len(s) + s.count("\t") * tabsize, "expandtabs()")
    elif name == "replace":
        _check_replace(budget, s, *args, **kwargs)
    elif name == "join" and args:
        items = list(args[0])  # an iterator is read once, here, and handed on as a list
        _check_join(budget, items, len(s))
        args = (items, *args[1:])
    return args


def _check_replace(budget: _Budget, s: Any, old: Any = "", new: Any = "", count: Any = -1) -> None:
    s, old, new = str(s), str(old), str(new)
    times = s.count(old) if old else len(s) + 1
    if _is_int(count) and count >= 0:
        times = min(times, count)
    budget.fits(len(s) + times * (len(new) - len(old)), "replace()")


def _check_join(budget: _Budget, items: list, separator: int) -> None:
    size = separator * max(len(items) - 1, 0)
    budget.fits(size, "join()")
    for item in items:
        size += _size(item, budget.cap)
        budget.fits(size, "join()")


# --- filters ---------------------------------------------------------------------------
# Each check takes the filter's own parameters (after the value) and raises _Limit before
# the filter allocates; `join` also hands back its items, read once into a list.


def _center(budget: _Budget, value: Any, width: Any = 80) -> None:
    if _is_int(width):
        budget.fits(width, "center()")


def _indent(
    budget: _Budget, s: Any, width: Any = 4, first: Any = False, blank: Any = False
) -> None:
    s = str(s)
    step = width if _is_int(width) else len(str(width))
    budget.fits(len(s) + (s.count("\n") + 1) * step, "indent()")


def _wordwrap(
    budget: _Budget,
    s: Any,
    width: Any = 79,
    break_long_words: Any = True,
    wrapstring: Any = None,
    break_on_hyphens: Any = True,
) -> None:
    s = str(s)
    if not _is_int(width) or width < 1:
        return
    # Lines are at least half the width long, except where the text already breaks.
    lines = 2 * len(s) // width + s.count("\n") + 1
    budget.fits(len(s) + lines * len(str(wrapstring or "\n")), "wordwrap()")


def _replace(budget: _Budget, s: Any, old: Any, new: Any, count: Any = None) -> None:
    _check_replace(budget, s, old, new, -1 if count is None else count)


def _fill(budget: _Budget, value: Any, count: Any, fill_with: Any = None) -> None:
    # batch() pads its last row to `count` items; slice() makes `count` slices even of
    # nothing.
    if _is_int(count):
        budget.fits(count, "batch()/slice()")


def _slice(budget: _Budget, value: Any, slices: Any, fill_with: Any = None) -> None:
    _fill(budget, value, slices)


def _format(budget: _Budget, value: Any, *args: Any, **kwargs: Any) -> None:
    _check_printf(budget, str(value), kwargs or args)


def _tojson(budget: _Budget, value: Any, indent: Any = None) -> None:
    step = indent if _is_int(indent) else len(str(indent or ""))
    if step > 16:  # every line of the JSON repeats it as often as it nests
        raise _Limit("tojson() indents at most 16")


def _join(budget: _Budget, value: Any, d: Any = "", attribute: Any = None) -> list:
    items = list(value)
    _check_join(budget, items, len(str(d)))
    return items


def _urlize(
    budget: _Budget,
    value: Any,
    trim_url_limit: Any = None,
    nofollow: Any = False,
    target: Any = None,
    rel: Any = None,
    extra_schemes: Any = None,
) -> None:
    # Each link repeats target and rel, and a text of n characters holds up to n/4 links.
    if len(str(target or "")) + len(str(rel or "")) > 100:
        raise _Limit("urlize() takes target and rel of at most 100 characters")


def _sum(budget: _Budget, iterable: Any, attribute: Any = None, start: Any = 0) -> None:
    if not isinstance(start, (int, float)):  # sum() of lists copies them over and over
        raise _Limit("sum() adds numbers only in templates")


_FILTER_CHECKS: dict[str, Callable[..., Any]] = {
    "center": _center,
    "indent": _indent,
    "wordwrap": _wordwrap,
    "replace": _replace,
    "batch": _fill,
    "slice": _slice,
    "format": _format,
    "tojson": _tojson,
    "join": _join,
    "urlize": _urlize,
    "sum": _sum,
}

# Filters that do not turn their value into text. Every other filter does, so a list or
# dict given to it is measured first: its text is as long as all its items together.
_STRUCTURAL_FILTERS = frozenset(
    {
        "abs", "attr", "batch", "count", "d", "default", "dictsort", "first", "float",
        "groupby", "int", "items", "last", "length", "list", "map", "max", "min", "random",
        "reject", "rejectattr", "reverse", "round", "select", "selectattr", "slice", "sort",
        "sum", "unique",
    }
)  # fmt: skip


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    check = _FILTER_CHECKS.get(name)
    measure = name not in _STRUCTURAL_FILTERS
    at = 1 if getattr(func, "jinja_pass_arg", None) else 0  # after context/environment

    @wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget.get()
        budget.tick()
        value = args[at] if len(args) > at else None
        if measure and not isinstance(value, str):
            budget.fits(_size(value, budget.cap), f"the text of the value given to {name}")
        if check is not None:
            try:
                items = check(budget, *args[at:], **kwargs)
            except TypeError:
                items = None  # wrong arguments: the filter itself says so
            if items is not None:
                args = (*args[:at], items, *args[at + 1 :])
        result = func(*args, **kwargs)
        # Filters may grow text a few times over (escaping, upper-casing); a value at the
        # cap may not, while a long parameter may still be shortened (`|truncate`).
        if (
            isinstance(result, str)
            and len(result) > budget.cap
            and not (isinstance(value, str) and len(result) <= len(value))
        ):
            raise _Limit(f"the result of {name} would be over {budget.cap:,} characters")
        return result

    return guarded


def _range(*args: Any) -> range:
    rng = range(*args)
    try:
        items = len(rng)
    except OverflowError:
        items = MAX_RANGE + 1
    if items > MAX_RANGE:
        raise _Limit(f"range() may give at most {MAX_RANGE:,} items")
    return rng


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    if _is_int(n) and _is_int(max):
        _budget.get().fits(n * max * 12, "lipsum()")  # words average under 12 characters
    return generate_lorem_ipsum(n, html, min, max)


def _printable(value: Any) -> Any:
    """finalize: a list or dict printed with {{ }} is measured before it becomes text."""
    if not isinstance(value, (str, int, float)) and value is not None:
        budget = _budget.get()
        budget.fits(_size(value, budget.cap), "a printed value")
    return value


@pass_context  # never folded into a constant when compiling: it is a generator
def _guard_loop(context: Context, iterable: Iterable[Any]) -> Iterator[Any]:
    """Every loop iterates through this: the deadline is checked at each item."""
    budget = _budget.get()
    for item in iterable:
        budget.tick()
        yield item


@pass_eval_context
def _join_checked(eval_ctx: EvalContext, parts: list[Any]) -> str:
    """`a ~ b`, measured before it is joined."""
    budget = _budget.get()
    size = sum(len(p) if isinstance(p, str) else _size(p, budget.cap) for p in parts)
    budget.fits(size, "a joined string")
    joined = (markup_join if eval_ctx.autoescape else str_join)(parts)
    budget.fits(len(joined), "a joined string")  # escaping may have grown it
    return joined


# Filters no template can name (a filter name in a template is an identifier): the code
# Jinja2 generates calls a filter directly, where a global would go through `call`.
_LOOP, _JOIN = "(loop)", "(~)"


def _depth(tree: nodes.Node) -> int:
    deepest, stack = 0, [(tree, 1)]
    while stack:  # not recursive: the tree may be deeper than Python recurses
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in node.iter_child_nodes())
    return deepest


class _Hooks(NodeTransformer):
    """Route every loop's iterable and every `~` through the checks above."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _filter(_LOOP, node.iter)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _filter(_JOIN, nodes.List(node.nodes, lineno=node.lineno))


def _filter(name: str, node: nodes.Expr) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, autoescape: bool) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=autoescape, finalize=_printable)
        self.globals["range"] = _range
        self.globals["lipsum"] = _lipsum
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}
        self.filters[_LOOP] = _guard_loop
        self.filters[_JOIN] = _join_checked

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        if _depth(tree) > MAX_DEPTH:
            raise TemplateSyntaxError(f"nests more than {MAX_DEPTH} levels deep", 1, name, filename)
        tree = _Hooks().visit(tree)
        tree.set_environment(self)
        return tree

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        # encode() leads to bytes, whose methods are not checked; translate() can swap
        # every character for a long string.
        if isinstance(obj, str) and attr in ("encode", "translate", "maketrans"):
            return False
        return super().is_safe_attribute(obj, attr, value)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _budget.get()
        budget.tick()
        if isinstance(__obj, (BuiltinMethodType, MethodType)) and isinstance(
            getattr(__obj, "__self__", None), str
        ):
            args = _check_str_method(budget, __obj.__self__, __obj.__name__, args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt, mapping = value.__self__, value.__name__ == "format_map"

        def checked(*args: Any, **kwargs: Any) -> str:
            _check_format(_budget.get(), fmt, args, kwargs, mapping)
            return wrapped(*args, **kwargs)

        return checked

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget.get()
        if operator == "**":
            # |left| ** right has at most bit_length(|left|) * right bits.
            if (
                _is_int(left)
                and _is_int(right)
                and right > 0
                and abs(left) > 1
                and abs(left).bit_length() * right > MAX_INT_BITS
            ):
                raise _Limit(f"a number would be over {MAX_INT_BITS:,} bits")
        elif operator == "*":
            if _is_int(left) and _is_int(right):
                if left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
                    raise _Limit(f"a number would be over {MAX_INT_BITS:,} bits")
            elif _is_int(right) or _is_int(left):
                times, seq = (right, left) if _is_int(right) else (left, right)
                if isinstance(seq, (str, list, tuple)):
                    budget.fits(_size(seq, budget.cap) * max(times, 0), "a repeated value")
        elif operator == "+":
            if not (_is_int(left) or isinstance(left, float)):
                budget.fits(_size(left, budget.cap) + _size(right, budget.cap), "a sum")
        elif isinstance(left, str):  # %
            _check_printf(budget, left, right)
        result = self.binop_table[operator](left, right)
        if _is_int(result):
            _check_int(result)
        elif isinstance(result, str):  # Markup escapes what it is joined with
            budget.fits(len(result), "a string")
        return result

    def concat(self, chunks: Iterable[str]) -> str:  # type: ignore[override]
        """The output, and every buffer (macros, {% set %} blocks), counted as it grows."""
        budget = _budget.get()
        if isinstance(chunks, list):
            budget.fits(sum(map(len, chunks)), "the output")
            return "".join(chunks)
        # The template's own generator: read in batches, so a loop printing the same long
        # value a million times stops at the cap and not at the end.
        out: list[str] = []
        size, it = 0, iter(chunks)
        while batch := list(islice(it, 64)):
            size += sum(map(len, batch))
            if size > budget.cap:
                raise _Limit(f"the output would be over {budget.cap:,} characters")
            out += batch
        return "".join(out)


_text_env = _Sandbox(autoescape=False)
_html_env = _Sandbox(autoescape=True)


def _env(part: str) -> _Sandbox:
    return _html_env if part in HTML_PARTS else _text_env


def check_source(part: str, source: str) -> str | None:
    """Why `source` is not an acceptable template, or None."""
    env = _env(part)
    try:
        tree = env.parse(source)
    except TemplateSyntaxError as exc:
        return f"Template syntax error on line {exc.lineno}: {exc.message}"
    except RecursionError:  # {{ ((((...)))) }} thousands deep: the parser recurses
        return "The template nests expressions too deeply."
    except ValueError:  # Python reads no int literal of more than 4,300 digits
        return "A number in the template has too many digits."
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node, nodes.Getitem):
            name = getattr(node.arg, "value", None)
        else:  # {{ x|attr("__class__") }}
            name = (
                getattr(node.args[0], "value", None) if node.name == "attr" and node.args else None
            )
        if isinstance(name, str) and name.startswith("_"):
            return f"Templates may not use attributes or keys starting with '_' ({name!r})."
    return None


_variables: dict[tuple[str, str], frozenset[str]] = {}


def variables(part: str, source: str) -> frozenset[str]:
    """The parameter names a part uses."""
    from jinja2 import meta

    key = (part, source)
    found = _variables.get(key)
    if found is None:
        if len(_variables) > 2048:  # as _compiled below
            _variables.clear()
        try:
            found = frozenset(meta.find_undeclared_variables(_env(part).parse(source)))
        except (TemplateSyntaxError, RecursionError, SyntaxError, ValueError):
            found = frozenset()  # it does not compile either, and compiling it says why
        _variables[key] = found
    return found


_compiled: dict[tuple[str, str], Any] = {}


def _compile(part: str, source: str) -> Any:
    key = (part, source)
    found = _compiled.get(key)
    if found is None:
        if len(_compiled) > 2048:  # bounded: templates change rarely, but they do change
            _compiled.clear()
        found = _compiled[key] = _env(part).from_string(source)
    return found


def _compile_part(budget: _Budget, part: str, source: str, field: str) -> Any:
    """The compiled part, or RenderError on `field` if it cannot be compiled.

    Compiled with the default limits and off the clock: a cold cache must not make a
    template time out, nor fold its constants with one part's cap for another.
    """
    started = time.monotonic()
    token = _budget.set(_UNBOUNDED)
    try:
        return _compile(part, source)
    except TemplateSyntaxError as exc:  # found only when compiling: an unknown filter or test
        raise RenderError(field, f"Template error on line {exc.lineno}: {exc.message}") from None
    except (RecursionError, SyntaxError):  # e.g. {{ x|e|e|e... }} past Python's nesting limit
        raise RenderError(field, "The template nests too deeply to compile.") from None
    finally:
        _budget.reset(token)
        budget.deadline += time.monotonic() - started


def _render_part(
    budget: _Budget, tag: str, part: str, source: str, params: Mapping[str, Any]
) -> str:
    template = _compile_part(budget, part, source, "template")
    budget.cap = MAX_CHARS[part]
    try:
        return template.render(**params)
    except _Limit as exc:
        # A template that breaks a limit on its own is refused when saved; one that still
        # gets here breaks it with these parameters (or was saved before the limits).
        field = "params" if variables(part, source) else "template"
        raise RenderError(field, f"locales.{tag}.{part}: {exc}.", timed_out=exc.timed_out) from None
    except RecursionError:
        raise RenderError(
            "template", f"locales.{tag}.{part}: macros or loops nest too deeply."
        ) from None
    except UndefinedError as exc:
        missing = sorted(variables(part, source) - set(params))
        field = f"params.{missing[0]}" if missing else "params"
        raise RenderError(field, f"Missing parameter: {exc.message}") from exc
    except SecurityError as exc:
        raise RenderError("template", f"The template tried something unsafe: {exc}") from exc
    except TemplateError as exc:
        raise RenderError("template", f"The template failed to render: {exc}") from exc
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise RenderError("params", f"The parameters do not fit the template: {exc}") from exc


def render_locale(
    parts: Mapping[str, str],
    params: Mapping[str, Any],
    tag: str = "",
    seconds: float = RENDER_SECONDS,
) -> dict[str, str]:
    """Render every part of one locale variant."""
    budget = _budget.get()
    token = _budget.set(_Budget(seconds)) if budget is _UNBOUNDED else None
    try:
        return {
            part: _render_part(_budget.get(), tag, part, parts[part], params)
            for part in PARTS
            if parts.get(part) is not None
        }
    finally:
        if token is not None:
            _budget.reset(token)


def render_all(
    locales: Mapping[str, Mapping[str, str]],
    params: Mapping[str, Any],
    seconds: float = RENDER_SECONDS,
) -> dict:
    """Every locale of a template rendered with `params`: {locale: {part: text}}.

    All of it within `seconds`, each part within its MAX_CHARS.
    """
    missing = sorted(
        {name for parts in locales.values() for part, src in parts.items() if src is not None
         for name in variables(part, src)} - set(params)
    )  # fmt: skip
    if missing:
        raise RenderError(
            f"params.{missing[0]}",
            f"Missing parameter{'s' if len(missing) > 1 else ''}: {', '.join(missing)}.",
        )
    token = _budget.set(_Budget(seconds))
    try:
        return {tag: render_locale(parts, params, tag) for tag, parts in locales.items()}
    finally:
        _budget.reset(token)


def check_limits(locales: Mapping[str, Mapping[str, str]], seconds: float = RENDER_SECONDS) -> None:
    """Raise RenderError (field `locales.<tag>.<part>`) for a part that breaks a limit before
    any parameter is given: rendered with every parameter empty, within `seconds` overall."""
    budget = _Budget(seconds)
    token = _budget.set(budget)
    try:
        for tag, parts in locales.items():
            for part in PARTS:
                source = parts.get(part)
                if source is not None:
                    _try_part(budget, tag, part, source)
    finally:
        _budget.reset(token)


def _try_part(budget: _Budget, tag: str, part: str, source: str) -> None:
    where = f"locales.{tag}.{part}"
    # An empty parameter prints as "", iterates as nothing and has every attribute; an
    # operation that needs a real value stops the trial, and the notification's own
    # parameters decide at ingest.
    empty = {name: ChainableUndefined(name=name) for name in variables(part, source)}
    template = _compile_part(budget, part, source, where)
    budget.cap = MAX_CHARS[part]
    try:
        template.render(**empty)
    except _Limit as exc:
        raise RenderError(where, f"{exc}.", timed_out=exc.timed_out) from None
    except RecursionError:
        raise RenderError(where, "Macros or loops nest too deeply.") from None
    except Exception:  # anything else depends on the parameters: decided at ingest
        pass
