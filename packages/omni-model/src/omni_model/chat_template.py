"""Chat templates rendered in a Jinja sandbox, as transformers renders them.

Templates ship inside checkpoints and GGUF files, so they are untrusted input: they run in
`jinja2.sandbox.ImmutableSandboxedEnvironment` (no underscore attributes, no mutation of the
messages, ranges capped), with `*` and `**` checked so a template cannot build a huge string or
integer. The sandbox stops escapes, not slowness: nested loops can still take long.
The environment mirrors transformers' (`trim_blocks`, `lstrip_blocks`, `loopcontrols`, a non-escaping
`tojson`, `raise_exception`, `strftime_now`, a no-op `{% generation %}` tag) so outputs match.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from omni_model.errors import TemplateError

# Used when a checkpoint carries no template: ChatML, the format of SmolLM2, Qwen2 and many others.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_MAX_SEQUENCE = 1_000_000  # items or characters a single `*` may produce
_MAX_EXPONENT = 1_000  # an integer `**` beyond this is a memory/CPU bomb, not a chat prompt


class _Raised(Exception):
    """What `raise_exception(msg)` throws inside a template; becomes TemplateError with msg."""


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; we render the body."""

    tags = {"generation"}  # noqa: RUF012 (jinja reads this class attribute)

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if (
                    isinstance(seq, str | list | tuple)
                    and isinstance(n, int)
                    and len(seq) * n > _MAX_SEQUENCE
                ):
                    raise jinja2.exceptions.SecurityError(f"'*' would make {len(seq) * n} items")
        elif (
            isinstance(left, int) and isinstance(right, int) and abs(right) > _MAX_EXPONENT and abs(left) > 1
        ):
            raise jinja2.exceptions.SecurityError(f"integer power with exponent {right} is too large")
        return super().call_binop(context, operator, left, right)


def _raise_exception(message: object) -> None:
    raise _Raised(str(message))


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes <, >, & and ' for HTML, which would change prompts.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def render_chat_template(
    template: str,
    messages: list[dict[str, str]],
    *,
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str | None],
    source: str,
) -> str:
    """Render `template` for `messages`; every failure is a one-line TemplateError naming `source`."""
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(
            f"{source}: chat template syntax error at line {e.lineno}: {_one_line(e.message)}"
        ) from None
    try:
        return compiled.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
        )
    except _Raised as e:
        raise TemplateError(f"{source}: chat template raised: {_one_line(e)}") from None
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"{source}: chat template blocked by the sandbox: {_one_line(e)}") from None
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, ArithmeticError, RecursionError) as e:
        raise TemplateError(f"{source}: chat template failed: {type(e).__name__}: {_one_line(e)}") from None
