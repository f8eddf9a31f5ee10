"""Gemma 3 decode on the CPU, synthetic weights with Gemma 3 270M's real shapes (262k tied vocabulary, 18 blocks of
hidden 640, 4 query heads and 1 KV head of 256, sliding window 512 on 5 of every 6 blocks, two RoPE bases).

Measured side by side in one process, batch 1, greedy, one token per step with the KV cache, median step time:
- the layers 4-bit (RTN, groups of 128) with the fp32 tied head, decode attention as one C++ call per layer
  (fast_decode.CpuAttention, Gemma's scale folded into q) vs the same model with the attention forced onto the torch
  modules (what Gemma 2's soft-capped layers run);
- the same with the 8-bit head (loader.quantize_head: lm_head RTN int8, the embedding table bf16);
plus the weight bytes of each (the 262k x 640 table dominates a model this small).

    .venv/bin/python tools/bench_gemma.py [--layers 18] [--steps 48] [--threads N]
Results: bench/results/gemma3_decode_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minigptq.config import ModelConfig  # noqa: E402
from minigptq.fast_decode import CpuAttention, accelerate  # noqa: E402
from minigptq.kv_cache import KVCache  # noqa: E402
from minigptq.loader import fuse_projections, quantize_head, set_module, weight_bytes  # noqa: E402
from minigptq.qlinear import QuantLinear  # noqa: E402
from minigptq.quantizer import QuantConfig, rtn  # noqa: E402
from minigptq.transformer import Attention, Transformer  # noqa: E402


def gemma3_270m(layers: int) -> ModelConfig:
    return ModelConfig(model_type="gemma3", vocab_size=262144, hidden_size=640, num_layers=layers, num_heads=4,
                       num_kv_heads=1, head_dim=256, intermediate_size=2048, max_positions=32768, norm="rms",
                       norm_eps=1e-6, positions="rope", activation="gelu_pytorch_tanh", gated_mlp=True,
                       qkv_bias=False, o_bias=False, mlp_bias=False, tie_word_embeddings=True, rope_theta=1e6,
                       qk_norm=True, sliding_window=512, window_layers=tuple(i for i in range(layers) if (i + 1) % 6),
                       norm_offset=1.0, embed_scale=True, sandwich_norms=True, attn_scale=256 ** -0.5,
                       rope_local_theta=1e4)


def build(cfg: ModelConfig) -> Transformer:
    """Random weights; every block linear RTN-quantized to 4 bits (groups of 128) and q/k/v, gate/up fused."""
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.embed.weight.normal_(0, 0.02)
    for name, mod in list(model.named_modules()):
        if name.startswith("layers.") and isinstance(mod, torch.nn.Linear):
            res = rtn(mod.weight.detach(), QuantConfig(bits=4, group_size=128))
            set_module(model, name, QuantLinear.from_codes(res.qweight, res.scales.half(), res.zeros, res.g_idx,
                                                           None, 4, 128, cpu_kernel="exact"))
    fuse_projections(model)
    return accelerate(model)


@torch.inference_mode()
def decode_ms(model: Transformer, prompt: int, steps: int) -> float:
    """Median ms of one greedy decode step after a prompt of `prompt` tokens."""
    cache = KVCache(model.cfg, 1, prompt + steps, torch.float32, "cpu")
    tok = model(torch.randint(3, 1000, (1, prompt), generator=torch.Generator().manual_seed(0)), cache, 0)
    tok = tok[:, -1:].argmax(-1)
    times = []
    for i in range(prompt, prompt + steps):
        t0 = time.perf_counter()
        tok = model(tok, cache, i).argmax(-1)  # (1, 1)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=18, help="blocks (default 18, as Gemma 3 270M)")
    p.add_argument("--steps", type=int, default=48, help="decode steps per variant (default 48)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gemma3_decode_cpu.json"), help="JSON output")
    p.add_argument("--threads", type=int, default=0, help="torch / kernel threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(gemma3_270m(args.layers))
    rows = {}
    rows["4bit_fp32head_cpp_attention"] = dict(ms=decode_ms(model, args.prompt, args.steps), bytes=weight_bytes(model))
    cpp_forward = CpuAttention.forward
    CpuAttention.forward = Attention.forward  # the torch modules, as Gemma 2's soft-capped layers run
    rows["4bit_fp32head_module_attention"] = dict(ms=decode_ms(model, args.prompt, args.steps),
                                                  bytes=weight_bytes(model))
    CpuAttention.forward = cpp_forward
    quantize_head(model)
    rows["4bit_int8head_cpp_attention"] = dict(ms=decode_ms(model, args.prompt, args.steps), bytes=weight_bytes(model))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    out = dict(date=str(date.today()), machine=dict(cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(),
                                                    system=platform.system(),
                                                    load_average_1_5_15min=[round(x, 2) for x in os.getloadavg()]),
               versions=dict(torch=torch.__version__, python=platform.python_version()),
               shape="gemma3-270m (synthetic)", layers=args.layers, prompt=args.prompt, steps=args.steps,
               note="shared, loaded machine: ratios between rows are the result, absolute times are noisy",
               results={k: dict(ms_per_token=round(v["ms"], 2), weight_MiB=round(v["bytes"] / 2**20, 1))
                        for k, v in rows.items()})
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["results"], indent=1))


if __name__ == "__main__":
    main()
