"""Text for calibration and evaluation: reading .txt / .jsonl files, random calibration windows, test windows.

Calibration follows the paper's code: tokenize the text once, cut `nsamples` random windows of `seqlen` tokens
(seeded). Evaluation follows it too: the test split's lines joined with "\\n\\n", tokenized once, cut into
non-overlapping `seqlen` windows.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from . import Error
from .generation import generate


# Far above any calibration or evaluation text (128 windows of 2048 tokens are ~1 MB, WikiText-2's test set 1.3 MB),
# low enough that a huge or sparse file is refused before it is read into memory and tokenized for an hour.
MAX_TEXT_FILE = 2**30


def read_utf8(path: Path) -> str:
    """A file's text. Bytes that are not UTF-8 are an error naming the line and byte offset: decoded as U+FFFD they
    would calibrate or evaluate on text nobody wrote, and say nothing about it."""
    with open(path, "rb") as f:
        too_big = os.fstat(f.fileno()).st_size > MAX_TEXT_FILE
        data = b"" if too_big else f.read(MAX_TEXT_FILE + 1)  # + 1: a file growing past the limit is seen too
    if too_big or len(data) > MAX_TEXT_FILE:
        raise Error(f"{path} is over the {MAX_TEXT_FILE // 2**30} GiB limit for a dataset file; calibration uses "
                    f"nsamples x seqlen tokens (~1 MB of text) and evaluation sets are a few MB: give a part of it "
                    f"(e.g. head -c 100M)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise Error(f"{path}: line {line} (byte offset {e.start}) is not UTF-8 text ({data[e.start:e.start + 4]!r}"
                    f"...); save the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a .jsonl file: each a {"text": str} or a {"messages": [{"role": ..., "content": ...}, ...]}."""
    rows = []
    # Lines end at "\n" only (JSON Lines): str.splitlines would also cut at U+2028, U+0085 ..., which JSON strings
    # may hold unescaped (json.dumps(..., ensure_ascii=False) writes them so).
    # A leading byte-order mark (Windows editors write one) marks the encoding; it is not part of the first row.
    for n, line in enumerate(read_utf8(path).removeprefix("\ufeff").split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise Error(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or not (isinstance(row.get("text"), str) or isinstance(row.get("messages"), list)):
            raise Error(f"{path}:{n}: each .jsonl line needs a string field \"text\" or a list \"messages\" "
                        f"(chat turns)")
        rows.append(row)
    return rows


def _file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
    if not path.is_file():
        raise Error(f"dataset {str(path)!r} is not a file (expected a .txt or .jsonl file)")
    return path


def read_text(path: str | Path) -> str:
    """A .txt file's text, or a .jsonl file's "text" fields joined with blank lines (HF datasets rows)."""
    path = _file(path)
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)
        if any("text" not in r for r in rows):
            raise Error(f"{path}: rows with \"messages\" need the model's chat template: use the file for "
                        f"calibration (quantize), not as plain text")
        raw = "\n\n".join(r["text"] for r in rows)
    else:
        raw = read_utf8(path)
        # The paper's convention: the Hugging Face dataset's rows joined with "\n\n". Those rows are the file's
        # lines with their trailing newline kept, and whitespace-only lines as "" (this reproduces published ppl).
        raw = "\n\n".join(line if line.strip() else "" for line in raw.splitlines(keepends=True))
    if not raw.strip():
        raise Error(f"dataset file {path} is empty")
    return raw


# The paper's evaluation sets, as its code reads them: WikiText-2's test rows joined with "\n\n", PTB's test
# sentences (the dataset's rows: the file's lines, stripped) joined with a space.
PRESETS = {"wikitext2": ("wikitext2/wiki.test.raw", "rows"), "ptb": ("ptb/ptb.test.txt", "sentences")}


def preset_text(name: str, data_dir: str | Path) -> tuple[str, Path]:
    """The text of evaluation preset `name` (PRESETS) from the files under data_dir -> (text, file)."""
    if name not in PRESETS:
        raise Error(f"unknown dataset preset {name!r}; valid: {', '.join(PRESETS)}")
    rel, rule = PRESETS[name]
    path = _file(Path(data_dir) / rel)
    if rule == "rows":
        return read_text(path), path
    text = " ".join(line.strip() for line in read_utf8(path).splitlines() if line.strip())
    if not text:
        raise Error(f"dataset file {path} is empty")
    return text, path


def tokenize_file(path: str | Path, tokenizer) -> Tensor:
    """The whole file as one token stream (1-D LongTensor)."""
    return torch.tensor(tokenizer.encode(read_text(path), bos=False), dtype=torch.long)


def calibration_tokens(source, tokenizer) -> tuple[Tensor, str]:
    """Calibration data from any source -> (a token stream (1-D) or ready windows (2-D), what it was), from:
    - a .txt file, or a .jsonl file of {"text": ...} rows (joined with blank lines, as the paper's code does);
    - a .jsonl file of {"messages": [...]} rows (chat / SFT data): each conversation rendered with the model's
      chat template, the token streams concatenated;
    - a list of strings (joined with blank lines: the same tokens as a .jsonl file of those texts);
    - a list of token-id lists, or a 1-D tensor of token ids (a token stream);
    - a 2-D tensor of token ids: the calibration windows themselves (nsamples x seqlen), used as they are."""
    if isinstance(source, (str, Path)):
        path = _file(source)
        if path.suffix == ".jsonl":
            rows = read_jsonl(path)
            if all("messages" in r for r in rows) and rows:
                ids = [i for r in rows
                       for i in tokenizer.apply_chat_template(r["messages"], add_generation_prompt=False)]
                return torch.tensor(ids, dtype=torch.long), f"{len(rows)} conversations in {path} (chat template)"
        return tokenize_file(path, tokenizer), str(path)
    if isinstance(source, Tensor):
        if source.dtype not in (torch.int32, torch.int64) or source.dim() not in (1, 2) or source.numel() == 0:
            raise Error(f"calibration tokens must be a non-empty 1-D or 2-D integer tensor, got {source.dtype} "
                        f"{list(source.shape)}")
        if int(source.min()) < 0:
            raise Error("calibration token ids must be >= 0")
        return source.long(), (f"{source.shape[0]} given windows of {source.shape[1]} tokens" if source.dim() == 2
                               else f"a stream of {source.numel()} given tokens")
    if isinstance(source, list) and source and all(isinstance(x, str) for x in source):
        return torch.tensor(tokenizer.encode("\n\n".join(source), bos=False), dtype=torch.long), \
            f"{len(source)} given texts"
    if isinstance(source, list) and source and all(
            isinstance(x, list) and x and all(isinstance(i, int) and not isinstance(i, bool) for i in x)
            for x in source):
        return calibration_tokens(torch.tensor([i for x in source for i in x], dtype=torch.long), tokenizer)[0], \
            f"{len(source)} given token sequences"
    raise Error(f"calibration data must be a .txt/.jsonl file, a list of strings, a list of token-id lists or a "
                f"tensor of token ids; got {type(source).__name__}")


def calibration_windows(tokens: Tensor, nsamples: int, seqlen: int, seed: int, source: str = "") -> Tensor:
    """nsamples random windows of seqlen tokens from a token stream -> (nsamples, seqlen)."""
    if nsamples < 1 or seqlen < 2:
        raise Error(f"need nsamples >= 1 and seqlen >= 2, got nsamples={nsamples}, seqlen={seqlen}")
    if tokens.numel() <= seqlen:
        raise Error(f"calibration text {source} has {tokens.numel()} tokens, fewer than one window of "
                    f"{seqlen + 1}; use a longer file or a smaller --seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def eval_windows(tokens: Tensor, seqlen: int, max_windows: int | None = None) -> Tensor:
    """Non-overlapping windows of seqlen tokens (the remainder is dropped, as in the paper) -> (n, seqlen)."""
    n = tokens.numel() // seqlen
    if n == 0:
        raise Error(f"the evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return tokens[:n * seqlen].view(n, seqlen)


@torch.inference_mode()
def sample_from_model(model, nsamples: int, seqlen: int, seed: int, bos_id: int | None, batch: int = 8) -> Tensor:
    """Data-free calibration: sequences sampled from the model itself (temperature 1) -> (nsamples, seqlen).

    Each sequence starts from BOS (or a random token when the model has none) and continues with the model's own
    samples, so its activations look like the model's natural input without any text at hand.
    """
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
