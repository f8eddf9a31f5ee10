"""Chat templates, and `python -m minigptq.chat`: render a conversation the way the model was trained to read one, from its tokenizer_config.json.

A checkpoint's `chat_template` (in tokenizer_config.json, as a string or a list of named templates, or in a
chat_template.jinja file beside it) is a Jinja template over `messages` ([{"role": ..., "content": ...}, ...]),
`add_generation_prompt` and the special tokens. It is rendered here as transformers renders it: a sandboxed Jinja
environment with trim_blocks and lstrip_blocks, loop controls, a `tojson` filter that does not escape HTML, and the
`raise_exception` / `strftime_now` helpers (templates from the Hub are untrusted code: the sandbox keeps them from
reaching Python objects). The rendered text already holds the special tokens, so it is tokenized without adding any.
"""
from __future__ import annotations

if __name__ == "__main__":  # before the imports below load torch: Ctrl-C meanwhile exits 130 with one line
    from .cli import quiet_start
    quiet_start()

import json
import logging
from datetime import datetime
from pathlib import Path


from . import Error
from .config import read_file

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


def render(template: str, messages: list[dict], add_generation_prompt: bool = True, source: str | None = None,
           **variables) -> str:
    """The conversation as the model's input text (special tokens included, as text). source: where the template
    came from, for the error messages. Rendered in minigptq/template.py's bounded sandbox: a template that runs too
    long, builds too much or fails in any way is a one-line Error."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from .template import BoundedSandbox

    class Generation(Extension):  # {% generation %}...{% endgeneration %} marks assistant text: rendered as is
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


class ChatSession:
    """A conversation that keeps its KV cache across turns: each turn feeds only the tokens after the part of the
    rendered conversation that is already in the cache (the whole history is rendered again, so the template
    decides everything; only where the new rendering departs from what was computed is work redone)."""

    FIRST = 256  # slots of the KV cache at the start; make_room grows it
    HINT = "lower --context (the tokens of conversation kept) or --max-new-tokens, or /reset the conversation"

    def __init__(self, model, tokenizer, system: str | None = None, context: int | None = None):
        from .transformer import KVCache, check_kv_memory
        if tokenizer.chat_template is None:
            raise Error("this checkpoint has no chat template (tokenizer_config.json: chat_template)")
        n = model.cfg.max_positions if context is None else context
        if not isinstance(n, int) or not 2 <= n <= model.cfg.max_positions:
            raise Error(f"context must be an integer in [2, {model.cfg.max_positions}], got {context!r}")
        self.model, self.tok, self.context = model, tokenizer, n
        # The cache starts small and grows with the conversation (make_room), up to the context: a whole-context
        # cache up front would take gigabytes of a long-context model that a short chat never uses.
        self.cache = KVCache(model.cfg, 1, min(n, self.FIRST), model.act_dtype, model.embed.weight.device,
                             hint=self.HINT)
        try:  # say now, not only when the conversation gets there, that the whole context would not fit
            check_kv_memory(model.cfg, 1, n, model.act_dtype, model.embed.weight.device,
                            "a conversation that long would end with an error; pass a smaller --context to bound it")
        except Error as e:
            logging.getLogger("minigptq").warning(f"note: {e}")
        self.system = system
        self.reset()

    def make_room(self, need: int) -> None:
        """Grow the cache to hold `need` slots (at most the context): doubled, so that a long chat copies it only
        a few times, or just `need` where the double would not fit in memory. Between turns only, so every decode
        step (CPU fast path, CUDA graph) is built on the current tensors."""
        cur = self.cache.max_len
        if need <= cur:
            return
        doubled = min(self.context, max(need, 2 * cur))
        try:
            self.cache.grow(doubled, self.HINT)
        except Error:  # check_kv_memory refused the double
            if doubled == need:
                raise
            self.cache.grow(need, self.HINT)

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        self.cached: list[int] = []  # the tokens whose keys and values are in the cache, in order

    def reply(self, text: str, max_new_tokens: int = 256, stop: list[str] | None = None, on_step=None,
              **sampling) -> str:
        """Add the user's message, generate the assistant's answer (streamed through on_step), return its text."""
        from .generate import StopStrings, generate
        ids = self.tok.apply_chat_template(self.messages + [{"role": "user", "content": text}])
        keep = 0
        while keep < min(len(ids) - 1, len(self.cached)) and ids[keep] == self.cached[keep]:
            keep += 1
        stops = StopStrings(self.tok, stop) if stop else None
        eos = tuple(dict.fromkeys(self.tok.eos_ids + self.model.cfg.eos_token_ids))
        if len(ids) >= self.context:
            raise Error(f"the conversation has {len(ids)} tokens, as many as the context of {self.context} or more; "
                        f"/reset it, or pass a larger --context (the model's is {self.model.cfg.max_positions})")
        self.make_room(min(self.context, len(ids) + max(max_new_tokens, 1)))
        new, stats = generate(self.model, [ids[keep:]], max_new_tokens, eos_ids=eos, pad_id=self.tok.pad_id,
                              on_step=on_step, stop=stops, cache=self.cache, start=keep, **sampling)
        new = new[0]
        answer = stops.cut(self.tok.decode(new)) if stops else self.tok.decode(new)
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        # every generated token was fed back except the last one (unless the last one sampled was EOS, not in `new`)
        self.cached = ids + (new if stats.finish[0] == "eos" else new[:-1])
        self.last_stats = stats
        return answer


def main(args) -> None:
    import sys
    from .cli import resolve_device
    from .generate import TextStream, check_sampling
    from .loader import load_model
    from .tokenizer import load_tokenizer
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    device, dtype = resolve_device(args.device, args.dtype)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype=dtype, device=device, head_dtype=args.head_dtype, cpu_kernel=args.cpu_kernel)
    session = ChatSession(model, tok, args.system, args.context)
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat with the model; /reset starts over, /exit (or Ctrl-D) ends", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except UnicodeDecodeError as e:  # the stream cannot go on after a decoding error: end with one line
            raise Error(f"stdin is not valid {e.encoding} text ({e.reason}, byte 0x{e.object[e.start]:02x}); give "
                        f"UTF-8 text (check the terminal's encoding)") from None
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            session.reset()
            continue
        if not line.strip():
            continue
        stream = TextStream(tok, [], (), stops=args.stop or ())
        session.reply(line, args.max_new_tokens, stop=args.stop, on_step=stream, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        print(flush=True)


def parser():
    import argparse
    from .cli import add_debug_flag, add_device_flags, add_sampling_flags
    p = argparse.ArgumentParser(prog="python -m minigptq.chat",
                                description="Chat with a checkpoint through its chat template, one line per user turn "
                                            "on stdin; the KV cache is kept across turns.")
    p.add_argument("--model", required=True, help="checkpoint folder (or a hub id in the local cache)")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--stop", action="append", default=None, help="stop a reply at this string; repeatable")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per reply at most (default 256)")
    p.add_argument("--context", type=int, default=None, help="tokens of conversation kept (default: the model's)")
    add_sampling_flags(p)
    add_device_flags(p)
    p.add_argument("--head-dtype", choices=["fp32", "fp16", "bf16", "int8"], default=None,
                   help="dtype of the embedding and lm_head (see generate --help)")
    add_debug_flag(p)
    return p


if __name__ == "__main__":
    from .cli import run
    run(main, parser())
