"""Decode benchmark in the paper's way: batch 1, greedy, one token per step with the KV cache, per-step wall time
(synchronised on a GPU), median over a fixed number of steps; plus weight, KV-cache and peak memory.

Each variant runs in its own process (clean peak-memory figures, no cache warmed by another variant), one after the
other in the same invocation, so ratios between variants are measured side by side.

CPU, real weights (SmolLM2-135M-Instruct full precision and its GPTQ checkpoints):
    .venv/bin/python tools/bench_generate.py --q4 models/bench_quality/minigptq-gptq-4bit-g128 \
        --q3 models/bench_quality/minigptq-gptq-3bit-g128
    add `--compile` for variants whose decode step runs through torch.compile, and `--llamacpp FILE.gguf` for
    llama.cpp on the same prompts (run by tools/bench_llamacpp.py in the venv named by --llamacpp-python).
GPU, synthetic weights with real shapes (latency does not depend on the values):
    python tools/bench_generate.py --device cuda --synthetic llama2-7b [--eager-too]
CPU, a 1B-class model built here (TinyLlama-1.1B's shapes, random weights quantized by RTN, 4-bit g128), prefill of
512 tokens and decode, the exact kernels against the int8 ones:
    .venv/bin/python tools/bench_generate.py --synthetic tinyllama-1.1b --contexts 128 --prefill 512 --no-fp
Side by side with llama.cpp on the same weights (bench/README.md: "llama.cpp side by side" has every command):
    .venv/bin/python tools/bench_generate.py --synthetic tinyllama-1.1b --write-checkpoint models/tinyllama-1.1b-random
    then quantize it with `minigptq.quantize --method rtn`, convert it with llama.cpp's convert_hf_to_gguf.py, and pass
    --model/--q4/--q3/--llamacpp.
Every run also times a plain memory copy (--copy-mib, read + write) in the same invocation, and reports each
variant's decode as achieved GB/s (the block and head bytes read per token) and as a fraction of that copy.
Results: bench/results/generate_*.json, one file per device and model (generate_<device>_<model>.json)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minigptq.config import ModelConfig  # noqa: E402
from minigptq.fast_decode import accelerate  # noqa: E402
from minigptq.generation import generate  # noqa: E402
from minigptq.loader import fuse_projections, load_model, parse_dtype, quantize_head, weight_bytes  # noqa: E402
from minigptq.qlinear import QuantLinear  # noqa: E402
from minigptq.quantizer import QuantConfig, rtn  # noqa: E402
from minigptq.transformer import Transformer  # noqa: E402

SYNTHETIC = {  # real shapes; OPT-175B is projected from a few of its 96 layers
    "llama2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                      num_kv_heads=32, head_dim=128, intermediate_size=11008, max_positions=4096, norm="rms",
                      norm_eps=1e-5, positions="rope", activation="silu", gated_mlp=True, qkv_bias=False,
                      o_bias=False, mlp_bias=False, tie_word_embeddings=False),
    "opt-175b": dict(model_type="opt", vocab_size=50272, hidden_size=12288, num_layers=96, num_heads=96,
                     num_kv_heads=96, head_dim=128, intermediate_size=49152, max_positions=2048, norm="layer",
                     norm_eps=1e-5, positions="learned", activation="relu", gated_mlp=False, qkv_bias=True,
                     o_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "tinyllama-1.1b": dict(model_type="llama", vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32,
                           num_kv_heads=4, head_dim=64, intermediate_size=5632, max_positions=2048, norm="rms",
                           norm_eps=1e-5, positions="rope", activation="silu", gated_mlp=True, qkv_bias=False,
                           o_bias=False, mlp_bias=False, tie_word_embeddings=False),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, intermediate_size=1536, max_positions=8192, norm="rms",
                         norm_eps=1e-5, positions="rope", activation="silu", gated_mlp=True, qkv_bias=False,
                         o_bias=False, mlp_bias=False, tie_word_embeddings=True),
}
RTN_SYNTHETIC = ("tinyllama-1.1b", "smollm2-135m")  # built from random weights by RTN (CPU); the others: random codes


def synthetic_model(name: str, bits: int | None, dtype, device, layers: int | None, cpu_kernel: str = "exact",
                    fuse: bool = False, head_dtype: str | None = None) -> Transformer:
    """A model of real shapes with random weights; linears replaced by packed QuantLinear if bits (RTN of the random
    weights for RTN_SYNTHETIC, random codes otherwise); with the fast decode paths, as load_model gives them."""
    kw = dict(SYNTHETIC[name])
    if layers:
        kw["num_layers"] = layers
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**kw)).to(device=device, dtype=dtype)
    for m in model.modules():  # a trained model's scale: activations neither vanish nor blow up over the layers
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.02)
    if bits and name in RTN_SYNTHETIC:
        rtn_linears(model, bits, cpu_kernel)
        if fuse:
            fuse_projections(model)
        if head_dtype == "int8":  # as load_model(head_dtype=...) does
            quantize_head(model, cpu_kernel=cpu_kernel)
        elif head_dtype:
            for mod in (model.embed, model.lm_head):
                mod.weight = torch.nn.Parameter(mod.weight.to(parse_dtype(head_dtype)), requires_grad=False)
            if model.cfg.tie_word_embeddings:
                model.lm_head.weight = model.embed.weight
    elif bits:
        quantize_linears(model, bits, device)
        for ql in model.layers.modules():
            if isinstance(ql, QuantLinear):
                ql.qweight.random_(-2**31, 2**31 - 1)
                ql.qzeros.random_(-2**31, 2**31 - 1)
                ql.scales.uniform_(1e-3, 2e-3)
                ql.post_load()
    return accelerate(model).eval()


def rtn_linears(model: Transformer, bits: int, cpu_kernel: str) -> None:
    """Replace every block linear by its RTN quantization (symmetric, group size 128) as a packed QuantLinear."""
    for block in model.layers:
        for mname, lin in list(block.named_modules()):
            if isinstance(lin, torch.nn.Linear):
                r = rtn(lin.weight.detach().float(), QuantConfig(bits=bits, group_size=128))
                ql = QuantLinear.from_codes(r.qweight, r.scales.half(), r.zeros, r.g_idx, lin.bias, bits, 128,
                                            cpu_kernel=cpu_kernel)
                parent, _, leaf = mname.rpartition(".")
                setattr(block.get_submodule(parent), leaf, ql)


def write_checkpoint(name: str | None, out: Path) -> None:
    """--write-checkpoint: a random-init fp16 checkpoint of a Llama shape of SYNTHETIC (tools/bench_quantize.py)."""
    if name not in RTN_SYNTHETIC:
        raise SystemExit(f"--write-checkpoint needs --synthetic with a Llama shape: one of {', '.join(RTN_SYNTHETIC)}")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--write-checkpoint {out}: the folder exists and is not empty; give a new folder")
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_quantize import random_llama
    c = SYNTHETIC[name]
    random_llama(out, hidden=c["hidden_size"], inter=c["intermediate_size"], layers=c["num_layers"],
                 heads=c["num_heads"], kv_heads=c["num_kv_heads"], vocab=c["vocab_size"],
                 tie=c["tie_word_embeddings"], dtype=torch.float16)
    print(f"wrote {out} ({name} shapes, random weights, fp16)")


def copy_bandwidth(mib: int, threads: int, reps: int = 5) -> float:
    """GB/s of a plain copy of `mib` MiB (bytes read + bytes written), best of `reps`: the machine's practical
    memory bandwidth, measured in the same run as the variants."""
    torch.set_num_threads(threads)
    src = torch.ones(mib * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return round(2 * src.numel() / best / 1e9, 2)


def quantize_linears(model: Transformer, bits: int, device) -> None:
    """Replace every block linear by a QuantLinear of `bits` (group size 128), left zero (buffers only)."""
    for block in model.layers:
        for mname, lin in list(block.named_modules()):
            if isinstance(lin, torch.nn.Linear):
                ql = QuantLinear(lin.in_features, lin.out_features, bits, 128, lin.bias is not None,
                                 dtype=torch.float16, device=device)
                parent, _, leaf = mname.rpartition(".")
                setattr(block.get_submodule(parent), leaf, ql)


def memory_plan(name: str, gpu_gib: int = 80) -> dict:
    """Bytes of the full model in fp16 / 4-bit / 3-bit (built on the meta device: shapes only, no memory), its fp16
    KV cache at the full context for batch 1, and how many GPUs of gpu_gib GiB hold weights + that cache."""
    cfg = ModelConfig(**SYNTHETIC[name])
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.max_positions * cfg.head_dim * 2
    out = {"gpu_gib": gpu_gib, "kv_cache_bytes_full_context": kv, "variants": {}}
    for label, bits in (("fp16", None), ("gptq 4-bit", 4), ("gptq 3-bit", 3)):
        with torch.device("meta"):  # never materialised: 175B parameters would not fit in memory
            model = Transformer(cfg).to(dtype=torch.float16)
        if bits:
            quantize_linears(model, bits, "meta")
        tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}  # tied tables once
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        out["variants"][label] = {"weight_bytes": total, "gpus_needed": -(-(total + kv) // (gpu_gib * 2**30))}
    return out


def measure(args) -> dict:
    """One variant in this process -> its figures."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.act]
    if args.synthetic:
        model = synthetic_model(args.synthetic, args.bits, dtype, device, args.layers,
                                getattr(args, "cpu_kernel", "exact"), getattr(args, "fuse", False),
                                getattr(args, "head_dtype", None))
    else:
        model = load_model(args.path, dtype=args.act, device=device, head_dtype=args.head_dtype,
                           cpu_kernel=getattr(args, "cpu_kernel", "exact"), fuse=getattr(args, "fuse", False))
    quant = [m for m in model.layers.modules() if isinstance(m, QuantLinear)]  # the blocks' linears only
    lin = [m for m in model.layers.modules() if isinstance(m, torch.nn.Linear)]
    layer_bytes = sum(sum(b.numel() * b.element_size() for b in m.buffers()) for m in quant) + \
        sum(sum(p.numel() * p.element_size() for p in m.parameters()) for m in lin)
    head_bytes = sum(t.numel() * t.element_size() for t in list(model.lm_head.parameters()) +
                     list(model.lm_head.buffers()))
    out = {"weight_bytes": weight_bytes(model), "block_linear_bytes": layer_bytes, "head_bytes": head_bytes,
           "threads": torch.get_num_threads(), "contexts": {}}
    out["head_share"] = round(out["head_bytes"] / out["weight_bytes"], 3)
    prompts = json.loads(Path(args.prompts).read_text())
    if args.prefill:  # prompt processing alone: a fresh cache, the prompt in one forward pass, the first token
        prompt = prompts["prefill"]
        generate(model, [prompt[:32]], max_new_tokens=1)  # warm-up
        times = [generate(model, [prompt], max_new_tokens=1)[1].prefill_s for _ in range(args.prefill_reps)]
        out["prefill"] = {"tokens": len(prompt), "median_s": round(statistics.median(times), 4),
                          "tokens_per_s": round(len(prompt) / statistics.median(times), 1),
                          "runs_s": [round(t, 4) for t in times]}
    for ctx in args.contexts:
        prompt = prompts[str(ctx)]
        # warm-up (allocator, kernels, threads; with compile: the compilation, whose cache later rounds reuse)
        graph = getattr(args, "cuda_graph", None)  # None: generate's default (CUDA graphs on a GPU)
        generate(model, [prompt[:16]], max_new_tokens=4, compile=args.compile, cuda_graph=graph)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _, stats = generate(model, [prompt], max_new_tokens=args.steps + 1, compile=args.compile, cuda_graph=graph)
        out["contexts"][ctx] = {"prefill_ms": round(stats.prefill_s * 1000, 2),
                                "median_ms_per_token": round(stats.median_ms, 3),
                                "p90_ms_per_token": round(1000 * statistics.quantiles(stats.step_s, n=10)[-1], 3),
                                "kv_cache_bytes": stats.kv_cache_bytes}
        if device.type == "cuda":
            out["contexts"][ctx]["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu (default) or cuda")
    p.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"), help="full-precision checkpoint")
    p.add_argument("--q4", default=None, help="4-bit GPTQ checkpoint of --model")
    p.add_argument("--q3", default=None, help="3-bit GPTQ checkpoint of --model")
    p.add_argument("--synthetic", choices=sorted(SYNTHETIC), default=None,
                   help="random weights with this model's real shapes instead of checkpoints (GPU)")
    p.add_argument("--layers", type=int, default=None, help="with --synthetic: build only this many blocks and "
                                                            "project the per-token time to the full depth")
    p.add_argument("--contexts", default="128,512,1024",
                   help="prompt lengths before decoding (default 128,512,1024; empty: no decode)")
    p.add_argument("--prefill", type=int, default=0,
                   help="also time the prefill of a prompt of this many tokens alone (e.g. 512): tokens/s")
    p.add_argument("--prefill-reps", type=int, default=3, help="prefill runs per round, median (default 3)")
    p.add_argument("--bits", default="4,3", help="with --synthetic: the packed widths to build (default 4,3)")
    p.add_argument("--no-fp", action="store_true", help="skip the full-precision fp32 / bf16 variants")
    p.add_argument("--copy-mib", type=int, default=1024, help="MiB of the memory copy timed in the same run "
                                                              "(default 1024; 0 = none)")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per context (default 32)")
    p.add_argument("--rounds", type=int, default=3,
                   help="repeat every variant this many times in alternating order; report the median (default 3)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (default: all)")
    p.add_argument("--head-dtype", default="bf16", choices=["fp32", "fp16", "bf16", "int8"],
                   help="dtype of the embedding/lm_head for the quantized variants on CPU (default bf16)")
    p.add_argument("--cpu-kernels", default="exact,int8",
                   help="CPU kernels to run the GPTQ checkpoints with: exact (fp32 arithmetic, one call per linear) "
                        "and/or int8 (int8 activations, VNNI, fused q/k/v and gate/up); default exact,int8")
    p.add_argument("--compile", action="store_true",
                   help="also run the quantized variants (and the full-precision baseline) with the decode step "
                        "compiled by torch.compile")
    p.add_argument("--eager-too", action="store_true",
                   help="on CUDA, also run every variant with its decode steps launched one by one instead of replayed "
                        "from a CUDA graph (generate --no-cuda-graph), side by side")
    p.add_argument("--llamacpp", default=None, metavar="GGUF",
                   help="also measure llama.cpp on this GGUF file with the same prompts (CPU)")
    p.add_argument("--llamacpp-python", default=str(ROOT / ".venv-llamacpp" / "bin" / "python"),
                   help="interpreter of the venv that has llama-cpp-python (default .venv-llamacpp/bin/python)")
    p.add_argument("--gptqmodel", action="store_true",
                   help="also measure GPTQModel's CPU decode of the --q4 checkpoint (tools/bench_gptqmodel_decode.py in "
                        "the peer venv .venv-peer)")
    p.add_argument("--memory-plan", action="store_true",
                   help="with --synthetic: no timing; the full model's weight bytes in fp16 / 4-bit / 3-bit and the "
                        "80 GiB GPUs they need (with the fp16 KV cache of the full context), from the shapes alone; "
                        "writes bench/results/memory_<model>.json")
    p.add_argument("--write-checkpoint", default=None, metavar="DIR",
                   help="with --synthetic (a Llama shape): no timing; write a random-init fp16 Hugging Face checkpoint "
                        "of that shape to DIR (for `minigptq.quantize --method rtn` and llama.cpp's converter: the "
                        "same weights in both tools) and exit")
    p.add_argument("--out", default=None, help="result JSON (default bench/results/generate_<device>_<model>.json)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one variant, print JSON
    p.add_argument("--prompts", default=None, help=argparse.SUPPRESS)  # internal: the prompts file of --one
    args = p.parse_args(argv)
    args.contexts = [int(c) for c in args.contexts.split(",") if c]
    if args.write_checkpoint:
        write_checkpoint(args.synthetic, Path(args.write_checkpoint))
        return
    if args.memory_plan:
        if not args.synthetic:
            raise SystemExit("--memory-plan needs --synthetic (one of " + ", ".join(sorted(SYNTHETIC)) + ")")
        plan = dict(benchmark="memory plan", model=args.synthetic, date=date.today().isoformat(),
                    versions={"torch": torch.__version__}, **memory_plan(args.synthetic))
        for label, v in plan["variants"].items():
            print(f"{label:>11}: weights {v['weight_bytes'] / 2**30:7.1f} GiB -> {v['gpus_needed']} x "
                  f"{plan['gpu_gib']} GiB GPUs (with a {plan['kv_cache_bytes_full_context'] / 2**30:.1f} GiB KV cache)")
        out = Path(args.out or ROOT / "bench" / "results" / f"memory_{args.synthetic}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(plan, indent=2) + "\n")
        print(f"wrote {out}")
        return
    if args.one:
        spec = json.loads(args.one)
        for k, v in spec.items():
            setattr(args, k, v)
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    base = "fp32" if args.device == "cpu" else "fp16"
    variants = {base: dict(act=base, path=args.model, bits=None, head_dtype=None, compile=False)}
    if args.device == "cpu":
        variants["bf16"] = dict(act="bf16", path=args.model, bits=None, head_dtype=None, compile=False)
    if args.no_fp:
        variants = {}
    for bits, path in ((4, args.q4), (3, args.q3)):
        if path or (args.synthetic and str(bits) in args.bits.split(",")):
            head = args.head_dtype if args.device == "cpu" else None
            # the fp32 kernels, one call per linear; on the CPU also the int8 kernels with fused q/k/v and gate/up
            variants[f"gptq {bits}-bit"] = dict(act=base, path=path, bits=bits, compile=False, head_dtype=head,
                                                cpu_kernel="exact", fuse=False)
            if "exact" not in args.cpu_kernels.split(","):
                del variants[f"gptq {bits}-bit"]
            if args.device == "cpu" and (not args.synthetic or args.synthetic in RTN_SYNTHETIC) and \
                    "int8" in args.cpu_kernels:
                variants[f"gptq {bits}-bit int8"] = dict(act=base, path=path, bits=bits, compile=False,
                                                         head_dtype=head, cpu_kernel="int8", fuse=True)
    if args.compile:
        variants.update({f"{name} compiled": dict(spec, compile=True) for name, spec in list(variants.items())
                         if name != "bf16"})
    if args.eager_too and args.device == "cuda":
        variants.update({f"{name} eager": dict(spec, cuda_graph=False) for name, spec in list(variants.items())})
    if args.llamacpp:
        if not Path(args.llamacpp_python).exists():
            raise SystemExit(f"--llamacpp needs llama-cpp-python: {args.llamacpp_python} does not exist (see "
                             f"tools/bench_llamacpp.py for the two commands that make it)")
        variants[f"llama.cpp {Path(args.llamacpp).stem.rsplit('.', 1)[-1]}"] = dict(gguf=args.llamacpp)
    if args.gptqmodel:
        peer = ROOT / ".venv-peer" / "bin" / "python"
        if not args.q4 or not peer.exists():
            raise SystemExit("--gptqmodel needs --q4 and the peer venv .venv-peer (bash tools/install.sh --test)")
        variants["GPTQModel 4-bit"] = dict(peer=str(peer), path=args.q4)
    vocab = SYNTHETIC[args.synthetic]["vocab_size"] if args.synthetic else \
        json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)  # the same random prompts for every variant, llama.cpp included
    prompts_file = Path(tempfile.mkdtemp()) / "prompts.json"
    prompt_ids = {c: [rng.randrange(3, vocab) for _ in range(c)] for c in args.contexts}
    if args.prefill:
        prompt_ids["prefill"] = [rng.randrange(3, vocab) for _ in range(args.prefill)]
    prompts_file.write_text(json.dumps(prompt_ids))
    copy_gbps = [copy_bandwidth(args.copy_mib, args.threads)] if args.copy_mib else []
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):  # alternate the order so a slow spell on a shared machine hits every variant
        for name in (names if r % 2 == 0 else names[::-1]):
            spec = variants[name]
            if "gguf" in spec:
                cmd = [args.llamacpp_python, str(ROOT / "tools" / "bench_llamacpp.py"), spec["gguf"], "--prompts",
                       str(prompts_file), "--steps", str(args.steps), "--threads", str(args.threads)]
            elif "peer" in spec:
                cmd = [spec["peer"], str(ROOT / "tools" / "bench_gptqmodel_decode.py"), spec["path"], "--prompts",
                       str(prompts_file), "--steps", str(args.steps), "--threads", str(args.threads)]
            else:
                cmd = [sys.executable, __file__, "--one", json.dumps(spec), "--device", args.device, "--steps",
                       str(args.steps), "--contexts", ",".join(map(str, args.contexts)), "--threads",
                       str(args.threads), "--prompts", str(prompts_file), "--prefill", str(args.prefill),
                       "--prefill-reps", str(args.prefill_reps)]
            if args.synthetic:
                cmd += ["--synthetic", args.synthetic] + (["--layers", str(args.layers)] if args.layers else [])
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                raise SystemExit(f"variant {name} failed:\n{proc.stderr[-3000:]}")
            res = json.loads(line[7:])
            runs[name].append(res)
            print(f"round {r + 1} {name:>12}: " + ", ".join(
                f"ctx {c}: {v['median_ms_per_token']:.2f} ms/token" for c, v in res["contexts"].items())
                + (f" prefill {res['prefill']['tokens_per_s']:.1f} tokens/s" if "prefill" in res else "")
                + f" | weights {res['weight_bytes'] / 2**20:.1f} MiB ({time.perf_counter() - t:.0f}s)", flush=True)
        if args.copy_mib:
            copy_gbps.append(copy_bandwidth(args.copy_mib, args.threads))
    results = {}
    for name, rs in runs.items():  # per context: the median over rounds of each round's median step time
        results[name] = dict(rs[0], peak_rss_bytes=max(x["peak_rss_bytes"] for x in rs))
        if "prefill" in rs[0]:
            per_round = [x["prefill"]["tokens_per_s"] for x in rs]
            results[name]["prefill"] = dict(rs[0]["prefill"], tokens_per_s=statistics.median(per_round),
                                            rounds_tokens_per_s=per_round)
        for c in results[name]["contexts"]:
            per_round = [x["contexts"][c]["median_ms_per_token"] for x in rs]
            results[name]["contexts"][c] = dict(rs[0]["contexts"][c], median_ms_per_token=statistics.median(per_round),
                                                rounds_ms_per_token=per_round)
    base = base if base in results else next(iter(results))  # --no-fp: ratios against the first variant
    copy = statistics.median(copy_gbps) if copy_gbps else None
    for name, r in results.items():
        r["speedup_vs_" + base] = {c: round(results[base]["contexts"][c]["median_ms_per_token"] /
                                            v["median_ms_per_token"], 2) for c, v in r["contexts"].items()}
        if "prefill" in r:
            r["prefill"]["speedup_vs_" + base] = round(r["prefill"]["tokens_per_s"] /
                                                       results[base]["prefill"]["tokens_per_s"], 2)
        if "block_linear_bytes" in r:  # llama.cpp and GPTQModel report their whole model size only
            r["block_linear_bytes_ratio_vs_" + base] = round(results[base]["block_linear_bytes"] /
                                                              r["block_linear_bytes"], 2)
            for v in r["contexts"].values():  # bytes a decode step must read: the blocks' weights and the head
                gbps = (r["block_linear_bytes"] + r["head_bytes"]) / (v["median_ms_per_token"] / 1000) / 1e9
                v["achieved_GBps"] = round(gbps, 2)
                if copy:
                    v["fraction_of_copy"] = round(gbps / copy, 3)
    if args.synthetic and args.layers:
        full = SYNTHETIC[args.synthetic]["num_layers"]
        note = (f"built {args.layers} of {full} blocks; the full model's per-token time is projected as "
                f"t(layers) * {full}/{args.layers} (embedding/head time included once, a slight overestimate)")
        for r in results.values():
            for v in r["contexts"].values():
                v["projected_full_ms_per_token"] = round(v["median_ms_per_token"] * full / args.layers, 2)
            if "prefill" in r:
                r["prefill"]["projected_full_tokens_per_s"] = round(r["prefill"]["tokens_per_s"] * args.layers / full, 1)
    else:
        note = None
    model_name = args.synthetic or Path(args.model).name
    cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), "")
    flags = next((x.split(":", 1)[1].split() for x in open("/proc/cpuinfo") if x.startswith("flags")), [])
    doc = {"benchmark": "generate", "model": model_name, "device": args.device, "date": date.today().isoformat(),
           "machine": {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
                       "simd": [f for f in flags if f.startswith(("avx", "amx")) or f == "fma"],
                       "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
           "copy_GBps": {"median": copy, "runs": copy_gbps, "mib": args.copy_mib,
                         "what": "torch copy_ of a uint8 tensor, bytes read + written / time, best of 5, measured "
                                 "before the variants and after each round"},
           "versions": {"python": platform.python_version(), "torch": torch.__version__},
           "protocol": f"batch 1, greedy, prompt of each context length prefilled, then {args.steps} decode steps "
                       f"timed one by one (synchronised on GPU); median per run, then the median over {args.rounds} "
                       f"rounds run in alternating order; the same random prompts for every variant. 'compiled': "
                       f"decode step through torch.compile (dynamic shapes; on CUDA the static step, captured in the "
                       f"graph), compilation done in a warm-up. On CUDA every decode step is replayed from a CUDA "
                       f"graph captured before the first step, except for 'eager' variants. llama.cpp: "
                       f"tools/bench_llamacpp.py, llama_decode of one token + argmax of the last logits row. "
                       f"GPTQModel: tools/bench_gptqmodel_decode.py, its forward with past_key_values + argmax. "
                       f"'int8': --cpu-kernel int8 with fused q/k/v and gate/up; the plain GPTQ variants run the exact "
                       f"fp32 kernels one linear at a time (the previous code path)",
           "projection": note,
           "results": results}
    out = Path(args.out or ROOT / "bench" / "results" / f"generate_{args.device}_{model_name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
