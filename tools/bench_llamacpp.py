"""llama.cpp's decode speed on a GGUF file, measured the way tools/bench_generate.py measures minigptq.

Run by bench_generate.py (`--llamacpp FILE.gguf`) with the interpreter of a separate virtual environment that has
llama-cpp-python (minigptq itself never depends on it):

    python3 -m venv .venv-llamacpp && CMAKE_ARGS="-DGGML_NATIVE=ON" .venv-llamacpp/bin/pip install llama-cpp-python
    .venv/bin/python tools/bench_generate.py ... --llamacpp models/.cache/SmolLM2-135M-Instruct.Q4_1.gguf

Same protocol: batch 1, the same random prompt of each context length (token ids written by the caller),
prefill, then one greedy token per step through llama.cpp's own C API (llama_decode + the last row of logits), each step
timed, median reported. Prints one line `RESULT {json}` with the fields bench_generate.py reads.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("gguf", help="GGUF model file")
    p.add_argument("--prompts", required=True, help="JSON file: {context length: [token ids]}")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per context (default 32)")
    p.add_argument("--threads", type=int, required=True, help="CPU threads for llama.cpp")
    args = p.parse_args(argv)

    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    prompts = {int(k): v for k, v in json.loads(Path(args.prompts).read_text()).items()}
    n_ctx = max(prompts) + args.steps + 8
    llm = Llama(model_path=args.gguf, n_ctx=n_ctx, n_batch=min(n_ctx, 2048), n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)
    n_vocab = llm.n_vocab()

    def step(tokens: list[int]) -> int:
        """Decode `tokens` after what is in the cache; the greedy next token from the last row of logits."""
        llm.eval(tokens)
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(row.argmax())

    out = {"weight_bytes": int(llama_cpp.llama_model_size(llm.model)), "threads": args.threads,
           "llama_cpp_python": llama_cpp.__version__,
           "system_info": llama_cpp.llama_print_system_info().decode().strip(), "contexts": {}}
    warm = next(iter(prompts.values()))[:16]
    llm.reset()
    step(warm)
    for _ in range(4):  # warm-up (threads, buffers)
        step([1])
    for ctx, prompt in prompts.items():
        llm.reset()  # the KV cache is reused from slot 0
        t = time.perf_counter()
        tok = step(prompt)
        prefill = time.perf_counter() - t
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            tok = step([tok])
            times.append(time.perf_counter() - t)
        out["contexts"][str(ctx)] = {"prefill_ms": round(prefill * 1000, 2),
                                     "median_ms_per_token": round(1000 * statistics.median(times), 3),
                                     "p90_ms_per_token": round(1000 * statistics.quantiles(times, n=10)[-1], 3)}
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
