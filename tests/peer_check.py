"""Runs inside the peer venv (.venv-peer: transformers + optimum + GPTQModel, CPU torch) for the interop tests.

Usage: .venv-peer/bin/python tests/peer_check.py JOBS.json
JOBS.json is a list of jobs, done in order in one process (importing the peer stack is slow):
  {"op": "logits", "loader": "transformers" | "gptqmodel", "model": DIR, "tokens": FILE.pt, "out": FILE.pt}
      load a GPTQ checkpoint with the torch backend and save the fp32 logits of tokens (B, T)
  {"op": "quantize", "model": DIR, "out": DIR, "calib": FILE.pt, "bits": 4, "group_size": 32, "sym": true,
   "desc_act": false}
      quantize a full-precision checkpoint with GPTQModel (paper settings: damp 0.01, act_group_aware off;
      with "defaults": true, GPTQModel's own defaults for everything but bits and group_size)
"""
import json
import os
import sys

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
import torch  # noqa: E402


def logits(job):
    tokens = torch.load(job["tokens"])
    if job["loader"] == "transformers":
        from transformers import AutoModelForCausalLM, GPTQConfig
        cfg = json.load(open(os.path.join(job["model"], "quantize_config.json")))
        model = AutoModelForCausalLM.from_pretrained(
            job["model"], device_map="cpu", dtype=torch.float16,
            quantization_config=GPTQConfig(bits=cfg["bits"], backend="torch"))
    else:
        from gptqmodel import BACKEND, GPTQModel
        model = GPTQModel.load(job["model"], backend=BACKEND.TORCH, device="cpu", dtype=torch.float16)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=tokens).logits.float()
    torch.save(out, job["out"])
    packed = [type(m).__name__ for m in model.modules() if hasattr(m, "qweight")]
    print(f"peer {job['loader']} loaded {job['model']}: packed_layers={len(packed)} {sorted(set(packed))}",
          flush=True)


def quantize(job):
    from gptqmodel import GPTQModel, QuantizeConfig
    calib = torch.load(job["calib"])
    data = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calib]
    if job.get("defaults"):  # GPTQModel's own defaults (tools/bench_quality.py): only bits and group size given
        qc = QuantizeConfig(bits=job["bits"], group_size=job["group_size"])
        print(f"peer defaults: desc_act={qc.desc_act} act_group_aware={qc.act_group_aware} "
              f"damp_percent={qc.damp_percent} sym={qc.sym}", flush=True)
    else:
        qc = QuantizeConfig(bits=job["bits"], group_size=job["group_size"], sym=job["sym"], desc_act=job["desc_act"],
                            damp_percent=0.01, act_group_aware=False)
    model = GPTQModel.load(job["model"], qc, device="cpu")
    model.quantize(data, batch_size=1)
    model.save(job["out"])
    print(f"peer quantized {job['model']} -> {job['out']}", flush=True)


if __name__ == "__main__":
    for job in json.load(open(sys.argv[1])):
        {"logits": logits, "quantize": quantize}[job["op"]](job)
