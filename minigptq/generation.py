"""Text generation with a preallocated KV cache: the library loop behind `python -m minigptq.generate` (the
command is minigptq/generate.py), `minigptq.chat` and quantize's sample.

Prefill the (left-padded) prompts once, then one token per step; greedy, temperature, top-k, top-p; stop at EOS,
a stop string or max tokens. Each decode step is the model's forward, its torch.compile'd form, or a replay of a
CUDA graph (minigptq/fast_decode.py). Timing follows the paper's latency protocol: per-step wall time, synchronised
on a GPU, median reported. Also the text side of streaming: StopStrings, completion_text, TextStream.
"""
from __future__ import annotations

import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from . import Error
from .fast_decode import CudaGraphStep, StaticDecodeStep, compiled_decode_step
from .kv_cache import KVCache, resolve_kv_dtype
from .transformer import Transformer, nonfinite_error

log = logging.getLogger("minigptq")


@dataclass
class GenerationStats:
    prefill_s: float = 0.0                               # time to process the prompts and give the first token
    step_s: list[float] = field(default_factory=list)    # wall time of every later decode step
    kv_cache_bytes: int = 0
    kv_dtype: torch.dtype | None = None                  # the KV cache's dtype (kv_cache.resolve_kv_dtype)
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


@torch.inference_mode()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_ids: tuple[int, ...] = (), pad_id: int = 0,
             seed: int | None = None, on_step: Callable[[Tensor], None] | None = None, compile: bool = False,
             stop: Callable[[int, list[int]], bool] | None = None, cache: KVCache | None = None, start: int = 0,
             cuda_graph: bool | None = None, kv_dtype: str | torch.dtype = "auto"
             ) -> tuple[list[list[int]], GenerationStats]:
    """Generate up to max_new_tokens for each prompt (token id lists) -> (new tokens per prompt, stats).

    Prompts of different lengths are left-padded. A prompt stops at its first EOS (not included in the output), or
    when stop(b, new tokens of prompt b) returns True (its last token is included: see StopStrings).
    on_step(tokens (B,)) is called with each new token, e.g. to stream text. compile: run the decode steps through
    torch.compile (compiled_decode_step; the first steps of the first call pay the compilation); the prompt's
    prefill stays eager. cache, start: continue one sequence (B = 1) whose first `start` tokens are already in
    `cache` (a chat that keeps its KV cache across turns); the prompt is then only the tokens after them.
    cuda_graph: replay the decode step from a CUDA graph (CudaGraphStep; with compile, the compiled step). None: on a
    CUDA device when the model has a static step (StaticDecodeStep.supported) and more than one step is asked for.
    kv_dtype: the new cache's dtype, "auto" (fp16 on the CPU for an fp32 model, else the model's), "fp32", "fp16" or
    "bf16" (minigptq/kv_cache.py); a given `cache` keeps its own.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    device, dtype = model.embed.weight.device, model.act_dtype
    cache_dtype = resolve_kv_dtype(kv_dtype, dtype, device)  # a bad value is refused before any work
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
    if cuda_graph and device.type != "cuda":
        raise Error(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
    if cuda_graph and not StaticDecodeStep.supported(model):
        raise Error(f"{StaticDecodeStep.unsupported(model)}: no CUDA graph can replay it; use cuda_graph=False")
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
    cache = cache if cache is not None else KVCache(model.cfg, B, S, cache_dtype, device,
                                                    hint="lower --max-new-tokens, or give fewer or shorter prompts")
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    stats = GenerationStats(kv_cache_bytes=cache.nbytes, kv_dtype=cache.k.dtype)

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
            _check_finite(model, prompts, out, i, bad, cache)  # before a stream shows a token of broken logits
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
    _check_finite(model, prompts, out, i, bad, cache)
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


def _check_finite(model: Transformer, prompts: list[list[int]], out: Tensor, i: int, bad: Tensor,
                  cache: KVCache) -> None:
    """Raise the user error if a row's logits were non-finite; out[:, :i + 1] are the tokens generated so far (the
    last of them sampled from the broken logits), so the diagnostic re-runs its prompt and out[b, :i]. An fp16 cache
    under wider activations (--kv-dtype auto on the CPU) overflows past 65504: the error names the way out."""
    if bool(bad.any()):
        b = int(bad.nonzero()[0])
        seq = torch.tensor(prompts[b] + out[b, :i].tolist(), device=out.device)[None]  # (1, T)
        which = f" for prompt {b + 1} of {len(prompts)}" if len(prompts) > 1 else ""
        e = nonfinite_error(model, seq, f"logits{which} at generated token {i + 1}")
        if cache.k.dtype == torch.float16 and model.act_dtype != torch.float16:
            raise Error(f"{e}; or a key or value overflowed the fp16 KV cache (beyond 65504): try --kv-dtype bf16 "
                        f"or fp32")
        raise e


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
