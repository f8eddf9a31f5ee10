"""Mixture-of-experts models (issue #26): Mixtral, Qwen2-MoE (shared expert, a dense block), Qwen3-MoE.

- fp32 parity with transformers on random checkpoints it writes (8 experts, top-2, hidden 64): full forward and KV-cache
  step decoding within 1e-4, greedy tokens equal to transformers' generate;
- quantize -> generate -> eval on each; per-expert token counts in quant_log.tsv; decoding a packed MoE calls only the
  routed experts, and the batch, the steps and the full forward agree;
- an expert that no calibration token reaches goes through the documented rule (its Hessian from all tokens, logged),
  and without the rule it would come out as zeros (so the rule is what saves it);
- the vLLM fused-MoE rules of the compatibility report; config errors name the value.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PEER_PY, cached_steps, lazy_checkpoints, random_tokens, save_with_tokenizer
from minigptq import Error, load_model
from minigptq.checkpoint_reader import CheckpointReader
import minigptq.qlinear as qlinear
from minigptq.compat import layer_facts, moe_problems, report
from minigptq.eval import perplexity
from minigptq.fast_decode import StaticDecodeStep
from minigptq.generate import generate
from minigptq.moe import MoE
from minigptq.qlinear import QuantLinear
from minigptq.quantize import quantize_model
from minigptq.quantizer import QuantConfig
from minigptq.transformer import KVCache

TOL = 1e-4  # max abs logit difference in fp32, as the issue asks
T = 48
BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            max_position_embeddings=128, num_experts_per_tok=2)
CASES = {  # kind -> (model_type, config fields over BASE)
    "mixtral": ("mixtral", dict(num_local_experts=8, sliding_window=16, intermediate_size=32)),
    # block 0 dense (mlp_only_layers), block 1 MoE with the sigmoid-gated shared expert; top-k weights not renormalised
    "qwen2_moe": ("qwen2_moe", dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                    mlp_only_layers=[0], norm_topk_prob=False)),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=8, moe_intermediate_size=32, norm_topk_prob=True, head_dim=32)),
}


def make_checkpoint(kind: str, out, seed: int = 0):
    import transformers as tf
    model_type, kw = CASES[kind]
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(model_type, **{**BASE, **kw})).eval()
    with torch.no_grad():  # norms away from 1, larger weights: sharper attention and routing
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "embed" not in name:
                p.mul_(4)
    return save_with_tokenizer(model, out)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """kind -> path of CASES[kind]'s checkpoint (written on first use)."""
    return lazy_checkpoints(tmp_path_factory, "moe", make_checkpoint)


def tokens_for(seed: int, B: int = 1) -> torch.Tensor:
    return random_tokens(seed, B, T)


def hf_model(path):
    import transformers as tf
    return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()



@pytest.mark.parametrize("kind", list(CASES))
def test_forward_decoding_and_greedy_match_transformers(ckpts, kind):
    path = ckpts(kind)
    ours, hf = load_model(path, dtype="fp32"), hf_model(path)
    moe = [i for i, b in enumerate(ours.layers) if isinstance(b.mlp, MoE)]
    assert moe == ([1] if kind == "qwen2_moe" else [0, 1])
    assert hasattr(ours.layers[1].mlp, "shared_expert") == (kind == "qwen2_moe")
    tokens = tokens_for(1, B=2)
    with torch.inference_mode():
        full = ours(tokens)
    prefill = T - 10  # past Mixtral's window of 16; then 10 steps through the cache
    with torch.no_grad():
        want = hf(tokens).logits
        out = hf(tokens[:, :prefill], use_cache=True)  # transformers' own step decoding through its cache
        steps = [out.logits]
        for i in range(prefill, T):
            out = hf(tokens[:, i:i + 1], cache=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert (full - want).abs().max().item() < TOL
    assert (cached_steps(ours, tokens, prefill) - torch.cat(steps, dim=1)).abs().max().item() < TOL
    prompt = tokens[:1, :6]
    with torch.no_grad():
        greedy = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                             min_new_tokens=8)[0, 6:].tolist()
    assert generate(ours, [prompt[0].tolist()], max_new_tokens=8)[0][0] == greedy


def test_routing_changes_the_logits(ckpts, tmp_path):
    """norm_topk_prob and the number of experts per token are read (parity above is not parity by accident)."""
    src = ckpts("qwen3_moe")
    cfg = json.loads((src / "config.json").read_text())
    tokens = tokens_for(2)
    with torch.inference_mode():
        on = load_model(src, dtype="fp32")(tokens)
    for change in (dict(norm_topk_prob=False), dict(num_experts_per_tok=3)):
        shutil.copytree(src, tmp_path / "off", dirs_exist_ok=True)
        (tmp_path / "off" / "config.json").write_text(json.dumps({**cfg, **change}))
        with torch.inference_mode():
            assert (on - load_model(tmp_path / "off", dtype="fp32")(tokens)).abs().max().item() > 100 * TOL


@pytest.fixture(scope="module")
def quantized(ckpts, tmp_path_factory):
    """kind -> 4-bit g32 GPTQ checkpoint of CASES[kind] (made on first use)."""
    base, made = tmp_path_factory.mktemp("moe-q"), {}

    def get(kind):
        if kind not in made:
            made[kind] = quantize_model(ckpts(kind), base / kind, qcfg=QuantConfig(bits=4, group_size=32),
                                        dataset=tokens_for(7, B=4), log=lambda m: None)
        return made[kind]
    return get


def quant_log(path) -> list[dict]:
    head, *rows = (path / "quant_log.tsv").read_text().splitlines()
    return [dict(zip(head.split("\t"), r.split("\t"))) for r in rows]


@pytest.mark.parametrize("kind", list(CASES))
def test_quantize_generate_eval(ckpts, quantized, kind):
    path = quantized(kind)
    q, fp = load_model(path, dtype="fp32"), load_model(ckpts(kind), dtype="fp32")
    E, n_moe = 8, 1 if kind == "qwen2_moe" else 2
    shared = 3 if kind == "qwen2_moe" else 0
    dense = 3 if kind == "qwen2_moe" else 0  # Qwen2-MoE's block 0 has the dense MLP
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 2 * 4 + n_moe * (3 * E + shared) + dense
    assert all(not isinstance(b.mlp.router, QuantLinear) for b in q.layers if isinstance(b.mlp, MoE))  # full precision
    rows = [r for r in quant_log(path) if ".experts." in r["module"]]
    assert len(rows) == n_moe * 3 * E
    # natural routing: each block's experts together see top-k x the 4 x 48 calibration tokens (once per gate/up/down)
    for i in [i for i, blk in enumerate(q.layers) if isinstance(blk.mlp, MoE)]:
        blk = [r for r in rows if r["module"].startswith(f"model.layers.{i}.")]
        assert sum(int(r["tokens"]) for r in blk) == 3 * 2 * 4 * T
    tokens = tokens_for(0)
    with torch.inference_mode():
        a, b = q(tokens), fp(tokens)
    assert 0 < ((a - b).norm() / b.norm()).item() < 0.5
    assert (cached_steps(q, tokens, prefill=T - 6) - a).abs().max().item() < 1e-3  # packed decode (fast_decode.CpuMoE)
    new, stats = generate(q, [[5, 6, 7]], max_new_tokens=8)
    assert len(new[0]) == 8 and stats.median_ms > 0
    ppl_q, ppl_fp = perplexity(q, tokens.view(2, 24), False), perplexity(fp, tokens.view(2, 24), False)
    assert abs(ppl_q / ppl_fp - 1) < 0.25
    with pytest.raises(Error, match="a mixture of experts reads its routing back to the host"):
        StaticDecodeStep(q, KVCache(q.cfg, 1, 8, torch.float32, "cpu"), torch.ones(1, 8, dtype=torch.bool))


def test_packed_decode_reads_only_routed_experts(quantized, monkeypatch):
    """A decode step of one token runs exactly the top-k routed experts' packed layers per MoE block, one kernel call
    each for gate+up (fused) and down (fast_decode.CpuMoE); steps, a padded batch and the full forward agree."""
    model = load_model(quantized("qwen3_moe"), dtype="fp32", cpu_kernel="exact")
    owner = {}  # kernel layout -> (block, expert)
    for i, blk in enumerate(model.layers):
        for e, expert in enumerate(blk.mlp.experts):
            assert expert.fused is not None  # gate and up: one packed call
            owner[id(expert.fused.layout)] = owner[id(expert.down._layout)] = (i, e)
    calls, real = [], qlinear.kernel_matmul
    monkeypatch.setattr(qlinear, "kernel_matmul", lambda x2, L, path: calls.append(owner.get(id(L))) or
                        real(x2, L, path))
    tokens = tokens_for(4)
    with torch.inference_mode():
        full = model(tokens)
        cache = KVCache(model.cfg, 1, T, torch.float32, "cpu")
        model(tokens[:, :T - 1], cache, 0)
        calls.clear()
        last = model(tokens[:, T - 1:], cache, T - 1)
    experts = [c for c in calls if c is not None]
    assert len(experts) == 2 * 2 * 2 and len(set(experts)) == 2 * 2  # 2 blocks x top-2 experts x (gate+up, down)
    assert len(calls) - len(experts) == 2 * 2  # attention: fused q/k/v and o per block
    assert (last[0, -1] - full[0, -1]).abs().max().item() < 1e-3
    assert (cached_steps(model, tokens, prefill=20) - full).abs().max().item() < 1e-3
    batch = [tokens[0, :30].tolist(), tokens[0, :12].tolist()]
    together = generate(model, batch, max_new_tokens=6)[0]
    assert together == [generate(model, [b], max_new_tokens=6)[0][0] for b in batch]


def test_starved_expert_is_calibrated_on_all_tokens(ckpts, tmp_path):
    """Expert 3 of every block gets no routed token (its router row is 0 and the others come in +-v pairs, so two
    logits above 0 always win). With the rule (default) its Hessian is from all tokens: logged, finite, close to the
    full-precision weights; with --moe-min-share 0 GPTQ sees an all-zero Hessian and zeroes the expert."""
    src = tmp_path / "starved"
    shutil.copytree(ckpts("qwen3_moe"), src)
    t = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        v = torch.randn(3, 64, generator=g)
        t[f"model.layers.{i}.mlp.gate.weight"] = torch.stack(
            [v[0], -v[0], v[1], torch.zeros(64), -v[1], v[2], -v[2], torch.randn(64, generator=g)])
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    lines = []
    out = quantize_model(src, tmp_path / "q", qcfg=QuantConfig(bits=4, group_size=32), dataset=tokens_for(7, B=4),
                         log=lines.append)
    rows = {r["module"]: r for r in quant_log(out)}
    for i in range(2):
        for p in ("gate_proj", "up_proj", "down_proj"):
            r = rows[f"model.layers.{i}.mlp.experts.3.{p}"]
            assert r["tokens"] == "0" and r["note"] == f"all tokens: 0 routed < {-(-4 * T // 100)}", r
            assert float(r["error"]) > 0
    assert any("layers.1.mlp.experts.3.up_proj: all tokens" in m for m in lines)
    assert all(r["note"] == "" for m, r in rows.items() if ".experts.3." not in m)
    q = load_model(out, dtype="fp32")
    W = q.layers[0].mlp.experts[3].gate.dequantized_weight()
    W0 = t["model.layers.0.mlp.experts.3.gate_proj.weight"]
    assert torch.isfinite(W).all() and ((W - W0).norm() / W0.norm()).item() < 0.2
    bare = quantize_model(src, tmp_path / "bare", qcfg=QuantConfig(bits=4, group_size=32),
                          dataset=tokens_for(7, B=4), log=lambda m: None, moe_min_share=0.0)
    assert load_model(bare, dtype="fp32").layers[0].mlp.experts[3].gate.dequantized_weight().abs().max() == 0


def test_vllm_fused_moe_rules(quantized):
    ckpt = CheckpointReader(quantized("qwen2_moe"))
    layers, fused = layer_facts(ckpt)
    assert not fused and moe_problems(ckpt, layers) == []
    kept = {k: v for k, v in layers.items() if k != "model.layers.1.mlp.experts.5.down_proj"}
    assert "experts.5.down_proj is kept" in moe_problems(ckpt, kept)[0]
    router = dict(layers, **{"model.layers.1.mlp.gate": dict(K=64, trivial=True)})
    assert "router model.layers.1.mlp.gate must stay in full precision" in moe_problems(ckpt, router)[0]


@pytest.mark.parametrize("change,message", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok=9 must lie in [1, num_experts=8]"),
    (dict(mlp_only_layers="0"), "'mlp_only_layers' must be a list"),
    (dict(moe_intermediate_size=0), "'moe_intermediate_size' must be an integer"),
])
def test_config_errors_name_the_value(ckpts, tmp_path, change, message):
    src = ckpts("qwen3_moe")
    shutil.copytree(src, tmp_path / "bad")
    cfg = json.loads((src / "config.json").read_text())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(Error, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_model(tmp_path / "bad")


def test_moe_min_share_is_checked(ckpts, tmp_path):
    with pytest.raises(Error, match=r"--moe-min-share must be a number in \[0, 1\], got 2"):
        quantize_model(ckpts("qwen3_moe"), tmp_path / "q", dataset=tokens_for(0, B=1), moe_min_share=2)


def test_compat_report_says_which_loaders_take_moe(quantized):
    mixtral, qwen = report(quantized("mixtral")), report(quantized("qwen2_moe"))
    assert not mixtral[0].ok and "fused 3-D parameter" in mixtral[0].reasons[0] and not qwen[0].ok
    assert not mixtral[1].ok and "block_sparse_moe" in mixtral[1].reasons[0]
    assert not qwen[1].ok and "mlp_only_layers" in qwen[1].reasons[0]  # its block 0 is dense
    assert mixtral[2].ok and qwen[2].ok  # vLLM's fused-MoE GPTQ path: every expert quantized, routers kept


@pytest.mark.peer
@pytest.mark.skipif(not PEER_PY.exists(), reason="peer venv .venv-peer not installed")
def test_gptq_moe_checkpoints_load_in_gptqmodel(quantized, tmp_path):
    """GPTQModel 7.7 (torch backend, fp16) loads the Qwen3-MoE checkpoint written here and a Mixtral one under
    transformers 5's names, every expert packed, and gives our logits. (transformers 5.23 drops packed experts,
    GPTQModel does not read Mixtral's original names, and its Qwen2-MoE leaves the dense blocks of mlp_only_layers
    unpacked: see the compatibility report.)"""
    from test_interop import check_close, ours, run_peer
    tokens = tokens_for(5)
    torch.save(tokens, tmp_path / "tokens.pt")
    models = {"qwen3_moe": quantized("qwen3_moe"), "mixtral": renamed_mixtral(quantized("mixtral"), tmp_path / "mx")}
    log = run_peer([{"op": "logits", "loader": "gptqmodel", "model": str(m), "tokens": str(tmp_path / "tokens.pt"),
                     "out": str(tmp_path / f"{k}.pt")} for k, m in models.items()], tmp_path)
    loaded = [line for line in log.splitlines() if "packed_layers=" in line]
    assert [int(line.split("packed_layers=")[1].split()[0]) for line in loaded] == [2 * (4 + 3 * 8)] * 2, loaded
    for k, m in models.items():
        check_close(ours(m, tokens), torch.load(tmp_path / f"{k}.pt"), f"{k} in GPTQModel")


def test_gptaq_is_refused_for_moe(ckpts, tmp_path):
    with pytest.raises(Error, match=r"--method gptaq does not support mixtures of experts \(qwen3_moe\)"):
        quantize_model(ckpts("qwen3_moe"), tmp_path / "q", method="gptaq", dataset=tokens_for(0, B=1))


def renamed_mixtral(src, dst):
    """A copy of the Mixtral checkpoint `src` under transformers 5's names (mlp.gate, mlp.experts.{e}.gate_proj ...),
    as GPTQModel 7.7 writes Mixtral checkpoints."""
    shutil.copytree(src, dst)
    t = load_file(dst / "model.safetensors")
    for a, b in [(".block_sparse_moe.gate.", ".mlp.gate."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."),
                 (".w2.", ".down_proj."), (".block_sparse_moe.experts.", ".mlp.experts.")]:
        t = {k.replace(a, b): v for k, v in t.items()}
    save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_mixtral_under_transformers5_names(ckpts, quantized, tmp_path):
    """Mixtral under transformers 5's names loads with the same logits, full precision and GPTQ, and the report says
    GPTQModel takes it."""
    tokens = tokens_for(3)
    for kind, src in (("fp", ckpts("mixtral")), ("gptq", quantized("mixtral"))):
        dst = renamed_mixtral(src, tmp_path / kind)
        with torch.inference_mode():
            assert torch.equal(load_model(src, dtype="fp32")(tokens), load_model(dst, dtype="fp32")(tokens))
    assert report(dst)[1].ok
