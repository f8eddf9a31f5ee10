"""LoRA adapters (minigptq/lora.py, qlinear_grad.py, finetune.py, quantize --adapter): logits equal to
transformers + PEFT on the same GPTQ checkpoint both ways, every bad-adapter error, gradients through a packed linear
against a float64 oracle, fine-tune --resume bit for bit, and the merge before quantizing."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PEER_PY, ROOT, WIKI_VALID
from minigptq import Error, kernels, load_model, load_tokenizer, qlinear_grad
from minigptq import generate as generate_cli
from minigptq.cli import run as cli_run
from minigptq.finetune import TrainConfig, chat_example, examples, finetune
from minigptq.kv_cache import KVCache
from minigptq.loader import internal_to_hf
from minigptq.lora import LoRALinear, LoRAWeights, apply_adapter, new_adapter, read_adapter, save_adapter
from minigptq.qlinear import QuantLinear
from minigptq.quantize import quantize_model
from minigptq.quantizer import QuantConfig

TOL = 2e-2  # relative to the logits' scale: transformers + PEFT compute the GPTQ base in fp16, minigptq in fp32
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def tiny(hf_checkpoints, tmp_path_factory):
    """(full-precision checkpoint, its 4-bit g32 GPTQ checkpoint written by minigptq, a text file)."""
    d = tmp_path_factory.mktemp("lora")
    src = hf_checkpoints("llama-untied-bias")
    text = d / "train.txt"
    text.write_text(WIKI_VALID.read_text()[:20000])
    q4 = quantize_model(src, d / "q4", qcfg=QuantConfig(bits=4, group_size=32), dataset=text, nsamples=4, seqlen=64,
                        log=lambda m: None)
    return src, q4, text


def random_adapter(model_path, out, targets=ALL, r=4, alpha=8.0, seed=0):
    """A minigptq-written PEFT folder whose B is random (a fresh adapter's B = 0 would hide it entirely)."""
    model = load_model(model_path, dtype="fp32")
    to_hf = internal_to_hf(model.checkpoint)
    g = torch.Generator().manual_seed(seed)
    w = {k: LoRAWeights(v.A, 0.1 * torch.randn(v.B.shape, generator=g), v.scaling)
         for k, v in new_adapter(model, to_hf, list(targets), r, alpha, seed=seed).items()}
    apply_adapter(model, w, to_hf)
    save_adapter(model, to_hf, out, r, alpha)
    return out


def logits(path, tokens, adapter=None):
    with torch.inference_mode():
        return load_model(path, dtype="fp32", adapter=adapter)(tokens).float()


def check_close(a, b, what):
    diff, scale = (a - b).abs().max().item(), max(1.0, b.abs().max().item())
    assert diff < TOL * scale, f"{what}: max |logit diff| {diff:.4g} >= {TOL} x {scale:.3g}"


# -- PEFT interop, both ways ---------------------------------------------------------------------------------------

@pytest.mark.peer
@pytest.mark.skipif(not PEER_PY.exists(), reason="peer venv .venv-peer not installed")
def test_adapters_equal_in_minigptq_and_peft(tiny, tmp_path):
    """PEFT-made adapters (rank/alpha patterns; rsLoRA on all linears) give PEFT's logits here, and an adapter
    trained by minigptq gives minigptq's logits in transformers + PEFT."""
    _, q4, text = tiny
    ours = tmp_path / "ours"
    finetune(q4, text, ours, TrainConfig(rank=4, alpha=8, targets=ALL, steps=2, seqlen=32, lr=2e-2),
             log=lambda m: None)
    tokens = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "tokens.pt")
    made = {"pat": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                        rank_pattern={"down_proj": 2}, alpha_pattern={"layers.1.self_attn.v_proj": 3}),
            # a regex (PEFT's "all-linear" finds no nn.Linear in a GPTQ model: its packed layers are not ones)
            "rs": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=r".*\.(q|k|v|o|gate|up|down)_proj")}
    jobs = [{"op": "make", "model": str(q4), "out": str(tmp_path / k), "config": c} for k, c in made.items()]
    jobs += [{"op": "logits", "model": str(q4), "adapter": str(tmp_path / k), "tokens": str(tmp_path / "tokens.pt"),
              "out": str(tmp_path / f"{k}.pt")} for k in ("pat", "rs", "ours")]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    r = subprocess.run([str(PEER_PY), str(ROOT / "tests" / "peer_lora.py"), str(tmp_path / "jobs.json")],
                       capture_output=True, text=True, timeout=1200, cwd=tmp_path,
                       env=dict(os.environ, GPTQMODEL_CPU_WORKERS="2"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    loaded = [line for line in r.stdout.splitlines() if "lora_layers=" in line]
    assert [line.split("lora_layers=")[1].split()[0] for line in loaded] == ["8", "14", "14"], loaded
    base = logits(q4, tokens)
    for k in ("pat", "rs", "ours"):
        peer, mine = torch.load(tmp_path / f"{k}.pt"), logits(q4, tokens, tmp_path / k)
        check_close(mine, peer, f"adapter {k}")
        assert (base - peer).abs().max() > 10 * (mine - peer).abs().max(), f"adapter {k} changes too little"


def test_adapter_keeps_decode_path_equal(tiny, tmp_path):
    """KV-cache decoding with an adapter (fused q/k/v and gate/up kernel + LoRA slices) equals the full forward."""
    _, q4, _ = tiny
    ad = random_adapter(q4, tmp_path / "ad")
    model = load_model(q4, dtype="fp32", adapter=ad)
    assert type(model.layers[0].attn.fused).__name__ == "LoRAFused" and model.decode_plans() is None
    tokens = torch.randint(3, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(tokens)  # (1, 12, V)
        cache = KVCache(model.cfg, 1, 12, torch.float32, "cpu")
        steps = [model(tokens[:, :8], cache)[:, -1]] + [model(tokens[:, t:t + 1], cache, start=t)[:, -1]
                                                        for t in range(8, 12)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 7:], rtol=1e-4, atol=1e-4)
    assert (full - logits(q4, tokens)).abs().max() > 1e-2  # the adapter is really applied


# -- bad adapters: one line each, naming what is wrong ------------------------------------------------------------

def _cfg(d, **kw):
    c = json.loads((d / "adapter_config.json").read_text())
    c.update(kw)
    (d / "adapter_config.json").write_text(json.dumps(c))


def _tensors(d, fn):
    t = load_file(d / "adapter_model.safetensors")
    fn(t)
    save_file(t, d / "adapter_model.safetensors")


Q = "base_model.model.model.layers.0.self_attn.q_proj"
BAD = {
    "no folder": (lambda d: shutil.rmtree(d), "not found"),
    "no config": (lambda d: (d / "adapter_config.json").unlink(), "no adapter_config.json"),
    "bin only": (lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"), "adapter_model.bin"),
    "bad json": (lambda d: (d / "adapter_config.json").write_text("{"), "not valid JSON"),
    "dora": (lambda d: _cfg(d, use_dora=True), "DoRA"),
    "modules_to_save": (lambda d: _cfg(d, modules_to_save=["lm_head"]), "modules_to_save"),
    "peft type": (lambda d: _cfg(d, peft_type="IA3"), "peft_type 'IA3'"),
    "fan_in_fan_out": (lambda d: _cfg(d, fan_in_fan_out=True), "fan_in_fan_out"),
    "pissa": (lambda d: _cfg(d, init_lora_weights="pissa"), "changes the base weights"),
    "unknown target": (lambda d: _cfg(d, target_modules=["q_proj", "c_attn"]), "['c_attn'] name no linear"),
    "rank": (lambda d: _cfg(d, r=8), "valid shapes are [8, 64]"),
    "bad rank pattern": (lambda d: _cfg(d, rank_pattern={"q_proj": -1}), "positive integer"),
    "other base": (lambda d: _tensors(d, lambda t: t.update({f"{Q}.lora_A.weight": torch.zeros(4, 96)})),
                   "made for another base model"),
    "unknown module": (lambda d: _tensors(d, lambda t: t.update({
        "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)})), "not a linear"),
    "dora magnitude": (lambda d: _tensors(d, lambda t: t.update({f"{Q}.lora_magnitude_vector": torch.ones(64)})),
                       "DoRA magnitude"),
    "nan": (lambda d: _tensors(d, lambda t: t[f"{Q}.lora_B.weight"].__setitem__((0, 0), float("nan"))),
            "non-finite"),
    "half pair": (lambda d: _tensors(d, lambda t: t.pop(f"{Q}.lora_B.weight")), "lora_A but no lora_B"),
    "missing module": (lambda d: _tensors(d, lambda t: [t.pop(f"{Q}.lora_{w}.weight") for w in "AB"]),
                       "has no weights for 1 module"),
    "untargeted": (lambda d: _cfg(d, target_modules=["k_proj", "v_proj"]), "does not name"),
    "bad regex": (lambda d: _cfg(d, target_modules="(q_proj"), "not a valid regular expression"),
}


@pytest.fixture(scope="module")
def good_adapter(tiny, tmp_path_factory):
    return random_adapter(tiny[1], tmp_path_factory.mktemp("good") / "ad", targets=("q_proj", "v_proj"))


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_is_one_line_error(tiny, good_adapter, tmp_path, case):
    d = tmp_path / "ad"
    shutil.copytree(good_adapter, d)
    mutate, needle = BAD[case]
    mutate(d)
    with pytest.raises((Error, FileNotFoundError), match=None) as e:
        load_model(tiny[1], dtype="fp32", adapter=d)
    assert needle in str(e.value), str(e.value)
    if case in ("dora", "other base"):  # and the command line says it in one line, exit code 2
        err, out = io.StringIO(), io.StringIO()
        mod = generate_cli
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), pytest.raises(SystemExit) as ex:
            cli_run(mod.main, mod.parser(), ["--model", str(tiny[1]), "--prompt", "Hi", "--adapter", str(d)])
        assert ex.value.code == 2 and err.getvalue().count("\n") == 1 and needle in err.getvalue(), err.getvalue()


# -- gradients through a packed linear -----------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["compiled", "tiles"])
@pytest.mark.parametrize("bits", [4, 3])
def test_packed_linear_gradients_equal_float64_oracle(bits, path, monkeypatch):
    """d/dx, d/dA, d/dB through LoRALinear(QuantLinear) equal those through a float64 nn.Linear holding the
    dequantized weight; the graph saves no tensor as large as the weight. grad_x by the compiled dequantize kernel
    (where built) and by torch's tile-by-tile fallback."""
    if path == "tiles":
        monkeypatch.setattr(qlinear_grad, "compiled_dequantized", lambda layer, like: None)
    elif not kernels.cpu_available():
        pytest.skip(f"the compiled CPU kernels are not built: {kernels.CPU_IMPORT_ERROR}")
    g = torch.Generator().manual_seed(bits)
    K, N, gs, r = 544, 96, 32, 4  # K spans three 256-row tiles; act-order g_idx (a permutation of the groups)
    G = K // gs
    codes = torch.randint(0, 2**bits, (N, K), generator=g)
    scales = (torch.rand(G, N, generator=g) * 0.02 + 0.005).half()
    zeros = torch.randint(1, 2**bits, (G, N), generator=g)
    g_idx = (torch.arange(K) // gs)[torch.randperm(K, generator=g)].int()
    bias = torch.randn(N, generator=g) * 0.1
    ql = QuantLinear.from_codes(codes, scales, zeros, g_idx, bias, bits, gs)
    A, B = torch.randn(r, K, generator=g) * 0.05, torch.randn(N, r, generator=g) * 0.05
    lora = LoRALinear(ql, LoRAWeights(A.clone(), B.clone(), 2.0))
    x = torch.randn(3, 7, K, generator=g, requires_grad=True)
    gy = torch.randn(3, 7, N, generator=g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = lora(x)
    (y * gy).sum().backward()
    assert max(saved) < N * K, f"backward keeps a tensor of {max(saved)} values (the weight has {N * K})"

    W = ql.dequantized_weight().double()  # (N, K), exact: fp16 scale times a small integer
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    y64 = x64 @ W.T + bias.half().double() + 2.0 * (x64 @ A64.T) @ B64.T
    (y64 * gy.double()).sum().backward()
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for name, got, want in (("x", x.grad, x64.grad), ("A", lora.lora_A.grad, A64.grad), ("B", lora.lora_B.grad,
                                                                                          B64.grad)):
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert err < 1e-5, f"grad of {name}: max error {err:.3g} of its largest value"


# -- fine-tuning ---------------------------------------------------------------------------------------------------

def test_finetune_resume_is_bit_for_bit(tiny, tmp_path):
    """A run interrupted after its step-2 save and resumed ends with the same adapter, optimizer moments and RNG
    state, byte for byte, as the uninterrupted run (dropout and gradient accumulation on); other settings refused."""
    _, q4, text = tiny
    cfg = TrainConfig(rank=4, alpha=8, dropout=0.1, targets=("q_proj", "v_proj", "down_proj"), steps=4, seqlen=32,
                      batch=1, grad_accum=2, lr=1e-2, seed=3)
    stats = finetune(q4, text, tmp_path / "a", cfg, save_every=2, log=lambda m: None)

    def stop_at_3(msg):
        if msg.startswith("step 3/"):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        finetune(q4, text, tmp_path / "b", cfg, save_every=2, log=stop_at_3)
    assert json.loads((tmp_path / "b" / "trainer_state.json").read_text())["step"] == 2
    with pytest.raises(Error, match="lr: saved 0.01, given 0.02"):
        finetune(q4, text, tmp_path / "b", TrainConfig(**{**cfg.__dict__, "lr": 2e-2}), resume=True,
                 log=lambda m: None)
    other = tmp_path / "other.txt"
    other.write_text(text.read_text()[:-100])
    with pytest.raises(Error, match="not the file the saved run trained on"):
        finetune(q4, other, tmp_path / "b", cfg, save_every=2, resume=True, log=lambda m: None)
    resumed = finetune(q4, text, tmp_path / "b", cfg, save_every=2, resume=True, log=lambda m: None)
    assert resumed["loss"] == stats["loss"]
    for f in ("adapter_model.safetensors", "trainer_state.safetensors"):
        a, b = load_file(tmp_path / "a" / f), load_file(tmp_path / "b" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    B = load_file(tmp_path / "a" / "adapter_model.safetensors")[f"{Q}.lora_B.weight"]
    assert B.abs().max() > 0  # it trained
    with pytest.raises(FileExistsError):
        finetune(q4, text, tmp_path / "a", cfg, log=lambda m: None)


def test_finetune_data_formats(tiny, tmp_path):
    """.jsonl text rows are windows of seqlen; .jsonl messages put the loss on the assistant's tokens only."""
    _, q4, _ = tiny
    tok = load_tokenizer(q4)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": "Once upon a time there was a cat. " * 5}) for _ in range(4)))
    ex = examples(rows, tok, 16)
    assert ex and all(len(t) == 16 and bool(m.all()) for t, m in ex)
    tok.chat_template = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    chat = [{"role": "user", "content": "Where is the cat?"}, {"role": "assistant", "content": "In the garden."}]
    ids, mask = chat_example(tok, chat)
    said = tok.decode([i for i, m in zip(ids, mask) if m])
    assert "In the garden." in said and "cat?" not in said and "user" not in said, said
    with pytest.raises(Error, match="fewer than one window"):
        examples(rows, tok, 4096)


# -- quantize --adapter: merge, then GPTQ --------------------------------------------------------------------------

def test_quantize_adapter_equals_quantizing_the_merged_model(tiny, tmp_path):
    src, _, text = tiny
    ad = random_adapter(src, tmp_path / "ad", targets=("q_proj", "v_proj", "up_proj", "down_proj"))
    merged = tmp_path / "merged"
    shutil.copytree(src, merged)
    w = load_file(merged / "model.safetensors")
    model = load_model(src, dtype="fp32")
    to_hf = internal_to_hf(model.checkpoint)
    for name, lw in read_adapter(ad, model, to_hf).items():
        key = to_hf[name] + ".weight"
        w[key] = (w[key].double() + (lw.B.double() @ lw.A.double()) * lw.scaling).to(w[key].dtype)
    save_file(w, merged / "model.safetensors", metadata={"format": "pt"})
    tokens = torch.randint(3, 512, (1, 20), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(src, tokens, ad), logits(merged, tokens), rtol=1e-4, atol=1e-4)
    kw = dict(qcfg=QuantConfig(bits=4, group_size=32), dataset=text, nsamples=4, seqlen=64, log=lambda m: None)
    a = load_file(quantize_model(src, tmp_path / "qa", adapter=ad, **kw) / "model.safetensors")
    b = load_file(quantize_model(merged, tmp_path / "qb", **kw) / "model.safetensors")
    plain = load_file(quantize_model(src, tmp_path / "qc", **kw) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    q = "model.layers.0.self_attn.q_proj.qweight"
    assert not torch.equal(a[q], plain[q])  # the merge changed what was quantized


def test_finetune_grad_checkpoint_gives_the_same_adapter(tiny, tmp_path):
    """Recomputing each block in backward (--grad-checkpoint) trains the same adapter."""
    _, q4, text = tiny
    cfg = TrainConfig(rank=4, alpha=8, targets=("q_proj", "o_proj", "up_proj"), steps=2, seqlen=32, lr=1e-2)
    finetune(q4, text, tmp_path / "a", cfg, log=lambda m: None)
    finetune(q4, text, tmp_path / "b", TrainConfig(**{**cfg.__dict__, "grad_checkpoint": True}), log=lambda m: None)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in "ab")
    assert any(bool(t.abs().max() > 0) for k, t in a.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
