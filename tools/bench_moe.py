"""Decode benchmark of a 4-bit mixture of experts against the dense 4-bit model with the same active parameters
(issue #26), side by side in one run.

The MoE has Qwen3-30B-A3B's proportions scaled to this machine: 64 experts, top-8, an expert's hidden layer 3/8 of
the model width (Qwen3-30B-A3B: 128 experts, top-8, 768 of 2048), Qwen3 attention (q/k norms, grouped-query). The
dense twin is Qwen3 with the same attention and an MLP of 8 x the expert width: per token both compute the same
multiply-adds and read the same packed bytes (plus the MoE's router, in full precision). Weights are random packed
codes (latency does not depend on the values; the router's random weights spread the tokens over the experts).
Batch 1, greedy, one token per step with the KV cache; the per-step median over `--rounds` alternating rounds.

    .venv/bin/python tools/bench_moe.py [--hidden 1024] [--layers 4] [--threads 1] [--new-tokens 32]
Result: bench/results/moe_decode_cpu.json (machine, versions, date, both models' ms/token and bytes read per token).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minigptq import __version__  # noqa: E402
from minigptq.arch import get_arch  # noqa: E402
from minigptq.config import Fields  # noqa: E402
from minigptq.fast_decode import accelerate  # noqa: E402
from minigptq.generation import generate  # noqa: E402
from minigptq.loader import fuse_projections, set_module  # noqa: E402
from minigptq.moe import MoE  # noqa: E402
from minigptq.qlinear import QuantLinear  # noqa: E402
from minigptq.transformer import Transformer  # noqa: E402


def build(moe: bool, hidden: int, layers: int, experts: int, top_k: int, vocab: int):
    """The 4-bit MoE (moe) or its dense twin, random packed weights, fused and accelerated as load_model leaves them."""
    width = hidden * 3 // 8  # one expert's hidden layer
    heads = hidden // 64
    d = dict(model_type="qwen3_moe" if moe else "qwen3", vocab_size=vocab, hidden_size=hidden,
             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 8), head_dim=64,
             intermediate_size=top_k * width, moe_intermediate_size=width, num_experts=experts,
             num_experts_per_tok=top_k, norm_topk_prob=True, max_position_embeddings=4096)
    cfg = get_arch(d["model_type"]).config_from_hf(Fields(d))
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(cfg)
    for name, mod in list(model.layers.named_modules()):
        if isinstance(mod, torch.nn.Linear) and not name.endswith("router"):  # the router stays full precision
            ql = QuantLinear(mod.in_features, mod.out_features, 4, 128, False, dtype=torch.float16, device="cpu")
            ql.qweight.random_(-2**31, 2**31 - 1)
            ql.qzeros.random_(-2**31, 2**31 - 1)
            ql.scales.uniform_(1e-3, 2e-3)
            ql.post_load()
            set_module(model.layers, name, ql)
    for name, p in list(model.named_parameters()):  # norms 1, the rest (embedding, head, routers) random
        value = torch.ones(p.shape) if "norm" in name else 0.02 * torch.randn(p.shape)
        mod, _, leaf = name.rpartition(".")
        model.get_submodule(mod)._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    fuse_projections(model)
    return accelerate(model).eval()


def bytes_per_token(model: Transformer, top_k: int) -> dict:
    """Bytes of weights one decode token reads in the blocks: every packed / full-precision tensor of a dense block;
    in a MoE block the router, top_k of its experts and the rest (norms, attention)."""
    def size(m):
        return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    blocks = 0
    for b in model.layers:
        if isinstance(b.mlp, MoE):
            experts = sum(size(e) for e in b.mlp.experts)
            blocks += size(b) - experts + experts * top_k // len(b.mlp.experts)
        else:
            blocks += size(b)
    return {"blocks": blocks, "lm_head": size(model.lm_head), "total": blocks + size(model.lm_head)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024, help="model width (default 1024)")
    p.add_argument("--layers", type=int, default=4, help="blocks (default 4)")
    p.add_argument("--experts", type=int, default=64, help="experts per MoE block (default 64)")
    p.add_argument("--top-k", type=int, default=8, help="experts per token (default 8)")
    p.add_argument("--vocab", type=int, default=2048,
                   help="vocabulary (default 2048: the fp32 head about a quarter of the bytes read per token, as "
                        "Qwen3-30B-A3B's bf16 head is of its 4-bit active weights)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    p.add_argument("--new-tokens", type=int, default=32, help="decode steps per round (default 32)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per model (default 3)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "moe_decode_cpu.json"), help="result file")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    models = {"moe": build(True, a.hidden, a.layers, a.experts, a.top_k, a.vocab),
              "dense": build(False, a.hidden, a.layers, a.experts, a.top_k, a.vocab)}
    prompt = [list(range(3, 19))]
    steps = {k: [] for k in models}
    with torch.inference_mode():
        for k, m in models.items():  # warm-up: kernel layouts, allocator
            generate(m, prompt, max_new_tokens=4)
        for _ in range(a.rounds):  # alternating, so both see the same machine load
            for k, m in models.items():
                steps[k].append(generate(m, prompt, max_new_tokens=a.new_tokens)[1].median_ms)
    cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), "")
    res = {"date": str(date.today()), "machine": {"cpu": cpu, "cores": os.cpu_count(), "threads": a.threads,
                                                  "python": platform.python_version(),
                                                  "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
           "versions": {"torch": torch.__version__, "minigptq": __version__},
           "config": {"hidden": a.hidden, "layers": a.layers, "experts": a.experts, "top_k": a.top_k,
                      "expert_width": a.hidden * 3 // 8, "dense_width": a.top_k * (a.hidden * 3 // 8),
                      "bits": 4, "group_size": 128, "vocab": a.vocab, "prompt_tokens": len(prompt[0]),
                      "new_tokens": a.new_tokens, "rounds": a.rounds},
           "ms_per_token": {k: round(statistics.median(v), 3) for k, v in steps.items()},
           "ms_per_token_rounds": {k: [round(x, 3) for x in v] for k, v in steps.items()},
           "bytes_per_token": {k: bytes_per_token(m, a.top_k) for k, m in models.items()},
           "weight_bytes": {k: sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
                            for k, m in models.items()}}
    res["moe_over_dense"] = round(res["ms_per_token"]["moe"] / res["ms_per_token"]["dense"], 3)
    res["goal"] = "moe_over_dense <= 1.3 (issue #26)"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("ms_per_token", "moe_over_dense", "bytes_per_token")}))


if __name__ == "__main__":
    main()
