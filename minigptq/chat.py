"""`python -m minigptq.chat`: a conversation with a checkpoint through its chat template, and ChatSession, which keeps
the KV cache across turns (the rendering itself is minigptq/chat_template.py, called by Tokenizer.apply_chat_template).
"""
from __future__ import annotations

if __name__ == "__main__":  # before the imports below load torch: Ctrl-C meanwhile exits 130 with one line
    from .cli import quiet_start
    quiet_start()

import argparse
import logging
import sys

from . import Error
from .cli import add_debug_flag, add_device_flags, add_kv_flag, add_sampling_flags, run
from .generation import StopStrings, TextStream, check_sampling, completion_text, generate
from .kv_cache import KVCache, check_kv_memory, resolve_kv_dtype
from .loader import load_model, resolve_device
from .tokenizer import load_tokenizer


class ChatSession:
    """A conversation that keeps its KV cache across turns: each turn feeds only the tokens after the part of the
    rendered conversation that is already in the cache (the whole history is rendered again, so the template
    decides everything; only where the new rendering departs from what was computed is work redone)."""

    FIRST = 256  # slots of the KV cache at the start; make_room grows it
    HINT = "lower --context (the tokens of conversation kept) or --max-new-tokens, or /reset the conversation"

    def __init__(self, model, tokenizer, system: str | None = None, context: int | None = None,
                 kv_dtype: str = "auto"):
        if tokenizer.chat_template is None:
            raise Error("this checkpoint has no chat template (tokenizer_config.json: chat_template)")
        n = model.cfg.max_positions if context is None else context
        if not isinstance(n, int) or not 2 <= n <= model.cfg.max_positions:
            raise Error(f"context must be an integer in [2, {model.cfg.max_positions}], got {context!r}")
        self.model, self.tok, self.context = model, tokenizer, n
        dev = model.embed.weight.device
        dtype = resolve_kv_dtype(kv_dtype, model.act_dtype, dev)  # the cache's: "auto" is fp16 for fp32 on the CPU
        # The cache starts small and grows with the conversation (make_room), up to the context: a whole-context
        # cache up front would take gigabytes of a long-context model that a short chat never uses.
        self.cache = KVCache(model.cfg, 1, min(n, self.FIRST), dtype, dev, hint=self.HINT)
        try:  # say now, not only when the conversation gets there, that the whole context would not fit
            check_kv_memory(model.cfg, 1, n, dtype, dev,
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

    def prompt_ids(self, text: str) -> list[int]:
        """The conversation so far with the user's message `text`, rendered for the assistant's turn: what reply
        feeds the model (a TextStream for the reply starts from it, so that its text reads as the answer does)."""
        return self.tok.apply_chat_template(self.messages + [{"role": "user", "content": text}])

    def reply(self, text: str, max_new_tokens: int = 256, stop: list[str] | None = None, on_step=None,
              **sampling) -> str:
        """Add the user's message, generate the assistant's answer (streamed through on_step), return its text."""
        ids = self.prompt_ids(text)
        keep = 0
        while keep < min(len(ids) - 1, len(self.cached)) and ids[keep] == self.cached[keep]:
            keep += 1
        stops = StopStrings(self.tok, stop, [ids]) if stop else None
        eos = tuple(dict.fromkeys(self.tok.eos_ids + self.model.cfg.eos_token_ids))
        if len(ids) >= self.context:
            raise Error(f"the conversation has {len(ids)} tokens, as many as the context of {self.context} or more; "
                        f"/reset it, or pass a larger --context (the model's is {self.model.cfg.max_positions})")
        self.make_room(min(self.context, len(ids) + max(max_new_tokens, 1)))
        new, stats = generate(self.model, [ids[keep:]], max_new_tokens, eos_ids=eos, pad_id=self.tok.pad_id,
                              on_step=on_step, stop=stops, cache=self.cache, start=keep, **sampling)
        new = new[0]
        said = completion_text(self.tok, ids, new)  # decoded after the prompt: a leading space is kept
        answer = stops.cut(said) if stops else said
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        # every generated token was fed back except the last one (unless the last one sampled was EOS, not in `new`)
        self.cached = ids + (new if stats.finish[0] == "eos" else new[:-1])
        self.last_stats = stats
        return answer


def main(args: argparse.Namespace) -> None:
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    device, dtype = resolve_device(args.device, args.dtype)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype=dtype, device=device, head_dtype=args.head_dtype, cpu_kernel=args.cpu_kernel,
                       adapter=args.adapter)
    session = ChatSession(model, tok, args.system, args.context, args.kv_dtype)
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
        stream = TextStream(tok, session.prompt_ids(line), (), stops=args.stop or ())
        answer = session.reply(line, args.max_new_tokens, stop=args.stop, on_step=stream,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        stream.finish(answer)  # what the stream held back (an incomplete character, a stop string's start)
        print(flush=True)


def parser() -> argparse.ArgumentParser:
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
    add_kv_flag(p)
    p.add_argument("--head-dtype", choices=["fp32", "fp16", "bf16", "int8"], default=None,
                   help="dtype of the embedding and lm_head (see generate --help)")
    add_debug_flag(p)
    return p


if __name__ == "__main__":
    run(main, parser())
