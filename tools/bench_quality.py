"""Quality benchmark: WikiText-2 perplexity of full precision, RTN and GPTQ (minigptq) and GPTQModel on one model.

Both quantizers get the *same* calibration windows (WikiText-2 validation, tokenized by minigptq, saved to a file and
handed to GPTQModel as token ids) and the paper's settings (damp 0.01, no act-order, GPTQModel's act_group_aware
off). Every checkpoint is evaluated by minigptq's eval on the first --eval-windows windows of 2048 tokens of the
test split. Quantization wall time and peak memory (max RSS of the quantizing process) are measured per run.

    .venv/bin/python tools/bench_quality.py            # writes bench/results/quality_smollm2.json

GPTQModel runs from the peer venv (.venv-peer, see ../shared/tools/install_peer.sh); --no-peer skips it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minigptq import load_model, load_tokenizer  # noqa: E402
from minigptq.data import calibration_windows, eval_windows, tokenize_file  # noqa: E402
from minigptq.eval import perplexity  # noqa: E402


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"), help="full-precision checkpoint")
    p.add_argument("--calib", default=str(ROOT.parent / "shared/data/wikitext2/wiki.valid.tokens"),
                   help="calibration text (default WikiText-2 validation)")
    p.add_argument("--test", default=str(ROOT.parent / "shared/data/wikitext2/wiki.test.raw"),
                   help="evaluation text (default WikiText-2 test)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, default=512, help="calibration window length (default 512)")
    p.add_argument("--eval-windows", type=int, default=8, help="evaluation windows of 2048 tokens (default 8)")
    p.add_argument("--configs", default="4:128,3:128,3:-1", help="bits:groupsize list (default 4:128,3:128,3:-1)")
    p.add_argument("--methods", default="rtn,gptq", help="minigptq methods to run (default rtn,gptq)")
    p.add_argument("--work", default=str(ROOT / "models" / "bench_quality"), help="folder for the checkpoints")
    p.add_argument("--no-peer", action="store_true", help="skip GPTQModel")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality_smollm2.json"), help="result JSON")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(args.model)
    calib = calibration_windows(tokenize_file(args.calib, tok), args.nsamples, args.seqlen, seed=0)
    torch.save(calib, work / "calib.pt")
    test = eval_windows(tokenize_file(args.test, tok), 2048, args.eval_windows)

    def ppl(path) -> float:
        v = perplexity(load_model(path, dtype="fp32"), test, progress=False)
        print(f"  ppl {v:.3f}  {path}", flush=True)
        return v

    results = {"fp32": {"ppl": ppl(args.model)}}
    py = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv/bin/python").exists() else sys.executable
    peer = ROOT / ".venv-peer" / "bin" / "python"
    for spec in args.configs.split(","):
        bits, gs = map(int, spec.split(":"))
        tag = f"{bits}bit-g{gs}" if gs > 0 else f"{bits}bit-perchannel"
        for method in args.methods.split(","):
            out = work / f"minigptq-{method}-{tag}"
            wall, rss = run_measured([py, "-m", "minigptq.quantize", "--model", args.model, "--out", str(out),
                                      "--bits", str(bits), "--groupsize", str(gs), "--method", method,
                                      "--dataset", args.calib, "--nsamples", str(args.nsamples),
                                      "--seqlen", str(args.seqlen), "--overwrite"])
            results[f"minigptq {method} {tag}"] = {"ppl": ppl(out), "quant_s": round(wall, 1),
                                                   "peak_rss_mib": round(rss)}
        if not args.no_peer and peer.exists():
            out = work / f"gptqmodel-{tag}"
            jobs = work / f"jobs-{tag}.json"
            jobs.write_text(json.dumps([{"op": "quantize", "model": args.model, "out": str(out),
                                         "calib": str(work / "calib.pt"), "bits": bits, "group_size": gs,
                                         "sym": True, "desc_act": False}]))
            if out.exists():
                import shutil
                shutil.rmtree(out)
            wall, rss = run_measured([str(peer), str(ROOT / "tests" / "peer_check.py"), str(jobs)],
                                     env=dict(os.environ, GPTQMODEL_CPU_WORKERS="2"), cwd=work)
            results[f"gptqmodel gptq {tag}"] = {"ppl": ppl(out), "quant_s": round(wall, 1),
                                                "peak_rss_mib": round(rss)}
    peer_version = subprocess.run([str(peer), "-c", "import gptqmodel; print(gptqmodel.__version__)"],
                                  capture_output=True, text=True).stdout.strip().splitlines()[-1] if peer.exists() else None
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    doc = {"benchmark": "quality", "model": Path(args.model).name, "date": date.today().isoformat(),
           "machine": {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()},
           "versions": {"python": platform.python_version(), "torch": torch.__version__, "gptqmodel": peer_version},
           "settings": {"calibration": f"{Path(args.calib).name}, {args.nsamples} x {args.seqlen} tokens, seed 0",
                        "eval": f"{Path(args.test).name}, first {len(test)} windows of 2048", "damp": 0.01,
                        "sym": True, "act_order": False, "gptqmodel_act_group_aware": False},
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
