"""Quantize -> load -> generate -> eval, end to end, on every architecture; the checkpoint's format and contents."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, STORIES, WIKI_VALID
from minigptq import load_model, load_tokenizer
from minigptq.data import eval_windows
from minigptq.eval import perplexity
from minigptq.generate import generate
from minigptq.checkpoint_reader import SafetensorsFile
from minigptq.qlinear import QuantLinear
from minigptq.quantize import quantize_model
from minigptq.quantizer import QuantConfig

QUIET = dict(log=lambda msg: None)


def calib_file(tmp_path, model_path, n_tokens=4000):
    """A calibration text: WikiText-2 validation text (shared data)."""
    p = tmp_path / "calib.txt"
    p.write_text(WIKI_VALID.read_text()[:n_tokens * 4])
    return p


@pytest.mark.parametrize("kind", ["llama-gqa-tied", "opt-350m-style", "bloom"])
def test_quantize_generate_eval_every_arch(hf_checkpoints, tmp_path, kind):
    src = hf_checkpoints(kind)
    out = quantize_model(src, tmp_path / "q", qcfg=QuantConfig(bits=4, group_size=32), dataset=calib_file(tmp_path, src),
                         nsamples=8, seqlen=64, **QUIET)
    q = load_model(out, dtype="fp32")
    fp = load_model(src, dtype="fp32")
    n_quant = sum(isinstance(m, QuantLinear) for m in q.modules())
    assert n_quant == 2 * (4 if kind == "bloom" else 6 if kind.startswith("opt") else 7)
    tokens = torch.randint(3, 512, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = q(tokens), fp(tokens)
    rel = ((a - b).norm() / b.norm()).item()
    assert 0 < rel < 0.25  # quantized, but close to full precision at 4 bits
    new, stats = generate(q, [[5, 6, 7]], max_new_tokens=8)
    assert len(new[0]) == 8 and stats.median_ms > 0
    ppl_q, ppl_fp = perplexity(q, tokens.view(2, 24), False), perplexity(fp, tokens.view(2, 24), False)
    assert abs(ppl_q / ppl_fp - 1) < 0.2


def test_checkpoint_format(hf_checkpoints, tmp_path):
    src = hf_checkpoints("llama-gqa-tied")
    out = quantize_model(src, tmp_path / "q", qcfg=QuantConfig(bits=3, group_size=32, sym=False, act_order=True),
                         dataset=calib_file(tmp_path, src), nsamples=4, seqlen=64, **QUIET)
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["bits"] == 3 and qc["group_size"] == 32 and qc["sym"] is False and qc["desc_act"] is True
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq" and qc["damp_percent"] == 0.01
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == qc and cfg["torch_dtype"] == "float16"
    f = SafetensorsFile(out / "model.safetensors")
    assert f.metadata == {"format": "pt"}
    p = "model.layers.1.mlp.down_proj"
    K, N = 128, 64
    assert f.get(f"{p}.qweight").dtype == torch.int32 and f.get(f"{p}.qweight").shape == (K * 3 // 32, N)
    assert f.get(f"{p}.qzeros").shape == (K // 32, N * 3 // 32)
    assert f.get(f"{p}.scales").dtype == torch.float16 and f.get(f"{p}.scales").shape == (K // 32, N)
    g_idx = f.get(f"{p}.g_idx")
    assert g_idx.shape == (K,) and not bool((g_idx[1:] >= g_idx[:-1]).all())  # act-order: not monotone
    assert f"{p}.weight" not in f.keys() and "lm_head.weight" not in f.keys()  # tied head not duplicated
    assert f.get("model.embed_tokens.weight").dtype == torch.float16
    assert (out / "tokenizer.model").is_file() and (out / "quant_log.tsv").is_file()
    log = (out / "quant_log.tsv").read_text().splitlines()
    assert log[0].split("\t") == ["block", "module", "method", "error", "percdamp", "seconds", "tokens", "note"]
    assert len(log) == 1 + 2 * 7
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no work folders left behind


def test_gptq_beats_rtn_on_stories260k(tmp_path):
    """3-bit on a real model: GPTQ's perplexity is below RTN's, on text sampled from the model itself."""
    fp = load_model(STORIES, dtype="fp32")
    tok = load_tokenizer(STORIES)
    torch.manual_seed(0)
    from minigptq.data import sample_from_model
    text = sample_from_model(fp, 8, 256, seed=123, bos_id=tok.bos_id)  # held-out "test set"
    qcfg = QuantConfig(bits=3, group_size=-1)
    ppl = {"fp": perplexity(fp, text, False)}
    for method in ("rtn", "gptq"):
        out = quantize_model(STORIES, tmp_path / method, qcfg=qcfg, method=method, nsamples=16, seqlen=256,
                             seed=0, **QUIET)  # data-free calibration (different seed from the test text)
        ppl[method] = perplexity(load_model(out, dtype="fp32"), text, False)
    assert ppl["fp"] < ppl["gptq"] < ppl["rtn"], ppl


def test_unpackable_layers_kept_and_recorded(tmp_path):
    """stories260k's MLP has 172 hidden units (down_proj inputs, up/gate outputs): not packable, so those layers
    stay fp16 and the config says so in the peers' terms."""
    out = quantize_model(STORIES, tmp_path / "q", qcfg=QuantConfig(bits=4, group_size=-1), nsamples=4, seqlen=64,
                         **QUIET)
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["modules_in_block_to_quantize"] == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                                  ["self_attn.o_proj"]]
    assert "-:^model\\.layers\\.0\\.mlp\\.down_proj$" in qc["dynamic"] and len(qc["dynamic"]) == 5 * 3
    f = SafetensorsFile(out / "model.safetensors")
    assert f.get("model.layers.0.mlp.down_proj.weight").dtype == torch.float16
    model = load_model(out, dtype="fp32")
    assert isinstance(model.layers[0].mlp.down, torch.nn.Linear)
    assert isinstance(model.layers[0].mlp.up, torch.nn.Linear)
    assert isinstance(model.layers[0].attn.q, QuantLinear)
    tok = load_tokenizer(out)
    new, _ = generate(model, [tok.encode("Once upon a time")], max_new_tokens=12, eos_ids=(2,))
    assert len(tok.decode(new[0]).split()) >= 3


def test_quantize_cli_runs_and_refuses_existing_out(tmp_path):
    out = tmp_path / "q"
    cmd = [sys.executable, "-m", "minigptq.quantize", "--model", str(STORIES), "--bits", "3", "--groupsize", "32",
           "--nsamples", "2", "--seqlen", "32", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "data-free" in r.stderr and "kept in full precision" in r.stderr
    r2 = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r2.returncode == 2 and "already exists" in r2.stderr and "Traceback" not in r2.stderr
    g = subprocess.run([sys.executable, "-m", "minigptq.generate", "--model", str(out), "--prompt", "Once upon a time",
                        "--max-new-tokens", "8"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert g.returncode == 0, g.stderr
    assert "QuantLinear" in g.stderr and "MiB" in g.stderr


def test_sharded_output(hf_checkpoints, tmp_path, monkeypatch):
    """Past the shard size the writer splits the checkpoint and writes an index; the loader reads it back."""
    import minigptq.checkpoint_writer as ck
    src = hf_checkpoints("bloom")
    monkeypatch.setattr(ck, "SHARD_BYTES", 64 * 1024)
    out = quantize_model(src, tmp_path / "q", qcfg=QuantConfig(bits=4, group_size=32), dataset=calib_file(tmp_path, src),
                         nsamples=2, seqlen=32, **QUIET)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    monkeypatch.setattr(ck, "SHARD_BYTES", 4 * 2**30)
    single = quantize_model(src, tmp_path / "q1", qcfg=QuantConfig(bits=4, group_size=32),
                            dataset=calib_file(tmp_path, src), nsamples=2, seqlen=32, **QUIET)
    tokens = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        assert torch.equal(load_model(out, dtype="fp32")(tokens), load_model(single, dtype="fp32")(tokens))


def test_rtn_runs_no_calibration_and_writes_the_same_checkpoint(hf_checkpoints, tmp_path, monkeypatch):
    """--method rtn reads no data and runs no forward pass unless layer_errors asks for the calibrated error log; the
    checkpoint is byte-identical either way; quant_log.tsv says which error it holds."""
    import minigptq.driver
    import minigptq.quantize
    src = hf_checkpoints("llama-gqa-tied")
    qcfg = QuantConfig(bits=4, group_size=32, act_order=True)  # act-order: no effect without a Hessian
    calibrated = quantize_model(src, tmp_path / "a", qcfg=qcfg, method="rtn", dataset=calib_file(tmp_path, src),
                                nsamples=4, seqlen=64, layer_errors=True, **QUIET)

    def never(*args, **kwargs):
        raise AssertionError("RTN ran a calibration step")
    for mod, name in ((minigptq.quantize, "calibration"), (minigptq.driver, "hessian_pass"),
                      (minigptq.driver, "next_inputs"), (minigptq.driver, "make_replays")):
        monkeypatch.setattr(mod, name, never)
    with pytest.raises(FileNotFoundError, match="not-there.txt: no such file"):  # a wrong path still says so
        quantize_model(src, tmp_path / "c", qcfg=qcfg, method="rtn", dataset=tmp_path / "not-there.txt", **QUIET)
    assert not (tmp_path / "c").exists()
    plain = quantize_model(src, tmp_path / "b", qcfg=qcfg, method="rtn", dataset=calib_file(tmp_path, src), **QUIET)
    assert (plain / "model.safetensors").read_bytes() == (calibrated / "model.safetensors").read_bytes()
    rows = {p: [r.split("\t") for r in (p / "quant_log.tsv").read_text().splitlines()[1:]] for p in (plain, calibrated)}
    assert len(rows[plain]) == len(rows[calibrated]) == 2 * 7
    for r in rows[plain]:  # the weight error 1/2 ||W - Q||_F^2, no damping, no tokens
        assert r[2] == "rtn" and float(r[3]) > 0 and r[4] == "0.0" and r[6] == ""
        assert r[7] == "no calibration: error = 1/2 ||W - Q||_F^2"
    assert all(r[6] == str(4 * 64) and r[7] == "" for r in rows[calibrated])  # the proxy loss on 4 x 64 tokens
    qc = json.loads((plain / "quantize_config.json").read_text())
    assert qc["meta"]["calibration"] == "none (rtn)" and qc["desc_act"] is False
