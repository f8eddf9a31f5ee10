"""Chat templates: render a conversation the way the model was trained to read one, from its tokenizer_config.json.

A checkpoint's `chat_template` (in tokenizer_config.json, as a string or a list of named templates, or in a
chat_template.jinja file beside it) is a Jinja template over `messages` ([{"role": ..., "content": ...}, ...]),
`add_generation_prompt` and the special tokens. It is rendered here as transformers renders it: a sandboxed Jinja
environment with trim_blocks and lstrip_blocks, loop controls, a `tojson` filter that does not escape HTML, and the
`raise_exception` / `strftime_now` helpers (templates from the Hub are untrusted code: the sandbox keeps them from
reaching Python objects, and minigptq/template_sandbox.py bounds their time and memory). The rendered text already
holds the special tokens, so it is tokenized without adding any (Tokenizer.apply_chat_template).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import Extension, loopcontrols

from . import Error
from .config import read_file
from .template_sandbox import BoundedSandbox

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def find_template(folder: Path, tokenizer_config: dict, name: str | None = None) -> str | None:
    """The checkpoint's chat template (the default one, or `name` of a list of named ones), or None."""
    tpl = tokenizer_config.get("chat_template")
    if tpl is None and (folder / "chat_template.jinja").exists():  # a FIFO or a device there is refused by read_file
        try:
            tpl = read_file(folder / "chat_template.jinja").decode("utf-8")
        except UnicodeDecodeError as e:
            raise Error(f"{folder / 'chat_template.jinja'} is not UTF-8 text ({e})") from None
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get(name or "default")
        if tpl is None:
            raise Error(f"{folder}: no chat template named {name or 'default'!r}; the checkpoint has "
                        f"{', '.join(map(str, named))}")
    if tpl is not None and not isinstance(tpl, str):
        raise Error(f"{folder}/tokenizer_config.json: chat_template must be a string or a list of named "
                    f"templates, got {type(tpl).__name__}")
    return tpl


def special_tokens(tokenizer_config: dict) -> dict[str, str]:
    """The special tokens a template may refer to ({{ bos_token }} ...), as strings."""
    out = {}
    for key in SPECIAL_TOKENS:
        tok = tokenizer_config.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if isinstance(tok, str):
            out[key] = tok
    extra = tokenizer_config.get("additional_special_tokens")
    if isinstance(extra, list):
        out["additional_special_tokens"] = [t.get("content") if isinstance(t, dict) else t for t in extra]
    return out


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages):
        raise Error("messages must be a non-empty list of {\"role\": str, \"content\": ...} objects, got "
                    f"{str(messages)[:200]}")
    return messages


# -- what transformers gives a template beyond plain Jinja ----------------------------------------------------------

class Generation(Extension):
    """{% generation %}...{% endgeneration %} marks assistant text (for training masks): rendered as is."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_pass"), [], [], body).set_lineno(lineno)

    def _pass(self, caller):
        return caller()


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    if not (indent is None or isinstance(indent, int) and 0 <= indent <= 16 or isinstance(indent, str)
            and len(indent) <= 16):  # repeated per line and nesting level: a wide one multiplies the text
        raise jinja2.exceptions.SecurityError(f"tojson: indent must be a number or a string up to 16, got "
                                              f"{str(indent)[:20]!r}")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(fmt):
    if not isinstance(fmt, str) or len(fmt) > 1000:  # each %c grows 12-fold: keep the result small
        raise jinja2.exceptions.SecurityError("strftime_now: the format must be a string of up to 1000 characters")
    return datetime.now().strftime(fmt)


def render(template: str, messages: list[dict], add_generation_prompt: bool = True, source: str | None = None,
           **variables) -> str:
    """The conversation as the model's input text (special tokens included, as text). source: where the template
    came from, for the error messages. Rendered in minigptq/template_sandbox.py's bounded sandbox: a template that
    runs too long, builds too much or fails in any way is a one-line Error."""
    messages = check_messages(messages)
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    where = f"the chat template in {source}" if source else "the chat template"
    try:
        return env.render_text(template, messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as e:
        raise Error(f"{where} failed: {' '.join(str(e).split())[:500]}") from None
    # The template is untrusted code: whatever it raises (1/0, a TypeError, a recursion without end, a template
    # too deeply nested for Python's compiler) is its fault, reported as one line.
    except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError, RecursionError, MemoryError,
            SyntaxError) as e:
        raise Error(f"{where} failed: {type(e).__name__}: {' '.join(str(e).split())[:500]}") from None
