"""LoRA fine-tuning over GPTQ weights on SmolLM2-135M-Instruct -> bench/results/lora_smollm2.json.

Parts (--parts, default both):
    memory   the same LoRA (rank 16, all seven linears of every block) trained for --mem-steps steps of --seqlen
             tokens on the 4-bit GPTQ model and on the full-precision model, each in its own process, alternated
             --repeats times: median seconds per step (after the first) -> training tokens/s, and the process's
             memory polled every 20 ms from /proc/<pid>/status (RssAnon: memory the process holds; RssFile: pages of the
             memory-mapped checkpoint; VmHWM: peak resident).
    quality  a real fine-tune: the 4-bit model with a rank-16 adapter on Penn Treebank text (ptb.valid.txt, sentences
             joined by spaces as the paper's code joins the test set), --steps steps; perplexity on held-out PTB
             test windows (--eval-windows x --seqlen tokens) before and after; then the adapter merged into the
             full-precision weights and quantized again (quantize --adapter, the same calibration as the 4-bit
             model), evaluated beside the adapter-on-4-bit model.
    python tools/bench_lora.py --q4 DIR [--fp models/SmolLM2-135M-Instruct] [--parts memory,quality] [--steps 60]
The 4-bit model: python -m minigptq.quantize --model models/SmolLM2-135M-Instruct --bits 4 --dataset
../shared/data/wikitext2/wiki.valid.tokens --nsamples 32 --seqlen 512. This is a tool, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def poll(pid: int, peak: dict, stop: threading.Event) -> None:
    """Keep the largest RssAnon / RssFile (MiB) of process pid in `peak` until stop is set."""
    while not stop.is_set():
        try:
            for line in open(f"/proc/{pid}/status"):
                key, _, val = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmHWM"):
                    peak[key] = max(peak.get(key, 0.0), int(val.split()[0]) / 1024)
        except (FileNotFoundError, ProcessLookupError):
            return
        stop.wait(0.02)


def one_run(model: str, data: Path, out: Path, steps: int, seqlen: int, grad_ckpt: bool) -> dict:
    """Train in a child process (this file with --child) -> its timings and polled memory."""
    cmd = [sys.executable, __file__, "--child", model, str(data), str(out), str(steps), str(seqlen),
           str(int(grad_ckpt))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, stop = {}, threading.Event()
    t = threading.Thread(target=poll, args=(proc.pid, peak, stop), daemon=True)
    t.start()
    stdout, stderr = proc.communicate()
    stop.set()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"training {model} failed: {stderr[-2000:]}")
    res = json.loads(stdout.strip().splitlines()[-1])
    return {**res, "peak_rss_anon_mib": round(peak.get("RssAnon", 0), 1),
            "peak_rss_file_mib": round(peak.get("RssFile", 0), 1), "vm_hwm_mib": round(peak.get("VmHWM", 0), 1)}


def child(model: str, data: str, out: str, steps: int, seqlen: int, grad_ckpt: bool) -> None:
    from minigptq.finetune import TrainConfig, finetune
    marks = []
    cfg = TrainConfig(rank=16, alpha=32, targets=TARGETS, steps=steps, seqlen=seqlen, lr=5e-4,
                      grad_checkpoint=grad_ckpt)
    stats = finetune(model, data, out, cfg, save_every=10**6, log=lambda m: marks.append(time.perf_counter()))
    step_s = [b - a for a, b in zip(marks[1:], marks[2:])]  # marks[0]: the start line; the first step warms up
    print(json.dumps({"median_step_s": statistics.median(step_s), "tokens_per_s": seqlen / statistics.median(step_s),
                      "final_loss": stats["loss"], "steps": steps, "seqlen": seqlen}))


def ptb_text(name: str) -> str:
    lines = (SHARED / "data" / "ptb" / name).read_text().splitlines()
    return " ".join(line.strip() for line in lines if line.strip())


def ppl(model_path: str, windows: torch.Tensor, adapter=None) -> float:
    from minigptq import load_model
    from minigptq.eval import perplexity
    with torch.inference_mode():
        return perplexity(load_model(model_path, dtype="fp32", adapter=adapter), windows)


def quality(args, tmp: Path, res: dict) -> None:
    """Fills res as it goes (an interrupted run keeps what was measured)."""
    from minigptq import load_tokenizer
    from minigptq.data import eval_windows
    from minigptq.finetune import TrainConfig, finetune
    from minigptq.quantize import quantize_model
    from minigptq.quantizer import QuantConfig
    train = tmp / "ptb_train.txt"
    train.write_text(ptb_text("ptb.valid.txt"))
    tok = load_tokenizer(args.q4)
    test = torch.tensor(tok.encode(ptb_text("ptb.test.txt"), bos=False), dtype=torch.long)
    windows = eval_windows(test, args.seqlen, args.eval_windows)
    res.update(model_4bit=f"{Path(args.q4).name} (python -m minigptq.quantize, 4-bit g128)",
               eval=f"{len(windows)} windows x {args.seqlen} tokens of ptb.test.txt",
               train=f"ptb.valid.txt, {args.steps} steps x 1 x {args.seqlen} tokens, rank 16, alpha 32, lr 5e-4, "
                     f"all seven linears")
    res["ppl_fp32"] = ppl(args.fp, windows)
    res["ppl_4bit"] = ppl(args.q4, windows)
    t0 = time.perf_counter()
    adapter = tmp / "adapter"
    cfg = TrainConfig(rank=16, alpha=32, targets=TARGETS, steps=args.steps, seqlen=args.seqlen, lr=5e-4)
    stats = finetune(args.q4, train, adapter, cfg, save_every=10**6, log=lambda m: print(m, file=sys.stderr))
    res["train_seconds"], res["train_final_loss"] = round(time.perf_counter() - t0, 1), stats["loss"]
    res["ppl_4bit_adapter"] = ppl(args.q4, windows, adapter)
    res["peft_interop"] = peft_interop(args.q4, adapter, windows[:2, :64], tmp)
    res["decode"] = decode(args.q4, adapter, tok)
    res["ppl_fp32_adapter"] = ppl(args.fp, windows, adapter)  # the adapter on the full-precision weights, unquantized
    if args.merge_nsamples == 0:
        return
    merged = quantize_model(args.fp, tmp / "merged-q4", qcfg=QuantConfig(bits=4, group_size=128), adapter=adapter,
                            dataset=str(SHARED / "data" / "wikitext2" / "wiki.valid.tokens"),
                            nsamples=args.merge_nsamples, seqlen=512, log=lambda m: print(m, file=sys.stderr))
    res["merge_calibration"] = f"wiki.valid.tokens, {args.merge_nsamples} x 512, 4-bit g128"
    res["ppl_merged_then_4bit"] = ppl(str(merged), windows)


def peft_interop(q4: str, adapter: Path, tokens: torch.Tensor, tmp: Path) -> dict:
    """The trained adapter on the 4-bit model in transformers + PEFT (peer venv, GPTQ torch backend, fp16) vs here."""
    from minigptq import load_model
    peer = ROOT / ".venv-peer" / "bin" / "python"
    if not peer.exists():
        return {"skipped": "no .venv-peer"}
    torch.save(tokens, tmp / "tokens.pt")
    (tmp / "jobs.json").write_text(json.dumps([{"op": "logits", "model": q4, "adapter": str(adapter),
                                                "tokens": str(tmp / "tokens.pt"), "out": str(tmp / "peer.pt")}]))
    r = subprocess.run([str(peer), str(ROOT / "tests" / "peer_lora.py"), str(tmp / "jobs.json")], capture_output=True,
                       text=True, env=dict(os.environ, GPTQMODEL_CPU_WORKERS="2"))
    if r.returncode != 0:
        return {"failed": r.stderr[-1000:]}
    theirs = torch.load(tmp / "peer.pt")
    with torch.inference_mode():
        ours = load_model(q4, dtype="fp32", cpu_kernel="exact", adapter=adapter)(tokens).float()
        base = load_model(q4, dtype="fp32", cpu_kernel="exact")(tokens).float()
    return {"tokens": list(tokens.shape), "max_abs_logit_diff": (ours - theirs).abs().max().item(),
            "max_abs_logit": theirs.abs().max().item(), "adapter_effect_max_abs": (ours - base).abs().max().item(),
            "argmax_agreement": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
            "note": "peer computes the GPTQ base in fp16, minigptq in fp32 (exact kernel)"}


def decode(q4: str, adapter: Path, tok) -> dict:
    """Median ms per decoded token (batch 1, greedy, 64 tokens after a short prompt) without and with the adapter,
    alternated: the adapter's cost on the CPU decode path (no one-call C++ block; fused kernels + LoRA slices)."""
    from minigptq import load_model
    from minigptq.generation import generate
    models = {"4bit": load_model(q4, dtype="fp32"), "4bit+adapter": load_model(q4, dtype="fp32", adapter=adapter)}
    ids = tok.encode("The stock market closed higher on Tuesday as investors")
    ms = {k: [] for k in models}
    for _ in range(3):
        for k, m in models.items():
            ms[k].append(generate(m, [ids], max_new_tokens=64)[1].median_ms)
    return {k: round(min(v), 3) for k, v in ms.items()}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5], int(sys.argv[5]), int(sys.argv[6]), sys.argv[7] == "1")
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--q4", required=True, help="4-bit GPTQ SmolLM2 checkpoint")
    p.add_argument("--fp", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--parts", default="memory,quality",
                   help="comma-separated: memory (SmolLM2), memory-1b (a random TinyLlama-shape 1.1B model, built and "
                        "quantized here, where the weights are most of the memory), quality")
    p.add_argument("--grad-checkpoint", action="store_true", help="memory parts: recompute each block in backward "
                                                                  "(both models alike)")
    p.add_argument("--work", default=str(ROOT / "models" / "bench_lora"),
                   help="folder for the synthetic 1.1B model and its 4-bit checkpoint (kept between runs; ~5 GB)")
    p.add_argument("--steps", type=int, default=60, help="fine-tuning steps of the quality part")
    p.add_argument("--mem-steps", type=int, default=6, help="steps per run of the memory part")
    p.add_argument("--repeats", type=int, default=2, help="alternated runs per model in the memory part")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--merge-nsamples", type=int, default=32,
                   help="calibration windows (x 512 tokens) of the merge-then-quantize run (the 4-bit model: 32; "
                        "0 = skip it)")
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora_smollm2.json"))
    args = p.parse_args()
    parts = args.parts.split(",")
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), "")
    doc.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               machine=dict(cpu=cpu, cores=os.cpu_count(), platform=platform.platform(),
                            note="shared with other jobs while measured: times are noisy"),
               versions=dict(python=platform.python_version(), torch=torch.__version__))
    try:
        run_parts(args, parts, doc)
    finally:  # also after Ctrl-C: what was measured is kept
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
        print(json.dumps(doc, indent=2))


def memory(args, q4: str, fp: str, data: Path, tmp: Path) -> dict:
    """The same LoRA trained on q4 and on fp, alternated --repeats times -> runs, and the ratios of the fastest."""
    runs = {"4bit": [], "fp32": []}
    for r in range(args.repeats):
        for name, model in (("4bit", q4), ("fp32", fp)):
            runs[name].append(one_run(model, data, tmp / f"{name}-{r}", args.mem_steps, args.seqlen,
                                      args.grad_checkpoint))
            print(name, runs[name][-1], file=sys.stderr)
    best = {k: min(v, key=lambda x: x["median_step_s"]) for k, v in runs.items()}
    return dict(runs=runs, setup=f"rank 16 on {', '.join(TARGETS)}; {args.mem_steps} steps x 1 x {args.seqlen} "
                                 f"tokens; fp32 activations; gradient checkpointing "
                                 f"{'on' if args.grad_checkpoint else 'off'} (both alike)",
                # the fp32 weights are pages of the mapped checkpoint (RssFile), so peak RSS (VmHWM) is the figure to
                # compare, not RssAnon alone
                peak_rss_ratio_4bit_over_fp32=best["4bit"]["vm_hwm_mib"] / best["fp32"]["vm_hwm_mib"],
                speed_ratio_fp32_over_4bit=best["fp32"]["tokens_per_s"] / best["4bit"]["tokens_per_s"])


def synthetic_1b(work: Path) -> tuple[Path, Path]:
    """A random-init TinyLlama-shape checkpoint and its 4-bit RTN quantization, made once in `work`."""
    from bench_quantize import random_llama
    fp = random_llama(work / "llama-1.1b-random", hidden=2048, inter=5632, layers=22)
    q4 = work / "llama-1.1b-random-4bit-rtn"
    if not (q4 / "model.safetensors").exists():
        subprocess.run([sys.executable, "-m", "minigptq.quantize", "--model", str(fp), "--out", str(q4), "--bits", "4",
                        "--groupsize", "128", "--method", "rtn", "--overwrite", "--quiet"],  # RTN reads no data
                       check=True, cwd=ROOT)
    return fp, q4


def run_parts(args, parts: list[str], doc: dict) -> None:
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        data = tmp / "ptb_train.txt"
        data.write_text(ptb_text("ptb.valid.txt"))
        if "memory" in parts:
            doc["memory"] = memory(args, args.q4, args.fp, data, tmp)
        if "memory-1b" in parts:
            fp, q4 = synthetic_1b(Path(args.work))
            doc["memory_1b"] = {"model": "random-init Llama, TinyLlama-1.1B shape (hidden 2048, MLP 5632, 22 layers, "
                                         "16 heads of 128, no GQA) with stories260k's 512-token vocabulary; "
                                         "4-bit RTN g128",
                                **memory(args, str(q4), str(fp), data, tmp)}
        if "quality" in parts:
            doc["quality"] = {}
            quality(args, tmp, doc["quality"])


if __name__ == "__main__":
    main()
