"""Quoting and templating: the only way a value reaches a shell, a PowerShell script or a report.

Plan-supplied templates (script arguments) render in jinja2's immutable sandbox with StrictUndefined:
a template can read the context it is given and nothing else. Values that go into a command line are
quoted here, by one tested function per language; nothing builds commands by string formatting.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# PowerShell treats these as single quotes too; each must be doubled inside a single-quoted literal.
_PS_SINGLE_QUOTES = "'\u2018\u2019\u201a\u201b"


def ps_quote(value: object) -> str:
    """A PowerShell single-quoted literal that evaluates to exactly `value`'s text."""
    text = str(value)
    if "\x00" in text:
        raise ValueError("a NUL character cannot be passed to PowerShell")
    out = []
    for ch in text:
        out.append(ch * 2 if ch in _PS_SINGLE_QUOTES else ch)
    return "'" + "".join(out) + "'"


def sh_quote(value: object) -> str:
    """A POSIX shell word that evaluates to exactly `value`'s text."""
    text = str(value)
    if "\x00" in text:
        raise ValueError("a NUL character cannot be passed to a shell")
    return shlex.quote(text)


def sh_join(argv: Iterable[object]) -> str:
    return " ".join(sh_quote(a) for a in argv)


class PlanTemplateError(ValueError):
    """A plan-supplied template failed to parse or render."""


def sandbox() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)
    env.filters["sh"] = sh_quote
    env.filters["ps"] = ps_quote
    return env


_ENV = sandbox()


def check_template(source: str) -> str | None:
    """Parse a plan template; the error message, or None when it is valid."""
    try:
        _ENV.parse(source)
    except TemplateError as exc:
        return f"template error: {exc}"
    return None


def render_arg(source: str, context: Mapping[str, Any]) -> str:
    """Render one plan-supplied argument in the sandbox."""
    try:
        return _ENV.from_string(source).render(**context)
    except TemplateError as exc:  # includes SecurityError and UndefinedError
        raise PlanTemplateError(f"cannot render {source!r}: {exc}") from None


def render_args(sources: Iterable[str], context: Mapping[str, Any]) -> list[str]:
    """Each argument renders to exactly one argv element: no word splitting, no shell."""
    return [render_arg(s, context) for s in sources]
