"""`python -m minigptq.finetune`: train a LoRA adapter (minigptq/lora.py) over a model's frozen weights, packed GPTQ
ones included (QLoRA-style: their backward is minigptq/qlinear_grad.py), and write it in PEFT's format.

Data (one file): .txt (the text cut into windows of --seqlen tokens), .jsonl with "text" rows (each row tokenized,
the rows concatenated, cut into windows), or .jsonl with "messages" rows (each conversation rendered with the
model's chat template, truncated to --seqlen; the loss counts only the assistant's tokens). The order of the
examples is a function of --seed and the step alone, so a resumed run sees exactly what the interrupted one would.
Every --save-every steps and at the end the output folder gets the adapter (adapter_model.safetensors +
adapter_config.json, PEFT's format) and the training state (trainer_state.safetensors: AdamW moments, RNG state;
trainer_state.json, written last, holds the step, the settings and the other files' checksums): --resume continues
from it bit for bit.
"""
from __future__ import annotations

if __name__ == "__main__":  # before the imports below load torch: Ctrl-C meanwhile exits 130 with one line
    from .cli import quiet_start
    quiet_start()

import argparse
import json
import logging
import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

from . import Error
from .cli import add_debug_flag, run
from .data import read_jsonl, read_text
from .durable import save_tensors, sha256_file, write_json
from .loader import internal_to_hf, load_model
from .lora import apply_adapter, freeze_packed, new_adapter, read_adapter, save_adapter
from .tokenizer import load_tokenizer

logger = logging.getLogger("minigptq")
STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the numbers of a run (a resumed run must match it exactly)."""
    rank: int = 16               # LoRA rank r
    alpha: float = 32.0          # LoRA alpha: B A x is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0         # dropout on the adapter's input
    targets: tuple = ("q_proj", "v_proj")  # HF module name suffixes, or ("all-linear",)
    rslora: bool = False
    lr: float = 2e-4
    weight_decay: float = 0.0
    steps: int = 100             # optimizer steps
    seqlen: int = 512
    batch: int = 1               # sequences per micro-batch
    grad_accum: int = 1          # micro-batches per optimizer step
    seed: int = 0
    grad_checkpoint: bool = False  # recompute each block in backward instead of keeping its activations


def examples(path: str | Path, tok, seqlen: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The training examples of a data file -> [(tokens (T,), loss mask (T,) over the predicted tokens)]."""
    path = Path(path)
    rows = read_jsonl(path) if path.suffix == ".jsonl" else None
    if rows is not None and any("messages" in r for r in rows):
        out = []
        for n, row in enumerate(rows, 1):
            if "messages" not in row:
                raise Error(f"{path}:{n}: mixes \"text\" and \"messages\" rows; use one kind per file")
            ids, mask = chat_example(tok, row["messages"])
            if any(mask[:seqlen]):
                out.append((torch.tensor(ids[:seqlen]), torch.tensor(mask[:seqlen])))
        if not out:
            raise Error(f"{path}: no conversation has an assistant turn within the first {seqlen} tokens")
        return out
    ids = torch.tensor(tok.encode(read_text(path), bos=False), dtype=torch.long)  # (n,)
    if ids.numel() < seqlen:
        raise Error(f"{path} holds {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}; give more text "
                    f"or a smaller --seqlen")
    windows = ids[:ids.numel() // seqlen * seqlen].view(-1, seqlen)  # (n_windows, seqlen)
    return [(w, torch.ones(seqlen, dtype=torch.bool)) for w in windows]


def chat_example(tok, messages: list) -> tuple[list[int], list[bool]]:
    """One conversation -> (token ids, mask: True on the assistant's tokens). Each assistant turn's tokens are the
    rendering up to and including it minus the rendering of the conversation before it with the generation prompt."""
    ids = tok.apply_chat_template(messages, add_generation_prompt=False)
    mask = [False] * len(ids)
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "assistant":
            start = len(tok.apply_chat_template(messages[:i], add_generation_prompt=True))
            end = len(tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False))
            mask[start:end] = [True] * (end - start)
    return ids, mask


def batch_at(data: list, cfg: TrainConfig, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch `micro` of optimizer step `step` -> tokens (B, T), target mask (B, T - 1). Example i of the run is
    example perm_e[i mod n] of epoch e = i // n, perm_e a permutation seeded by (seed, e): a pure function of step."""
    n, rows = len(data), []
    for b in range(cfg.batch):
        i = (step * cfg.grad_accum + micro) * cfg.batch + b
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000003 + i // n))
        rows.append(data[int(perm[i % n])])
    T = max(len(t) for t, _ in rows)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)  # right padding: causal attention never looks at it
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for j, (t, m) in enumerate(rows):
        tokens[j, :len(t)], mask[j, :len(t)] = t, m
    return tokens, mask[:, 1:]  # the loss is on the next token: targets are tokens[:, 1:]


def loss_sum(model, tokens: torch.Tensor, target_mask: torch.Tensor, grad_checkpoint: bool) -> torch.Tensor:
    """Summed cross-entropy of the masked next-token predictions of tokens (B, T)."""
    B, T = tokens.shape
    ctx, pos = model.context(B, T, tokens.device, model.act_dtype)
    x = model.embed_tokens(tokens, pos)  # (B, T, hidden)
    for block in model.layers:
        x = checkpoint(block, x, ctx, use_reentrant=False) if grad_checkpoint else block(x, ctx)
    logits = model.head(x[:, :-1]).float()  # (B, T - 1, vocab)
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none")
    return (losses * target_mask.reshape(-1)).sum()


def finetune(model_path: str | Path, data: str | Path, out: str | Path, cfg: TrainConfig = TrainConfig(),
             save_every: int = 50, resume: bool = False, epochs: float | None = None, dtype: str = "fp32",
             log=None) -> dict:
    """Train a LoRA adapter on `data` over the model at `model_path`, writing it to `out` -> the last step's stats."""
    log = log or logger.info
    check_config(cfg, save_every)
    out = Path(out)
    state_file = out / STATE_JSON
    if resume and not state_file.is_file():
        raise FileNotFoundError(f"--resume: {state_file} not found; nothing to resume (start without --resume)")
    if not resume and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty; give a new folder, or --resume a run there")
    tok = load_tokenizer(model_path)
    data_ex = examples(data, tok, cfg.seqlen)
    if epochs is not None:
        if not epochs > 0:
            raise Error(f"--epochs {epochs} must be positive")
        steps = max(1, math.ceil(epochs * len(data_ex) / (cfg.batch * cfg.grad_accum)))
        cfg = TrainConfig(**{**asdict(cfg), "steps": steps})
    model = load_model(model_path, dtype=dtype, fuse=False, cpu_kernel="exact")  # the parts alone: no fused backward
    to_hf = internal_to_hf(model.checkpoint)
    start = 0
    if resume:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        saved = TrainConfig(**{**state["config"], "targets": tuple(state["config"]["targets"])})
        if saved != cfg:
            diff = {k: (v, getattr(cfg, k)) for k, v in asdict(saved).items() if getattr(cfg, k) != v}
            said = ", ".join(f"{k}: saved {a!r}, given {b!r}" for k, (a, b) in diff.items())
            raise Error(f"--resume: the settings differ from the saved run's ({said}); give the same ones")
        if state.get("data_sha256") != sha256_file(Path(data)):
            raise Error(f"--resume: --data {data} is not the file the saved run trained on (its checksum differs)")
        for name, digest in state["sha256"].items():
            if sha256_file(out / name) != digest:
                raise Error(f"--resume: {out / name} does not match {STATE_JSON} (changed since, or a save was "
                            f"interrupted); cannot continue bit for bit")
        weights = read_adapter(out, model, to_hf)
        start = state["step"]
    else:
        weights = new_adapter(model, to_hf, list(cfg.targets), cfg.rank, cfg.alpha, cfg.rslora, cfg.seed)
    apply_adapter(model, weights, to_hf, cfg.dropout)
    freeze_packed(model)  # the packed layers without an adapter: their input gradient tile by tile as well
    params = [p for p in model.parameters() if p.requires_grad]  # the adapter's A and B only
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    torch.manual_seed(cfg.seed)  # dropout's random numbers
    if resume:
        st = load_file(str(out / STATE_TENSORS))
        opt.load_state_dict({"state": {i: {"step": st[f"{i}.step"], "exp_avg": st[f"{i}.exp_avg"],
                                           "exp_avg_sq": st[f"{i}.exp_avg_sq"]} for i in range(len(params))},
                             "param_groups": opt.state_dict()["param_groups"]})
        torch.set_rng_state(st["rng"])
    model.train()
    log(f"finetune: {sum(p.numel() for p in params)} adapter parameters (r={cfg.rank}, {', '.join(cfg.targets)}) "
        f"on {model_path}; {len(data_ex)} examples, {cfg.steps} steps of {cfg.batch}x{cfg.grad_accum} sequences")
    stats = {}
    t0, tokens_seen = time.perf_counter(), 0
    for step in range(start, cfg.steps):
        batches = [batch_at(data_ex, cfg, step, m) for m in range(cfg.grad_accum)]
        n_targets = max(1, sum(int(m.sum()) for _, m in batches))
        total = 0.0
        for tokens, mask in batches:
            loss = loss_sum(model, tokens, mask, cfg.grad_checkpoint) / n_targets
            loss.backward()
            total += float(loss.detach())
            tokens_seen += tokens.numel()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        stats = dict(step=step + 1, loss=total, tokens_per_s=tokens_seen / dt, peak_rss_mib=peak_rss_mib())
        log(f"step {step + 1}/{cfg.steps}: loss {total:.4f}, {stats['tokens_per_s']:.0f} tokens/s, "
            f"peak RSS {stats['peak_rss_mib']:.0f} MiB")
        if (step + 1) % save_every == 0 or step + 1 == cfg.steps:
            save_state(model, to_hf, opt, params, cfg, step + 1, out, str(model_path), sha256_file(Path(data)))
    return stats


def save_state(model, to_hf, opt, params, cfg: TrainConfig, step: int, out: Path, base: str, data_sha256: str) -> None:
    """The adapter (PEFT format) and the training state; trainer_state.json last, with the others' checksums, so a
    save cut short is detected by --resume instead of mixing two steps."""
    save_adapter(model, to_hf, out, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora, base)
    st = opt.state_dict()["state"]
    tensors = {f"{i}.{k}": st[i][k] for i in range(len(params)) for k in ("step", "exp_avg", "exp_avg_sq")}
    save_tensors(out / STATE_TENSORS, {**tensors, "rng": torch.get_rng_state()})
    names = ("adapter_model.safetensors", "adapter_config.json", STATE_TENSORS)
    write_json(out / STATE_JSON, dict(step=step, config={**asdict(cfg), "targets": list(cfg.targets)},
                                      data_sha256=data_sha256,
                                      sha256={n: sha256_file(out / n) for n in names}))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def check_config(cfg: TrainConfig, save_every: int) -> None:
    for name, v in (("rank", cfg.rank), ("steps", cfg.steps), ("seqlen", cfg.seqlen), ("batch", cfg.batch),
                    ("grad-accum", cfg.grad_accum), ("save-every", save_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "seqlen" else 1):
            raise Error(f"--{name} must be an integer >= {2 if name == 'seqlen' else 1}, got {v!r}")
    if not 0 <= cfg.dropout < 1:
        raise Error(f"--dropout {cfg.dropout} must lie in [0, 1)")
    if not cfg.lr > 0 or not cfg.alpha > 0 or not cfg.weight_decay >= 0:
        raise Error(f"--lr ({cfg.lr}) and --alpha ({cfg.alpha}) must be positive, --weight-decay "
                    f"({cfg.weight_decay}) >= 0")


def main(args: argparse.Namespace) -> None:
    cfg = TrainConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, rslora=args.rslora,
                      targets=tuple(t.strip() for t in args.target_modules.split(",") if t.strip()), lr=args.lr,
                      weight_decay=args.weight_decay, steps=args.steps, seqlen=args.seqlen, batch=args.batch,
                      grad_accum=args.grad_accum, seed=args.seed, grad_checkpoint=args.grad_checkpoint)
    finetune(args.model, args.data, args.out, cfg, save_every=args.save_every, resume=args.resume,
             epochs=args.epochs, dtype=args.dtype)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minigptq.finetune",
                                description="Train a LoRA adapter over a (GPTQ or full-precision) checkpoint; the "
                                            "adapter is written in PEFT's format.")
    p.add_argument("--model", required=True, help="checkpoint folder (GPTQ or full precision); its weights stay frozen")
    p.add_argument("--data", required=True, help="training data: .txt, .jsonl with \"text\" rows, or .jsonl with "
                                                 "\"messages\" rows (loss on the assistant's tokens only)")
    p.add_argument("--out", required=True, help="adapter folder to write (PEFT format, plus the training state)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r (default 16)")
    p.add_argument("--alpha", type=float, default=32.0,
                   help="LoRA alpha; the update is scaled by alpha / r (default 32)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapter's input (default 0)")
    p.add_argument("--rslora", action="store_true", help="rank-stabilised scaling alpha / sqrt(r)")
    p.add_argument("--target-modules", default="q_proj,v_proj",
                   help="comma-separated HF module names to adapt, e.g. q_proj,k_proj,v_proj,o_proj, or all-linear "
                        "(default q_proj,v_proj)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--epochs", type=float, default=None, help="passes over the data instead of --steps")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each block during backward instead of keeping its activations (less memory)")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter's init, the data order and dropout")
    p.add_argument("--save-every", type=int, default=50, help="write the adapter and state every N steps (default 50)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out, bit for bit")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="activation dtype (default fp32)")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    add_debug_flag(p)
    return p


if __name__ == "__main__":
    run(main, parser())
