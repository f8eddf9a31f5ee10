"""Text for calibration and evaluation: reading .txt / .jsonl files, random calibration windows, test windows.

Calibration follows the paper's code: tokenize the text once, cut `nsamples` random windows of `seqlen` tokens
(seeded). Evaluation follows it too: the test split's lines joined with "\\n\\n", tokenized once, cut into
non-overlapping `seqlen` windows.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor


def read_text(path: str | Path) -> str:
    """A .txt file's text, or a .jsonl file's "text" fields joined with blank lines (HF datasets rows)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"dataset {str(path)!r} is not a file (expected a .txt or .jsonl file)")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{n}: each .jsonl line needs a string field \"text\"")
            rows.append(row["text"])
        raw = "\n\n".join(rows)
    else:
        # The paper's convention: the Hugging Face dataset's rows joined with "\n\n". Those rows are the file's
        # lines with their trailing newline kept, and whitespace-only lines as "" (this reproduces published ppl).
        raw = "\n\n".join(line if line.strip() else "" for line in raw.splitlines(keepends=True))
    if not raw.strip():
        raise ValueError(f"dataset file {path} is empty")
    return raw


def tokenize_file(path: str | Path, tokenizer) -> Tensor:
    """The whole file as one token stream (1-D LongTensor)."""
    return torch.tensor(tokenizer.encode(read_text(path), bos=False), dtype=torch.long)


def calibration_windows(tokens: Tensor, nsamples: int, seqlen: int, seed: int, source: str = "") -> Tensor:
    """nsamples random windows of seqlen tokens from a token stream -> (nsamples, seqlen)."""
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"need nsamples >= 1 and seqlen >= 2, got nsamples={nsamples}, seqlen={seqlen}")
    if tokens.numel() <= seqlen:
        raise ValueError(f"calibration text {source} has {tokens.numel()} tokens, fewer than one window of "
                         f"{seqlen + 1}; use a longer file or a smaller --seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def eval_windows(tokens: Tensor, seqlen: int, max_windows: int | None = None) -> Tensor:
    """Non-overlapping windows of seqlen tokens (the remainder is dropped, as in the paper) -> (n, seqlen)."""
    n = tokens.numel() // seqlen
    if n == 0:
        raise ValueError(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return tokens[:n * seqlen].view(n, seqlen)


@torch.inference_mode()
def sample_from_model(model, nsamples: int, seqlen: int, seed: int, bos_id: int | None, batch: int = 8) -> Tensor:
    """Data-free calibration: sequences sampled from the model itself (temperature 1) -> (nsamples, seqlen).

    Each sequence starts from BOS (or a random token when the model has none) and continues with the model's own
    samples, so its activations look like the model's natural input without any text at hand.
    """
    from .generate import generate
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(0, nsamples, batch):
        n = min(batch, nsamples - b)
        firsts = [bos_id if bos_id is not None else int(torch.randint(model.cfg.vocab_size, (1,), generator=g))
                  for _ in range(n)]
        new, _ = generate(model, [[t] for t in firsts], max_new_tokens=seqlen - 1, temperature=1.0,
                          seed=seed + b)
        out += [[f] + s for f, s in zip(firsts, new)]
    return torch.tensor(out, dtype=torch.long)
