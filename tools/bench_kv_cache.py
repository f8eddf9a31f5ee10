"""The KV cache in fp32 vs fp16 vs bf16 on the CPU (--kv-dtype), on a SmolLM2 4-bit GPTQ checkpoint with fp32
activations -> bench/results/kv_cache_cpu.json:
- bytes per cached token, and the cache's bytes for a generate() run (what `python -m minigptq.generate` reports);
- greedy tokens on the 5 standard prompts (tools/bench_int8_greedy.py's), 32 new tokens: how many leading tokens
  equal the fp32 cache's;
- logits: the fp32-cache greedy continuation fed back step by step (teacher forcing) through each cache; the largest
  absolute logit difference to the fp32 cache over all steps and prompts, and whether every step's argmax agrees;
- decode ms/token at contexts 128 and 512 (random prompt tokens, then 32 greedy steps, median), the dtypes
  alternated over `--rounds` rounds in one process; the best (lowest) median of the rounds is reported, with every
  round kept;
- the attention alone (cpu_attn_decode, the model's shapes, every layer once = one token) at contexts 128, 512, 2048.
    python tools/bench_kv_cache.py [--model DIR] [--rounds 3] [--threads 1]
This is a tool, not a test. The machine is shared: with --threads 1 (default) every step runs on the calling thread,
so its CPU time (time.thread_time) is reported beside the wall time; CPU time does not count the time the thread
waited for a core, wall time does (loadavg is recorded). With 2 threads on an overloaded machine every OpenMP
barrier waits for a descheduled thread."""
import argparse
import datetime
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from minigptq import __version__  # noqa: E402
from minigptq.durable import write_json  # noqa: E402
from minigptq.kernels import cpu_attn_decode  # noqa: E402
from minigptq.generation import generate  # noqa: E402
from minigptq.kv_cache import KV_DTYPES, KVCache  # noqa: E402
from minigptq.loader import load_model  # noqa: E402
from minigptq.tokenizer import load_tokenizer  # noqa: E402

PROMPTS = ["The capital of France is", "In 1905, Albert Einstein published", "The best way to learn a language is",
           "def fibonacci(n):", "Water boils at"]
DEFAULT_MODEL = "models/bench_quality/minigptq-gptq-gar-4bit-g128-damp0.05"


@torch.inference_mode()
def forced_logits(model, prompt: list[int], cont: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Logits (len(cont), V) of the prompt's last token and of each token of cont fed back one at a time."""
    cache = KVCache(model.cfg, 1, len(prompt) + len(cont), dtype, "cpu")
    out = [model(torch.tensor([prompt]), cache, 0, last_only=True)[0, -1]]
    for i, t in enumerate(cont[:-1]):
        out.append(model(torch.tensor([[t]]), cache, len(prompt) + i)[0, -1])
    return torch.stack(out)


def attention_ms(cfg, S: int, dtype: torch.dtype, reps: int = 20) -> float:
    """Median ms of one token's attention over S cached slots in every layer (cpu_attn_decode, RoPE included)."""
    g = torch.Generator().manual_seed(0)
    H, KVH, hd, L = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    k_cache = torch.randn(L, 1, KVH, S + 1, hd, generator=g).to(dtype)
    v_cache = torch.randn(L, 1, KVH, S + 1, hd, generator=g).to(dtype)
    q, k, v = (torch.randn(1, 1, n * hd, generator=g) for n in (H, KVH, KVH))
    cos, sin = torch.ones(1, 1, 1, hd), torch.zeros(1, 1, 1, hd)
    times = []
    for _ in range(reps):
        t = time.thread_time()
        for layer in range(L):
            cpu_attn_decode(q, k, v, H * hd, KVH * hd, hd, cos, sin, k_cache, v_cache, layer, None, H, S)
        times.append(time.thread_time() - t)
    return round(1000 * statistics.median(times), 4)


@torch.inference_mode()
def decode_ms(model, prompt: list[int], steps: int, dtype: torch.dtype) -> tuple[float, float]:
    """(median CPU ms, median wall ms) of greedy decode steps after a prefill of `prompt`, through a cache of dtype."""
    cache = KVCache(model.cfg, 1, len(prompt) + steps + 1, dtype, "cpu")
    nxt = model(torch.tensor([prompt]), cache, 0, last_only=True)[0, -1].argmax()
    cpu, wall = [], []
    for i in range(steps):
        t, w = time.thread_time(), time.perf_counter()
        nxt = model(nxt.view(1, 1), cache, len(prompt) + i)[0, -1].argmax()
        cpu.append(time.thread_time() - t)
        wall.append(time.perf_counter() - w)
    return round(1000 * statistics.median(cpu), 3), round(1000 * statistics.median(wall), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/kv_cache_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype="fp32")
    tok = load_tokenizer(args.model)
    cfg = model.cfg
    names = list(KV_DTYPES)  # fp32, fp16, bf16
    per_token = {n: 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * KV_DTYPES[n].itemsize for n in names}

    rng = random.Random(0)
    speed = {}
    for ctx in (128, 512):
        prompt = [rng.randrange(3, cfg.vocab_size) for _ in range(ctx)]
        rounds = {n: [] for n in names}
        for _ in range(args.rounds):
            for n in names:
                rounds[n].append(decode_ms(model, prompt, args.new_tokens, KV_DTYPES[n]))
        speed[str(ctx)] = {n: dict(cpu_ms_per_token=min(c for c, _ in r), wall_ms_per_token=min(w for _, w in r),
                                   rounds_cpu_wall=r) for n, r in rounds.items()}
        print(ctx, {n: speed[str(ctx)][n]["cpu_ms_per_token"] for n in names}, flush=True)

    attention = {}
    for S in (128, 512, 2048):
        rounds = {n: [] for n in names}
        for _ in range(args.rounds):
            for n in names:
                rounds[n].append(attention_ms(cfg, S, KV_DTYPES[n]))
        attention[str(S)] = {n: dict(cpu_ms_per_token=min(r), rounds=r) for n, r in rounds.items()}
        print("attention", S, {n: min(r) for n, r in rounds.items()}, flush=True)

    ids = [tok.encode(p) for p in PROMPTS]
    greedy = {n: [] for n in names}
    cache_bytes = {n: [] for n in names}  # per prompt: GenerationStats.kv_cache_bytes, what generate reports
    for n in names:
        for p in ids:
            new, stats = generate(model, [p], max_new_tokens=args.new_tokens, kv_dtype=n)
            greedy[n].append(new[0])
            cache_bytes[n].append(stats.kv_cache_bytes)
    agreement = {}
    for n in names[1:]:
        rows = []
        for prompt, p, a, b in zip(PROMPTS, ids, greedy["fp32"], greedy[n]):
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            rows.append(dict(prompt=prompt, identical_tokens=same, of=len(a), equal=a == b,
                             text=tok.decode(b) if a != b else None))
        lg = [(forced_logits(model, p, a, torch.float32), forced_logits(model, p, a, KV_DTYPES[n]))
              for p, a in zip(ids, greedy["fp32"])]
        agreement[n] = dict(prompts=rows, all_equal=all(r["equal"] for r in rows),
                            forced_logits_max_abs_diff=max(float((x - y).abs().max()) for x, y in lg),
                            forced_logits_max_abs=max(float(x.abs().max()) for x, _ in lg),
                            forced_argmax_agree=all(bool((x.argmax(-1) == y.argmax(-1)).all()) for x, y in lg))
        print(n, agreement[n]["all_equal"], agreement[n]["forced_logits_max_abs_diff"], flush=True)

    cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), "")
    flags = next((x.split(":", 1)[1].split() for x in open("/proc/cpuinfo") if x.startswith("flags")), [])
    o = model.layers[0].attn.o
    doc = dict(
        benchmark="KV cache dtype on the CPU: bytes, greedy agreement with the fp32 cache, decode ms/token",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=dict(cpu=cpu, isa=[f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "amx_int8")
                                   if f in flags], threads=torch.get_num_threads(), loadavg=os.getloadavg(),
                     python=platform.python_version()),
        versions=dict(torch=torch.__version__, minigptq=__version__),
        model=args.model, activations="fp32", cpu_kernel=getattr(getattr(o, "_layout", None), "cpu_kernel", None),
        new_tokens=args.new_tokens, contexts_note="random prompt tokens of that length, then new_tokens steps",
        bytes_per_token=per_token, generate_kv_cache_bytes_per_prompt=cache_bytes,
        greedy_vs_fp32_cache=agreement, decode=speed, attention_only=attention)
    write_json(Path(args.out), doc)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
