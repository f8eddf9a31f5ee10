"""Gemma 2 and Gemma 3 (issue #25): fp32 parity with transformers' Gemma2ForCausalLM, Gemma3ForCausalLM and (its
language model) Gemma3ForConditionalGeneration on random tiny checkpoints that hold every difference from Llama:
(1 + w) norms, four norms per block, embeddings times sqrt(hidden), query_pre_attn_scalar, head_dim != hidden / heads,
one KV head, sliding windows (8) shorter than the sequence alternating with global blocks, Gemma 2's attention and
final soft-caps, Gemma 3's q/k norms and its two RoPE bases (local plain, global linear-scaled).

- full forward and step-by-step decoding with the KV cache within 1e-4, greedy tokens equal to transformers';
- each Gemma feature really changes the logits (the parity could not hold with it ignored);
- quantize -> generate -> eval (library for Gemma 2, the three CLIs for Gemma 3); the C++ attention decode step for
  Gemma 3 and the module path for Gemma 2's soft-capped attention, both equal to the full forward;
- GPTQ checkpoints of both load in transformers (peer venv) with our logits;
- Gemma's chat template: BOS once, <end_of_turn> a stop token, the ids transformers renders;
- bad configs are one-line errors naming the field.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import PEER_PY, ROOT, WIKI_VALID, cached_steps, lazy_checkpoints, random_tokens, save_with_tokenizer
from minigptq import Error, load_model, load_tokenizer
from minigptq.arch.gemma import config_from_hf
from minigptq.checkpoint_reader import CheckpointReader, SafetensorsFile
from minigptq.config import Fields
from minigptq.eval import perplexity
from minigptq.fast_decode import CpuAttention, StaticDecodeStep
from minigptq.generate import generate
from minigptq.kv_cache import KVCache
from minigptq.memory import peak_bytes
from minigptq.qlinear import QuantLinear
from minigptq.quantize import quantize_model
from minigptq.quantizer import QuantConfig

TOL = 1e-4
T = 40  # tokens per test sequence: five sliding windows of 8
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
            head_dim=32, vocab_size=512, sliding_window=8, max_position_embeddings=128, query_pre_attn_scalar=24,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
CASES = {  # kind -> transformers classes and config fields over BASE
    # layer_types left to transformers: its default pattern, sliding / full / sliding
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(attn_logit_softcapping=4.0, final_logit_softcapping=1.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        rope_parameters=GEMMA3_ROPE, layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
}


def _randomize(model):
    """Norm weights away from 0 (Gemma's (1 + w)), larger projections: sharper attention, soft-caps in play."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.3 * torch.randn_like(p))
            elif "proj" in name:
                p.mul_(4)


def make_checkpoint(kind: str, out, seed: int = 0):
    import transformers as tf
    if kind == "gemma3-mm":  # the multimodal class: language_model.model.* tensors, a vision tower beside them
        cfg = tf.Gemma3Config(text_config=dict(BASE, **CASES["gemma3"][2]), mm_tokens_per_image=4,
                              vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=28, patch_size=14))
        cls = tf.Gemma3ForConditionalGeneration
    else:
        cfg_cls, cls, kw = CASES[kind]
        cfg, cls = getattr(tf, cfg_cls)(**BASE, **kw), getattr(tf, cls)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    _randomize(model)
    return save_with_tokenizer(model, out)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """kind -> path of CASES[kind]'s checkpoint (written on first use)."""
    return lazy_checkpoints(tmp_path_factory, "gemma", make_checkpoint)


def hf_model(path):
    import transformers as tf
    cls = tf.Gemma3ForConditionalGeneration if path.name.endswith("-mm") else tf.AutoModelForCausalLM
    # eager: the attention transformers recommends for Gemma (SDPA cannot soft-cap)
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def tokens_for(seed: int, B: int = 1) -> torch.Tensor:
    return random_tokens(seed, B, T)



@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "gemma3-mm"])
def test_forward_decoding_and_greedy_tokens_match_transformers(ckpts, kind):
    path, tokens = ckpts(kind), tokens_for(1)
    ours, hf = load_model(path, dtype="fp32"), hf_model(path)
    with torch.no_grad():
        want = hf(input_ids=tokens).logits
        hf_new = hf.generate(tokens[:, :12], max_new_tokens=10, do_sample=False, min_new_tokens=10)[0, 12:].tolist()
    with torch.inference_mode():
        full = ours(tokens)
    assert (full - want).abs().max().item() < TOL
    assert (cached_steps(ours, tokens) - want).abs().max().item() < TOL
    assert generate(ours, [tokens[0, :12].tolist()], max_new_tokens=10)[0][0] == hf_new


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_static_decode_step_matches(ckpts, kind):
    """The fixed-shape step that CUDA graphs replay (here run eagerly on the CPU): per-layer RoPE tables, the
    window mask over the whole cache and the soft-capped attention give the dynamic steps' logits."""
    model, tokens = load_model(ckpts(kind), dtype="fp32"), tokens_for(2)
    want = cached_steps(model, tokens, prefill=8)[:, 8:]
    cache = KVCache(model.cfg, 1, T, torch.float32, "cpu")
    with torch.inference_mode():
        model(tokens[:, :8], cache, 0)
        step, got = StaticDecodeStep(model, cache, torch.ones(1, T, dtype=torch.bool)), []
        for i in range(8, T):
            step.tokens.copy_(tokens[:, i:i + 1])
            step.slot.fill_(i)
            got.append(step().clone())
    assert (torch.cat(got, dim=1) - want).abs().max().item() < TOL


def test_configs_read_as_transformers_reads_them(ckpts, caplog):
    g2 = CheckpointReader(ckpts("gemma2")).cfg
    assert (g2.window_layers, g2.attn_softcap, g2.final_softcap, g2.rope_local_theta) == ((0, 2), 4.0, 1.0, 0.0)
    assert g2.head_dim == 32 and g2.num_kv_heads == 1 and g2.tie_word_embeddings and g2.attn_scale == 24 ** -0.5
    with caplog.at_level(logging.INFO, logger="minigptq"):
        g3 = CheckpointReader(ckpts("gemma3-mm")).cfg
    assert "vision tower and multimodal projector weights are ignored" in caplog.text
    assert g3 == CheckpointReader(ckpts("gemma3")).cfg
    assert g3.qk_norm and g3.rope_local_theta == 1e4 and g3.rope_theta == 1e6 and g3.rope_scaling.factor == 4.0
    old = {k: v for k, v in json.loads((ckpts("gemma3") / "config.json").read_text()).items()
           if k not in ("rope_parameters", "layer_types")}  # a transformers-4 config: the pattern and three fields
    old.update(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling=dict(rope_type="linear", factor=4.0),
               sliding_window_pattern=2)
    assert config_from_hf(Fields(old)) == g3


@pytest.mark.parametrize("kind,without", [
    ("gemma2", dict(attn_logit_softcapping=None)),
    ("gemma2", dict(final_logit_softcapping=None)),
    ("gemma2", dict(query_pre_attn_scalar=32)),
    ("gemma2", dict(layer_types=["full_attention"] * 3)),
    ("gemma3", dict(rope_parameters=dict(GEMMA3_ROPE, sliding_attention={"rope_type": "default",
                                                                         "rope_theta": 1e6}))),
    ("gemma3", dict(rope_parameters=dict(GEMMA3_ROPE, full_attention={"rope_type": "default", "rope_theta": 1e6}))),
])
def test_each_feature_changes_the_logits(ckpts, tmp_path, kind, without):
    src = ckpts(kind)
    shutil.copytree(src, tmp_path / "off")
    cfg = json.loads((src / "config.json").read_text())
    (tmp_path / "off" / "config.json").write_text(json.dumps({**cfg, **without}))
    tokens = tokens_for(1)
    with torch.inference_mode():
        on, off = load_model(src, dtype="fp32")(tokens), load_model(tmp_path / "off", dtype="fp32")(tokens)
    assert (on - off).abs().max().item() > 100 * TOL


def test_memory_estimate_counts_the_large_vocabulary():
    """Gemma 3 4B's 262k x 2560 tied embedding (fp32 to compute, fp16 to write: 4 GB) outweighs one block and the
    solver together; quantize's up-front memory check counts it."""
    cfg = config_from_hf(Fields(dict(model_type="gemma3_text", hidden_size=2560, intermediate_size=10240,
                                     num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4)))
    need = peak_bytes(SimpleNamespace(cfg=cfg), nsamples=128, seqlen=2048, act_dtype=torch.float32)
    assert need["embeddings"] == 262208 * 2560 * 6 > need["block"] + need["solver"]


@pytest.mark.parametrize("change,message", [
    (dict(layer_types=["sliding_attention", "full_attention"]),
     "'layer_types' must list num_hidden_layers=3 values, each one of full_attention, sliding_attention, got 2"),
    (dict(layer_types=None, sliding_window_pattern=0), "'sliding_window_pattern' must be an integer in [1, 65536]"),
    (dict(attn_logit_softcapping=0), "'attn_logit_softcapping' must be a finite number in (0, inf], got 0"),
    (dict(final_logit_softcapping=-1.0), "'final_logit_softcapping' must be a finite number in (0, inf], got -1.0"),
    (dict(query_pre_attn_scalar=0), "'query_pre_attn_scalar' must be a finite number in (0, inf], got 0"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 0.5}), "'rope_theta' must be a finite number in (1,"),
    (dict(model_type="gemma3_text", rope_parameters=dict(GEMMA3_ROPE, sliding_attention={"rope_type": "linear",
                                                                                         "factor": 2.0})),
     "RoPE scaling 'linear' on the sliding-window layers (rope_parameters sliding_attention) is not supported"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention=true (an encoder"),
    (dict(model_type="gemma3", text_config=[1]), "the field 'text_config' must be an object"),
])
def test_config_errors_name_the_field(ckpts, tmp_path, change, message):
    shutil.copytree(ckpts("gemma2"), tmp_path / "bad")
    cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(Error, match="config.json") as e:
        load_model(tmp_path / "bad")
    assert message in str(e.value) and "\n" not in str(e.value)


# -- quantized --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantized(ckpts, tmp_path_factory):
    """kind -> 4-bit g32 GPTQ checkpoint (Gemma 3 through the quantize CLI, the others through the library)."""
    base, made = tmp_path_factory.mktemp("gemma-q"), {}
    calib = base / "calib.txt"
    calib.write_text(WIKI_VALID.read_text()[:16000])

    def get(kind):
        if kind not in made:
            if kind != "gemma3":
                made[kind] = quantize_model(ckpts(kind), base / kind, qcfg=QuantConfig(bits=4, group_size=32),
                                            dataset=calib, nsamples=4, seqlen=T, log=lambda m: None)
            else:
                r = subprocess.run([sys.executable, "-m", "minigptq.quantize", "--model", str(ckpts(kind)), "--out",
                                    str(base / kind), "--bits", "4", "--groupsize", "32", "--dataset", str(calib),
                                    "--nsamples", "4", "--seqlen", str(T)], capture_output=True, text=True, cwd=ROOT,
                                   timeout=300)
                assert r.returncode == 0, r.stderr[-2000:]
                assert re.search(r"compatibility of .*\n  transformers +yes\n  GPTQModel +yes", r.stderr), r.stderr
                made[kind] = base / kind
        return made[kind]
    return get


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_quantize_generate_eval(ckpts, quantized, kind):
    q, fp = load_model(quantized(kind), dtype="fp32", cpu_kernel="exact"), load_model(ckpts(kind), dtype="fp32")
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 3 * 7
    for block in q.layers:  # the four norms (and q/k norms) stay in full precision
        assert all(p.dtype == torch.float32 for n, p in block.named_parameters() if "norm" in n)
    tokens = tokens_for(0)
    with torch.inference_mode():
        a, b = q(tokens), fp(tokens)
    assert 0 < ((a - b).norm() / b.norm()).item() < 0.5
    new, stats = generate(q, [[5, 6, 7]], max_new_tokens=8)
    assert len(new[0]) == 8 and stats.median_ms > 0
    ppl_q, ppl_fp = perplexity(q, tokens.view(2, 20), False), perplexity(fp, tokens.view(2, 20), False)
    assert abs(ppl_q / ppl_fp - 1) < 0.2
    # decoding: Gemma 3's attention runs the C++ step (scale folded into q, local RoPE table), Gemma 2's soft-capped
    # attention the modules; either way the full forward's logits
    calls = []
    orig = CpuAttention._decode_step
    with pytest.MonkeyPatch.context() as m:
        m.setattr(CpuAttention, "_decode_step", lambda self, *a: calls.append(1) or orig(self, *a))
        steps = cached_steps(q, tokens, prefill=20)
    assert q.decode_plans() is None and bool(calls) == (kind == "gemma3")
    with torch.inference_mode():
        assert (steps - q(tokens)).abs().max().item() < 1e-3
        # the 8-bit head (RTN) on the tied embedding, the table in bf16, then the embedding scale and the soft-cap
        int8 = load_model(quantized(kind), dtype="fp32", head_dtype="int8", cpu_kernel="exact")
        assert isinstance(int8.lm_head, QuantLinear) and int8.embed.weight.dtype == torch.bfloat16
        a8 = int8(tokens)
    assert ((a8 - a).norm() / a.norm()).item() < 0.02 and (a8.argmax(-1) == a.argmax(-1)).float().mean() > 0.9


def test_quantized_multimodal_gemma3_keeps_its_vision_tower(ckpts, quantized):
    """The language model is quantized; the vision tower and projector are copied as they are (transformers loads the
    result as Gemma3ForConditionalGeneration: the peer test below), and the tied head is not written."""
    src, out = SafetensorsFile(ckpts("gemma3-mm") / "model.safetensors"), quantized("gemma3-mm")
    got = SafetensorsFile(out / "model.safetensors")
    vision = [n for n in src.keys() if n.startswith(("vision_tower.", "multi_modal_projector."))]
    assert vision and all(torch.equal(got.get(n), src.get(n).half()) for n in vision)
    assert not [n for n in got.keys() if "lm_head" in n]
    assert sum(n.endswith(".qweight") for n in got.keys()) == 21
    with torch.inference_mode():
        a, b = load_model(out, dtype="fp32")(tokens_for(0)), load_model(ckpts("gemma3-mm"), dtype="fp32")(tokens_for(0))
    # 4 bits on 4 windows over random weights: 0.56 measured (unrelated logits would be ~1.4)
    assert 0 < ((a - b).norm() / b.norm()).item() < 0.75


def test_cli_generate_and_eval_on_quantized_gemma3(quantized):
    q = quantized("gemma3")
    g = subprocess.run([sys.executable, "-m", "minigptq.generate", "--model", str(q), "--prompt", "Once upon a time",
                        "--max-new-tokens", "6"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert g.returncode == 0 and g.stdout.startswith("Once upon a time"), g.stderr[-2000:]
    e = subprocess.run([sys.executable, "-m", "minigptq.eval", "--model", str(q), "--dataset", str(WIKI_VALID),
                        "--max-windows", "2", "--seqlen", "32"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert e.returncode == 0 and e.stdout.startswith("perplexity "), e.stderr[-2000:]


@pytest.mark.peer
@pytest.mark.skipif(not PEER_PY.exists(), reason="peer venv .venv-peer not installed")
def test_gptq_checkpoints_load_in_transformers_and_gptqmodel(quantized, tmp_path):
    from test_interop import check_close, ours, run_peer
    tokens = tokens_for(5)
    torch.save(tokens, tmp_path / "tokens.pt")
    jobs = [(k, loader) for loader in ("transformers", "gptqmodel") for k in ("gemma2", "gemma3")]
    jobs.append(("gemma3-mm", "transformers"))  # Gemma3ForConditionalGeneration, its vision tower as copied
    log = run_peer([{"op": "logits", "loader": loader, "model": str(quantized(k)),
                     "tokens": str(tmp_path / "tokens.pt"), "out": str(tmp_path / f"{k}-{loader}.pt")}
                    for k, loader in jobs], tmp_path)
    loaded = [line for line in log.splitlines() if "packed_layers=" in line]
    assert [int(line.split("packed_layers=")[1].split()[0]) for line in loaded] == [21] * 5, loaded
    for k, loader in jobs:
        check_close(ours(quantized(k), tokens), torch.load(tmp_path / f"{k}-{loader}.pt"), f"{k} in {loader}")


# -- tokenizer and chat template ---------------------------------------------------------------------------------------

GEMMA_TEMPLATE = (  # Gemma 2's chat template, as its tokenizer_config.json holds it
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")


def gemma_tokenizer(folder):
    """A word-level tokenizer.json with Gemma's special tokens and ids (<pad> 0, <eos> 1, <bos> 2), its BOS added by
    the post-processor as Gemma's is, and Gemma's chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    words = specials + ["user", "model", "hello", "there", "how", "are", "you", "?", "\n"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.WhitespaceSplit()])
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", add_bos_token=True,
        chat_template=GEMMA_TEMPLATE, tokenizer_class="GemmaTokenizer")))
    (folder / "config.json").write_text(json.dumps(dict(model_type="gemma2", bos_token_id=2, eos_token_id=1,
                                                        pad_token_id=0)))
    return folder


def test_gemma_chat_template_bos_once_and_end_of_turn_stops(tmp_path):
    import transformers as tf
    folder = gemma_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(folder)
    chat = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "how are you ?"},
            {"role": "user", "content": "hello"}]
    ids = tok.apply_chat_template(chat)
    ref = tf.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<bos>",
                                     eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    ref.chat_template = GEMMA_TEMPLATE
    want = ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert ids == list(want) and ids[0] == 2 and ids.count(2) == 1 and 3 not in ids  # <bos> once, nothing unknown
    assert tok.encode("hello there") == [2, 8, 9]  # plain prompts: BOS from the post-processor, once
    assert tok.eos_ids == (1, 5)  # <eos>, then <end_of_turn>: the template's turn end stops a reply
