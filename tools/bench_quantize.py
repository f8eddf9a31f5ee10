"""Quantization memory and time: peak anonymous memory, file pages, wall time -> bench/results/quantize_memory.json.

Each run is a separate process whose /proc/<pid>/status is polled every 20 ms: RssAnon (anonymous memory: what the
process really holds), RssFile (pages of memory-mapped files, e.g. the checkpoint being read: the kernel can drop
them at any time), VmHWM. The anonymous memory at the end of every block (from the driver's progress lines) shows
whether anything accumulates across blocks. Parts (--parts, default all; results of parts not run are kept from the
JSON already there, each run with its own date):
    smollm2    minigptq on SmolLM2-135M-Instruct, 4-bit g128, the quality benchmark's calibration (32 x 512
               wikitext-2 tokens);
    gptqmodel  GPTQModel on the same model and calibration (in the peer venv), for the time ratio;
    big        minigptq on a random-init Llama of 3.2 GB (fp32, 16 blocks of hidden 2048 / intermediate 5504,
               8 x 512 calibration tokens) under a memory cgroup limit (v1 or v2, needs root) of less than half the
               checkpoint (--limit-gib, default 1.4);
    big-free   the same without a limit, activations in fp32 and in bf16 (--act-dtype bf16).
    python tools/bench_quantize.py [--parts smollm2,gptqmodel,big,big-free] [--limit-gib 1.4]
Run it on an otherwise idle machine: the time ratio of the first two parts is the figure that matters.
This is a tool, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
WIKI = SHARED / "data" / "wikitext2" / "wiki.valid.tokens"


def random_llama(out: Path, hidden: int = 2048, inter: int = 5504, layers: int = 16, seed: int = 0, *,
                 heads: int | None = None, kv_heads: int | None = None, vocab: int = 512, tie: bool = True,
                 dtype: torch.dtype = torch.float32) -> Path:
    """A random-init Llama checkpoint (safetensors, stories260k's 512-token tokenizer), written once.

    A vocab larger than the tokenizer's 512 pieces is allowed: the extra ids are valid model inputs (benchmarks feed
    random ids) and llama.cpp's converter pads its vocabulary with [PAD] entries for them.
    """
    from safetensors.torch import save_file
    if (out / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    heads = heads or hidden // 128
    kv_heads, head_dim = kv_heads or heads, hidden // heads
    sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.02,
          "model.norm.weight": torch.ones(hidden)}
    if not tie:
        sd["lm_head.weight"] = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5
    for i in range(layers):
        p = f"model.layers.{i}."
        kv = kv_heads * head_dim
        for name, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (kv, hidden)),
                            ("self_attn.v_proj", (kv, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                            ("mlp.down_proj", (hidden, inter))):
            sd[p + name + ".weight"] = torch.randn(*shape, generator=g) / shape[1] ** 0.5
        sd[p + "input_layernorm.weight"] = torch.ones(hidden)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    sd = {k: v.to(dtype) for k, v in sd.items()}
    tmp = out / "model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
        torch_dtype=str(dtype).removeprefix("torch."))))
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (out / name).write_bytes((SHARED / "models" / "stories260k" / name).read_bytes())
    os.replace(tmp, out / "model.safetensors")  # last: its presence means the folder is complete
    return out


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in open(f"/proc/{pid}/status"):
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


class Cgroup:
    """A child memory cgroup of this process's own (v1 or v2) with a limit; `add(pid)` moves a process into it."""

    def __init__(self, limit_bytes: int):
        path = {c: p for _, c, p in (line.rstrip("\n").split(":", 2) for line in open("/proc/self/cgroup"))}
        if "memory" in path:
            self.dir, self.limit_file = Path(f"/sys/fs/cgroup/memory{path['memory']}") / "minigptq-bench", \
                "memory.limit_in_bytes"
        else:
            self.dir, self.limit_file = Path(f"/sys/fs/cgroup{path['']}") / "minigptq-bench", "memory.max"
        self.dir.mkdir(exist_ok=True)
        (self.dir / self.limit_file).write_text(str(limit_bytes))
        if self.limit_file == "memory.limit_in_bytes":  # no swap either, where the kernel offers the knob
            try:
                (self.dir / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
            except OSError:
                pass

    def add(self, pid: int) -> None:
        (self.dir / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        try:
            self.dir.rmdir()
        except OSError:
            pass


def measured(cmd: list[str], cgroup_bytes: int | None = None, cwd=ROOT, env=None) -> dict:
    """Run cmd, polling its memory; -> wall time, peaks, per-block anonymous memory, exit code, output tail."""
    cg = Cgroup(cgroup_bytes) if cgroup_bytes else None
    t0 = time.perf_counter()
    # The child waits on stdin until it is in the cgroup, so none of its memory is charged elsewhere.
    proc = subprocess.Popen(["/bin/sh", "-c", 'read _; exec "$@"', "sh", *cmd], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env)
    if cg:
        cg.add(proc.pid)
    proc.stdin.write("go\n")
    proc.stdin.close()
    peak = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    blocks, lines = [], []

    def read_err():  # one merged stream, always drained: a full pipe would stop the child
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"block (\d+)/(\d+) done", line)
            if m:
                blocks.append(dict(block=int(m.group(1)), rss_anon=_status(proc.pid).get("RssAnon", 0),
                                   seconds=round(time.perf_counter() - t0, 1)))
    reader = threading.Thread(target=read_err, daemon=True)
    reader.start()
    while proc.poll() is None:
        for k, v in _status(proc.pid).items():
            peak[k] = max(peak[k], v)
        time.sleep(0.02)
    reader.join(5)
    wall = time.perf_counter() - t0
    if cg:
        cg.close()
    return dict(exit_code=proc.returncode, wall_s=round(wall, 1), peak_rss_anon=peak["RssAnon"],
                peak_rss_file=peak["RssFile"], peak_vm_hwm=peak["VmHWM"], per_block=blocks,
                output_tail="".join(lines[-3:])[-600:])


PARTS = ("smollm2", "gptqmodel", "big", "big-free")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smollm2", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"), help="SmolLM2 checkpoint")
    p.add_argument("--work", default=str(ROOT / "models" / "bench_quantize"), help="folder for the models written")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--limit-gib", type=float, default=1.4, help="cgroup memory limit for the big model (GiB)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the SmolLM2 pair (median; default 3)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "quantize_memory.json"), help="result JSON")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    if not parts or any(x not in PARTS for x in parts):
        p.error(f"--parts {args.parts!r}: choose from {', '.join(PARTS)}")
    from minigptq.checkpoint_reader import CheckpointReader
    from minigptq.data import calibration_windows, tokenize_file
    from minigptq.memory import peak_bytes
    from minigptq.tokenizer import load_tokenizer
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "minigptq.quantize"]
    out = Path(args.out)
    runs = json.loads(out.read_text())["runs"] if out.exists() else {}
    stamp = time.strftime("%Y-%m-%d %H:%M")

    def quant(name, model, dest, extra=(), cgroup=None):
        cmd = py + ["--model", str(model), "--out", str(dest), "--bits", "4", "--groupsize", "128", "--dataset",
                    str(WIKI), "--overwrite", *extra]
        res = measured(cmd, cgroup)
        ckpt = CheckpointReader(model)
        n, T = int(extra[extra.index("--nsamples") + 1]), int(extra[extra.index("--seqlen") + 1])
        acts = torch.bfloat16 if "bf16" in extra else torch.float32
        budget = peak_bytes(ckpt, n, T, acts)
        res.update(when=stamp, checkpoint_bytes=(Path(model) / "model.safetensors").stat().st_size,
                   budget=dict(budget, total=sum(budget.values())), cgroup_limit_bytes=cgroup,
                   settings=" ".join(extra))
        runs[name] = res
        blocks = [round(b["rss_anon"] / 2**20) for b in res["per_block"]]
        print(f"{name}: exit {res['exit_code']}, {res['wall_s']} s, peak anonymous {res['peak_rss_anon'] / 2**20:.0f} "
              f"MiB (budget {sum(budget.values()) / 2**20:.0f} MiB + interpreter), peak file pages "
              f"{res['peak_rss_file'] / 2**20:.0f} MiB, per block {blocks} MiB", flush=True)
        if res["exit_code"]:
            print(res["output_tail"], flush=True)

    smol = ["--nsamples", "32", "--seqlen", "512"]
    rounds = {"minigptq SmolLM2 4-bit g128": [], "GPTQModel SmolLM2 4-bit g128": []}
    for r in range(args.rounds):  # alternating, so a slow spell of the shared machine hits both
        if "smollm2" in parts:
            quant("minigptq SmolLM2 4-bit g128", args.smollm2, work / "smol-4bit", smol)
            rounds["minigptq SmolLM2 4-bit g128"].append(runs["minigptq SmolLM2 4-bit g128"]["wall_s"])
        if "gptqmodel" in parts:
            peer = ROOT / ".venv-peer" / "bin" / "python"
            tok = load_tokenizer(args.smollm2)
            calib = calibration_windows(tokenize_file(WIKI, tok), 32, 512, seed=0)
            tmp = Path(tempfile.mkdtemp())
            torch.save(calib, tmp / "calib.pt")
            (tmp / "jobs.json").write_text(json.dumps([{"op": "quantize", "model": args.smollm2, "out": str(tmp / "q"),
                                                        "calib": str(tmp / "calib.pt"), "bits": 4, "group_size": 128,
                                                        "sym": True, "desc_act": False}]))
            res = measured([str(peer), str(ROOT / "tests" / "peer_check.py"), str(tmp / "jobs.json")], cwd=tmp,
                           env=dict(os.environ, GPTQMODEL_CPU_WORKERS="2"))
            runs["GPTQModel SmolLM2 4-bit g128"] = dict(res, when=stamp, settings="32 x 512, same windows")
            rounds["GPTQModel SmolLM2 4-bit g128"].append(res["wall_s"])
            print(f"GPTQModel: exit {res['exit_code']}, {res['wall_s']} s, peak anonymous "
                  f"{res['peak_rss_anon'] / 2**20:.0f} MiB", flush=True)
    for name, times in rounds.items():
        if times:
            runs[name].update(wall_s_rounds=times, wall_s=sorted(times)[len(times) // 2])  # the median
    if "big" in parts or "big-free" in parts:
        big = random_llama(work / "random-llama")
        size = (big / "model.safetensors").stat().st_size
        big_args = ["--nsamples", "8", "--seqlen", "512"]
        label = f"minigptq random Llama {size / 1e9:.1f} GB"
    if "big" in parts:
        limit = int(args.limit_gib * 2**30)
        try:
            quant(f"{label} under a {args.limit_gib:g} GiB cgroup limit", big, work / "big-4bit-cg", big_args,
                  cgroup=limit)
        except OSError as e:
            runs["cgroup"] = dict(skipped=f"cannot create a memory cgroup here: {e}")
    if "big-free" in parts:
        quant(label, big, work / "big-4bit", big_args)
        quant(f"{label}, bf16 activations", big, work / "big-4bit-bf16", big_args + ["--act-dtype", "bf16"])
    if "minigptq SmolLM2 4-bit g128" in runs and "GPTQModel SmolLM2 4-bit g128" in runs:
        ratio = runs["GPTQModel SmolLM2 4-bit g128"]["wall_s"] / runs["minigptq SmolLM2 4-bit g128"]["wall_s"]
        runs["GPTQModel SmolLM2 4-bit g128"]["time_ratio_vs_minigptq"] = round(ratio, 2)
        print(f"GPTQModel / minigptq wall time on SmolLM2 (medians): {ratio:.2f}x")
    cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), "")
    doc = dict(benchmark="quantize memory and time", date=date.today().isoformat(),
               machine=dict(cpu=cpu, cores=os.cpu_count(), platform=platform.platform()),
               versions=dict(python=platform.python_version(), torch=torch.__version__),
               method=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1], runs=runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
