"""Text generation with a preallocated KV cache, and the `python -m minigptq.generate` command.

Prefill the (left-padded) prompts once, then one token per step; greedy, temperature, top-k, top-p; stop at EOS or
max tokens. Timing follows the paper's latency protocol: per-step wall time, synchronised on a GPU, median reported.
"""
from __future__ import annotations

if __name__ == "__main__":  # before the imports below load torch: Ctrl-C meanwhile exits 130 with one line
    from .cli import quiet_start
    quiet_start()

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from . import Error
from .cli import add_debug_flag, add_device_flags, add_sampling_flags, resolve_device, run
from . import rope
from .transformer import Context, KVCache, Transformer, alibi_bias, attention_masks, key_positions

log = logging.getLogger("minigptq")


@dataclass
class GenerationStats:
    prefill_s: float = 0.0                               # time to process the prompts and give the first token
    step_s: list[float] = field(default_factory=list)    # wall time of every later decode step
    kv_cache_bytes: int = 0
    finish: list[str] = field(default_factory=list)     # per prompt: "eos", "stop" (a stop string) or "length"

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.step_s) if self.step_s else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return 1000 / self.median_ms if self.step_s else float("nan")


GREEDY_BELOW = 1e-5  # temperatures below this sample greedily (see sample)


def sample(logits: Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator | None) -> Tensor:
    """logits (B, V) -> next tokens (B,). temperature 0 is greedy, and so is one below GREEDY_BELOW (as in vLLM):
    dividing fp32 logits by it would overflow them to Inf (1e-300 is 0 in fp32) and the softmax to NaN."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None = None) -> None:
    if seed is not None and not -2**63 <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise Error(f"seed must be an integer in [-2**63, 2**64), got {seed}")
    if max_new_tokens < 1:
        raise Error(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not (0 <= temperature < float("inf")):  # also NaN
        raise Error(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise Error(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise Error(f"top_p must be in (0, 1], got {top_p}")


def compiled_decode_step(model: Transformer) -> Callable[..., Tensor]:
    """model.forward compiled by torch.compile for one-token decode steps, made once per model and kept on it.

    dynamic=True: the cache slot and the number of keys change every step, so they are traced as symbols instead of
    triggering a recompilation per step. QuantLinear enters the graph as the custom op minigptq::qgemm.
    """
    step = model.__dict__.get("_compiled_decode_step")
    if step is None:
        step = torch.compile(model.forward, dynamic=True)
        model.__dict__["_compiled_decode_step"] = step  # a plain attribute: not a submodule, not in state_dict
    return step


class StaticDecodeStep:
    """One decode step whose shapes never change and that reads nothing back to the host, so that a CUDA graph can
    capture it once and replay it for every token (CudaGraphStep).

    Where Transformer.forward slices the cache to the keys written so far and builds masks and positions on the
    host, this step writes the new key and value at a device-side slot (KVCache.update with a tensor) and attends
    over every slot of the cache, with a mask that hides the slots after the current one (and left padding, and the
    sliding window). Positions and RoPE tables of every slot are made once. The same numbers as a dynamic step up to
    rounding (the masked keys weigh exactly 0). Set `tokens` (B, 1) and `slot` (1,), then call -> logits (B, 1, V).
    """

    def __init__(self, model: Transformer, cache: KVCache, key_valid: Tensor):
        cfg, (B, S) = model.cfg, key_valid.shape
        if not self.supported(model):
            raise Error(f"rope_scaling {cfg.rope_scaling.type!r} depends on the sequence length at every step: the "
                        f"decode step has no static form (run without CUDA graphs)")
        dev, dtype = key_valid.device, model.act_dtype
        if S < cache.max_len:  # a cache longer than this generation: its later slots are never valid
            key_valid = torch.cat([key_valid, key_valid.new_zeros(B, cache.max_len - S)], dim=1)
            S = cache.max_len
        self.model, self.cache, self.key_valid = model, cache, key_valid
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.slots = torch.arange(S, device=dev)
        self.kpos = key_positions(key_valid)  # (B, S)
        self.cos = self.sin = None
        if cfg.positions == "rope":
            self.cos, self.sin = rope.cos_sin(cfg, self.kpos, dtype)  # (B, 1, S, hd)
        # made once: the slopes' host-to-device copy may not happen inside a graph capture
        self.alibi = alibi_bias(cfg, self.kpos, dtype) if cfg.positions == "alibi" else None
        self.window = cfg.sliding_window if cfg.window_layers else 0

    @staticmethod
    def supported(model: Transformer) -> bool:
        s = model.cfg.rope_scaling
        return s is None or s.type not in ("dynamic", "longrope")

    def __call__(self) -> Tensor:
        m, slot = self.model, self.slot
        mask, window_mask = attention_masks(self.slots, slot, self.key_valid, self.key_valid.shape[0], self.window,
                                            m.act_dtype, self.alibi)
        cos = sin = None
        if self.cos is not None:
            cos, sin = self.cos.index_select(2, slot), self.sin.index_select(2, slot)  # (B, 1, 1, hd)
        x = m.embed_tokens(self.tokens, self.kpos.index_select(1, slot))
        ctx = Context(mask, False, cos, sin, self.cache, slot, window_mask)
        for block in m.layers:
            x = block(x, ctx)
        return m.head(x)


class CudaGraphStep:
    """The static decode step captured in one CUDA graph (after a warm-up on a side stream that also pays any
    torch.compile compilation) and replayed per token: one launch of the whole step instead of hundreds of kernel
    launches and their host work. Call with the new tokens (B,) and their cache slot -> logits (B, 1, V), a buffer
    that the next call overwrites."""

    def __init__(self, model: Transformer, cache: KVCache, key_valid: Tensor, first_slot: int, compile: bool = False):
        self.step = StaticDecodeStep(model, cache, key_valid)
        self.step.slot.fill_(first_slot)  # the warm-up writes (junk) keys there only; the first real step rewrites them
        fn = torch.compile(self.step.__call__, dynamic=False) if compile else self.step.__call__
        dev = key_valid.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = fn()

    def __call__(self, tokens: Tensor, slot: int) -> Tensor:
        self.step.tokens.copy_(tokens.view(-1, 1))
        self.step.slot.fill_(slot)
        self.graph.replay()
        return self.logits


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_ids: tuple[int, ...] = (), pad_id: int = 0,
             seed: int | None = None, on_step: Callable[[Tensor], None] | None = None, compile: bool = False,
             stop: Callable[[int, list[int]], bool] | None = None, cache: KVCache | None = None, start: int = 0,
             cuda_graph: bool | None = None) -> tuple[list[list[int]], GenerationStats]:
    """Generate up to max_new_tokens for each prompt (token id lists) -> (new tokens per prompt, stats).

    Prompts of different lengths are left-padded. A prompt stops at its first EOS (not included in the output), or
    when stop(b, new tokens of prompt b) returns True (its last token is included: see StopStrings).
    on_step(tokens (B,)) is called with each new token, e.g. to stream text. compile: run the decode steps through
    torch.compile (compiled_decode_step; the first steps of the first call pay the compilation); the prompt's
    prefill stays eager. cache, start: continue one sequence (B = 1) whose first `start` tokens are already in
    `cache` (a chat that keeps its KV cache across turns); the prompt is then only the tokens after them.
    cuda_graph: replay the decode step from a CUDA graph (CudaGraphStep; with compile, the compiled step). None: on a
    CUDA device when the model has a static step (StaticDecodeStep.supported) and more than one step is asked for.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise Error("every prompt needs at least one token")
    if start and (len(prompts) != 1 or cache is None):
        raise Error("continuing from a cache (start > 0) needs one prompt and its cache")
    ctx_len = model.cfg.max_positions if cache is None else min(model.cfg.max_positions, cache.max_len)
    T0 = max(len(p) for p in prompts)
    if start + T0 >= ctx_len:
        raise Error(f"the prompt has {start + T0} tokens but the model's context is {ctx_len}; shorten it")
    if start + T0 + max_new_tokens > ctx_len:
        log.warning(f"note: max_new_tokens lowered from {max_new_tokens} to {ctx_len - start - T0} to fit the "
                    f"context of {ctx_len}")
        max_new_tokens = ctx_len - start - T0
    device, dtype = model.embed.weight.device, model.act_dtype
    if cuda_graph and device.type != "cuda":
        raise Error(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
    if cuda_graph and not StaticDecodeStep.supported(model):
        raise Error(f"rope_scaling {model.cfg.rope_scaling.type!r} changes with the sequence length every step: no "
                    f"CUDA graph can replay it; use cuda_graph=False")
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and StaticDecodeStep.supported(model) and max_new_tokens > 1
    B, S = len(prompts), start + T0 + max_new_tokens
    tokens = torch.full((B, T0), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(B, S, dtype=torch.bool, device=device)  # (B, S): real tokens, False for left padding
    valid[:, :start] = True
    for b, p in enumerate(prompts):
        tokens[b, T0 - len(p):] = torch.tensor(p, device=device)
        valid[b, start + T0 - len(p):] = True
    padded = not bool(valid[:, :start + T0].all())
    # sized to this run (prompt + max_new_tokens, at most the context), after a memory check
    cache = cache if cache is not None else KVCache(model.cfg, B, S, dtype, device,
                                                    hint="lower --max-new-tokens, or give fewer or shorter prompts")
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    stats = GenerationStats(kv_cache_bytes=cache.nbytes)

    sync()
    t = time.perf_counter()
    logits = model(tokens, cache, start, valid[:, :start + T0] if padded else None, last_only=True)  # (B, 1, V)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    bad = torch.zeros(B, dtype=torch.bool, device=device)  # rows whose logits held NaN/Inf (read where the host syncs)
    nxt, bad = _sample_finite(logits[:, -1], bad, done, temperature, top_k, top_p, gen)
    sync()
    stats.prefill_s = time.perf_counter() - t

    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    eos = torch.tensor(eos_ids or [-1], device=device)
    stopped = [False] * B  # by `stop`
    graph = CudaGraphStep(model, cache, valid, start + T0, compile) if cuda_graph else None
    step = compiled_decode_step(model) if compile and graph is None else model
    for i in range(max_new_tokens):
        out[:, i] = nxt
        if eos_ids:  # without EOS ids no step needs to look at the tokens (no host sync beyond the timing)
            done |= torch.isin(nxt, eos)
        if stop is not None:
            rows = out[:, :i + 1].tolist()
            for b in range(B):
                if not stopped[b] and not bool(done[b]) and stop(b, rows[b]):
                    stopped[b] = True
                    done[b] = True
        if on_step is not None:
            _check_finite(model, prompts, out, i, bad)  # before a stream shows a token of broken logits
            on_step(nxt)
        if i == max_new_tokens - 1 or ((eos_ids or stop is not None) and bool(done.all())):
            break
        t = time.perf_counter()
        pos = start + T0 + i
        if graph is not None:
            logits = graph(nxt, pos)
        else:
            logits = step(nxt[:, None], cache, pos, valid[:, :pos + 1] if padded else None)  # (B, 1, V)
        nxt, bad = _sample_finite(logits[:, -1], bad, done, temperature, top_k, top_p, gen)
        if eos_ids or stop is not None:
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        sync()
        stats.step_s.append(time.perf_counter() - t)
    _check_finite(model, prompts, out, i, bad)
    result = []
    for b, row in enumerate(out[:, :i + 1].tolist()):
        cut = next((j for j, tok in enumerate(row) if tok in eos_ids), None)
        if stopped[b]:  # everything up to the token that completed the stop string
            cut = next(j + 1 for j in range(len(row)) if stop(b, row[:j + 1]))
        stats.finish.append("stop" if stopped[b] else "eos" if cut is not None else "length")
        result.append(row[:cut])
    return result, stats


def _sample_finite(logits: Tensor, bad: Tensor, done: Tensor, *sampling) -> tuple[Tensor, Tensor]:
    """sample() on logits (B, V) whose rows may hold NaN/Inf (broken weights) -> (next tokens (B,), bad (B,) with
    those rows added, except rows already done (B,), whose tokens are dropped). Such rows are sampled as zeros
    (multinomial would fail on them, on a GPU fatally); the host reads `bad` later, where it syncs anyway
    (_check_finite): no extra sync per step."""
    row_bad = ~torch.isfinite(logits).all(-1)  # (B,)
    return sample(torch.where(row_bad[:, None], 0, logits), *sampling), bad | (row_bad & ~done)


def _check_finite(model: Transformer, prompts: list[list[int]], out: Tensor, i: int, bad: Tensor) -> None:
    """Raise the user error if a row's logits were non-finite; out[:, :i + 1] are the tokens generated so far (the
    last of them sampled from the broken logits), so the diagnostic re-runs its prompt and out[b, :i]."""
    if bool(bad.any()):
        from .transformer import nonfinite_error
        b = int(bad.nonzero()[0])
        seq = torch.tensor(prompts[b] + out[b, :i].tolist(), device=out.device)[None]  # (1, T)
        which = f" for prompt {b + 1} of {len(prompts)}" if len(prompts) > 1 else ""
        raise nonfinite_error(model, seq, f"logits{which} at generated token {i + 1}")


class StopStrings:
    """stop(b, new_ids) for generate: True once the text of the new tokens contains one of `strings`.

    prompts: the prompts' token ids; their last tokens are decoded before the new ones so that the text is the one
    shown (completion_text, TextStream: a stop string " and" matches the first new token "▁and")."""

    def __init__(self, tokenizer, strings: list[str], prompts: list[list[int]] | None = None):
        if any(not isinstance(x, str) or not x for x in strings):
            raise Error(f"stop strings must be non-empty strings, got {strings!r}")
        self.tok, self.strings = tokenizer, list(strings)
        self.anchors = [p[-4:] for p in prompts] if prompts else None

    def __call__(self, b: int, ids: list[int]) -> bool:
        ctx = ids[-68:-64] if len(ids) > 64 else self.anchors[b] if self.anchors else []
        tail = self.tok.decode(ctx + ids[-64:])[len(self.tok.decode(ctx)):] if ctx else self.tok.decode(ids[-64:])
        return any(x in tail for x in self.strings)

    def cut(self, text: str) -> str:
        """text up to (not including) the first stop string."""
        at = min((i for i in (text.find(x) for x in self.strings) if i >= 0), default=len(text))
        return text[:at]


def completion_text(tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text of the new tokens as it reads after the prompt: decode(prompt + new) minus decode(prompt).

    Decoding `new` alone loses what depends on the token before it (SentencePiece drops the space of a first
    "▁and": "Lily" + "and"); this is what the full text shows, exact for SentencePiece and byte-level BPE."""
    head, full = tokenizer.decode(prompt), tokenizer.decode(prompt + new)
    if not full.startswith(head):  # the prompt's text changed with what follows: keep the part both share
        head = head[:next((k for k, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), len(full)))]
    return full[len(head):]


class TextStream:
    """Prints the text of new tokens as they come (batch 1), holding back incomplete UTF-8 characters and any
    text that may be the start of a stop string; nothing after EOS or a stop string is shown."""

    def __init__(self, tokenizer, prompt: list[int], eos_ids, file=None, stops: list[str] = ()):
        file = file if file is not None else sys.stdout  # read now, not at import: a redirected stdout is followed
        self.tok, self.anchor, self.eos, self.file, self.stops = tokenizer, prompt[-4:], set(eos_ids), file, stops
        self.ids: list[int] = []
        self.shown = 0
        self.done = False  # set at EOS or a stop string: nothing after it is shown
        self.base = len(tokenizer.decode(self.anchor))  # decode with context so leading spaces survive

    def __call__(self, nxt: Tensor) -> None:
        tok = int(nxt[0])
        self.done = self.done or tok in self.eos
        if self.done:
            return
        self.ids.append(tok)
        text = self.tok.decode(self.anchor + self.ids)[self.base:]
        if text.endswith("\ufffd"):
            return
        at = min((i for i in (text.find(x) for x in self.stops) if i >= 0), default=-1)
        if at >= 0:
            text, self.done = text[:at], True
        else:  # hold back a suffix that may still grow into a stop string
            hold = max((k for x in self.stops for k in range(1, len(x)) if text.endswith(x[:k])), default=0)
            text = text[:len(text) - hold]
        if len(text) > self.shown:
            print(text[self.shown:], end="", flush=True, file=self.file)
            self.shown = len(text)

    def finish(self, text: str) -> None:
        """At the end: show the rest of `text`, the completion as --quiet prints it (what was held back: a character
        whose last bytes never came, the start of a stop string that never completed)."""
        if len(text) > self.shown:
            print(text[self.shown:], end="", flush=True, file=self.file)
            self.shown = len(text)


def main(args: argparse.Namespace) -> None:
    from .loader import load_model, weight_bytes
    from .tokenizer import check_token_ids, load_tokenizer
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)  # before any output
    device, dtype = resolve_device(args.device, args.dtype)
    tok = load_tokenizer(args.model)  # before the weights: a prompt or template problem is reported at once
    chat = args.chat or args.system is not None
    if chat:
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        prompts = [tok.apply_chat_template(system + [{"role": "user", "content": p}]) for p in args.prompt]
    else:
        prompts = [tok.encode(p) for p in args.prompt]
    stops = StopStrings(tok, args.stop, prompts) if args.stop else None
    model = load_model(args.model, dtype=dtype, device=device, head_dtype=args.head_dtype, cpu_kernel=args.cpu_kernel)
    for p in prompts:
        check_token_ids(p, model.cfg.vocab_size, "the prompt")
        if len(p) >= model.cfg.max_positions:
            raise Error(f"the prompt has {len(p)} tokens but the model's context is {model.cfg.max_positions}; "
                             f"shorten it")
    eos = tuple(dict.fromkeys(tok.eos_ids + model.cfg.eos_token_ids))
    stream = TextStream(tok, prompts[0], eos, stops=args.stop or ()) \
        if len(prompts) == 1 and not args.quiet and not args.json else None
    if stream and not chat:
        print(args.prompt[0], end="", flush=True)
    new, stats = generate(model, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                          eos, tok.pad_id, args.seed, on_step=stream, compile=args.compile, stop=stops,
                          cuda_graph=None if args.cuda_graph is None or device.type != "cuda" else args.cuda_graph)
    texts = [completion_text(tok, p, n) for p, n in zip(prompts, new)]
    texts = [stops.cut(t) for t in texts] if stops else texts
    if args.json:
        for p, ids, n, text, fin in zip(args.prompt, prompts, new, texts, stats.finish):
            print(json.dumps(dict(prompt=p, completion=text, prompt_tokens=len(ids), completion_tokens=len(n),
                                  finish_reason=fin, prefill_ms=round(stats.prefill_s * 1000, 2),
                                  median_ms_per_token=round(stats.median_ms, 3), batch=len(prompts))), flush=True)
    elif stream:
        stream.finish(texts[0])
        print()
    else:
        for i, (p, text) in enumerate(zip(args.prompt, texts)):
            if len(prompts) > 1:
                print(f"--- [{i + 1}/{len(prompts)}]")
            print(text if chat else p + text)
    n_tok = sum(len(n) for n in new)
    o = model.layers[0].attn.o
    kind = type(o).__name__ + (" int8-act" if getattr(o, "_layout", None) is not None and o._layout.int8 else "")
    log.info(f"\n[{kind}, {dtype}, {device}] weights {weight_bytes(model) / 2**20:.1f} MiB,"
             f" KV cache {stats.kv_cache_bytes / 2**20:.1f} MiB | prefill {len(prompts)}x{max(map(len, prompts))} tokens"
             f" {stats.prefill_s * 1000:.1f} ms | decode {n_tok} tokens, median {stats.median_ms:.2f} ms/token"
             f" ({stats.tokens_per_s:.1f} tokens/s per sequence)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minigptq.generate",
                                description="Generate text from a Hugging Face checkpoint folder (full precision or "
                                            "GPTQ) with minigptq's own model code and a KV cache.")
    p.add_argument("--model", required=True, help="checkpoint folder (config.json, weights, tokenizer)")
    p.add_argument("--prompt", required=True, action="append",
                   help="prompt text; repeat the flag for a batch of prompts (left-padded)")
    p.add_argument("--chat", action="store_true",
                   help="send each prompt as a user message through the model's chat template (tokenizer_config.json)")
    p.add_argument("--system", default=None, help="system message for --chat (implies --chat)")
    p.add_argument("--stop", action="append", default=None,
                   help="stop when the generated text contains this string (the text is cut before it); repeatable")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    add_sampling_flags(p)
    add_device_flags(p)
    p.add_argument("--head-dtype", choices=["fp32", "fp16", "bf16", "int8"], default=None,
                   help="store the embedding and lm_head in this dtype (bf16: half the bytes per token of an fp32 "
                        "head; int8: lm_head quantized to 8 bits, embedding bf16; default: --dtype)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (fuses the small ops between the matmuls; the "
                        "first tokens wait for the compilation, and the timing then includes it: see "
                        "tools/bench_generate.py --compile for steady-state figures)")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", default=None,
                   help="on a CUDA device, run every decode step eagerly instead of replaying it from a CUDA graph "
                        "(default: graphs, captured once before the first step; not used on the CPU)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt (prompt, completion, token counts, finish reason, timings)")
    p.add_argument("--quiet", action="store_true", help="do not stream tokens; print the texts at the end, no timings")
    add_debug_flag(p)
    return p


if __name__ == "__main__":
    run(main, parser())
