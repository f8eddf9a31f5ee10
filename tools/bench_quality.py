"""Quality benchmark: WikiText-2 and PTB perplexity of RTN, GPTQ and its variants (minigptq) and GPTQModel on one
model, with the quantization time of each (issue 30's table).

Every quantizer gets the *same* calibration windows (WikiText-2 validation, tokenized by minigptq, saved to a file and
handed to GPTQModel as token ids). Every checkpoint is evaluated by minigptq's eval on the first --eval-windows
windows of 2048 tokens of each test set, read as the paper's code reads them (minigptq.data.PRESETS), through the
exact fp32 kernels (the int8 ones, the default where they run, add ~0.4%: bench/results/prefill_cpu.json). Quantization
wall time and peak memory (the quantizing process's own VmHWM) are measured per run.

A cell is METHOD:BITS:GROUP[:DAMP], run in the order given; the JSON is rewritten after every cell, so an
interrupted run keeps what finished. Methods:
  rtn                 round to nearest (minigptq)
  gptq                the paper's settings (--paper): damp 0.01, columns in order (bit-exact with the reference)
  gptq-gar            + group-aware act-order (GAR; g_idx trivial, vLLM serves it): minigptq's default
  gptq-actorder       + act-order (desc_act: g_idx permuted, vLLM's fast path refuses it)
  gptq-gar-mse        GAR + the grid range searched for the least error per group (--mse)
  gptaq               GPTAQ (asymmetric target, alpha 0.25) + GAR
  gptqmodel-default   GPTQModel 7.7.0 with its defaults (GAR on, damp 0.05) for bits and group size
  gptqmodel-paper     GPTQModel with the paper's settings (damp 0.01, act_group_aware off)
DAMP (minigptq only) defaults to 0.01.

    nice .venv/bin/python tools/bench_quality.py --cells gptq-gar:4:128:0.05,gptqmodel-default:4:128

GPTQModel runs from the peer venv (.venv-peer, see ../shared/tools/install_peer.sh).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minigptq import load_model, load_tokenizer  # noqa: E402
from minigptq.data import calibration_windows, eval_windows, preset_text, tokenize_file  # noqa: E402
from minigptq.eval import perplexity  # noqa: E402

MINIGPTQ_FLAGS = {"rtn": ["--method", "rtn"], "gptq": ["--paper"], "gptq-gar": ["--act-group-aware"],
                  "gptq-actorder": ["--act-order"], "gptaq": ["--method", "gptaq", "--act-group-aware"],
                  "gptq-gar-mse": ["--act-group-aware", "--mse"]}
PEER = ("gptqmodel-default", "gptqmodel-paper")


def run_measured(cmd: list[str], env=None, cwd=ROOT) -> tuple[float, float]:
    """Run a command -> (wall seconds, peak resident memory in MiB of that process).

    The peak is the child's own VmHWM, polled from /proc: getrusage/wait4 would report the parent's high-water
    mark too, since Linux carries it across fork+exec.
    """
    t = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env)
    peak_kib = 0
    while p.poll() is None:
        try:
            status = Path(f"/proc/{p.pid}/status").read_text()
            peak_kib = max(peak_kib, int(status.split("VmHWM:")[1].split()[0]))
        except (OSError, IndexError, ValueError):
            pass  # the process is exiting
        time.sleep(0.1)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed with exit code {p.returncode}")
    return time.perf_counter() - t, peak_kib / 1024


def parse_cell(spec: str) -> tuple[str, int, int, float]:
    """METHOD:BITS:GROUP[:DAMP] -> (method, bits, group size, damp)."""
    parts = spec.split(":")
    if len(parts) not in (3, 4) or parts[0] not in (*MINIGPTQ_FLAGS, *PEER):
        raise SystemExit(f"error: bad cell {spec!r}; use METHOD:BITS:GROUP[:DAMP] with METHOD one of "
                         f"{', '.join((*MINIGPTQ_FLAGS, *PEER))}")
    return parts[0], int(parts[1]), int(parts[2]), float(parts[3]) if len(parts) == 4 else 0.01


def quantize_cell(method: str, bits: int, gs: int, damp: float, args, work: Path) -> tuple[Path, float, float]:
    """Quantize one cell -> (checkpoint folder, wall seconds, peak MiB)."""
    tag = f"{bits}bit-g{gs}" if gs > 0 else f"{bits}bit-perchannel"
    if method in PEER:
        out = work / f"{method}-{tag}"
        jobs = work / f"jobs-{method}-{tag}.json"
        jobs.write_text(json.dumps([{"op": "quantize", "model": args.model, "out": str(out),
                                     "calib": str(work / "calib.pt"), "bits": bits, "group_size": gs, "sym": True,
                                     "desc_act": False, "defaults": method == "gptqmodel-default"}]))
        if out.exists():
            shutil.rmtree(out)
        wall, rss = run_measured([str(ROOT / ".venv-peer" / "bin" / "python"), str(ROOT / "tests" / "peer_check.py"),
                                  str(jobs)], env=dict(os.environ, GPTQMODEL_CPU_WORKERS="2"), cwd=work)
        return out, wall, rss
    out = work / f"minigptq-{method}-{tag}-damp{damp:g}"
    py = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv/bin/python").exists() else sys.executable
    wall, rss = run_measured([py, "-m", "minigptq.quantize", "--model", args.model, "--out", str(out), "--bits",
                              str(bits), "--groupsize", str(gs), "--percdamp", str(damp), "--dataset", args.calib,
                              "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--overwrite", "--quiet",
                              *MINIGPTQ_FLAGS[method]])
    return out, wall, rss


def header(args, evals: dict) -> dict:
    peer = ROOT / ".venv-peer" / "bin" / "python"
    peer_version = subprocess.run([str(peer), "-c", "import gptqmodel; print(gptqmodel.__version__)"],
                                  capture_output=True, text=True).stdout.strip().splitlines()[-1] if peer.exists() else None
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {"benchmark": "quality", "model": Path(args.model).name, "date": date.today().isoformat(),
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
                        "note": "2 cores shared with other jobs: quant_s is wall time under that load"},
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "gptqmodel": peer_version},
            "settings": {"calibration": f"{Path(args.calib).name}, {args.nsamples} x {args.seqlen} tokens, seed 0",
                         "eval": {name: f"first {len(w)} windows of 2048" for name, w in evals.items()},
                         "threads": args.threads or torch.get_num_threads(), "sym": True, "cells": "METHOD:BITS:GROUP[:DAMP], see tools/bench_quality.py"},
            "results": {}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"), help="full-precision checkpoint")
    p.add_argument("--calib", default=str(ROOT.parent / "shared/data/wikitext2/wiki.valid.tokens"),
                   help="calibration text (default WikiText-2 validation)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared/data"),
                   help="folder of the test sets (wikitext2/wiki.test.raw, ptb/ptb.test.txt)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="calibration window length (default 512)")
    p.add_argument("--eval-windows", type=int, default=8, help="evaluation windows of 2048 tokens (default 8)")
    p.add_argument("--cells", default="gptq-gar:4:128:0.05,gptqmodel-default:4:128,gptq-gar:3:128:0.05,"
                                      "gptqmodel-default:3:128,gptq-gar:4:128:0.01,gptq:4:128,gptaq:4:128:0.05",
                   help="comma-separated METHOD:BITS:GROUP[:DAMP] cells, run in this order")
    p.add_argument("--no-fp", action="store_true", help="skip the full-precision row")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for the evaluation and every quantizer (OMP_NUM_THREADS; GPTQModel keeps its 2 workers); 1 "
                        "avoids spinning threads on a CPU shared with other jobs (default: torch's own)")
    p.add_argument("--work", default=str(ROOT / "models" / "bench_quality"), help="folder for the checkpoints")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality_smollm2_table.json"),
                   help="result JSON (rewritten after every cell; existing results in it are kept)")
    args = p.parse_args(argv)
    if args.threads is not None:  # the quantizers are child processes: they read it from the environment
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    cells = [parse_cell(c) for c in args.cells.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(args.model)
    calib = calibration_windows(tokenize_file(args.calib, tok), args.nsamples, args.seqlen, seed=0)
    torch.save(calib, work / "calib.pt")
    evals = {name: eval_windows(torch.tensor(tok.encode(preset_text(name, args.data_dir)[0], bos=False)), 2048,
                                args.eval_windows) for name in ("wikitext2", "ptb")}
    out = Path(args.out)
    doc = header(args, evals)
    if out.exists():  # keep the cells of earlier runs (same protocol) that this run does not redo
        doc["results"] = json.loads(out.read_text()).get("results", {})

    def save() -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(out)  # atomic: a reader never sees half a file

    def ppl(path) -> dict:
        model = load_model(path, dtype="fp32", cpu_kernel="exact")  # the checkpoint's quality, not a kernel's
        return {name: round(perplexity(model, w, progress=False), 3) for name, w in evals.items()}

    if not args.no_fp:
        doc["results"]["fp32"] = {"ppl": ppl(args.model)}
        save()
    for method, bits, gs, damp in cells:
        tag = f"{bits}bit-g{gs}" if gs > 0 else f"{bits}bit-perchannel"
        key = f"{method} {tag}" + ("" if method in PEER else f" damp{damp:g}")
        print(f"== {key}", flush=True)
        try:
            path, wall, rss = quantize_cell(method, bits, gs, damp, args, work)
            doc["results"][key] = {"ppl": ppl(path), "quant_s": round(wall, 1), "peak_rss_mib": round(rss)}
        except RuntimeError as e:  # one failed cell must not lose the others
            doc["results"][key] = {"error": str(e)}
        print(f"   {doc['results'][key]}", flush=True)
        save()


if __name__ == "__main__":
    main()
