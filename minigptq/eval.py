"""Perplexity with the paper's protocol, and the `python -m minigptq.eval` command.

The test text as the paper's code builds it (WikiText-2's rows joined with "\\n\\n", PTB's sentences joined with a
space: the presets `wikitext2` and `ptb`), tokenized once without BOS, non-overlapping windows of `seqlen` tokens
(2048 or the model's context if smaller); ppl = exp(mean negative log-likelihood over every predicted token of every
window).
"""
from __future__ import annotations

if __name__ == "__main__":  # before the imports below load torch: Ctrl-C meanwhile exits 130 with one line
    from .cli import quiet_start
    quiet_start()

import argparse
import logging
import math
import os
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import Error
from .cli import add_debug_flag, add_device_flags, add_kv_flag, run
from .data import PRESETS, eval_windows, preset_text, tokenize_file
from .kv_cache import KVCache, resolve_kv_dtype
from .loader import load_model, resolve_device
from .tokenizer import check_token_ids, load_tokenizer
from .transformer import nonfinite_error

log = logging.getLogger("minigptq")
DATA_ENV = "MINIGPTQ_DATA"  # the default --data-dir (the folder of the presets' files), where set


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, progress: bool = False, chunk: int | None = None,
               kv_dtype: str = "auto") -> float:
    """windows (n, seqlen) of token ids -> perplexity of the model on them.

    chunk: feed each window `chunk` tokens at a time through the KV cache, as decoding does (the same result in exact
    arithmetic; with chunk <= 16 every packed layer runs its decode kernel, e.g. the int8 one). kv_dtype: that
    cache's dtype (minigptq/kv_cache.py: resolve_kv_dtype; "auto" is fp16 for an fp32 model on the CPU).
    """
    device = model.embed.weight.device
    cache_dtype = resolve_kv_dtype(kv_dtype, model.act_dtype, device)
    nll, count = 0.0, 0
    bar = tqdm(windows, desc="perplexity", unit="window", disable=not progress, file=sys.stderr, leave=False)
    for i, w in enumerate(bar):
        w = w[None].to(device)  # (1, seqlen)
        if chunk:
            cache = KVCache(model.cfg, 1, w.shape[1], cache_dtype, device, hint="lower --seqlen")
            logits = torch.cat([model(w[:, s:s + chunk], cache, s) for s in range(0, w.shape[1], chunk)], dim=1)
            logits = logits[0, :-1].float()
        else:
            logits = model(w)[0, :-1].float()  # (seqlen-1, vocab): predictions of tokens 1..seqlen-1
        window_nll = F.cross_entropy(logits, w[0, 1:], reduction="sum").item()
        if not math.isfinite(window_nll):  # NaN or Inf logits: never report them as a perplexity
            raise nonfinite_error(model, w, f"logits in window {i}")
        nll += window_nll
        count += w.shape[1] - 1
        bar.set_postfix_str(f"ppl {math.exp(min(nll / count, 709)):.3f}")
    if nll / count > 709:  # exp overflows a float: the logits are finite but absurd
        raise Error(f"the mean negative log-likelihood is {nll / count:.4g} nats per token, so the perplexity "
                    f"exp({nll / count:.4g}) overflows: the model's logits are degenerate (broken weights?)")
    return math.exp(nll / count)


def main(args: argparse.Namespace) -> None:
    if args.dataset in PRESETS and not args.data_dir:
        raise Error(f"--dataset {args.dataset} is read from a data folder: pass --data-dir DIR (the folder holding "
                    f"{PRESETS[args.dataset][0]}) or set {DATA_ENV}")
    if args.seqlen < 2:
        raise Error(f"--seqlen must be >= 2, got {args.seqlen}")
    if args.max_windows is not None and args.max_windows < 1:
        raise Error(f"--max-windows must be >= 1, got {args.max_windows}")
    if args.chunk is not None and args.chunk < 1:
        raise Error(f"--chunk must be >= 1, got {args.chunk}")
    device, dtype = resolve_device(args.device, args.dtype)
    model = load_model(args.model, dtype=dtype, device=device, cpu_kernel=args.cpu_kernel,
                       adapter=args.adapter)
    seqlen = min(args.seqlen, model.cfg.max_positions)
    if seqlen < 2:  # one token predicts nothing: no window would hold a prediction
        raise Error(f"{args.model}: the model's context (max_position_embeddings {model.cfg.max_positions}) is "
                    f"shorter than the 2 tokens a perplexity window needs; valid: a model whose context is >= 2")
    tok = load_tokenizer(args.model)
    if args.dataset in PRESETS:
        text, source = preset_text(args.dataset, args.data_dir)
        tokens = torch.tensor(tok.encode(text, bos=False), dtype=torch.long)
    else:
        tokens, source = tokenize_file(args.dataset, tok), args.dataset
    check_token_ids(tokens, model.cfg.vocab_size, f"the tokenizer's encoding of {source}")
    windows = eval_windows(tokens, seqlen, args.max_windows)
    log.info(f"{args.model}: {len(windows)} windows of {seqlen} tokens from {source}")
    ppl = perplexity(model, windows, progress=not args.quiet and sys.stderr.isatty(), chunk=args.chunk,
                     kv_dtype=args.kv_dtype)
    print(f"perplexity {ppl:.4f}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minigptq.eval",
                                description="Perplexity of a checkpoint (full precision or GPTQ) on a text file, with "
                                            "the GPTQ paper's protocol (non-overlapping windows).")
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--dataset", required=True,
                   help="wikitext2 or ptb (the paper's test sets from --data-dir, joined as its code joins them: "
                        "WikiText-2 rows with blank lines, PTB sentences with spaces), or a file: .txt (lines joined "
                        "with blank lines) or .jsonl with a \"text\" field")
    p.add_argument("--data-dir", default=os.environ.get(DATA_ENV) or None,
                   help=f"folder holding wikitext2/wiki.test.raw and ptb/ptb.test.txt, for --dataset wikitext2 / ptb "
                        f"(default: the environment variable {DATA_ENV}, if set)")
    p.add_argument("--seqlen", type=int, default=2048, help="window length (default 2048, capped at the context)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--chunk", type=int, default=None,
                   help="feed each window N tokens at a time through the KV cache, as decoding does (N <= 16 runs "
                        "every packed layer through its decode kernel, e.g. --cpu-kernel int8); default: whole windows")
    add_device_flags(p)
    add_kv_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_debug_flag(p)
    return p


if __name__ == "__main__":
    run(main, parser())
