"""Greedy outputs of the SmolLM2 GPTQ checkpoints (the quality benchmark's, models/bench_quality/) with int8
activations (--cpu-kernel int8) vs the exact fp32 kernels, 32 new tokens on a few prompts
-> bench/results/greedy_int8_smollm2.json: how many leading tokens agree, and both texts.
    python tools/bench_int8_greedy.py
This is a tool, not a test."""
import datetime
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from minigptq.loader import load_model
from minigptq.tokenizer import load_tokenizer
from minigptq.generation import generate
prompts = ["The capital of France is", "In 1905, Albert Einstein published", "The best way to learn a language is",
           "def fibonacci(n):", "Water boils at"]
tok = load_tokenizer("models/SmolLM2-135M-Instruct")
ids = [tok.encode(p) for p in prompts]
out = {}
for bits in (4, 3):
    path = f"models/bench_quality/minigptq-gptq-{bits}bit-g128"
    res = {}
    for mode in ("exact", "int8"):
        m = load_model(path, dtype="fp32", cpu_kernel=mode)
        res[mode] = [generate(m, [p], max_new_tokens=32)[0][0] for p in ids]
    rows = []
    for p, a, b in zip(prompts, res["exact"], res["int8"]):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        rows.append(dict(prompt=p, exact=tok.decode(a), int8=tok.decode(b), identical_tokens=same, of=len(a)))
        print(bits, repr(p), same, "/", len(a), "|", tok.decode(b)[:70].replace("\n", " "))
    out[f"{bits}-bit g128"] = rows
json.dump(dict(benchmark="greedy outputs, int8 activations vs exact fp32 kernels", date=datetime.date.today().isoformat(),
               machine=platform.processor() or platform.machine(), torch=torch.__version__, max_new_tokens=32,
               results=out), open("bench/results/greedy_int8_smollm2.json", "w"), indent=2)
