"""GPTQModel's CPU decode speed on a GPTQ checkpoint, measured the way tools/bench_generate.py measures minigptq.

Run by bench_generate.py (`--gptqmodel`) with the interpreter of the peer venv (.venv-peer: transformers +
GPTQModel, made by ../shared/tools/install_peer.sh), which minigptq itself never depends on.

Same protocol: batch 1, the same random prompt of each context length (token ids written by the caller), prefill,
then one greedy token per step through the model's forward with its KV cache (past_key_values), each step timed,
median reported. GPTQModel loads the checkpoint with the backend given, activations in the dtype given.
Prints one line `RESULT {json}` with the fields bench_generate.py reads.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="GPTQ checkpoint folder")
    p.add_argument("--prompts", required=True, help="JSON file: {context length: [token ids]}")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per context (default 32)")
    p.add_argument("--threads", type=int, required=True, help="CPU threads")
    p.add_argument("--backend", default="TORCH",
                   help="GPTQModel backend, a gptqmodel.BACKEND name (default TORCH: its fused CPU backends, "
                        "TORCH_FUSED and TORCH_CPU_AVX512, refuse layers whose inputs are not a multiple of the group "
                        "size, e.g. SmolLM2's 576 with groups of 128)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="activation dtype GPTQModel runs in (default bfloat16, its CPU default)")
    args = p.parse_args(argv)
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(args.threads))
    import torch
    from gptqmodel import BACKEND, GPTQModel
    import gptqmodel
    torch.set_num_threads(args.threads)
    model = GPTQModel.load(args.model, backend=BACKEND[args.backend], device="cpu", dtype=getattr(torch, args.dtype))
    model.eval()
    prompts = {int(k): v for k, v in json.loads(Path(args.prompts).read_text()).items()}
    kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})

    @torch.inference_mode()
    def run(prompt, steps):
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, int(out.logits[0, -1].argmax())
            times.append(time.perf_counter() - t)
        return times

    run(next(iter(prompts.values()))[:16], 4)  # warm-up
    result = {"threads": args.threads, "gptqmodel": gptqmodel.__version__, "torch": torch.__version__,
              "dtype": args.dtype, "backend": args.backend, "kernels": kernels, "contexts": {}}
    for ctx, prompt in prompts.items():
        t = time.perf_counter()
        times = run(prompt, args.steps)
        total = time.perf_counter() - t
        result["contexts"][str(ctx)] = {"prefill_ms": round(1000 * (total - sum(times)), 2),
                                        "median_ms_per_token": round(1000 * statistics.median(times), 3),
                                        "p90_ms_per_token": round(1000 * statistics.quantiles(times, n=10)[-1], 3)}
    result["weight_bytes"] = sum(t.numel() * t.element_size() for t in
                                 list(model.parameters()) + list(model.buffers()))
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
