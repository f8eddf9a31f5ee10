"""The mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE), in plain torch, as transformers computes it.

    router logits = router(x)                       (tokens, experts), the router stays in full precision
    p = softmax(logits in fp32); w, e = top-k of p  (tokens, k); Mixtral and norm_topk_prob: w /= sum(w)
    y[t] = sum over its k experts of w * expert_e(x[t])      each expert a gated MLP of its own width
         + sigmoid(shared_expert_gate(x[t])) * shared_expert(x[t])   (Qwen2-MoE only)

Tokens are grouped by expert, so each expert that some token selected is called once, on exactly its tokens: a
packed expert (QuantLinear) is one kernel call per linear, and the experts no token chose are not read at all
(decode reads only the routed experts' bytes; minigptq/fast_decode.py: CpuMoE runs one decode token with fewer
torch ops). The experts are the shared MLP of minigptq/transformer.py, handed in
by the block as `make_mlp(width)`, so this file does not import the transformer.

Quantization (minigptq/driver.py) hooks an expert's linears and sees only the tokens routed to it; `calibrate_all`
bypasses routing for one expert (it then sees every token) for the rule on experts that too few tokens reach
(docs/algorithm.md).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .config import ModelConfig


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, make_mlp: Callable[[int], nn.Module]):
        super().__init__()
        self.top_k, self.norm_topk = cfg.experts_per_token, cfg.norm_topk_prob
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(make_mlp(cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        if cfg.shared_expert_size:
            self.shared_expert = make_mlp(cfg.shared_expert_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.calibrate_all: int | None = None  # the driver's: this expert also runs on every token (see docstring)

    def route(self, x2: Tensor) -> tuple[Tensor, Tensor]:
        """x2 (tokens, d) -> (weights (tokens, k) in x2's dtype, expert ids (tokens, k))."""
        probs = torch.softmax(self.router(x2).float(), dim=-1)  # (tokens, E), fp32 as transformers
        w, idx = torch.topk(probs, self.top_k, dim=-1)  # (tokens, k)
        if self.norm_topk:
            w = w / w.sum(dim=-1, keepdim=True)
        return w.to(x2.dtype), idx

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (tokens, d)
        w, idx = self.route(x2)
        y = torch.zeros_like(x2)  # (tokens, d)
        if self.calibrate_all is not None:  # calibration only: its hooks stop the forward, y is never used
            self.experts[self.calibrate_all](x2)
        flat = idx.reshape(-1)  # (tokens * k,): slot s is token s // k's choice s % k
        order = torch.argsort(flat, stable=True)  # slots grouped by expert, tokens ascending within each
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()  # one host read per layer
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue  # an expert no token chose: its weights are not touched
            slots = order[start:start + n]  # (n,)
            start += n
            tokens = slots // self.top_k  # (n,)
            out = self.experts[e](x2[tokens]) * w.reshape(-1)[slots, None]  # (n, d)
            y.index_add_(0, tokens, out.to(y.dtype))
        if hasattr(self, "shared_expert"):
            y = y + torch.sigmoid(self.shared_expert_gate(x2)) * self.shared_expert(x2)
        return y.view(shape)


def expert_of(name: str) -> int | None:
    """The expert index in an internal linear name ("mlp.experts.3.up" -> 3), or None (not a routed expert's)."""
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["mlp", "experts"] and len(parts) > 3 else None


@contextmanager
def route_all(moe: MoE, expert: int) -> Iterator[None]:
    """`with route_all(moe, e):` expert e of `moe` also runs on every token (its hooks then see them all); used only
    for calibration, by the rule for experts that too few calibration tokens reach (minigptq/driver.py)."""
    moe.calibrate_all = expert
    try:
        yield
    finally:
        moe.calibrate_all = None
