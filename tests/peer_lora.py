"""Runs inside the peer venv (.venv-peer: transformers + GPTQModel + PEFT 0.21, CPU) for tests/test_lora.py.

Usage: .venv-peer/bin/python tests/peer_lora.py JOBS.json; JOBS.json is a list of jobs done in order in one process:
  {"op": "make", "model": GPTQ_DIR, "out": ADAPTER_DIR, "config": {LoraConfig kwargs}, "seed": 0}
      create a LoRA adapter with PEFT on the GPTQ model, give every lora_B random values (PEFT starts it at 0, which
      would hide B entirely) and save it with save_pretrained
  {"op": "logits", "model": GPTQ_DIR, "adapter": ADAPTER_DIR, "tokens": FILE.pt, "out": FILE.pt}
      load the GPTQ checkpoint in transformers (torch backend), the adapter with PeftModel.from_pretrained, and
      save the fp32 logits of tokens (B, T)
"""
import json
import os
import sys

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
import torch  # noqa: E402


def base(path):
    from transformers import AutoModelForCausalLM, GPTQConfig
    cfg = json.load(open(os.path.join(path, "quantize_config.json")))
    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float16,
                                                quantization_config=GPTQConfig(bits=cfg["bits"], backend="torch"))


def make(job):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(job.get("seed", 0))
    model = get_peft_model(base(job["model"]), LoraConfig(task_type="CAUSAL_LM", **job["config"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(job["out"])
    lora = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "lora_A")})
    print(f"peer made adapter {job['out']}: {lora}", flush=True)


def logits(job):
    from peft import PeftModel
    model = PeftModel.from_pretrained(base(job["model"]), job["adapter"]).eval()
    with torch.no_grad():
        out = model(input_ids=torch.load(job["tokens"])).logits.float()
    torch.save(out, job["out"])
    lora = [type(m).__name__ for m in model.modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    print(f"peer loaded adapter {job['adapter']}: lora_layers={len(lora)} {sorted(set(lora))}", flush=True)


if __name__ == "__main__":
    for job in json.load(open(sys.argv[1])):
        {"make": make, "logits": logits}[job["op"]](job)
