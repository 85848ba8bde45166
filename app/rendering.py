"""Templates rendered in a Jinja2 sandbox.

A template's text reaches users, so it must never reach Python: the environment is
`ImmutableSandboxedEnvironment`, and templates are also refused up front when they name
an attribute or item starting with "_" (the way out of every sandbox escape). Parameters
must all be given: `StrictUndefined` turns a missing one into an error at ingest, not a
blank in someone's inbox. `email_html` is rendered with autoescaping on, so a parameter
holding `<script>` arrives as text; plain-text parts are rendered without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, UndefinedError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

PARTS = ("title", "body", "email_subject", "email_html")
HTML_PARTS = frozenset({"email_html"})

_text_env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
_html_env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=True)


class RenderError(ValueError):
    """A template that cannot be rendered with the given parameters; `field` names why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _env(part: str) -> ImmutableSandboxedEnvironment:
    return _html_env if part in HTML_PARTS else _text_env


def check_source(part: str, source: str) -> str | None:
    """Why `source` is not an acceptable template, or None."""
    env = _env(part)
    try:
        tree = env.parse(source)
    except TemplateSyntaxError as exc:
        return f"Template syntax error on line {exc.lineno}: {exc.message}"
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


def variables(part: str, source: str) -> set[str]:
    """The parameter names a part uses."""
    from jinja2 import meta

    return set(meta.find_undeclared_variables(_env(part).parse(source)))


_compiled: dict[tuple[str, str], Any] = {}


def _compile(part: str, source: str) -> Any:
    key = (part, source)
    found = _compiled.get(key)
    if found is None:
        if len(_compiled) > 2048:  # bounded: templates change rarely, but they do change
            _compiled.clear()
        found = _compiled[key] = _env(part).from_string(source)
    return found


def render_locale(parts: Mapping[str, str], params: Mapping[str, Any]) -> dict[str, str]:
    """Render every part of one locale variant."""
    out = {}
    for part in PARTS:
        source = parts.get(part)
        if source is None:
            continue
        try:
            out[part] = _compile(part, source).render(**params)
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
    return out


def render_all(locales: Mapping[str, Mapping[str, str]], params: Mapping[str, Any]) -> dict:
    """Every locale of a template rendered with `params`: {locale: {part: text}}."""
    missing = sorted(
        {name for parts in locales.values() for part, src in parts.items() if src is not None
         for name in variables(part, src)} - set(params)
    )  # fmt: skip
    if missing:
        raise RenderError(
            f"params.{missing[0]}",
            f"Missing parameter{'s' if len(missing) > 1 else ''}: {', '.join(missing)}.",
        )
    return {tag: render_locale(parts, params) for tag, parts in locales.items()}
