"""`python -m minigptq.generate`: generate text from a checkpoint folder (full precision or GPTQ) with minigptq's own
model code and a KV cache. The generation loop itself is minigptq/generation.py; `generate` (and the text helpers
StopStrings, TextStream, completion_text) are re-exported here, so `from minigptq.generate import generate` works.
"""
from __future__ import annotations

if __name__ == "__main__":  # before the imports below load torch: Ctrl-C meanwhile exits 130 with one line
    from .cli import quiet_start
    quiet_start()

import argparse
import json
import logging

from . import Error
from .cli import add_debug_flag, add_device_flags, add_kv_flag, add_sampling_flags, run
from .generation import StopStrings, TextStream, check_sampling, completion_text, generate
from .loader import load_model, resolve_device, weight_bytes
from .tokenizer import check_token_ids, load_tokenizer

__all__ = ["generate", "StopStrings", "TextStream", "completion_text", "main", "parser"]
log = logging.getLogger("minigptq")


def main(args: argparse.Namespace) -> None:
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
    model = load_model(args.model, dtype=dtype, device=device, head_dtype=args.head_dtype, cpu_kernel=args.cpu_kernel,
                       adapter=args.adapter)
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
                          cuda_graph=None if args.cuda_graph is None or device.type != "cuda" else args.cuda_graph,
                          kv_dtype=args.kv_dtype)
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
    kind = type(o).__name__ + (" int8-act" if getattr(o, "_layout", None) is not None and
                               o._layout.cpu_kernel == "int8" else "")
    log.info(f"\n[{kind}, {dtype}, {device}] weights {weight_bytes(model) / 2**20:.1f} MiB,"
             f" KV cache {stats.kv_cache_bytes / 2**20:.1f} MiB ({str(stats.kv_dtype)[6:]})"
             f" | prefill {len(prompts)}x{max(map(len, prompts))} tokens"
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
    add_kv_flag(p)
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
